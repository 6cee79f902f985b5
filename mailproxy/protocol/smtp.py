"""The client side of an SMTP session up to the backend login (spec 2.3, 9), sans-IO.

``SmtpMachine`` takes the client's bytes and answers with actions (``common.Send``, ``Close``, ``Log``,
``StartTLS``, ``Authenticate``); it owns no socket and no clock. The greeting delay and the deadlines are
the session's: it calls ``greeting()`` when the delay is over and ``early_input()`` for bytes that came
before it.

Lines are cut at LF, parsed whole, and executed one at a time. Unlike nginx 1.22 the buffer is compacted
after every line (spec 9.13), so "too long command" only means one line did not fit in
``smtp_client_buffer``.
"""

import enum
from dataclasses import dataclass

from mailproxy.protocol import sasl
from mailproxy.protocol.common import (TOO_MANY_COMMANDS, TOO_MANY_INVALID, AuthAttempt, Authenticate, Close,
                                       Log, Send, StartTLS, auth_server_text, escape_for_log, login_failed,
                                       redact_command, too_long)

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
EMPTY_CHALLENGE = b"334 \r\n"
USERNAME_CHALLENGE = b"334 " + sasl.USERNAME_PROMPT + CRLF
PASSWORD_CHALLENGE = b"334 " + sasl.PASSWORD_PROMPT + CRLF

# Arguments a command may carry before its line becomes a parse error (nginx's limit of 11).
MAX_ARGUMENTS = 11
COMMANDS = frozenset(
    (b"HELO", b"EHLO", b"QUIT", b"AUTH", b"NOOP", b"MAIL", b"RSET", b"RCPT", b"VRFY", b"EXPN", b"HELP",
     b"STARTTLS")
)
RESPONSE = b""  # the "command" of a SASL continuation line in the transition table

OAUTH_METHODS = ("xoauth2", "oauthbearer")
# Methods that must be enabled in smtp_auth to be accepted; PLAIN and LOGIN always are (spec 8.2).
GATED_METHODS = frozenset(("cram-md5", "external", "xoauth2", "oauthbearer"))
# Client bytes that must never reach an auth request header or a backend command (header injection).
_UNSAFE = (b"\0", b"\r", b"\n")


class State(enum.Enum):
    START = "start"
    AUTH_PLAIN = "auth plain"
    AUTH_LOGIN_USERNAME = "auth login username"
    AUTH_LOGIN_PASSWORD = "auth login password"
    AUTH_CRAM_MD5 = "auth cram-md5"
    AUTH_EXTERNAL = "auth external"
    AUTH_XOAUTH2 = "auth xoauth2"
    AUTH_OAUTHBEARER = "auth oauthbearer"
    AUTH_ERROR_SASL = "auth error sasl"  # waiting for the dummy response to an Auth-Error-SASL challenge
    AUTHENTICATING = "authenticating"  # the session is asking the auth server
    STARTING_TLS = "starting tls"
    CLOSED = "closed"


# States in which buffered lines are read and executed.
READING = frozenset(State) - {State.AUTHENTICATING, State.STARTING_TLS, State.CLOSED}


@dataclass(frozen=True)
class SmtpConfig:
    """Everything an SMTP session needs from its ``server {}``, wire bytes prepared once."""

    server_name: str
    auth_methods: frozenset
    starttls: str  # "off" | "on" | "only"
    client_buffer: int
    max_errors: int
    max_commands: int
    greeting_delay: float
    greeting: bytes
    helo: bytes
    ehlo_plain: bytes  # EHLO reply on a connection without TLS (starttls variants applied)
    ehlo_tls: bytes  # EHLO reply once TLS is up
    auth_ok: bytes = AUTH_OK
    internal_error: bytes = INTERNAL_ERROR
    pipelining_rejected: bytes = b"503 5.5.0 Improper use of SMTP command pipelining\r\n"
    ssl_cert_error: bytes = b"421 4.7.1 SSL certificate error\r\n"
    ssl_no_cert: bytes = b"421 4.7.1 No required SSL certificate\r\n"
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
            server_name, frozenset(auth_methods), starttls, client_buffer, max_errors, max_commands,
            greeting_delay, greeting=b"220 " + name + b" ESMTP ready\r\n", helo=b"250 " + name + CRLF,
            ehlo_plain=_multiline(plain), ehlo_tls=_multiline(with_auth),
        )


