"""The client side of an SMTP session up to the backend login (spec 2.3, 9), sans-IO.

``SmtpMachine`` takes the client's bytes and answers with actions (``common.Send``, ``Close``, ``Log``,
``StartTLS``, ``Authenticate``); it owns no socket and no clock. The greeting delay and the deadlines are
the session's: it calls ``greeting()`` when the delay is over and ``early_input()`` for bytes that came
before it.

Lines are cut at LF, parsed whole, and executed one at a time. Unlike nginx 1.22 the buffer is compacted
after every line (spec 9.13), so "too long command" only means one line did not fit in
``smtp_client_buffer``.
"""

import re
from dataclasses import dataclass

from mailproxy.log import escape_bytes
from mailproxy.protocol import sasl
from mailproxy.protocol.common import (EXCHANGE_STATES, RESPONSE, RESPONSE_STATES, AuthAttempt, Authenticate,
                                       LineMachine, Log, Machine, Send, ServerConfig, State, auth_server_text,
                                       redact_command, responses, too_long)

CRLF = b"\r\n"
SP, CR, LF = 0x20, 0x0D, 0x0A

INVALID = b"500 5.5.1 Invalid command\r\n"
INVALID_ARGUMENT = b"501 5.5.4 Invalid argument\r\n"
BAD_SEQUENCE = b"503 5.5.1 Bad sequence of commands\r\n"
AUTH_REQUIRED = b"530 5.7.1 Authentication required\r\n"
OK = b"250 2.0.0 OK\r\n"
BYE = b"221 2.0.0 Bye\r\n"
START_TLS = b"220 2.0.0 Start TLS\r\n"
INTERNAL_ERROR = b"451 4.3.2 Internal server error\r\n"
AUTH_OK = b"235 2.0.0 OK\r\n"  # sent by the session after the backend login (spec 4.4)

# Arguments a command may carry before its line becomes a parse error (nginx's limit of 11).
MAX_ARGUMENTS = 11
COMMANDS = frozenset(
    (b"HELO", b"EHLO", b"QUIT", b"AUTH", b"NOOP", b"MAIL", b"RSET", b"RCPT", b"VRFY", b"EXPN", b"HELP",
     b"STARTTLS")
)
# Methods that must be enabled in smtp_auth to be accepted; PLAIN and LOGIN always are (spec 8.2).
GATED_METHODS = frozenset(("cram-md5", "external", "xoauth2", "oauthbearer"))
_LETTERS = re.compile(rb"[A-Za-z]*")
# Client bytes that must never reach an auth request header or a backend command (header injection).
# One search, not `in` a byte: for bytes, `in` first tries its operand as an int and costs an exception.
_UNSAFE = re.compile(rb"[\0\r\n]")


@dataclass(frozen=True, kw_only=True)
class SmtpConfig(ServerConfig):
    """Everything an SMTP session needs from its ``server {}``, wire bytes prepared once."""

    greeting_delay: float = 0.0
    helo: bytes
    ehlo_plain: bytes  # EHLO reply on a connection without TLS (starttls variants applied)
    ehlo_tls: bytes  # EHLO reply once TLS is up
    auth_ok: bytes = AUTH_OK
    pipelining_rejected: bytes = b"503 5.5.0 Improper use of SMTP command pipelining\r\n"
    invalid: bytes = INVALID

    @classmethod
    def from_server(cls, server) -> "SmtpConfig":
        return cls.build(
            server.server_name, server.smtp_auth, server.smtp_capabilities, server.starttls,
            server.smtp_client_buffer, server.max_errors, server.max_commands, server.smtp_greeting_delay,
        )

    @classmethod
    def build(cls, server_name="localhost", auth_methods=frozenset(("plain", "login")), capabilities=(),
              starttls="off", client_buffer=4096, max_errors=5, max_commands=1000, greeting_delay=0.0):
        name = server_name.encode()
        base = [name] + [cap.encode() for cap in capabilities]
        advertised = [sasl.MECHANISM_NAMES[m] for m in sasl.ADVERTISED_ORDER if m in auth_methods]
        with_auth = base + ([("AUTH " + " ".join(advertised)).encode()] if advertised else [])
        # Without TLS the STARTTLS variants apply; "only" hides AUTH until TLS is up (spec 2.3.4).
        plain = {"on": with_auth + [b"STARTTLS"], "only": base + [b"STARTTLS"]}.get(starttls, with_auth)
        return cls(
            server_name=server_name, auth_methods=frozenset(auth_methods), starttls=starttls,
            client_buffer=client_buffer, max_errors=max_errors, max_commands=max_commands,
            greeting_delay=greeting_delay, greeting=b"220 " + name + b" ESMTP ready\r\n",
            helo=b"250 " + name + CRLF, ehlo_plain=_multiline(plain), ehlo_tls=_multiline(with_auth),
            internal_error=INTERNAL_ERROR, ssl_cert_error=b"421 4.7.1 SSL certificate error\r\n",
            ssl_no_cert=b"421 4.7.1 No required SSL certificate\r\n",
        )


