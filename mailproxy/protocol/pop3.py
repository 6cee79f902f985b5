"""The POP3 client side before the relay (spec 2.2, 9), sans-IO.

``Pop3Machine`` turns client bytes into actions (common.py) and never touches a socket or a clock. Every
reply the machine can send on its own is assembled once in ``Pop3Config``; the machine only picks, and
formats nothing but the auth server's texts and the per-session salt.

Input is taken one complete line at a time and removed from the buffer as soon as it is handled, so a
line fails as "too long" only when that line alone exceeds ``client_buffer`` (spec 9.13: mailproxy
compacts where nginx would not). Because only complete lines are looked at, the same bytes cut anywhere
give the same actions.
"""

import enum
import re
from dataclasses import dataclass

from . import sasl
from .common import (
    TOO_MANY_COMMANDS,
    TOO_MANY_INVALID,
    AuthAttempt,
    Authenticate,
    Close,
    Log,
    Send,
    StartTLS,
    auth_server_text,
    login_failed,
    too_long,
)

CRLF = b"\r\n"
OK = b"+OK\r\n"
INVALID = b"-ERR invalid command\r\n"
EMPTY_CHALLENGE = b"+ \r\n"
USERNAME_CHALLENGE = b"+ " + sasl.USERNAME_PROMPT + CRLF
PASSWORD_CHALLENGE = b"+ " + sasl.PASSWORD_PROMPT + CRLF
GREETING = b"+OK POP3 ready"

# The parser knows these words and no others: STAT, RETR ... are parse errors before login (spec 2.2).
VERBS = frozenset((b"USER", b"PASS", b"APOP", b"QUIT", b"CAPA", b"AUTH", b"NOOP", b"STLS"))
MAX_ARGS = 3
_VERB = re.compile(rb"[A-Za-z]{4}(?= |$)")

OAUTH_METHODS = ("xoauth2", "oauthbearer")


class State(enum.Enum):
    START = "start"
    USER = "user"  # USER accepted, PASS expected
    AUTH_PLAIN = "auth_plain"
    AUTH_LOGIN_USERNAME = "auth_login_username"
    AUTH_LOGIN_PASSWORD = "auth_login_password"
    AUTH_CRAM_MD5 = "auth_cram_md5"
    AUTH_EXTERNAL = "auth_external"
    AUTH_XOAUTH2 = "auth_xoauth2"
    AUTH_OAUTHBEARER = "auth_oauthbearer"
    AUTH_ERROR_SASL = "auth_error_sasl"  # Auth-Error-SASL challenge sent, dummy response expected
    AUTHENTICATING = "authenticating"  # waiting for the session: auth_failed() or the relay
    STARTING_TLS = "starting_tls"  # waiting for tls_established()
    CLOSED = "closed"


# States in which the next line is a command; in the other reading states it is a SASL response.
COMMAND_STATES = frozenset((State.START, State.USER))
READING_STATES = COMMAND_STATES | frozenset(
    (
        State.AUTH_PLAIN,
        State.AUTH_LOGIN_USERNAME,
        State.AUTH_LOGIN_PASSWORD,
        State.AUTH_CRAM_MD5,
        State.AUTH_EXTERNAL,
        State.AUTH_XOAUTH2,
        State.AUTH_OAUTHBEARER,
        State.AUTH_ERROR_SASL,
    )
)


