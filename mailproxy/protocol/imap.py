"""The client side of an IMAP session before login (spec 2.1, 9), as a sans-IO machine.

Bytes go in through ``receive_data``; actions come out (common.py). The machine owns the input buffer
(bounded by ``imap_client_buffer``) and works through pipelined commands one at a time, stopping at an
``Authenticate`` until the session reports back. Timers are the session's: it arms the deadline at the
greeting, drops it when an ``Authenticate`` comes out, and arms it anew after an Auth-Wait.
"""

from dataclasses import dataclass

from . import sasl
from .common import (EXCHANGE_STATES, RESPONSE_STATES, AuthAttempt, Authenticate, Kind, LiteralMachine, Log, Send,
                     ServerConfig, State, responses, too_long)
from .imap_parse import parse_line

CRLF = b"\r\n"
GREETING = b"* OK IMAP4 ready\r\n"
OK = b"OK completed\r\n"
BAD = b"BAD invalid command\r\n"
BYE = b"* BYE\r\n"
LITERAL_GO_AHEAD = b"+ OK\r\n"
NO_TAG = b"*"
ID_REPLY = b"* ID NIL\r\n"
ID_OK = b"OK ID completed\r\n"
# imap_client_id: what is kept of a client's ID (RFC 2971 allows 30 pairs); the rest is parsed, not kept.
MAX_ID_PAIRS = 30
MAX_ID_BYTES = 1024

# Only these need their method enabled; PLAIN and LOGIN are always accepted (spec 2.0.8).
GATED = frozenset(("cram-md5", "external", "xoauth2", "oauthbearer"))


@dataclass(frozen=True, kw_only=True)
class ImapConfig(ServerConfig):
    """Per-server settings with every fixed reply already assembled."""

    capability_plain: bytes  # CAPABILITY reply line on a connection without TLS
    capability_tls: bytes  # ... and with TLS (implicit or after STARTTLS)
    client_id: bool = False  # imap_client_id (ours): ID answered before login instead of BAD

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
        settings.setdefault("greeting", GREETING)
        return cls(
            capability_plain=plain + CRLF,
            capability_tls=with_auth + CRLF,
            auth_methods=methods,
            starttls=starttls,
            internal_error=b"* BAD internal server error\r\n",
            ssl_cert_error=b"* BYE SSL certificate error\r\n",
            ssl_no_cert=b"* BYE No required SSL certificate\r\n",
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


class ImapMachine(LiteralMachine):
    """One client's IMAP conversation up to the backend login.

    ``state`` (a ``common.State``) is public for the session and tests; ``tag`` is the tag of the command
    being handled, which every tagged reply, and the backend login's, answers under.
    """

    __slots__ = ("tag", "client_fields", "_quote_open")

    _LITERAL_GO_AHEAD = LITERAL_GO_AHEAD

    def __init__(self, config: ImapConfig, tls: bool = False, salt: bytes = None):
        LiteralMachine.__init__(self, config, tls, salt)
        self.tag = b""  # tag of the command being handled or authenticating (no trailing space)
        self.client_fields = ()  # imap_client_id: the last ID's (name, value | None) pairs, bounded
        self._quote_open = False  # a quoted string cut by its line end, open for the next lines (nginx's)

    def _parse(self, limit):
        if self.state in RESPONSE_STATES:
            parsed = parse_line(self._buffer, limit, True, quote_open=self._quote_open)
        else:
            parsed = parse_line(self._buffer, limit, False, self.config.client_id, self._quote_open)
            # Replies to this command, a refusal of a bad or too long one included, go under its tag.
            self.tag = parsed.tag if parsed.tag is not None else NO_TAG
        if parsed.kind is not Kind.INCOMPLETE:
            self._quote_open = parsed.quote_open  # what the next line starts with
        return parsed

    def _prefix(self) -> bytes:
        return self.tag + b" "

    def _invalid(self) -> bytes:
        return self.tag + b" " + BAD

    def _failure_reply(self, text: bytes, error_code) -> bytes:
        return self.tag + b" NO " + text + CRLF

    def _too_long(self, parsed):
        start = self.state is State.START
        # Continuation lines are SASL data (credentials): log none of it.
        shown = bytes(self._buffer[: parsed.end or self.config.client_buffer]) if start else b"..."
        return self._fatal(too_long(shown))

    def _authenticate(self, method, login, password):
        self.attempts += 1
        self._method = method
        self.login = login
        self.state = State.AUTHENTICATING
        salt = self._salt if method == "cram-md5" else None
        # Positional (keywords to a class call are packed into a dict): the four SMTP fields are empty.
        attempt = AuthAttempt(method, login, password, self.attempts, salt, self.tag, b"", False, b"", b"",
                              self.client_fields)
        return [Authenticate(attempt)]

    def _tls_required(self) -> bool:
        return self.config.starttls == "only" and not self.tls

    # --- commands in the start state --------------------------------------------------------------

    def _noop(self, args):
        return [Send(self._prefix() + OK)]

    def _capability(self, args):
        line = self.config.capability_tls if self.tls else self.config.capability_plain
        return [Send(line + self._prefix() + OK)]

    def _logout(self, args):
        return [Send(BYE + self._prefix() + OK)] + self._close()

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
        # RFC 2595 3.1: whatever the client said in clear may have been a man in the middle's words.
        self.client_fields = ()
        return self._begin_tls(self._prefix() + OK)

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
        if len(args) == 1:
            return self._start_exchange(method)
        if method == "cram-md5":
            return self._reject()
        self.state = EXCHANGE_STATES[method]
        return self._respond(args[1:])

    # --- inside an AUTHENTICATE exchange ----------------------------------------------------------

    def _response(self, args):
        """A continuation line; an empty one is an empty response."""
        try:
            return self._respond(args or (b"",))
        except sasl.SaslError as err:
            if self.state is not State.AUTH_LOGIN_USERNAME:
                raise
            # nginx answers a bad user name in the LOGIN exchange without any tag; clients expect it.
            self.state = State.START
            return [Log("info", str(err)), Send(BAD)]

    # The parser knows no other command before login (ID only with imap_client_id): SELECT and the rest
    # are parse errors, as in nginx.
    TRANSITIONS = {
        (State.START, b"NOOP"): _noop,
        (State.START, b"CAPABILITY"): _capability,
        (State.START, b"LOGOUT"): _logout,
        (State.START, b"STARTTLS"): _starttls,
        (State.START, b"LOGIN"): _login_command,
        (State.START, b"AUTHENTICATE"): _authenticate_command,
        (State.START, b"ID"): _id,
        **responses(_response),
    }
