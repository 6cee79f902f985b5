"""What the client-facing machines hand to the session, and what they share.

The machines never touch a socket: every step ends in a list of actions that the session carries out in
order. Keeping them plain frozen dataclasses lets tests compare whole transcripts with ``==``.

``Machine`` holds what nginx does alike in every protocol (a refused login, the SASL exchanges, invalid
and too many commands, STARTTLS); each protocol module keeps its own parser, commands and wire bytes.
"""

from dataclasses import dataclass
from typing import Optional

from . import sasl


@dataclass(frozen=True)
class Send:
    """Bytes for the client, written completely before the next action runs."""

    data: bytes


@dataclass(frozen=True)
class Close:
    """Close the client connection once everything before it was written."""


@dataclass(frozen=True)
class Log:
    """A line for the error log; the session adds nginx's context suffix."""

    level: str
    message: str


@dataclass(frozen=True)
class StartTLS:
    """Start the TLS handshake on the client connection (the reply was sent just before)."""


@dataclass(frozen=True)
class AuthAttempt:
    """One login the client asked for, as the auth_http request needs it."""

    method: str  # plain, apop, cram-md5, external, none, xoauth2, oauthbearer
    login: bytes
    password: bytes
    attempt: int  # Auth-Login-Attempt: client attempts in this session, from 1
    salt: Optional[bytes] = None  # "<R.T@S>\r\n" for apop and cram-md5
    tag: bytes = b""  # IMAP: the tag the backend login answers under
    helo: bytes = b""  # SMTP: client's HELO/EHLO argument
    esmtp: bool = False  # SMTP: the client used EHLO at least once
    mail_from: bytes = b""  # SMTP: raw MAIL command (method none)
    rcpt_to: bytes = b""  # SMTP: raw RCPT command (method none)
    imap_id: tuple = ()  # IMAP with imap_client_id (ours): the client's ID ((name, value | None), ...)


@dataclass(frozen=True)
class Authenticate:
    """Ask the auth server; the machine reads nothing until the session reports back."""

    request: AuthAttempt


Action = object  # any of the dataclasses above

CRLF = b"\r\n"
# Log texts that more than one protocol writes.
TOO_MANY_INVALID = "client sent too many invalid commands"
TOO_MANY_COMMANDS = "client sent too many commands"


# Commands whose arguments carry credentials: nginx dumps them raw into the log, we never do.
_SECRET_VERBS = (b"LOGIN", b"AUTHENTICATE", b"AUTH", b"PASS", b"APOP")


def escape_for_log(data: bytes) -> str:
    """Control bytes, quotes, backslashes and non-ASCII as \\xNN, so one log line stays one line."""
    out = []
    for byte in data:
        if 0x20 <= byte < 0x7F and byte not in (0x22, 0x5C):
            out.append(chr(byte))
        else:
            out.append("\\x%02X" % byte)
    return "".join(out)


def redact_command(line: bytes) -> bytes:
    """Keep the tag and verb of a credential-bearing line and drop what follows them."""
    words = line.split(None, 2)
    for keep in (1, 2):
        if len(words) > keep - 1 and words[keep - 1].upper() in _SECRET_VERBS:
            if len(words) > keep:
                return b" ".join(words[:keep]) + b" ..."
    return line


def auth_server_text(text) -> bytes:
    """Auth server texts reach the machines as latin-1-decoded header values: back to their bytes."""
    return text if isinstance(text, bytes) else text.encode("latin-1", "replace")


def login_failed(text: bytes) -> Log:
    """nginx's info line for a refused login; the auth server's text is escaped like any log input."""
    return Log("info", 'client login failed: "%s"' % escape_for_log(text))


def too_long(buffer: bytes) -> str:
    return 'client sent too long command "%s"' % escape_for_log(redact_command(buffer))


