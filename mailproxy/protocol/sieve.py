"""The client side of a ManageSieve session (RFC 5804) before login, as a sans-IO machine.

Same contract as the IMAP machine (docs/internals.md): bytes in, actions out, one input buffer bounded by
``sieve_client_buffer``, one command at a time, nothing read while an ``Authenticate`` is pending. The
nginx rules of spec 2.0 apply as they do to IMAP: ``timeout`` from the greeting (the session's), parse
errors counted against ``max_errors``, rejections not counted, ``max_commands`` (9.8), too-long input
closes.

ManageSieve differs from IMAP where it shows: there are no tags; the greeting *is* the capability
response (the proxy has to speak before it knows the backend, so the SIEVE extensions come from
``sieve_capabilities``); every argument is a string, quoted or a literal; a client literal, ``{n+}`` or
``{n}``, is never acknowledged, because RFC 5804 has no continuation reply for it; SASL challenges are
strings and a client answers each with a string, ``"*"`` cancelling the exchange (RFC 5804 2.1).
"""

from dataclasses import dataclass

from . import sasl
from .common import (EXCHANGE_STATES, RESPONSE, RESPONSE_STATES, AuthAttempt, Authenticate, Kind, LiteralMachine,
                     Machine, Parsed, Send, ServerConfig, State, responses, too_long)

CRLF = b"\r\n"
IMPLEMENTATION = b"mailproxy"
VERSION = b"1.0"
# Replies, all from here. A closing reply is BYE: RFC 5804 1.3 gives NO the meaning "this command
# failed, carry on" and BYE "the server is closing the connection"; a client told NO would try its next
# command on a dead socket, a client told BYE reports the text and stops.
OK_NOOP = b'OK "NOOP completed"\r\n'
OK_TAGGED_NOOP = b'"Done"\r\n'
OK_LOGOUT = b'OK "Logout completed"\r\n'
OK_STARTTLS = b'OK "Begin TLS negotiation now"\r\n'
NO_INVALID = b'NO "invalid command"\r\n'
NO_CANCELLED = b'NO "Authentication cancelled"\r\n'
BYE_INVALID = b'BYE "invalid command"\r\n'
BYE_TOO_MANY_INVALID = b'BYE "Too many invalid commands"\r\n'
BYE_TOO_MANY_COMMANDS = b'BYE "Too many commands"\r\n'
BYE_TOO_LONG = b'BYE "Command too long"\r\n'
INTERNAL_ERROR = b'BYE "internal server error"\r\n'
SSL_CERT_ERROR = b'BYE "SSL certificate error"\r\n'
SSL_NO_CERT = b'BYE "No required SSL certificate"\r\n'

# What sieve_auth can name. CRAM-MD5 and EXTERNAL are left out: a backend login needs a clear password,
# which neither gives (nginx makes the auth server return one; ManageSieve clients rarely offer either).
METHODS = ("plain", "login", "xoauth2", "oauthbearer")
# PLAIN and LOGIN are always accepted, sieve_auth only decides what is advertised (spec 2.0.8); the
# OAuth mechanisms need to be enabled, as in IMAP.
GATED = frozenset(("xoauth2", "oauthbearer"))
MAX_ARGS = 3  # AUTHENTICATE mechanism and initial response; one more is already wrong
LETTERS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def string(value: bytes) -> bytes:
    """A server string (RFC 5804 4): quoted when it can be, else a literal (CR, LF and NUL cannot be quoted)."""
    if any(byte in value for byte in b"\r\n\0") or len(value) > 1024:
        return b"{%d}\r\n" % len(value) + value
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def capability_response(auth_methods, words, starttls: bool, login_allowed: bool) -> bytes:
    """RFC 5804 1.7. ``words`` are sieve_capabilities: SIEVE extension names, and ``NAME=value`` for a
    capability line of its own (``NOTIFY=mailto``, ``MAXREDIRECTS=4``); no extension name has a '='."""
    extensions = [word for word in words if b"=" not in word]
    others = [word.split(b"=", 1) for word in words if b"=" in word]
    mechanisms = b" ".join(
        sasl.MECHANISM_NAMES[m].encode() for m in sasl.ADVERTISED_ORDER if m in auth_methods
    )
    lines = [
        b'"IMPLEMENTATION" ' + string(IMPLEMENTATION),
        # RFC 5804 1.7: a server that wants TLS first advertises an empty SASL list until then.
        b'"SASL" ' + string(mechanisms if login_allowed else b""),
        b'"SIEVE" ' + string(b" ".join(extensions)),
    ]
    lines += [string(name.upper()) + b" " + string(value) for name, value in others]
    if starttls:
        lines.append(b'"STARTTLS"')
    lines.append(b'"VERSION" ' + string(VERSION))
    return CRLF.join(lines) + CRLF + b"OK\r\n"