@dataclass(frozen=True)
class Pop3Config:
    """Everything a POP3 session needs from its server block, wire bytes already assembled."""

    methods: frozenset
    starttls: str  # "off" | "on" | "only"
    client_buffer: int
    max_errors: int
    max_commands: int
    server_name: str
    needs_salt: bool  # apop or cram-md5 enabled: the session's salt goes into the greeting
    greeting: bytes  # without salt
    capa: bytes  # TLS connections, the user state, starttls off
    capa_starttls: bytes  # starttls on, plain connection, start state
    capa_starttls_only: bytes  # starttls only, plain connection, start state
    auth_list: bytes  # reply to a bare AUTH
    internal_error: bytes = b"-ERR internal server error\r\n"
    ssl_cert_error: bytes = b"-ERR SSL certificate error\r\n"
    ssl_no_cert: bytes = b"-ERR No required SSL certificate\r\n"

    @classmethod
    def from_server(cls, server) -> "Pop3Config":
        return cls.build(
            methods=server.pop3_auth,
            capabilities=server.pop3_capabilities,
            starttls=server.starttls,
            client_buffer=server.pop3_client_buffer,
            max_errors=server.max_errors,
            max_commands=server.max_commands,
            server_name=server.server_name,
        )

    @classmethod
    def build(
        cls,
        methods=frozenset(("plain",)),
        capabilities=("TOP", "USER", "UIDL"),
        starttls="off",
        client_buffer=128,
        max_errors=5,
        max_commands=1000,
        server_name="localhost",
    ) -> "Pop3Config":
        methods = frozenset(methods)
        # "plain" stands for both PLAIN and LOGIN: USER/PASS-style logins are always accepted.
        mechs = []
        for method in sasl.ADVERTISED_ORDER:
            if method == "login" and "plain" in methods:
                mechs.append("LOGIN")
            elif method in methods and method != "login":
                mechs.append(sasl.MECHANISM_NAMES[method])
        head = b"+OK Capability list follows\r\n"
        caps = [c.encode() + CRLF for c in capabilities]
        sasl_line = b" ".join([b"SASL"] + [m.encode() for m in mechs]) + CRLF
        capa = head + b"".join(caps) + sasl_line + b".\r\n"
        capa_starttls = head + b"".join(caps) + sasl_line + b"STLS\r\n.\r\n"
        without_user = [c.encode() + CRLF for c in capabilities if c.upper() != "USER"]
        capa_starttls_only = head + b"".join(without_user) + b"STLS\r\n.\r\n"
        auth_list = (
            b"+OK methods supported:\r\n" + b"".join(m.encode() + CRLF for m in mechs) + b".\r\n"
        )
        return cls(
            methods=methods,
            starttls=starttls,
            client_buffer=client_buffer,
            max_errors=max_errors,
            max_commands=max_commands,
            server_name=server_name,
            needs_salt=bool(methods & {"apop", "cram-md5"}),
            greeting=GREETING + CRLF,
            capa=capa,
            capa_starttls=capa_starttls,
            capa_starttls_only=capa_starttls_only,
            auth_list=auth_list,
        )


class _Rejected(Exception):
    """A handler refused the line: invalid reply, back to start, not counted as a parse error."""


def parse_command(line: bytes):
    """``(verb, args)`` for a command line without its line end, or None for a parse error."""
    if b"\r" in line:
        return None
    match = _VERB.match(line)
    if match is None:
        return None
    verb = match.group().upper()
    if verb not in VERBS:
        return None
    rest = line[4:]
    if verb in (b"USER", b"PASS"):
        # The name or password runs to the end of the line, inner and trailing spaces included.
        value = rest.lstrip(b" ")
        return verb, [value] if value else []
    args = [word for word in rest.split(b" ") if word]
    if len(args) > MAX_ARGS:
        return None
    return verb, args


def parse_response(line: bytes):
    """The tokens of a SASL response line, or None for a parse error.

    The first token starts at the first byte (a leading space makes it empty); only it is used.
    """
    if b"\r" in line:
        return None
    first, *rest = line.split(b" ")
    tokens = [first] + [word for word in rest if word]
    if len(tokens) > MAX_ARGS:
        return None
    return tokens