def _multiline(lines) -> bytes:
    return b"".join(b"250-" + line + CRLF for line in lines[:-1]) + b"250 " + lines[-1] + CRLF


def _scan_arguments(line: bytes, pos: int, in_argument: bool):
    """Split the rest of a line into arguments as nginx does; None = parse error.

    Returns (arguments, offset just past the last argument). Runs of spaces separate arguments, a CR is
    only allowed right before the final LF, and an argument takes any other byte (NUL included: what to
    do with those is the handlers' business).
    """
    args = []
    start = last_end = pos
    end = len(line) - 1  # the LF
    while pos < end:
        byte = line[pos]
        if in_argument:
            if byte == SP or byte == CR:
                args.append(line[start:pos])
                last_end = pos
                in_argument = False
                if byte == CR:
                    return (args, last_end) if pos + 1 == end else None
        elif byte == CR:
            return (args, last_end) if pos + 1 == end else None
        elif byte != SP:
            if len(args) >= MAX_ARGUMENTS:
                return None
            start = pos
            in_argument = True
        pos += 1
    if in_argument:
        args.append(line[start:end])
        last_end = end
    return args, last_end


def parse_command(line: bytes):
    """(VERB, arguments, raw text up to the last argument) for one line ending in LF, or None."""
    length = 0
    while 0x41 <= line[length] <= 0x5A or 0x61 <= line[length] <= 0x7A:
        length += 1
    verb = line[:length].upper()
    if verb not in COMMANDS or line[length] not in (SP, CR, LF):
        return None
    scanned = _scan_arguments(line, length, False)
    return None if scanned is None else (verb, scanned[0], line[: scanned[1]])


def parse_response(line: bytes):
    """The space-separated tokens of a SASL continuation line (at least one, maybe empty), or None."""
    scanned = _scan_arguments(line, 0, True)
    return None if scanned is None else scanned[0]