@dataclass(frozen=True, kw_only=True)
class SieveConfig(ServerConfig):
    """Per-server settings with every fixed reply already assembled."""

    capability_plain: bytes  # capability response (ending in OK) on a connection without TLS
    capability_tls: bytes  # ... and with TLS

    @classmethod
    def build(cls, auth_methods=("plain",), extensions=(), starttls="off", **settings) -> "SieveConfig":
        methods = frozenset(auth_methods)
        words = tuple(e.encode() if isinstance(e, str) else e for e in extensions)
        return cls(
            capability_plain=capability_response(methods, words, starttls != "off", starttls != "only"),
            capability_tls=capability_response(methods, words, False, True),
            auth_methods=methods,
            starttls=starttls,
            internal_error=INTERNAL_ERROR,
            ssl_cert_error=SSL_CERT_ERROR,
            ssl_no_cert=SSL_NO_CERT,
            **settings,
        )

    @classmethod
    def from_server(cls, server) -> "SieveConfig":
        return cls.build(
            auth_methods=server.sieve_auth,
            extensions=server.sieve_capabilities,
            starttls=server.starttls,
            client_buffer=server.sieve_client_buffer,
            max_errors=server.max_errors,
            max_commands=server.max_commands,
            server_name=server.server_name,
        )


# --- the tokenizer ---------------------------------------------------------------------------------


class _Bad(Exception):
    def __init__(self, index: int):
        super().__init__(index)
        self.index = index


def parse_line(buf: bytes, limit: int, continuation: bool) -> Parsed:
    """Parse the line at the head of ``buf`` (at most ``limit`` bytes); a SASL response has no verb
    (``RESPONSE``)."""
    window = bytes(buf[:limit])
    result = Parsed(Kind.COMPLETE)
    index = 0
    try:
        if not continuation:
            while index < len(window) and window[index] in LETTERS:
                index += 1
            if index == len(window):
                return Parsed(Kind.INCOMPLETE)
            if index == 0 or window[index] not in b" \r\n":
                raise _Bad(index)
            result.verb = window[:index].upper()
        return _arguments(window, index, result, limit)
    except _Bad as bad:
        return _invalid(window, bad.index)


def _arguments(window: bytes, index: int, result: Parsed, limit: int) -> Parsed:
    length = len(window)
    while True:
        while index < length and window[index] == 0x20:
            index += 1
        if index == length:
            return Parsed(Kind.INCOMPLETE, wait_for=result.wait_for)
        byte = window[index]
        if byte == 0x0D:
            if index + 1 == length:
                return Parsed(Kind.INCOMPLETE)
            if window[index + 1] != 0x0A:
                raise _Bad(index + 1)
            result.end = index + 2
            return result
        if byte == 0x0A:
            result.end = index + 1
            return result
        if len(result.args) == MAX_ARGS:
            raise _Bad(index)
        if byte == 0x22:
            index = _quoted(window, index + 1, result.args)
        elif byte == 0x7B:
            index = _literal(window, index + 1, result, limit)
        else:
            # RFC 5804 wants strings; a bare atom (a number, a lazy client's mechanism) is taken as one.
            start = index
            while index < length and window[index] not in b" \r\n\"{":
                index += 1
            if index < length and window[index] in b"\"{":
                raise _Bad(index)
            result.args.append(window[start:index])
        if index < 0:
            return Parsed(Kind.INCOMPLETE, wait_for=result.wait_for)
        if index < length and window[index] not in b" \r\n":
            raise _Bad(index)


def _quoted(window: bytes, index: int, args: list) -> int:
    out = bytearray()
    while index < len(window):
        byte = window[index]
        if byte == 0x22:
            args.append(bytes(out))
            return index + 1
        if byte in b"\r\n":
            raise _Bad(index)  # RFC 5804: a quoted string never spans lines
        if byte == 0x5C:
            if index + 1 == len(window):
                return -1
            index += 1
            byte = window[index]
            if byte not in b'"\\':
                raise _Bad(index)  # only \" and \\ are QUOTED-SPECIALS
        out.append(byte)
        index += 1
    return -1


def _literal(window: bytes, index: int, result: Parsed, limit: int) -> int:
    length = len(window)
    start = index
    size = 0
    while index < length and 0x30 <= window[index] <= 0x39:
        if size <= limit:  # a ten-thousand-digit count must not cost a bignum
            size = size * 10 + window[index] - 0x30
        index += 1
    if index < length and index == start:
        raise _Bad(index)
    if index < length and window[index] == 0x2B:
        index += 1
    for expected in (0x7D, 0x0D, 0x0A):
        if index == length:
            return -1
        if window[index] != expected:
            if expected == 0x0D and window[index] == 0x0A:
                continue  # bare LF after the count, as for any line end
            raise _Bad(index)
        index += 1
    data_end = index + size
    if data_end + 1 > limit:
        result.wait_for = limit  # cannot fit: it ends as "too long" once the buffer is full
        return -1
    if data_end >= length:
        result.wait_for = data_end  # the byte after the data ends the line or starts more
        return -1
    result.args.append(window[index:data_end])
    return data_end