def _multiline(lines) -> bytes:
    return b"".join(b"250-" + line + CRLF for line in lines[:-1]) + b"250 " + lines[-1] + CRLF


def _scan_arguments(line: bytes, pos: int, in_argument: bool):
    """Split the rest of a line into arguments as nginx does; None = parse error.

    Returns (arguments, offset just past the last argument). Runs of spaces separate arguments, a CR is
    only allowed right before the final LF, and an argument takes any other byte (NUL included: what to
    do with those is the handlers' business). ``in_argument``: the first argument starts at ``pos`` even
    when it is empty (a SASL response line). One split for the line, not a Python step a byte (an AUTH
    PLAIN line cost 21,000 instructions so; callgrind).
    """
    end = len(line) - 1  # the LF
    cr = line.find(b"\r", pos, end)
    if cr >= 0:
        if cr != end - 1:
            return None
        end = cr
    rest = line[pos:end]
    words = rest.split(b" ")
    args = [word for word in words if word]
    if in_argument and not words[0]:
        args.insert(0, b"")
    if len(args) > MAX_ARGUMENTS:
        return None
    return args, pos + len(rest.rstrip(b" "))


def parse_command(line: bytes):
    """(VERB, arguments, raw text up to the last argument) for one line ending in LF, or None."""
    length = _LETTERS.match(line).end()
    verb = line[:length].upper()
    if verb not in COMMANDS or line[length] not in (SP, CR, LF):
        return None
    scanned = _scan_arguments(line, length, False)
    return None if scanned is None else (verb, scanned[0], line[: scanned[1]])


def parse_response(line: bytes):
    """The space-separated tokens of a SASL continuation line (at least one, maybe empty), or None."""
    scanned = _scan_arguments(line, 0, True)
    return None if scanned is None else scanned[0]


