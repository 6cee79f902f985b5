"""What the client-facing machines hand to the session, and what they share.

The machines never touch a socket: every step ends in a list of actions that the session carries out in
order. Actions are value classes (``value_class``), so tests compare whole transcripts with ``==``.

The four machines (imap.py, pop3.py, smtp.py, sieve.py) have one shape. ``State`` names the states with
one name for what nginx handles alike in every protocol; ``ServerConfig`` holds the settings every
protocol reads; ``Machine`` does what nginx does alike (a refused login, the SASL exchanges, invalid and
too many commands, STARTTLS). Each protocol keeps its parser, its wire bytes and its transition table:
``TRANSITIONS`` in its machine class, a plain dict from (state, verb) to the handler, where the verb of a
SASL response line is ``RESPONSE``. ``LineMachine`` reads the CRLF lines of POP3 and SMTP,
``LiteralMachine`` the commands of IMAP and ManageSieve, whose literals may carry line ends.
"""

import enum
from dataclasses import dataclass, field
from typing import List, Optional

from mailproxy.log import escape_bytes

from . import sasl


def value_class(cls):
    """A dataclass for the values a login hands on (actions, attempts, verdicts): slotted, compared and
    hashed by value, and never changed once made. Not ``frozen=True``, which would enforce the last at a
    price paid on every login: its __init__ sets each field through object.__setattr__ (an AuthAttempt
    costs 19,000 instructions so, 4,400 without; callgrind)."""
    return dataclass(slots=True, unsafe_hash=True)(cls)


@value_class
class Send:
    """Bytes for the client, written completely before the next action runs."""

    data: bytes


@value_class
class Close:
    """Close the client connection once everything before it was written."""


@value_class
class Log:
    """A line for the error log; the session adds nginx's context suffix."""

    level: str
    message: str


@value_class
class StartTLS:
    """Start the TLS handshake on the client connection (the reply was sent just before)."""


@value_class
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


@value_class
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
    return Log("info", 'client login failed: "%s"' % escape_bytes(text))


def too_long(buffer: bytes) -> str:
    return 'client sent too long command "%s"' % escape_bytes(redact_command(buffer))


# --- states -------------------------------------------------------------------------------------------


class State(enum.Enum):
    """Where a client is before login. What nginx handles alike in every protocol has one name here; a
    machine reaches only the states its transition table and its mechanisms lead to (POP3 alone has USER,
    ManageSieve offers neither CRAM-MD5 nor EXTERNAL)."""

    START = "a command is expected"
    USER = "POP3: USER accepted, PASS expected"
    # AUTH(ENTICATE) <mechanism> without an initial response: the client's response is expected.
    AUTH_PLAIN = "PLAIN response"
    AUTH_LOGIN_USERNAME = "LOGIN user name"
    AUTH_LOGIN_PASSWORD = "LOGIN password"
    AUTH_CRAM_MD5 = "CRAM-MD5 response"
    AUTH_EXTERNAL = "EXTERNAL response"
    AUTH_XOAUTH2 = "XOAUTH2 response"
    AUTH_OAUTHBEARER = "OAUTHBEARER response"
    SASL_ERROR = "dummy response to an Auth-Error-SASL challenge"
    AUTHENTICATING = "the session asks the auth server"
    STARTING_TLS = "the session runs the TLS handshake"
    CLOSED = "closed"

    # Every table and set lookup hashes the state. Enum's __hash__ (of the name) is Python code; members
    # are singletons compared by identity, so hashing by identity, in C, is equivalent and quicker.
    __hash__ = object.__hash__


# Input is parsed in every other state; in these it waits in the buffer (or, for TLS, is dropped).
READING = frozenset(State) - {State.AUTHENTICATING, State.STARTING_TLS, State.CLOSED}
# The state each mechanism's exchange starts in; LOGIN asks for the user name first.
EXCHANGE_STATES = {
    "plain": State.AUTH_PLAIN,
    "login": State.AUTH_LOGIN_USERNAME,
    "cram-md5": State.AUTH_CRAM_MD5,
    "external": State.AUTH_EXTERNAL,
    "xoauth2": State.AUTH_XOAUTH2,
    "oauthbearer": State.AUTH_OAUTHBEARER,
}
# The method whose response completes the exchange in each state (LOGIN's takes two responses).
EXCHANGE_METHODS = {state: method for method, state in EXCHANGE_STATES.items() if method != "login"}
# The states in which a line is a SASL response, not a command.
RESPONSE_STATES = frozenset(EXCHANGE_METHODS) | {
    State.AUTH_LOGIN_USERNAME, State.AUTH_LOGIN_PASSWORD, State.SASL_ERROR}
