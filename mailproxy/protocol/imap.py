"""The client side of an IMAP session before login (spec 2.1, 9), as a sans-IO machine.

Bytes go in through ``receive_data``; actions come out (common.py). The machine owns the input buffer
(bounded by ``imap_client_buffer``) and works through pipelined commands one at a time, stopping at an
``Authenticate`` until the session reports back. Timers are the session's: it arms the deadline at the
greeting, cancels it while ``awaiting_auth`` and re-arms it whenever the machine reads again.
"""

import enum
from dataclasses import dataclass

from . import sasl
from .common import (
    TOO_MANY_COMMANDS,
    TOO_MANY_INVALID,
    Authenticate,
    AuthAttempt,
    Close,
    Log,
    Send,
    StartTLS,
    auth_server_text,
    login_failed,
    too_long,
)
from .imap_parse import Kind, parse_line

CRLF = b"\r\n"
GREETING = b"* OK IMAP4 ready\r\n"
OK = b"OK completed\r\n"
BAD = b"BAD invalid command\r\n"
BYE = b"* BYE\r\n"
LITERAL_GO_AHEAD = b"+ OK\r\n"
EMPTY_CHALLENGE = b"+ \r\n"
USERNAME_CHALLENGE = b"+ " + sasl.USERNAME_PROMPT + CRLF
PASSWORD_CHALLENGE = b"+ " + sasl.PASSWORD_PROMPT + CRLF
NO_TAG = b"*"
ID_REPLY = b"* ID NIL\r\n"
ID_OK = b"OK ID completed\r\n"
# imap_client_id: what is kept of a client's ID (RFC 2971 allows 30 pairs); the rest is parsed, not kept.
MAX_ID_PAIRS = 30
MAX_ID_BYTES = 1024

# Only these need their method enabled; PLAIN and LOGIN are always accepted (spec 2.0.8).
GATED = frozenset(("cram-md5", "external", "xoauth2", "oauthbearer"))
OAUTH = frozenset(("xoauth2", "oauthbearer"))


@dataclass(frozen=True)
class ImapConfig:
    """Per-server settings with every fixed reply already assembled."""

    capability_plain: bytes  # CAPABILITY reply line on a connection without TLS
    capability_tls: bytes  # ... and with TLS (implicit or after STARTTLS)
    auth_methods: frozenset = frozenset(("plain",))
    starttls: str = "off"
    client_buffer: int = 4096
    max_errors: int = 5
    max_commands: int = 1000
    server_name: str = "localhost"
    client_id: bool = False  # imap_client_id (ours): ID answered before login instead of BAD
    greeting: bytes = GREETING
    # For the session: what the client gets when things fail outside the machine.
    internal_error: bytes = b"* BAD internal server error\r\n"
    ssl_cert_error: bytes = b"* BYE SSL certificate error\r\n"
    ssl_no_cert: bytes = b"* BYE No required SSL certificate\r\n"

    @classmethod
    def build(
        cls,
        auth_methods=("plain",),
        capabilities=("IMAP4", "IMAP4rev1", "UIDPLUS"),
        starttls="off",
        **settings,
    ) -> "ImapConfig":
        methods = frozenset(auth_methods)
        base = b"* CAPABILITY" + b"".join(b" " + cap.encode() for cap in capabilities)
        with_auth = base + b"".join(
            b" AUTH=" + sasl.MECHANISM_NAMES[m].encode() for m in sasl.ADVERTISED_ORDER if m in methods
        )
        if starttls == "on":
            plain = with_auth + b" STARTTLS"
        elif starttls == "only":
            plain = base + b" STARTTLS LOGINDISABLED"
        else:
            plain = with_auth
        return cls(
            capability_plain=plain + CRLF,
            capability_tls=with_auth + CRLF,
            auth_methods=methods,
            starttls=starttls,
            **settings,
        )

    @classmethod
    def from_server(cls, server) -> "ImapConfig":
        return cls.build(
            auth_methods=server.imap_auth,
            capabilities=server.imap_capabilities,
            starttls=server.starttls,
            client_buffer=server.imap_client_buffer,
            max_errors=server.max_errors,
            max_commands=server.max_commands,
            server_name=server.server_name,
            client_id=getattr(server, "imap_client_id", False),
        )