class SmtpMachine(LineMachine):
    """One client's SMTP conversation up to the backend login.

    ``state`` (a ``common.State``) and ``tls`` are public for the session and tests; the rest is internal.
    """

    __slots__ = ("helo", "esmtp", "mail_from", "rcpt_to", "_command_text", "_command_line")

    _CHALLENGE_PREFIX = b"334 "
    _INVALID = INVALID

    def __init__(self, config: SmtpConfig, tls: bool = False):
        LineMachine.__init__(self, config, tls)
        self.helo = b""
        self.esmtp = False
        self.mail_from = b""
        self.rcpt_to = b""
        # The command being handled as the client wrote it, up to its last argument and whole: MAIL and
        # RCPT hand on the first (Auth-SMTP-From/To), a refused MAIL logs the second (nginx's s->cmd).
        self._command_text = self._command_line = b""

    def early_input(self, data: bytes):
        """Bytes that arrived before the delayed greeting: nginx refuses such a client (spec 2.3.2)."""
        shown = b"".join(_redact_line(line) for line in data.splitlines(keepends=True))
        shown = shown.replace(b"\r", b"_").replace(b"\n", b"_")
        log = Log("info", 'client was rejected before greeting: "%s"' % escape_bytes(shown))
        return [log, Send(self.config.pipelining_rejected)] + self._close()

    # -- reading ----------------------------------------------------------------------------------

    def _parse(self, line: bytes):
        if self.state in RESPONSE_STATES:
            tokens = parse_response(line)
            return None if tokens is None else (RESPONSE, tokens)
        parsed = parse_command(line)
        if parsed is None:
            return None
        verb, args, self._command_text = parsed
        self._command_line = line
        return verb, args

    def _too_long(self, buffer: bytes):
        if self.state in RESPONSE_STATES:
            # A continuation line is SASL data: log it as the AUTH exchange it belongs to, redacted.
            buffer = b"AUTH " + buffer
        return self._fatal(too_long(buffer))

    def _failure_reply(self, text: bytes, error_code) -> bytes:
        return (auth_server_text(error_code) if error_code else b"535 5.7.0") + b" " + text + CRLF

    def _authenticate(self, method: str, login: bytes, password: bytes):
        self.attempts += 1
        self._method = method
        if method != "none":  # SMTP's relay without AUTH names no login and leaves nginx's as it was
            self.login = login
        self.state = State.AUTHENTICATING
        # Auth-SMTP-From/To belong to method none only (spec 3.2).
        envelope = (self.mail_from, self.rcpt_to) if method == "none" else (b"", b"")
        salt = self._salt if method == "cram-md5" else None
        # Positional (keywords to a class call are packed into a dict); no IMAP tag.
        request = AuthAttempt(method, login, password, self.attempts, salt, b"", self.helo, self.esmtp,
                              envelope[0], envelope[1])
        return [Authenticate(request)]

    # -- commands (spec 2.3.3) -------------------------------------------------------------------

    def _helo(self, args):
        if not self._introduce(args):
            return [Send(INVALID_ARGUMENT)]
        return [Send(self.config.helo)]

    def _ehlo(self, args):
        if not self._introduce(args):
            return [Send(INVALID_ARGUMENT)]
        self.esmtp = True
        return [Send(self.config.ehlo_tls if self.tls else self.config.ehlo_plain)]

    def _introduce(self, args) -> bool:
        # The name goes into Auth-SMTP-Helo and the backend's HELO: nothing that could end a line there.
        if len(args) != 1 or _unsafe(args[0]):
            return False
        self.helo = args[0]
        self.mail_from = self.rcpt_to = b""
        return True

    def _noop(self, args):
        return [Send(OK)]

    def _rset(self, args):
        self.mail_from = self.rcpt_to = b""
        return [Send(OK)]

    def _quit(self, args):
        return [Send(BYE)] + self._close()

    def _starttls(self, args):
        if self.tls or self.config.starttls == "off":
            return [Send(INVALID)]
        self.helo = self.mail_from = self.rcpt_to = b""
        return self._begin_tls(START_TLS)

    def _mail(self, args):
        if "none" not in self.config.auth_methods:
            shown = self._command_line.replace(b"\r", b"_").replace(b"\n", b"_")
            return [
                Log("info", 'client was rejected: "%s"' % escape_bytes(shown)),
                Send(AUTH_REQUIRED),
            ]
        if self.mail_from:
            return [Send(BAD_SEQUENCE)]
        if not args or _unsafe(self._command_text):
            return [Send(INVALID_ARGUMENT)]
        self.mail_from = self._command_text
        return [Send(OK)]

    def _rcpt(self, args):
        if not self.mail_from:
            return [Send(BAD_SEQUENCE)]
        if not args or _unsafe(self._command_text):
            return [Send(INVALID_ARGUMENT)]
        self.rcpt_to = self._command_text
        return self._authenticate("none", b"", b"")

    def _auth(self, args):
        if self.config.starttls == "only" and not self.tls:
            return [Send(INVALID)]
        if not args:
            return [Send(INVALID_ARGUMENT)]
        method = sasl.mechanism(args[0])
        initial = args[1:]
        if (
            method is None
            or (method in GATED_METHODS and method not in self.config.auth_methods)
            or len(initial) > (0 if method == "cram-md5" else 1)
        ):
            return [Send(INVALID)]
        if not initial:
            return self._start_exchange(method)
        # The initial response is handled as the first continuation line.
        self.state = EXCHANGE_STATES[method]
        return self._respond(initial)

    # VRFY, EXPN and HELP parse but are never served: the invalid reply, as for any verb without an entry.
    TRANSITIONS = {
        (State.START, b"HELO"): _helo,
        (State.START, b"EHLO"): _ehlo,
        (State.START, b"NOOP"): _noop,
        (State.START, b"RSET"): _rset,
        (State.START, b"QUIT"): _quit,
        (State.START, b"STARTTLS"): _starttls,
        (State.START, b"MAIL"): _mail,
        (State.START, b"RCPT"): _rcpt,
        (State.START, b"AUTH"): _auth,
        **responses(Machine._respond),
    }


def _redact_line(line: bytes) -> bytes:
    content = line.rstrip(b"\r\n")
    return redact_command(content) + line[len(content):]


def _unsafe(value: bytes) -> bool:
    return _UNSAFE.search(value) is not None
