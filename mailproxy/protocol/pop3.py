"""The POP3 client side before the relay (spec 2.2, 9), sans-IO.

``Pop3Machine`` turns client bytes into actions (common.py) and never touches a socket or a clock. Every
reply the machine can send on its own is assembled once in ``Pop3Config``; the machine only picks, and
formats nothing but the auth server's texts and the per-session salt.

Input is taken one complete line at a time and removed from the buffer as soon as it is handled, so a
line fails as "too long" only when that line alone exceeds ``client_buffer`` (spec 9.13: mailproxy
compacts where nginx would not). Because only complete lines are looked at, the same bytes cut anywhere
give the same actions.
"""

import re
from dataclasses import dataclass

from . import sasl
from .common import (EXCHANGE_STATES, RESPONSE, RESPONSE_STATES, AuthAttempt, Authenticate, LineMachine, Machine,
                     Send, ServerConfig, State, responses, too_long)

CRLF = b"\r\n"
OK = b"+OK\r\n"
INVALID = b"-ERR invalid command\r\n"
GREETING = b"+OK POP3 ready"

# The parser knows these words and no others: STAT, RETR ... are parse errors before login (spec 2.2).
VERBS = frozenset((b"USER", b"PASS", b"APOP", b"QUIT", b"CAPA", b"AUTH", b"NOOP", b"STLS"))
MAX_ARGS = 3
_VERB = re.compile(rb"[A-Za-z]{4}(?= |$)")


@dataclass(frozen=True, kw_only=True)
class Pop3Config(ServerConfig):
    """Everything a POP3 session needs from its server block, wire bytes already assembled; ``greeting``
    is the one without salt."""

    needs_salt: bool  # apop or cram-md5 enabled: the session's salt goes into the greeting
    capa: bytes  # TLS connections, the user state, starttls off
    capa_starttls: bytes  # starttls on, plain connection, start state
    capa_starttls_only: bytes  # starttls only, plain connection, start state
    auth_list: bytes  # reply to a bare AUTH

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
            auth_methods=methods,
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
            internal_error=b"-ERR internal server error\r\n",
            ssl_cert_error=b"-ERR SSL certificate error\r\n",
            ssl_no_cert=b"-ERR No required SSL certificate\r\n",
        )


def parse_command(line: bytes):
    """``(verb, args)`` for a command line without its line end, or None for a parse error."""
    if line.find(b"\r") >= 0:  # not `in`: for bytes, `in` tries an int first and costs an exception
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
    if line.find(b"\r") >= 0:
        return None
    first, *rest = line.split(b" ")
    tokens = [first] + [word for word in rest if word]
    if len(tokens) > MAX_ARGS:
        return None
    return tokens


class Pop3Machine(LineMachine):
    """One client's POP3 conversation up to the backend login.

    ``state`` (a ``common.State``) is public for the session and tests; everything else is internal.
    """

    __slots__ = ("_greeting",)

    _INVALID = INVALID

    def __init__(self, config: Pop3Config, tls: bool = False, salt=None):
        if config.needs_salt and salt is None:
            salt = sasl.make_salt(config.server_name)
        LineMachine.__init__(self, config, tls, salt if config.needs_salt else None)
        # APOP and CRAM-MD5 use the salt the greeting announced.
        self._greeting = GREETING + b" " + self._salt if self._salt is not None else config.greeting

    @property
    def salt(self):
        return self._salt

    def greeting(self):
        return [Send(self._greeting)]

    def _parse(self, line: bytes):
        line = line[:-2] if line[-2:] == b"\r\n" else line[:-1]
        if self.state in RESPONSE_STATES:
            tokens = parse_response(line)
            return None if tokens is None else (RESPONSE, tokens)
        return parse_command(line)

    def _too_long(self, buffer: bytes):
        # A SASL response is a credential whatever it looks like: only commands are shown.
        return self._fatal(too_long(b"..." if self.state in RESPONSE_STATES else buffer))

    def _failure_reply(self, text: bytes, error_code) -> bytes:
        return b"-ERR " + text + CRLF

    def _authenticate(self, method: str, login: bytes, password: bytes):
        self.attempts += 1
        self._method = method
        self.login = login
        self.state = State.AUTHENTICATING
        salt = self._salt if method in ("apop", "cram-md5") else None
        return [Authenticate(AuthAttempt(method, login, password, self.attempts, salt))]

    def _starttls_only(self) -> bool:
        return self.config.starttls == "only" and not self.tls

    # -- commands -------------------------------------------------------------------------------

    def _user(self, args):
        if self._starttls_only() or len(args) != 1:
            return self._reject()
        self._login = self.login = args[0]
        self.state = State.USER
        return [Send(OK)]

    def _pass(self, args):
        if len(args) != 1:
            return self._reject()
        return self._authenticate("plain", self._login, args[0])

    def _apop(self, args):
        if self._starttls_only() or "apop" not in self.config.auth_methods or len(args) != 2:
            return self._reject()
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
            return self._reject()
        return self._begin_tls(OK)

    def _auth(self, args):
        if self._starttls_only():
            return self._reject()
        if not args:
            return [Send(self.config.auth_list)]
        method = sasl.mechanism(args[0])
        initial = args[1:]
        enabled = method in ("plain", "login") or method in self.config.auth_methods
        if method is None or not enabled or len(initial) > (0 if method == "cram-md5" else 1):
            return self._reject()
        if not initial:
            return self._start_exchange(method)
        self.state = EXCHANGE_STATES[method]
        return self._respond(initial)

    # Any other verb the parser knows (PASS before USER, USER after it, ...) gets the invalid reply.
    TRANSITIONS = {
        (State.START, b"USER"): _user,
        (State.START, b"APOP"): _apop,
        (State.START, b"AUTH"): _auth,
        (State.START, b"CAPA"): _capa,
        (State.START, b"STLS"): _stls,
        (State.START, b"NOOP"): _noop,
        (State.START, b"QUIT"): _quit,
        (State.USER, b"PASS"): _pass,
        (State.USER, b"CAPA"): _capa,
        (State.USER, b"NOOP"): _noop,
        (State.USER, b"QUIT"): _quit,
        **responses(Machine._respond),
    }