class State(enum.Enum):
    START = "not authenticated"
    AUTH_PLAIN = "AUTHENTICATE PLAIN response"
    AUTH_LOGIN_USERNAME = "AUTHENTICATE LOGIN user name"
    AUTH_LOGIN_PASSWORD = "AUTHENTICATE LOGIN password"
    AUTH_CRAM_MD5 = "AUTHENTICATE CRAM-MD5 response"
    AUTH_EXTERNAL = "AUTHENTICATE EXTERNAL response"
    AUTH_XOAUTH2 = "AUTHENTICATE XOAUTH2 response"
    AUTH_OAUTHBEARER = "AUTHENTICATE OAUTHBEARER response"
    SASL_ERROR = "dummy response to an Auth-Error-SASL challenge"
    AUTHENTICATING = "waiting for the auth server"
    STARTTLS = "waiting for the TLS handshake"
    CLOSED = "closed"


class Command(enum.Enum):
    NOOP = b"NOOP"
    CAPABILITY = b"CAPABILITY"
    LOGOUT = b"LOGOUT"
    STARTTLS = b"STARTTLS"
    LOGIN = b"LOGIN"
    AUTHENTICATE = b"AUTHENTICATE"
    ID = b"ID"  # only parsed with imap_client_id
    RESPONSE = b""  # an untagged continuation line inside an AUTHENTICATE exchange


# States whose input is parsed; in the others it waits in the buffer (or, after STARTTLS, is dropped).
READING = frozenset(State) - {State.AUTHENTICATING, State.STARTTLS, State.CLOSED}