def _invalid(window: bytes, index: int) -> Parsed:
    newline = window.find(b"\n", index)
    if newline < 0:
        return Parsed(Kind.INCOMPLETE)
    line_end = newline - 1 if newline > 0 and window[newline - 1] == 0x0D else newline
    # Client literals are never acknowledged, so their bytes follow at once and would be read as
    # commands: a bad line announcing one cannot be resynchronised.
    return Parsed(Kind.INVALID, end=newline + 1, close=window[line_end - 1 : line_end] == b"}")


# --- the machine ------------------------------------------------------------------------------------


class SieveMachine(LiteralMachine):
    """One client's ManageSieve conversation up to the backend login.

    ``state`` (a ``common.State``) is public for the session and tests; the rest is internal.
    """

    __slots__ = ()

    _INVALID = NO_INVALID
    _BYE_TOO_MANY_INVALID = BYE_TOO_MANY_INVALID
    _BYE_TOO_MANY_COMMANDS = BYE_TOO_MANY_COMMANDS
    _BYE_LITERAL = BYE_INVALID
    _GREETS_AFTER_TLS = True

    def greeting(self):
        return [Send(self._capabilities())]

    def _parse(self, limit):
        return parse_line(self._buffer, limit, self.state in RESPONSE_STATES)

    def _capabilities(self) -> bytes:
        return self.config.capability_tls if self.tls else self.config.capability_plain

    @classmethod
    def _challenge(cls, data: bytes) -> bytes:
        return string(data) + CRLF

    def _failure_reply(self, text: bytes, error_code) -> bytes:
        return b"NO " + string(text) + CRLF

    def _too_long(self, parsed):
        # SASL responses are credentials: log none of them. What is shown is what the buffer holds, however
        # the bytes arrived (one read may bring far more than the buffer).
        shown = bytes(self._buffer[: self.config.client_buffer]) if self.state is State.START else b"..."
        return self._fatal(too_long(shown), BYE_TOO_LONG)

    def _authenticate(self, method, login, password):
        self.attempts += 1
        self._method = method
        self.login = login
        self.state = State.AUTHENTICATING
        return [Authenticate(AuthAttempt(method, login, password, self.attempts))]

    # --- commands ---------------------------------------------------------------------------------

    def _noop(self, args):
        if len(args) > 1:
            return self._reject()
        if args:
            # RFC 5804 2.11: a NOOP argument comes back as a TAG response code (clients sync on it).
            return [Send(b"OK (TAG " + string(args[0]) + b") " + OK_TAGGED_NOOP)]
        return [Send(OK_NOOP)]

    def _capability(self, args):
        if args:
            return self._reject()
        return [Send(self._capabilities())]

    def _logout(self, args):
        return [Send(OK_LOGOUT)] + self._close()

    def _starttls(self, args):
        if args or self.tls or self.config.starttls == "off":
            return self._reject()
        return self._begin_tls(OK_STARTTLS)

    def _authenticate_command(self, args):
        if (self.config.starttls == "only" and not self.tls) or not 1 <= len(args) <= 2:
            return self._reject()
        method = sasl.mechanism(args[0])
        if method not in METHODS or (method in GATED and method not in self.config.auth_methods):
            return self._reject()
        if len(args) == 1:
            return self._start_exchange(method)
        self.state = EXCHANGE_STATES[method]
        return self._answer(args[1])

    # --- inside an AUTHENTICATE exchange ----------------------------------------------------------

    def _response(self, args):
        """A client's string answering a challenge (RFC 5804 2.1)."""
        if len(args) != 1:
            return self._reject()
        return self._answer(args[0])

    def _answer(self, response: bytes):
        if response == b"*":
            return self._reject(NO_CANCELLED)
        return self._respond((response,))

    # Only these are known before login; HAVESPACE, PUTSCRIPT and the rest are parse errors here, as
    # IMAP's SELECT is to nginx: the proxy never serves them. The dummy answer to an Auth-Error-SASL
    # challenge is checked as it comes: the attempt is already refused, a "*" has nothing to cancel.
    TRANSITIONS = {
        (State.START, b"NOOP"): _noop,
        (State.START, b"CAPABILITY"): _capability,
        (State.START, b"LOGOUT"): _logout,
        (State.START, b"STARTTLS"): _starttls,
        (State.START, b"AUTHENTICATE"): _authenticate_command,
        **responses(_response, (State.AUTH_PLAIN, State.AUTH_LOGIN_USERNAME, State.AUTH_LOGIN_PASSWORD,
                                State.AUTH_XOAUTH2, State.AUTH_OAUTHBEARER)),
        (State.SASL_ERROR, RESPONSE): Machine._sasl_error_response,
    }