class SmtpMachine:
    """One client's SMTP conversation up to the backend login.

    ``state`` (a ``State``) and ``tls`` are public for the session and tests; the rest is internal.
    """

    def __init__(self, config: SmtpConfig, tls: bool = False):
        self.config = config
        self.tls = tls
        self.state = State.START
        self._buffer = bytearray()
        self._scanned = 0  # bytes of the buffer already searched for LF
        self._errors = 0
        self._commands = 0
        self._attempts = 0
        self._salt = None
        self._cram_challenge = None
        self._method = None  # of the attempt in flight, for Auth-Error-SASL
        self._pending_failure = None  # (reply, wait) behind an Auth-Error-SASL challenge
        self._login = b""  # AUTH LOGIN's user name while the password is asked for
        self.helo = b""
        self.esmtp = False
        self.mail_from = b""
        self.rcpt_to = b""

    # -- the session's side ---------------------------------------------------------------------

    def greeting(self):
        return [Send(self.config.greeting)]

    def early_input(self, data: bytes):
        """Bytes that arrived before the delayed greeting: nginx refuses such a client (spec 2.3.2)."""
        shown = b"".join(_redact_line(line) for line in data.splitlines(keepends=True))
        shown = shown.replace(b"\r", b"_").replace(b"\n", b"_")
        self._buffer.clear()
        self.state = State.CLOSED
        return [
            Log("info", 'client was rejected before greeting: "%s"' % escape_for_log(shown)),
            Send(self.config.pipelining_rejected),
            Close(),
        ]

    def receive_data(self, data: bytes):
        if self.state is State.CLOSED:
            return []
        if not data:
            return self._close()
        if self.state is State.STARTING_TLS:
            # Plain-text bytes behind STARTTLS must not survive into the TLS session (spec 2.0.11).
            return []
        self._buffer += data
        if self.state not in READING:
            return []
        return self._process()

    def auth_failed(self, text, wait: bool, error_code=None, sasl_error=None):
        """The auth server refused the attempt (spec 3.4, 9.6)."""
        if self.state is State.CLOSED:
            return []
        if self.state is not State.AUTHENTICATING:
            raise RuntimeError("auth_failed() without an authentication in flight")
        text = auth_server_text(text)
        code = auth_server_text(error_code) if error_code else b"535 5.7.0"
        actions = [login_failed(text)]
        reply = code + b" " + text + CRLF
        if sasl_error is not None and self._method in OAUTH_METHODS:
            # The client must answer the mechanism's error challenge before it learns the verdict.
            actions.append(Send(b"334 " + auth_server_text(sasl_error) + CRLF))
            self._pending_failure = (reply, wait)
            self.state = State.AUTH_ERROR_SASL
            return actions + self._process()
        actions.append(Send(reply))
        if not wait:
            return actions + self._close()
        self._to_start()
        return actions + self._process()

    def tls_established(self):
        if self.state is not State.STARTING_TLS:
            raise RuntimeError("tls_established() without STARTTLS")
        self.tls = True
        self._to_start()
        return []

    def trailing_data(self) -> bytes:
        """Client bytes buffered behind the line that logged in, for the relay."""
        return bytes(self._buffer)

    # -- reading ----------------------------------------------------------------------------------

    def _process(self):
        actions = []
        size = self.config.client_buffer
        while self.state in READING:
            end = self._buffer.find(b"\n", self._scanned, size)
            if end < 0:
                if len(self._buffer) >= size:
                    actions += self._too_long(bytes(self._buffer[:size]))
                else:
                    self._scanned = len(self._buffer)
                break
            line = bytes(self._buffer[: end + 1])
            del self._buffer[: end + 1]
            self._scanned = 0
            actions += self._line(line)
        return actions

    def _line(self, line: bytes):
        if self.state is State.START:
            parsed = parse_command(line)
            if parsed is None:
                return self._parse_error()
            verb, args, raw = parsed
        else:
            args = parse_response(line)
            if args is None:
                return self._parse_error()
            verb, raw = RESPONSE, line
        self._commands += 1
        if self._commands > self.config.max_commands:
            return self._fatal(TOO_MANY_COMMANDS)
        handler = _TRANSITIONS.get((self.state, verb))
        if handler is None:
            return self._reject()
        try:
            return handler(self, args, raw, line)
        except sasl.SaslError as err:
            return [Log("info", str(err))] + self._reject()

    def _too_long(self, buffer: bytes):
        if self.state is not State.START:
            # A continuation line is SASL data: log it as the AUTH exchange it belongs to, redacted.
            buffer = b"AUTH " + buffer
        return self._fatal(too_long(buffer))

    def _parse_error(self):
        self._errors += 1
        if self._errors >= self.config.max_errors:
            return self._fatal(TOO_MANY_INVALID)
        if self.state is State.AUTH_ERROR_SASL and not self._pending_failure[1]:
            # The refused login was final; an unreadable dummy response does not reopen the session.
            return [Send(INVALID)] + self._close()
        self._to_start()
        return [Send(INVALID)]

    def _reject(self):
        """A line that parsed but may not run here: the invalid reply, not counted (spec 2.0.5)."""
        if self.state is State.AUTH_ERROR_SASL:
            return self._settle_failure(INVALID)
        self._to_start()
        return [Send(INVALID)]

    def _fatal(self, message: str):
        return [Log("info", message), Send(INVALID)] + self._close()

    def _close(self):
        self.state = State.CLOSED
        self._buffer.clear()
        self._scanned = 0
        return [Close()]

    def _to_start(self):
        self.state = State.START
        self._method = None
        self._pending_failure = None
        self._login = b""

    def _authenticate(self, method: str, login: bytes, password: bytes, salt=None):
        self._attempts += 1
        self._method = method
        self.state = State.AUTHENTICATING
        # Auth-SMTP-From/To belong to method none only (spec 3.2).
        envelope = (self.mail_from, self.rcpt_to) if method == "none" else (b"", b"")
        request = AuthAttempt(method, login, password, self._attempts, salt, helo=self.helo, esmtp=self.esmtp,
                              mail_from=envelope[0], rcpt_to=envelope[1])
        return [Authenticate(request)]

    # -- commands (spec 2.3.3) -------------------------------------------------------------------

    def _helo(self, args, raw, line):
        if not self._introduce(args):
            return [Send(INVALID_ARGUMENT)]
        return [Send(self.config.helo)]

    def _ehlo(self, args, raw, line):
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

    def _noop(self, args, raw, line):
        return [Send(OK)]

    def _rset(self, args, raw, line):
        self.mail_from = self.rcpt_to = b""
        return [Send(OK)]

    def _quit(self, args, raw, line):
        return [Send(BYE)] + self._close()

    def _starttls(self, args, raw, line):
        if self.tls or self.config.starttls == "off":
            return [Send(INVALID)]
        self.helo = self.mail_from = self.rcpt_to = b""
        self.state = State.STARTING_TLS
        self._buffer.clear()
        self._scanned = 0
        return [Send(START_TLS), StartTLS()]

    def _mail(self, args, raw, line):
        if "none" not in self.config.auth_methods:
            shown = line.replace(b"\r", b"_").replace(b"\n", b"_")
            return [
                Log("info", 'client was rejected: "%s"' % escape_for_log(shown)),
                Send(AUTH_REQUIRED),
            ]
        if self.mail_from:
            return [Send(BAD_SEQUENCE)]
        if not args or _unsafe(raw):
            return [Send(INVALID_ARGUMENT)]
        self.mail_from = raw
        return [Send(OK)]

    def _rcpt(self, args, raw, line):
        if not self.mail_from:
            return [Send(BAD_SEQUENCE)]
        if not args or _unsafe(raw):
            return [Send(INVALID_ARGUMENT)]
        self.rcpt_to = raw
        return self._authenticate("none", b"", b"")

    def _auth(self, args, raw, line):
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
        if initial:
            return _FIRST_RESPONSE[method](self, initial, raw, line)
        if method == "cram-md5":
            if self._salt is None:
                self._salt = sasl.make_salt(self.config.server_name)
                self._cram_challenge = b"334 " + sasl.cram_md5_challenge(self._salt) + CRLF
            self.state = State.AUTH_CRAM_MD5
            return [Send(self._cram_challenge)]
        self.state, challenge = _FIRST_STEP[method]
        return [Send(challenge)]

    # -- SASL responses (spec 2.0.8, 9.3, 9.4) ---------------------------------------------------

    def _plain_response(self, tokens, raw, line):
        login, password = sasl.parse_plain(sasl.decode_base64(tokens[0], "plain"))
        return self._authenticate("plain", login, password)

    def _login_username(self, tokens, raw, line):
        self._login = sasl.decode_base64(tokens[0], "login")
        self.state = State.AUTH_LOGIN_PASSWORD
        return [Send(PASSWORD_CHALLENGE)]

    def _login_password(self, tokens, raw, line):
        password = sasl.decode_base64(tokens[0], "login")
        return self._authenticate("plain", self._login, password)

    def _cram_md5_response(self, tokens, raw, line):
        login, digest = sasl.parse_cram_md5(sasl.decode_base64(tokens[0], "cram-md5"))
        return self._authenticate("cram-md5", login, digest, salt=self._salt)

    def _external_response(self, tokens, raw, line):
        return self._authenticate("external", sasl.decode_base64(tokens[0], "external"), b"")

    def _xoauth2_response(self, tokens, raw, line):
        login, token = sasl.parse_xoauth2(sasl.decode_base64(tokens[0], "xoauth2"))
        return self._authenticate("xoauth2", login, token)

    def _oauthbearer_response(self, tokens, raw, line):
        login, token = sasl.parse_oauthbearer(sasl.decode_base64(tokens[0], "oauthbearer"))
        return self._authenticate("oauthbearer", login, token)

    def _error_sasl_response(self, tokens, raw, line):
        # The dummy response RFC 7628 asks for: an empty line (XOAUTH2) or "AQ==" (OAUTHBEARER).
        token = tokens[0]
        if len(tokens) == 1 and (token == b"" if self._method == "xoauth2" else token[:4] == b"AQ=="):
            return self._settle_failure(self._pending_failure[0])
        return self._settle_failure(INVALID)

    def _settle_failure(self, reply: bytes):
        wait = self._pending_failure[1]
        if not wait:
            return [Send(reply)] + self._close()
        self._to_start()
        return [Send(reply)]