class ImapMachine:
    def __init__(self, config: ImapConfig, tls: bool = False, salt: bytes = None):
        self.config = config
        self.tls = tls
        self.state = State.START
        self.tag = b""  # tag of the command being handled or authenticating (no trailing space)
        self.errors = 0
        self.commands = 0
        self.attempts = 0
        self._salt = salt  # made on the first CRAM-MD5 when not given, then kept for the session
        self._buffer = bytearray()
        self._scan_from = 0  # no rescan until an LF (or the rest of a literal) arrives past this
        self._acknowledged = 0  # "+ OK" already sent for the command at the head of the buffer
        self._login = b""  # AUTHENTICATE LOGIN user name, between the two steps
        self._method = None  # method of the pending or last attempt
        self._pending_failure = None  # (reply text, wait) behind an Auth-Error-SASL challenge
        self.client_fields = ()  # imap_client_id: the last ID's (name, value | None) pairs, bounded

    # --- what the session calls -------------------------------------------------------------------

    def greeting(self):
        return [Send(self.config.greeting)]

    def receive_data(self, data: bytes):
        if self.state is State.CLOSED:
            return []
        if not data:
            self._close()
            return [Close()]
        if self.state is State.STARTTLS:
            # These bytes belong to the TLS handshake, which the session runs, not to any command.
            return []
        self._buffer += data
        return self._process()

    def auth_failed(self, text, wait: bool, error_code=None, sasl_error=None):
        """The auth server refused the pending attempt; ``error_code`` is SMTP's and ignored here."""
        if self.state is State.CLOSED:
            return []  # the client left while the auth server was asked: nothing to tell it
        if self.state is not State.AUTHENTICATING:
            raise RuntimeError("auth_failed() without a pending attempt (state %s)" % self.state.name)
        text = auth_server_text(text)
        out = [login_failed(text)]
        if sasl_error is not None and self._method in OAUTH:
            out.append(Send(b"+ " + auth_server_text(sasl_error) + CRLF))
            self._pending_failure = (text, wait)
            self.state = State.SASL_ERROR
            return out + self._process()
        out.append(Send(self._prefix() + b"NO " + text + CRLF))
        return out + self._after_failure(wait)

    def tls_established(self):
        if self.state is State.STARTTLS:
            self.tls = True
            self.state = State.START
        return []

    def trailing_data(self) -> bytes:
        """Client bytes that arrived behind the authenticating command, for the backend once proxying."""
        return bytes(self._buffer)

    @property
    def reading(self) -> bool:
        """False while the session should leave client input unread (auth pending, TLS, closed)."""
        return self.state in READING

    @property
    def awaiting_auth(self) -> bool:
        return self.state is State.AUTHENTICATING

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    # --- the input loop ---------------------------------------------------------------------------

    def _process(self):
        out = []
        limit = self.config.client_buffer
        while self.state in READING:
            full = len(self._buffer) >= limit
            if not full and self._buffer.find(b"\n", self._scan_from) < 0:
                break
            parsed = parse_line(self._buffer, limit, self.state is not State.START, self.config.client_id)
            for _ in range(self._acknowledged, parsed.sync_literals):
                out.append(Send(LITERAL_GO_AHEAD))
            self._acknowledged = max(self._acknowledged, parsed.sync_literals)
            if parsed.kind is Kind.INCOMPLETE and not full:
                self._scan_from = max(len(self._buffer), parsed.wait_for)
                break
            if self.state is State.START:
                self.tag = parsed.tag if parsed.tag is not None else NO_TAG
            if parsed.kind in (Kind.INCOMPLETE, Kind.TOO_LONG):
                out += self._too_long(parsed)
                break
            del self._buffer[: parsed.end]
            self._scan_from = 0
            self._acknowledged = 0
            if parsed.kind is Kind.INVALID:
                out += self._parse_error(parsed.close)
                continue
            self.commands += 1
            if self.commands > self.config.max_commands:
                out += [Log("info", TOO_MANY_COMMANDS), Send(self._prefix() + BAD)]
                out += self._close_now()
                break
            command = Command(parsed.verb)
            handler = TRANSITIONS.get((self.state, command))
            if handler is None:
                out += self._parse_error(False)
                continue
            out += handler(self, parsed.args)
        return out

    def _prefix(self) -> bytes:
        return self.tag + b" "

    def _too_long(self, parsed):
        start = self.state is State.START
        # Continuation lines are SASL data (credentials): log none of it.
        shown = bytes(self._buffer[: parsed.end or self.config.client_buffer]) if start else b"..."
        return [Log("info", too_long(shown)), Send(self._prefix() + BAD)] + self._close_now()

    def _parse_error(self, announces_literal: bool):
        self.errors += 1
        out = []
        too_many = self.errors >= self.config.max_errors
        if too_many:
            out.append(Log("info", TOO_MANY_INVALID))
        out.append(Send(self._prefix() + BAD))
        if too_many or announces_literal:
            return out + self._close_now()
        if self.state is State.SASL_ERROR:
            return out + self._after_failure(self._pending_failure[1], process=False)
        self.state = State.START
        return out

    def _close_now(self):
        self._close()
        return [Close()]

    def _close(self):
        self.state = State.CLOSED
        self._buffer.clear()

    def _after_failure(self, wait: bool, process: bool = True):
        self._pending_failure = None
        if not wait:
            return self._close_now()
        self.state = State.START
        return self._process() if process else []

    # --- commands in the start state --------------------------------------------------------------

    def _noop(self, args):
        return [Send(self._prefix() + OK)]

    def _capability(self, args):
        line = self.config.capability_tls if self.tls else self.config.capability_plain
        return [Send(line + self._prefix() + OK)]

    def _logout(self, args):
        return [Send(BYE + self._prefix() + OK)] + self._close_now()

    def _id(self, args):
        """RFC 2971 before login (imap_client_id): keep what the client says it is; tell nothing of us."""
        fields = []
        size = 0
        for name, value in zip(args[0::2], args[1::2]):
            if name is None:
                continue  # a field name must be a string; NIL names nothing
            size += len(name) + len(value or b"")
            if len(fields) == MAX_ID_PAIRS or size > MAX_ID_BYTES:
                break
            fields.append((name, value))
        self.client_fields = tuple(fields)
        return [Send(ID_REPLY + self._prefix() + ID_OK)]

    def _starttls(self, args):
        if self.tls or self.config.starttls == "off":
            return self._reject()
        self._buffer.clear()  # anything pipelined behind STARTTLS was sent in clear: never act on it
        self._scan_from = 0
        self.state = State.STARTTLS
        return [Send(self._prefix() + OK), StartTLS()]

    def _login_command(self, args):
        if self._tls_required() or len(args) != 2 or not args[0]:
            return self._reject()
        return self._authenticate("plain", args[0], args[1])

    def _authenticate_command(self, args):
        if self._tls_required() or not 1 <= len(args) <= 2:
            return self._reject()
        method = sasl.mechanism(args[0])
        if method is None or (method in GATED and method not in self.config.auth_methods):
            return self._reject()
        initial = args[1] if len(args) == 2 else None
        if initial is None:
            return self._start_exchange(method)
        if method == "cram-md5":
            return self._reject()
        if method == "login":
            return self._login_username(initial, untagged=False)
        return RESPONSES[method](self, initial)

    def _start_exchange(self, method):
        self.state = EXCHANGE_STATES[method]
        if method == "login" or method == "external":
            return [Send(USERNAME_CHALLENGE)]
        if method == "cram-md5":
            if self._salt is None:
                self._salt = sasl.make_salt(self.config.server_name)
            return [Send(b"+ " + sasl.cram_md5_challenge(self._salt) + CRLF)]
        return [Send(EMPTY_CHALLENGE)]

    def _tls_required(self) -> bool:
        return self.config.starttls == "only" and not self.tls

    def _reject(self):
        """A command that parsed but cannot be done: the parse-error reply, not counted (spec 2.0.5)."""
        self.state = State.START
        return [Send(self._prefix() + BAD)]

    # --- continuation lines -----------------------------------------------------------------------

    def _response(self, args):
        response = args[0] if args else b""
        return RESPONSES[STATE_METHODS[self.state]](self, response)

    def _plain(self, response):
        return self._sasl(lambda: sasl.parse_plain(sasl.decode_base64(response, "plain")), "plain")

    def _login_username(self, response, untagged=True):
        try:
            self._login = sasl.decode_base64(response, "login")
        except sasl.SaslError as err:
            if not untagged:
                return self._sasl_rejected(err)
            # nginx answers a bad user name in the LOGIN exchange without any tag; clients expect it.
            self.state = State.START
            return [Log("info", str(err)), Send(BAD)]
        self.state = State.AUTH_LOGIN_PASSWORD
        return [Send(PASSWORD_CHALLENGE)]

    def _login_password(self, response):
        return self._sasl(lambda: (self._login, sasl.decode_base64(response, "login")), "plain")

    def _cram_md5(self, response):
        return self._sasl(lambda: sasl.parse_cram_md5(sasl.decode_base64(response, "cram-md5")), "cram-md5")

    def _external(self, response):
        # The password is never carried over from an earlier attempt (spec 9.11, 9.13).
        return self._sasl(lambda: (sasl.decode_base64(response, "external"), b""), "external")

    def _xoauth2(self, response):
        return self._sasl(lambda: sasl.parse_xoauth2(sasl.decode_base64(response, "xoauth2")), "xoauth2")

    def _oauthbearer(self, response):
        return self._sasl(
            lambda: sasl.parse_oauthbearer(sasl.decode_base64(response, "oauthbearer")), "oauthbearer"
        )

    def _sasl(self, decode, method):
        try:
            login, password = decode()
        except sasl.SaslError as err:
            return self._sasl_rejected(err)
        return self._authenticate(method, login, password)

    def _sasl_rejected(self, err):
        return [Log("info", str(err))] + self._reject()

    def _sasl_error_response(self, args):
        """The dummy answer to an Auth-Error-SASL challenge: the failure is told only if it is right."""
        text, wait = self._pending_failure
        if self._method == "xoauth2":
            accepted = not args or (len(args) == 1 and not args[0])
        else:
            accepted = len(args) == 1 and args[0][:4] == b"AQ=="
        reply = b"NO " + text + CRLF if accepted else BAD
        return [Send(self._prefix() + reply)] + self._after_failure(wait, process=False)

    def _authenticate(self, method, login, password):
        self.attempts += 1
        self._method = method
        self.state = State.AUTHENTICATING
        salt = self._salt if method == "cram-md5" else None
        attempt = AuthAttempt(method, login, password, self.attempts, salt=salt, tag=self.tag,
                              imap_id=self.client_fields)
        return [Authenticate(attempt)]