# The verb of a SASL response line in the transition tables.
RESPONSE = b""


def responses(handler, states=RESPONSE_STATES):
    """Transition-table entries: ``handler`` takes the SASL response lines in ``states``."""
    return {(state, RESPONSE): handler for state in states}


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


# --- configuration ------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """What every client machine and the session read from a ``server {}`` block, replies assembled once;
    each protocol's config adds its own fields and a ``build()`` that assembles them."""

    auth_methods: frozenset = frozenset(("plain",))  # <protocol>_auth
    starttls: str = "off"  # "off" | "on" | "only"
    client_buffer: int = 4096  # <protocol>_client_buffer: the longest command, its literals included
    max_errors: int = 5
    max_commands: int = 1000
    server_name: str = "localhost"  # in the CRAM-MD5 and APOP salt
    greeting: bytes = b""  # ManageSieve greets with its capabilities, which depend on TLS (SieveMachine)
    # For the session: what the client gets when things fail outside the machine.
    internal_error: bytes
    ssl_cert_error: bytes
    ssl_no_cert: bytes


# --- the shared machine -------------------------------------------------------------------------------


class Machine:
    """What the client-facing machines share: nginx handles a refused login, a SASL exchange, an invalid
    line and the session's calls alike in every protocol; only the bytes differ.

    A protocol's machine derives from ``LineMachine`` or ``LiteralMachine`` (which read the input and say
    what becomes of a verb the table has no entry for), sets its replies in the class attributes below and
    its ``TRANSITIONS``, and supplies ``_parse``, ``_too_long``, ``_authenticate`` (the AuthAttempt fields
    differ) and ``_failure_reply``. A handler takes the machine and the command's arguments (a SASL
    response's tokens) and returns actions.
    """

    __slots__ = ("config", "tls", "state", "errors", "commands", "attempts", "login", "_buffer", "_scan_from",
                 "_login", "_method", "_pending_failure", "_salt", "_cram_challenge")

    # (state, verb) -> handler; a verb the parser knows that has no entry in this state: ``_unexpected``.
    TRANSITIONS = {}
    _CHALLENGE_PREFIX = b"+ "
    _INVALID = b""  # the reply to a line that cannot be done
    # Replies before closing; None: the invalid reply (ManageSieve alone says BYE with a reason).
    _BYE_TOO_MANY_INVALID = _BYE_TOO_MANY_COMMANDS = _BYE_LITERAL = None
    # ManageSieve re-issues its capabilities, its greeting, unasked after STARTTLS (RFC 5804 2.2).
    _GREETS_AFTER_TLS = False

    def __init__(self, config, tls: bool = False, salt: bytes = None):
        self.config = config
        self.tls = tls
        self.state = State.START
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
        state = self.state
        if state is _CLOSED:
            return []
        if not data:
            return self._close()
        if state is _STARTING_TLS:
            # These bytes belong to the TLS handshake, which the session runs; plain-text bytes behind
            # STARTTLS must never act as commands (spec 2.0.11).
            return []
        self._buffer += data
        return self._process()

    def auth_failed(self, text, wait: bool, error_code=None, sasl_error=None):
        """The auth server refused the pending attempt (spec 3.4, 9.6); ``error_code`` is SMTP's."""
        if self.state is State.CLOSED:
            return []  # the client left while the auth server was asked: nothing to tell it
        if self.state is not State.AUTHENTICATING:
            raise RuntimeError("auth_failed() without a pending attempt (state %s)" % self.state.name)
        text = auth_server_text(text)
        reply = self._failure_reply(text, error_code)
        out = [login_failed(text)]
        if sasl_error is not None and self._method in OAUTH_METHODS:
            # The client must answer the mechanism's error challenge before it learns the verdict.
            out.append(Send(self._challenge(auth_server_text(sasl_error))))
            self._pending_failure = (reply, wait)
            self.state = State.SASL_ERROR
            return out + self._process()
        out.append(Send(reply))
        return out + self._after_failure(wait)

    def tls_established(self):
        """The handshake after STARTTLS is done: a new start, with TLS. The session reports a handshake
        only after StartTLS: a call out of turn is a bug and raises, as ``auth_failed``'s does (but for a
        client that left meanwhile)."""
        if self.state is State.CLOSED:
            return []  # the client left while the handshake ran: nothing to tell it
        if self.state is not State.STARTING_TLS:
            raise RuntimeError("tls_established() without STARTTLS (state %s)" % self.state.name)
        self.tls = True
        self._to_start()
        return self.greeting() if self._GREETS_AFTER_TLS else []

    def trailing_data(self) -> bytes:
        """Client bytes buffered behind the command that logged in, for the backend once relaying."""
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
        return self.state is _CLOSED

    # --- what every protocol does alike -----------------------------------------------------------

    def _command(self, verb: bytes, args):
        """A parsed command, or SASL response (``verb`` RESPONSE): counted against max_commands (spec
        9.8), then done by the handler the protocol's table has for it in this state. SASL data the method
        cannot use is refused with nginx's info line and the invalid reply."""
        self.commands += 1
        if self.commands > self.config.max_commands:
            return self._fatal(TOO_MANY_COMMANDS, self._BYE_TOO_MANY_COMMANDS)
        handler = self.TRANSITIONS.get((self.state, verb))
        if handler is None:
            return self._unexpected()
        try:
            return handler(self, args)
        except sasl.SaslError as err:
            return self._sasl_rejected(err)

    def _invalid(self) -> bytes:
        return self._INVALID

    @classmethod
    def _challenge(cls, data: bytes) -> bytes:
        return cls._CHALLENGE_PREFIX + data + CRLF

    def _close(self):
        self.state = State.CLOSED
        self._buffer.clear()
        self._scan_from = 0
        return [Close()]

    def _to_start(self):
        self.state = State.START
        self._login = b""
        self._method = None
        self._pending_failure = None

    def _fatal(self, message: str, reply: bytes = None):
        return [Log("info", message), Send(reply or self._invalid())] + self._close()

    def _reject(self, reply: bytes = None):
        """A line that parsed but cannot be done here: the invalid reply, not counted (spec 2.0.5)."""
        self.state = State.START
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
        if self.state is State.SASL_ERROR:
            return out + self._after_failure(self._pending_failure[1], process=False)
        self.state = State.START
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
        self.state = State.STARTING_TLS
        return [Send(reply), StartTLS()]

    # --- SASL exchanges ---------------------------------------------------------------------------

    def _start_exchange(self, method: str):
        """AUTH(ENTICATE) <mechanism> without an initial response: the first challenge."""
        self.state = EXCHANGE_STATES[method]
        if method == "cram-md5":
            return [Send(self._cram_md5_challenge())]
        if method == "login" or method == "external":
            return [Send(self._challenge(sasl.USERNAME_PROMPT))]
        return [Send(self._challenge(b""))]

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
        if state is State.SASL_ERROR:
            return self._sasl_error_response(tokens)
        if state is State.AUTH_LOGIN_USERNAME:
            self._login = self.login = sasl.decode_base64(tokens[0], "login")
            self.state = State.AUTH_LOGIN_PASSWORD
            return [Send(self._challenge(sasl.PASSWORD_PROMPT))]
        if state is State.AUTH_LOGIN_PASSWORD:
            return self._authenticate("plain", self._login, sasl.decode_base64(tokens[0], "login"))
        method = EXCHANGE_METHODS[state]
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