def _redact_line(line: bytes) -> bytes:
    content = line.rstrip(b"\r\n")
    return redact_command(content) + line[len(content):]


def _unsafe(value: bytes) -> bool:
    return any(byte in value for byte in _UNSAFE)


_START = State.START
_TRANSITIONS = {
    (_START, b"HELO"): SmtpMachine._helo,
    (_START, b"EHLO"): SmtpMachine._ehlo,
    (_START, b"NOOP"): SmtpMachine._noop,
    (_START, b"RSET"): SmtpMachine._rset,
    (_START, b"QUIT"): SmtpMachine._quit,
    (_START, b"STARTTLS"): SmtpMachine._starttls,
    (_START, b"MAIL"): SmtpMachine._mail,
    (_START, b"RCPT"): SmtpMachine._rcpt,
    (_START, b"AUTH"): SmtpMachine._auth,
    # VRFY, EXPN and HELP parse but are never served: no entry, so the invalid reply, not counted.
    (State.AUTH_PLAIN, RESPONSE): SmtpMachine._plain_response,
    (State.AUTH_LOGIN_USERNAME, RESPONSE): SmtpMachine._login_username,
    (State.AUTH_LOGIN_PASSWORD, RESPONSE): SmtpMachine._login_password,
    (State.AUTH_CRAM_MD5, RESPONSE): SmtpMachine._cram_md5_response,
    (State.AUTH_EXTERNAL, RESPONSE): SmtpMachine._external_response,
    (State.AUTH_XOAUTH2, RESPONSE): SmtpMachine._xoauth2_response,
    (State.AUTH_OAUTHBEARER, RESPONSE): SmtpMachine._oauthbearer_response,
    (State.AUTH_ERROR_SASL, RESPONSE): SmtpMachine._error_sasl_response,
}

# AUTH <mech> <initial response>: the initial response is handled as the first continuation line.
_FIRST_RESPONSE = {
    "plain": SmtpMachine._plain_response,
    "login": SmtpMachine._login_username,
    "external": SmtpMachine._external_response,
    "xoauth2": SmtpMachine._xoauth2_response,
    "oauthbearer": SmtpMachine._oauthbearer_response,
}
# Where AUTH <mech> goes without an initial response, and what it prompts with (spec 2.3.3, 9.3).
_FIRST_STEP = {
    "plain": (State.AUTH_PLAIN, EMPTY_CHALLENGE),
    "login": (State.AUTH_LOGIN_USERNAME, USERNAME_CHALLENGE),
    "external": (State.AUTH_EXTERNAL, USERNAME_CHALLENGE),
    "xoauth2": (State.AUTH_XOAUTH2, EMPTY_CHALLENGE),
    "oauthbearer": (State.AUTH_OAUTHBEARER, EMPTY_CHALLENGE),
}