class Pop3Machine:
    """One client's POP3 conversation up to the backend login.

    ``state`` (a ``State``) is public for the session and tests; everything else is internal.
    """

    def __init__(self, config: Pop3Config, tls: bool = False, salt=None):
        self.config = config
        self.tls = tls
        if config.needs_salt and salt is None:
            salt = sasl.make_salt(config.server_name)
        self.salt = salt if config.needs_salt else None
        self.state = State.START
        self._buffer = bytearray()
        self._errors = 0
        self._commands = 0
        self._attempts = 0
        self._login = b""
        self._method = None  # of the attempt in flight, for Auth-Error-SASL
        self._pending_failure = None  # (reply, wait) behind an Auth-Error-SASL challenge
        if self.salt is not None:
            self._greeting = GREETING + b" " + self.salt
            self._cram_challenge = b"+ " + sasl.cram_md5_challenge(self.salt) + CRLF
        else:
            self._greeting = config.greeting
            self._cram_challenge = None

    # -- the session's side ---------------------------------------------------------------------

    def greeting(self):
        return [Send(self._greeting)]

    def receive_data(self, data: bytes):
        if self.state is State.CLOSED:
            return []
        if not data:
            return self._close()
        if self.state is State.STARTING_TLS:
            # Plain-text bytes after STLS must not survive into the TLS session (spec 2.0.11).
            return []
        self._buffer += data
        return self._process()

    def auth_failed(self, text, wait: bool, error_code=None, sasl_error=None):
        """The auth server refused the attempt; ``error_code`` is SMTP's and ignored here."""
        if self.state is State.CLOSED:
            return []  # the client left while the auth server was asked: nothing to tell it
        if self.state is not State.AUTHENTICATING:
            raise RuntimeError("auth_failed() without an authentication in flight")
        text = auth_server_text(text)
        actions = [login_failed(text)]
        reply = b"-ERR " + text + CRLF
        if sasl_error is not None and self._method in OAUTH_METHODS:
            # The client must answer the mechanism's error challenge before it learns the verdict.
            actions.append(Send(b"+ " + auth_server_text(sasl_error) + CRLF))
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
            raise RuntimeError("tls_established() without STLS")
        self.tls = True
        self._to_start()
        return []

    def trailing_data(self) -> bytes:
        """Bytes the client sent behind the login that succeeded; the relay forwards them."""
        return bytes(self._buffer)

    # -- line handling --------------------------------------------------------------------------

    def _process(self):
        actions = []
        limit = self.config.client_buffer
        while self.state in READING_STATES:
            end = self._buffer.find(b"\n")
            if end < 0 and len(self._buffer) < limit:
                break
            if end < 0 or end >= limit:
                # A SASL response is a credential whatever it looks like: only commands are shown.
                shown = bytes(self._buffer[:limit]) if self.state in COMMAND_STATES else b"..."
                return actions + self._fatal(too_long(shown))
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if line.endswith(b"\r"):
                line = line[:-1]
            actions += self._line(line)
        return actions

    def _line(self, line: bytes):
        if self.state in COMMAND_STATES:
            parsed = parse_command(line)
        else:
            parsed = parse_response(line)
        if parsed is None:
            return self._parse_error()
        self._commands += 1
        if self._commands > self.config.max_commands:
            return self._fatal(TOO_MANY_COMMANDS)
        try:
            if self.state in COMMAND_STATES:
                verb, args = parsed
                handler = _COMMANDS.get((self.state, verb))
                if handler is None:
                    raise _Rejected()
                return handler(self, args)
            return _RESPONSES[self.state](self, parsed)
        except sasl.SaslError as err:
            return [Log("info", str(err))] + self._reject()
        except _Rejected:
            return self._reject()

    def _parse_error(self):
        self._errors += 1
        if self._errors >= self.config.max_errors:
            return self._fatal(TOO_MANY_INVALID)
        return self._reject()

    def _reject(self):
        if self.state is State.AUTH_ERROR_SASL:
            return self._settle_failure(INVALID)
        self._to_start()
        return [Send(INVALID)]

    def _fatal(self, message: str):
        return [Log("info", message), Send(INVALID)] + self._close()

    def _close(self):
        self.state = State.CLOSED
        self._buffer.clear()
        return [Close()]

    def _to_start(self):
        self.state = State.START
        self._login = b""
        self._method = None
        self._pending_failure = None

    def _authenticate(self, method: str, login: bytes, password: bytes):
        self._attempts += 1
        self._method = method
        self.state = State.AUTHENTICATING
        salt = self.salt if method in ("apop", "cram-md5") else None
        return [Authenticate(AuthAttempt(method, login, password, self._attempts, salt))]

    def _starttls_only(self) -> bool:
        return self.config.starttls == "only" and not self.tls

    # -- commands -------------------------------------------------------------------------------

    def _user(self, args):
        if self._starttls_only() or len(args) != 1:
            raise _Rejected()
        self._login = args[0]
        self.state = State.USER
        return [Send(OK)]

    def _pass(self, args):
        if len(args) != 1:
            raise _Rejected()
        return self._authenticate("plain", self._login, args[0])

    def _apop(self, args):
        if self._starttls_only() or "apop" not in self.config.methods or len(args) != 2:
            raise _Rejected()
        return self._authenticate("apop", args[0], args[1])

    def _capa(self, args):
        config = self.config
        if self.state is State.START and not self.tls and config.starttls == "on":
            return [Send(config.capa_starttls)]
        if self.state is State.START and not self.tls and config.starttls == "only":
            return [Send(config.capa_starttls_only)]
        return [Send(config.capa)]

    def _noop(self, args):
        return [Send(OK)]

    def _quit(self, args):
        return [Send(OK)] + self._close()

    def _stls(self, args):
        if self.tls or self.config.starttls not in ("on", "only"):
            raise _Rejected()
        self.state = State.STARTING_TLS
        self._buffer.clear()
        return [Send(OK), StartTLS()]

    def _auth(self, args):
        if self._starttls_only():
            raise _Rejected()
        if not args:
            return [Send(self.config.auth_list)]
        method = sasl.mechanism(args[0])
        initial = args[1:]
        enabled = method in ("plain", "login") or method in self.config.methods
        if method is None or not enabled or len(initial) > 1:
            raise _Rejected()
        if method == "cram-md5":
            if initial:
                raise _Rejected()
            self.state = State.AUTH_CRAM_MD5
            return [Send(self._cram_challenge)]
        if initial:
            return _RESPONSES[_FIRST_STATE[method]](self, initial)
        self.state = _FIRST_STATE[method]
        return [Send(_FIRST_CHALLENGE[method])]

    # -- SASL responses: ``tokens`` is never empty; only the first one counts --------------------

    def _plain_response(self, tokens):
        login, password = sasl.parse_plain(sasl.decode_base64(tokens[0], "plain"))
        return self._authenticate("plain", login, password)

    def _login_username(self, tokens):
        self._login = sasl.decode_base64(tokens[0], "login")
        self.state = State.AUTH_LOGIN_PASSWORD
        return [Send(PASSWORD_CHALLENGE)]

    def _login_password(self, tokens):
        password = sasl.decode_base64(tokens[0], "login")
        return self._authenticate("plain", self._login, password)

    def _cram_md5_response(self, tokens):
        login, digest = sasl.parse_cram_md5(sasl.decode_base64(tokens[0], "cram-md5"))
        return self._authenticate("cram-md5", login, digest)

    def _external_response(self, tokens):
        return self._authenticate("external", sasl.decode_base64(tokens[0], "external"), b"")

    def _xoauth2_response(self, tokens):
        login, token = sasl.parse_xoauth2(sasl.decode_base64(tokens[0], "xoauth2"))
        return self._authenticate("xoauth2", login, token)

    def _oauthbearer_response(self, tokens):
        login, token = sasl.parse_oauthbearer(sasl.decode_base64(tokens[0], "oauthbearer"))
        return self._authenticate("oauthbearer", login, token)

    def _error_sasl_response(self, tokens):
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