# Tested on every receive_data(): CPython 3.11 reads a module global several times faster than an Enum
# member off its class.
_CLOSED, _STARTING_TLS = State.CLOSED, State.STARTING_TLS


class LineMachine(Machine):
    """POP3 and SMTP: input is cut at LF and each line handled whole. Unlike nginx 1.22 the buffer is
    compacted after every line (spec 9.13), so a line is too long only when it alone does not fit in the
    client buffer; looking only at complete lines, the same bytes cut anywhere act the same.

    ``_parse(line)`` gives (verb, arguments), RESPONSE as the verb of a SASL response, or None for a
    parse error; ``_too_long(buffer)`` ends a line that does not fit."""

    __slots__ = ()

    def _process(self):
        out = []
        size = self.config.client_buffer
        buffer = self._buffer
        while self.state in READING:
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
            parsed = self._parse(line)
            out += self._parse_error() if parsed is None else self._command(parsed[0], parsed[1])
        return out

    def _unexpected(self):
        """A command the parser knows but this state does not take (PASS before USER, SMTP's VRFY): the
        invalid reply, not counted as an error, as nginx does."""
        return self._reject()


# --- IMAP and ManageSieve -----------------------------------------------------------------------------


class Kind(enum.Enum):
    COMPLETE = "complete"  # a whole command: tag, verb, args, end
    INVALID = "invalid"  # a parse error; end is just past its LF
    INCOMPLETE = "incomplete"  # wait for more bytes (or, with the buffer full, too long)