EXCHANGE_STATES = {
    "plain": State.AUTH_PLAIN,
    "login": State.AUTH_LOGIN_USERNAME,
    "cram-md5": State.AUTH_CRAM_MD5,
    "external": State.AUTH_EXTERNAL,
    "xoauth2": State.AUTH_XOAUTH2,
    "oauthbearer": State.AUTH_OAUTHBEARER,
}
STATE_METHODS = {state: method for method, state in EXCHANGE_STATES.items()}
STATE_METHODS[State.AUTH_LOGIN_PASSWORD] = "login-password"

RESPONSES = {
    "plain": ImapMachine._plain,
    "login": ImapMachine._login_username,
    "login-password": ImapMachine._login_password,
    "cram-md5": ImapMachine._cram_md5,
    "external": ImapMachine._external,
    "xoauth2": ImapMachine._xoauth2,
    "oauthbearer": ImapMachine._oauthbearer,
}

TRANSITIONS = {
    (State.START, Command.NOOP): ImapMachine._noop,
    (State.START, Command.CAPABILITY): ImapMachine._capability,
    (State.START, Command.LOGOUT): ImapMachine._logout,
    (State.START, Command.STARTTLS): ImapMachine._starttls,
    (State.START, Command.LOGIN): ImapMachine._login_command,
    (State.START, Command.AUTHENTICATE): ImapMachine._authenticate_command,
    (State.START, Command.ID): ImapMachine._id,
    (State.SASL_ERROR, Command.RESPONSE): ImapMachine._sasl_error_response,
}
TRANSITIONS.update({(state, Command.RESPONSE): ImapMachine._response for state in STATE_METHODS})