_COMMANDS = {
    (State.START, b"USER"): Pop3Machine._user,
    (State.START, b"APOP"): Pop3Machine._apop,
    (State.START, b"AUTH"): Pop3Machine._auth,
    (State.START, b"CAPA"): Pop3Machine._capa,
    (State.START, b"STLS"): Pop3Machine._stls,
    (State.START, b"NOOP"): Pop3Machine._noop,
    (State.START, b"QUIT"): Pop3Machine._quit,
    (State.USER, b"PASS"): Pop3Machine._pass,
    (State.USER, b"CAPA"): Pop3Machine._capa,
    (State.USER, b"NOOP"): Pop3Machine._noop,
    (State.USER, b"QUIT"): Pop3Machine._quit,
}

_RESPONSES = {
    State.AUTH_PLAIN: Pop3Machine._plain_response,
    State.AUTH_LOGIN_USERNAME: Pop3Machine._login_username,
    State.AUTH_LOGIN_PASSWORD: Pop3Machine._login_password,
    State.AUTH_CRAM_MD5: Pop3Machine._cram_md5_response,
    State.AUTH_EXTERNAL: Pop3Machine._external_response,
    State.AUTH_XOAUTH2: Pop3Machine._xoauth2_response,
    State.AUTH_OAUTHBEARER: Pop3Machine._oauthbearer_response,
    State.AUTH_ERROR_SASL: Pop3Machine._error_sasl_response,
}

# Where AUTH <mech> goes without an initial response, and what it prompts with (spec 2.2, 9.3).
_FIRST_STATE = {
    "plain": State.AUTH_PLAIN,
    "login": State.AUTH_LOGIN_USERNAME,
    "external": State.AUTH_EXTERNAL,
    "xoauth2": State.AUTH_XOAUTH2,
    "oauthbearer": State.AUTH_OAUTHBEARER,
}
_FIRST_CHALLENGE = {
    "plain": EMPTY_CHALLENGE,
    "login": USERNAME_CHALLENGE,
    "external": USERNAME_CHALLENGE,
    "xoauth2": EMPTY_CHALLENGE,
    "oauthbearer": EMPTY_CHALLENGE,
}