# Tested on every parse (see _CLOSED).
_INCOMPLETE, _INVALID = Kind.INCOMPLETE, Kind.INVALID


@dataclass(slots=True)
class Parsed:
    """A command at the head of the buffer as IMAP's and ManageSieve's tokenizers read it."""

    kind: Kind
    tag: Optional[bytes] = None  # IMAP: None when no tag was read completely (or a continuation line)
    verb: bytes = b""  # upper case; RESPONSE for a continuation line
    args: List[bytes] = field(default_factory=list)  # strings, quoted or literal (IMAP: NIL as None)
    end: int = 0  # bytes the command occupies, LF included
    sync_literals: int = 0  # IMAP: synchronising literal headers passed (each owes the client a "+ OK")
    close: bool = False  # an invalid line announcing a literal whose bytes cannot be told from commands
    wait_for: int = 0  # INCOMPLETE: where the LF that may complete the command can be (a literal's end)
    quote_open: bool = False  # IMAP: a quoted string ended with its line, still open for the next one


class LiteralMachine(Machine):
    """IMAP and ManageSieve: a string argument may be a literal, whose bytes may hold line ends, so input
    is not cut at LF but tokenized from the head of the buffer, whole commands one at a time, and parsed
    again only when something that can change the answer arrived (an LF, or the rest of a literal).

    ``_parse(limit)`` reads the command at the head of the buffer; ``_too_long(parsed)`` ends one that
    cannot fit. An IMAP client's synchronising literal is acknowledged as soon as its header is read."""

    __slots__ = ("_acknowledged",)

    # IMAP's "+ OK"; ManageSieve's parser never counts a synchronising literal (RFC 5804 has no
    # continuation reply for one).
    _LITERAL_GO_AHEAD = None

    def __init__(self, config, tls: bool = False, salt: bytes = None):
        Machine.__init__(self, config, tls, salt)
        self._acknowledged = 0  # go-aheads already sent for the command at the head of the buffer

    def _process(self):
        out = []
        limit = self.config.client_buffer
        buffer = self._buffer
        while self.state in READING:
            full = len(buffer) >= limit
            if not full and buffer.find(b"\n", self._scan_from) < 0:
                break
            parsed = self._parse(limit)
            if parsed.sync_literals > self._acknowledged:
                out += [Send(self._LITERAL_GO_AHEAD)] * (parsed.sync_literals - self._acknowledged)
                self._acknowledged = parsed.sync_literals
            kind = parsed.kind
            if kind is _INCOMPLETE:
                if full:
                    out += self._too_long(parsed)
                else:
                    self._scan_from = max(len(buffer), parsed.wait_for)
                break
            del buffer[: parsed.end]
            self._scan_from = 0
            self._acknowledged = 0
            if kind is _INVALID:
                out += self._parse_error(parsed.close)
            else:
                out += self._command(parsed.verb, parsed.args)
        return out

    def _unexpected(self):
        """A command unknown before login: a parse error (IMAP's parser already makes SELECT one)."""
        return self._parse_error()