# The methods whose failure may come with an Auth-Error-SASL challenge (RFC 7628 3.2.2).
OAUTH_METHODS = frozenset(("xoauth2", "oauthbearer"))
# What each method's decoded response holds; EXTERNAL names the user and carries no password, and none
# is carried over from an earlier attempt (spec 9.11, 9.13).
SASL_PARSERS = {
    "plain": sasl.parse_plain,
    "cram-md5": sasl.parse_cram_md5,
    "external": lambda decoded: (decoded, b""),
    "xoauth2": sasl.parse_xoauth2,
    "oauthbearer": sasl.parse_oauthbearer,
}


class Machine:
    """What the client-facing machines share: nginx handles a refused login, a SASL exchange, an invalid
    line and the session's calls alike in every protocol; only the bytes differ.

    A subclass names its State enum in its class statement (``states=``, with the two members whose names
    differ between protocols: ``starting_tls=``, ``sasl_error=``), sets its replies in the class
    attributes below, and supplies ``_process`` (or is a ``LineMachine``), ``_authenticate`` (the
    AuthAttempt fields differ) and ``_failure_reply``.
    """

    __slots__ = ("config", "tls", "state", "errors", "commands", "attempts", "login", "_buffer", "_scan_from",
                 "_login", "_method", "_pending_failure", "_salt", "_cram_challenge")

    _CHALLENGE_PREFIX = b"+ "
    _INVALID = b""  # the reply to a line that cannot be done
    # Replies before closing; None: the invalid reply (ManageSieve alone says BYE with a reason).
    _BYE_TOO_MANY_INVALID = _BYE_LITERAL = None

    def __init_subclass__(cls, states=None, starting_tls=None, sasl_error=None, **kwargs):
        """Bind a protocol's State members (its enum keeps its own names) once, at class creation, so that
        the shared code compares with class attributes, no dearer than the module's own enum."""
        super().__init_subclass__(**kwargs)
        if states is None:
            return  # LineMachine: its subclasses bind
        cls._START, cls._AUTHENTICATING, cls._CLOSED = states.START, states.AUTHENTICATING, states.CLOSED
        cls._AUTH_LOGIN_USERNAME = states.AUTH_LOGIN_USERNAME
        cls._AUTH_LOGIN_PASSWORD = states.AUTH_LOGIN_PASSWORD
        cls._STARTING_TLS = starting_tls
        cls._SASL_ERROR = sasl_error  # the dummy answer to an Auth-Error-SASL challenge is awaited
        # Input is parsed in every other state; in these it waits in the buffer (or is dropped, for TLS).
        cls._READING = frozenset(states) - {states.AUTHENTICATING, starting_tls, states.CLOSED}
        # Each method's exchange starts in the state named after it; LOGIN's asks for the user name first.
        names = {method: "AUTH_" + method.upper().replace("-", "_") for method in sasl.ADVERTISED_ORDER}
        names["login"] = "AUTH_LOGIN_USERNAME"
        exchange = {method: states[name] for method, name in names.items() if name in states.__members__}
        cls._EXCHANGE_STATES = exchange
        cls._EXCHANGE_METHODS = {state: method for method, state in exchange.items() if method != "login"}
        cls._EMPTY_CHALLENGE = cls._challenge(b"")
        cls._USERNAME_CHALLENGE = cls._challenge(sasl.USERNAME_PROMPT)
        cls._PASSWORD_CHALLENGE = cls._challenge(sasl.PASSWORD_PROMPT)

    def __init__(self, config, tls: bool = False, salt: bytes = None):
        self.config = config
        self.tls = tls
        self.state = self._START
        self.errors = 0
        self.commands = 0
        self.attempts = 0
        self._buffer = bytearray()
        self._scan_from = 0  # no LF before this offset: no rescan until more arrives
        self._login = b""  # AUTH LOGIN's user name (POP3: USER's) until the password comes
        # The login nginx's log lines show (its s->login): set by the command that names it (USER, AUTH
        # LOGIN's user name, a CRAM-MD5 response even with a bad digest, any attempt), kept after a
        # refusal, so the session's lines carry it before the auth server is asked, as nginx's do.
        self.login = b""
        self._method = None  # of the pending or last attempt, for Auth-Error-SASL
        self._pending_failure = None  # (reply, wait) behind an Auth-Error-SASL challenge
        self._salt = salt  # for CRAM-MD5 (and APOP): made on first use when not given, then kept
        self._cram_challenge = None

    # --- what the session calls -------------------------------------------------------------------

    def greeting(self):
        return [Send(self.config.greeting)]

    def receive_data(self, data: bytes):
        if self.state is self._CLOSED:
            return []
        if not data:
            return self._close()
        if self.state is self._STARTING_TLS:
            # These bytes belong to the TLS handshake, which the session runs; plain-text bytes behind
            # STARTTLS must never act as commands (spec 2.0.11).
            return []
        self._buffer += data
        return self._process()

    def auth_failed(self, text, wait: bool, error_code=None, sasl_error=None):
        """The auth server refused the pending attempt (spec 3.4, 9.6); ``error_code`` is SMTP's."""
        if self.state is self._CLOSED:
            return []  # the client left while the auth server was asked: nothing to tell it
        if self.state is not self._AUTHENTICATING:
            raise RuntimeError("auth_failed() without a pending attempt (state %s)" % self.state.name)
        text = auth_server_text(text)
        reply = self._failure_reply(text, error_code)
        out = [login_failed(text)]
        if sasl_error is not None and self._method in OAUTH_METHODS:
            # The client must answer the mechanism's error challenge before it learns the verdict.
            out.append(Send(self._challenge(auth_server_text(sasl_error))))
            self._pending_failure = (reply, wait)
            self.state = self._SASL_ERROR
            return out + self._process()
        out.append(Send(reply))
        return out + self._after_failure(wait)

    def tls_established(self):
        if self.state is not self._STARTING_TLS:
            raise RuntimeError("tls_established() without STARTTLS")
        self.tls = True
        self._to_start()
        return []

    def trailing_data(self) -> bytes:
        """Client bytes buffered behind the command that logged in, for the backend once relaying."""
        return bytes(self._buffer)

    @property
    def reading(self) -> bool:
        """False while the session should leave client input unread (auth pending, TLS, closed)."""
        return self.state in self._READING

    @property
    def awaiting_auth(self) -> bool:
        return self.state is self._AUTHENTICATING

    @property
    def closed(self) -> bool:
        return self.state is self._CLOSED

    # --- what every protocol does alike -----------------------------------------------------------

    def _invalid(self) -> bytes:
        return self._INVALID

    @classmethod
    def _challenge(cls, data: bytes) -> bytes:
        return cls._CHALLENGE_PREFIX + data + CRLF

    def _close(self):
        self.state = self._CLOSED
        self._buffer.clear()
        self._scan_from = 0
        return [Close()]

    def _to_start(self):
        self.state = self._START
        self._login = b""
        self._method = None
        self._pending_failure = None

    def _fatal(self, message: str, reply: bytes = None):
        return [Log("info", message), Send(reply or self._invalid())] + self._close()

    def _reject(self, reply: bytes = None):
        """A line that parsed but cannot be done here: the invalid reply, not counted (spec 2.0.5)."""
        self.state = self._START
        return [Send(reply or self._invalid())]

    def _sasl_rejected(self, err):
        return [Log("info", str(err))] + self._reject()

    def _parse_error(self, announces_literal: bool = False):
        self.errors += 1
        if self.errors >= self.config.max_errors:
            return self._fatal(TOO_MANY_INVALID, self._BYE_TOO_MANY_INVALID)
        if announces_literal:
            # The literal's bytes follow and would be read as commands: there is no resynchronising.
            return [Send(self._BYE_LITERAL or self._invalid())] + self._close()
        out = [Send(self._invalid())]
        if self.state is self._SASL_ERROR:
            return out + self._after_failure(self._pending_failure[1], process=False)
        self.state = self._START
        return out

    def _after_failure(self, wait: bool, process: bool = True):
        self._pending_failure = None
        if not wait:
            return self._close()
        self._to_start()
        return self._process() if process else []

    def _begin_tls(self, reply: bytes):
        self._buffer.clear()  # anything pipelined behind STARTTLS was sent in clear: never act on it
        self._scan_from = 0
        self.state = self._STARTING_TLS
        return [Send(reply), StartTLS()]

    # --- SASL exchanges ---------------------------------------------------------------------------

    def _start_exchange(self, method: str):
        """AUTH(ENTICATE) <mechanism> without an initial response: the first challenge."""
        self.state = self._EXCHANGE_STATES[method]
        if method == "cram-md5":
            return [Send(self._cram_md5_challenge())]
        if method == "login" or method == "external":
            return [Send(self._USERNAME_CHALLENGE)]
        return [Send(self._EMPTY_CHALLENGE)]

    def _cram_md5_challenge(self) -> bytes:
        if self._cram_challenge is None:
            if self._salt is None:
                self._salt = sasl.make_salt(self.config.server_name)
            self._cram_challenge = self._challenge(sasl.cram_md5_challenge(self._salt))
        return self._cram_challenge

    def _respond(self, tokens):
        """A response in a SASL exchange, ``tokens`` not empty and only the first read but for the dummy
        answer to an Auth-Error-SASL challenge; raises sasl.SaslError for data the method cannot use."""
        state = self.state
        if state is self._SASL_ERROR:
            return self._sasl_error_response(tokens)
        if state is self._AUTH_LOGIN_USERNAME:
            self._login = self.login = sasl.decode_base64(tokens[0], "login")
            self.state = self._AUTH_LOGIN_PASSWORD
            return [Send(self._PASSWORD_CHALLENGE)]
        if state is self._AUTH_LOGIN_PASSWORD:
            return self._authenticate("plain", self._login, sasl.decode_base64(tokens[0], "login"))
        method = self._EXCHANGE_METHODS[state]
        decoded = sasl.decode_base64(tokens[0], method)
        if method == "cram-md5":
            # nginx takes the login (up to the first space) before it checks the digest.
            self.login = decoded.partition(b" ")[0]
        login, password = SASL_PARSERS[method](decoded)
        return self._authenticate(method, login, password)

    def _sasl_error_response(self, tokens):
        """The failure is told only after the dummy answer RFC 7628 asks for: "AQ==", or for XOAUTH2 an
        empty one; anything else gets the invalid reply instead."""
        reply, wait = self._pending_failure
        # ManageSieve may pass no token at all: the length is checked first.
        if len(tokens) != 1 or (tokens[0] != b"" if self._method == "xoauth2" else tokens[0][:4] != b"AQ=="):
            reply = self._invalid()
        return [Send(reply)] + self._after_failure(wait, process=False)


class LineMachine(Machine):
    """POP3 and SMTP: input is cut at LF and each line handled whole by ``_line``. Unlike nginx 1.22 the
    buffer is compacted after every line (spec 9.13), so a line is too long only when it alone does not
    fit in the client buffer; looking only at complete lines, the same bytes cut anywhere act the same."""

    __slots__ = ()

    def _process(self):
        out = []
        size = self.config.client_buffer
        buffer = self._buffer
        while self.state in self._READING:
            end = buffer.find(b"\n", self._scan_from, size)
            if end < 0:
                if len(buffer) >= size:
                    out += self._too_long(bytes(buffer[:size]))
                else:
                    self._scan_from = len(buffer)
                break
            line = bytes(buffer[: end + 1])
            del buffer[: end + 1]
            self._scan_from = 0
            out += self._line(line)
        return out
