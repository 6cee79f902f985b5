"""The auth server's reply: header parsing (spec 3.3, 9.6) and the decision that follows (spec 3.4).

Sans-IO. ``ReplyParser.feed`` takes bytes as they arrive and returns the ``AuthReply`` once the blank line
ending the header block is seen; ``decide`` turns a reply into one of ``AuthOk``, ``AuthFail``,
``AuthRetry`` or ``AuthError``. Texts meant for the error log are ``str``; header values are kept as the
auth server sent them (``bytes``), and the failure texts that go back to the client are decoded as
latin-1 so that ``.encode("latin-1")`` restores nginx's raw bytes exactly.

The HTTP status is ignored as nginx ignores it. Only for keep-alive connections does the parser also note
the HTTP version, ``Connection``, ``Content-Length`` and ``Transfer-Encoding``: they say how much body
follows and whether the connection may carry the next request.
"""

import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Optional

from mailproxy.protocol.common import OAUTH_METHODS, value_class

# nginx reads the reply into one 1024-byte buffer; a header block that does not fit is a failed read.
HEADER_LIMIT = 1024

_HEADER = re.compile(rb"([A-Za-z0-9][A-Za-z0-9-]*)(?::[ ]*(.*?)[ ]*)?", re.DOTALL)
_DIGITS = re.compile(rb"[0-9]+")
_IPV4 = re.compile(rb"([0-9]+)\.([0-9]+)\.([0-9]+)\.([0-9]+)")
_NO_PASSWORD_METHODS = frozenset(("apop", "cram-md5", "external"))
_SMTP_AUTH_METHODS = frozenset((b"none", b"plain", b"login"))


# What went wrong with an exchange, for the metrics' login result and the keep-alive retry.
TIMED_OUT = "timed out"  # auth_http_timeout passed
SOCKET_FAILED = "socket"  # connect(), send() or recv() failed
BROKEN_REPLY = "reply"  # the reply could not be read as nginx reads one (the default: the parser raises it)


class AuthHttpError(Exception):
    """The exchange with the auth server failed; ``message`` is the error-log text (nginx's where it has
    one), ``kind`` one of TIMED_OUT, SOCKET_FAILED, BROKEN_REPLY."""

    def __init__(self, message: str, kind: str = BROKEN_REPLY):
        super().__init__(message)
        self.message = message
        self.kind = kind


def _text(value: bytes) -> str:
    return value.decode("latin-1")


@dataclass(slots=True)
class AuthReply:
    """What the header block said. None = header absent; b"" = present and empty."""

    peer: str
    status: Optional[bytes] = None  # the last Auth-Status value
    failure: Optional[bytes] = None  # the last Auth-Status that was neither OK nor WAIT: it sticks
    wait_status: bool = False  # an Auth-Status: WAIT was seen
    server: Optional[bytes] = None
    port: Optional[bytes] = None
    user: Optional[bytes] = None
    password: Optional[bytes] = None
    wait: Optional[int] = None  # Auth-Wait seconds, the last valid value
    error_code: Optional[bytes] = None
    error_sasl: Optional[bytes] = None
    method: Optional[bytes] = None  # Auth-Method (ours): how to log in to an SMTP backend this session
    ssl_upstream: Optional[bytes] = None  # ours: Auth-SSL-Upstream, TLS to this backend
    # Connection reuse (keep-alive mode only).
    http_version: Optional[bytes] = None  # b"HTTP/1.1", ... ; None without a status line
    http_status: Optional[int] = None
    connection: Optional[bytes] = None
    content_length: Optional[int] = None
    chunked: bool = False

    @property
    def reusable(self) -> bool:
        """Whether the connection can carry another request once the body has been read."""
        if self.http_version is None or self.chunked or self.body_length is None:
            return False
        connection = (self.connection or b"").lower()
        if self.http_version == b"HTTP/1.1":
            return b"close" not in connection
        return self.http_version == b"HTTP/1.0" and b"keep-alive" in connection

    @property
    def body_length(self) -> Optional[int]:
        """Bytes of body after the header block; None when only EOF ends it."""
        if self.http_status is not None and (100 <= self.http_status < 200 or self.http_status in (204, 304)):
            return 0
        return self.content_length


def _set_status(reply: AuthReply, value: bytes) -> None:
    reply.status = value
    if value == b"OK":
        return
    if value == b"WAIT":
        reply.wait_status = True
        return
    reply.failure = value


def _set_wait(reply: AuthReply, value: bytes) -> None:
    # nginx's ngx_atoi: digits only, no sign; anything else leaves the earlier value in place.
    if _DIGITS.fullmatch(value):
        reply.wait = int(value)


def _set_content_length(reply: AuthReply, value: bytes) -> None:
    reply.content_length = int(value) if _DIGITS.fullmatch(value) else None


def _setter(field):
    def store(reply, value):
        setattr(reply, field, value)

    return store


def _set_transfer_encoding(reply: AuthReply, value: bytes) -> None:
    reply.chunked = True


_HEADERS = {
    b"auth-status": _set_status,
    b"auth-server": _setter("server"),
    b"auth-port": _setter("port"),
    b"auth-user": _setter("user"),
    b"auth-pass": _setter("password"),
    b"auth-wait": _set_wait,
    b"auth-error-code": _setter("error_code"),
    b"auth-error-sasl": _setter("error_sasl"),
    b"auth-method": _setter("method"),
    b"auth-ssl-upstream": _setter("ssl_upstream"),
    b"connection": _setter("connection"),
    b"content-length": _set_content_length,
    b"transfer-encoding": _set_transfer_encoding,
}


class ReplyParser:
    """Incremental parser for one reply's header block.

    ``feed`` returns None until the header block is complete, then the ``AuthReply``; ``body`` then holds
    the bytes that came after the blank line. ``eof`` reports a connection closed too early.
    """

    def __init__(self, peer: str, limit: int = HEADER_LIMIT):
        self.peer = peer
        self.limit = limit
        self.reply = AuthReply(peer)
        self.body = b""
        self.done = False
        self._buf = b""
        self._pos = 0  # start of the first line not parsed yet
        self._in_status = None  # None: not known yet whether a status line starts the reply

    def _invalid_header(self) -> AuthHttpError:
        return AuthHttpError("auth http server %s sent invalid header in response" % self.peer)

    def feed(self, data: bytes) -> Optional[AuthReply]:
        if self.done:
            self.body += data
            return self.reply
        self._buf += data
        # Only the first `limit` bytes are ever looked at, as nginx's buffer holds no more.
        view = self._buf[: self.limit]
        if self._in_status is None:
            whole = self._whole_block(view)
            if whole is not None:
                return whole
            if len(view) < 5 and b"HTTP/".startswith(view):
                return self._check_limit(view)
            self._in_status = view.startswith(b"HTTP/")
        while True:
            end = view.find(b"\n", self._pos)
            if end < 0:
                return self._check_limit(view)
            line = view[self._pos : end]
            next_pos = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if self._in_status:
                self._status_line(line)
                self._in_status = False
            elif not line:
                self.done = True
                self.body = self._buf[next_pos:]
                self._buf = b""
                return self.reply
            else:
                self._header_line(line)
            self._pos = next_pos

    def _whole_block(self, view: bytes) -> Optional[AuthReply]:
        """The common reply, read in one go: its whole header block in the first bytes, every line
        ending in CRLF. A bare LF (a line end too, for nginx) sends it line by line (None); a stray CR
        is in the same line either way, where the line's reader refuses it."""
        end = view.find(b"\r\n\r\n")
        if end <= 0:
            return None
        head = view[:end]
        lines = head.split(b"\r\n")
        if head.count(b"\n") != len(lines) - 1:
            return None
        first = lines[0]
        if not first:
            return None  # the block ends before it starts: the line-by-line path says how
        if first.startswith(b"HTTP/"):
            self._status_line(first)
            del lines[0]
        for line in lines:
            self._header_line(line)
        self._in_status = False
        self.done = True
        self.body = self._buf[end + 4 :]
        self._buf = b""
        return self.reply

    def _check_limit(self, view: bytes) -> None:
        if len(view) < self.limit:
            return None
        # A syntax error inside the partial line is what nginx's byte parser would have hit first.
        partial = view[self._pos :]
        if partial.endswith(b"\r"):
            partial = partial[:-1]
        if self._in_status is not False:
            if b"\r" in partial and partial.startswith(b"HTTP/"):
                raise AuthHttpError("auth http server %s sent invalid response" % self.peer)
        elif partial and (b"\r" in partial or _HEADER.match(partial) is None or not self._prefix_ok(partial)):
            raise self._invalid_header()
        raise AuthHttpError("auth http server %s sent too big header in response" % self.peer)

    @staticmethod
    def _prefix_ok(partial: bytes) -> bool:
        match = _HEADER.match(partial)
        # The name may continue in the next bytes; only a character that can end nothing is an error.
        return match.end(1) == len(partial) or partial[match.end(1) : match.end(1) + 1] == b":"

    def _status_line(self, line: bytes) -> None:
        if line.find(b"\r") >= 0:  # not `in`: for bytes, `in` tries an int first and costs an exception
            raise AuthHttpError("auth http server %s sent invalid response" % self.peer)
        version, _, rest = line.partition(b" ")
        self.reply.http_version = version
        code = rest[:3]
        if len(code) == 3 and code.isdigit():
            self.reply.http_status = int(code)

    def _header_line(self, line: bytes) -> None:
        name, _, value = line.partition(b":")
        store = _HEADERS.get(name.lower())
        if store is not None and value.find(b"\r") < 0:
            # A header we read has a name of token bytes (its lower case is a key): what _HEADER would
            # take as the value is the rest of the line without its spaces at either end.
            store(self.reply, value.strip(b" "))
            return
        match = _HEADER.fullmatch(line)
        if match is None or b"\r" in line:
            raise self._invalid_header()

    def eof(self) -> None:
        """The auth server closed before the header block ended."""
        if not self.done:
            raise AuthHttpError("auth http server %s prematurely closed connection" % self.peer)


def parse(data: bytes, peer: str = "") -> Optional[AuthReply]:
    """One-shot form: the reply in ``data``, None when its header block is not complete yet."""
    return ReplyParser(peer).feed(data)


# --- the decision (spec 3.4) ---------------------------------------------------------------------------


@value_class
class AuthOk:
    addr: str  # normalised IP literal to connect to
    port: int
    upstream_text: str  # "<Auth-Server>:<Auth-Port>" as received, for logs
    login: Optional[bytes]  # Auth-User, None = keep the client's login
    password: Optional[bytes]  # Auth-Pass, None = keep the client's password
    family: int = socket.AF_INET
    # Auth-SSL-Upstream: on (ours) turns TLS to this backend on for the session whatever proxy_ssl says;
    # "off" or absence leaves the server's proxy_ssl/proxy_starttls in charge (it never turns TLS off).
    ssl_upstream: bool = False
    # SMTP backend login chosen by the auth server (ours): "none", "plain" or "login"; None = proxy_smtp_auth
    smtp_auth: Optional[str] = None


@value_class
class AuthFail:
    text: str  # Auth-Status as sent (latin-1), for the client's NO / -ERR / 5xx line and the log
    wait: int  # seconds before replying; 0 = reply and close
    error_code: Optional[str] = None  # SMTP only: replaces "535 5.7.0"
    sasl_error: Optional[str] = None  # xoauth2/oauthbearer only: the challenge to send first


@value_class
class AuthRetry:
    wait: int  # seconds before asking again with the same request


@value_class
class AuthError:
    log_message: str  # error-level log text; the client gets the internal-error reply


# Auth-Server values already read: an auth server names the same few backends over and over. Bounded,
# as the values come from the network; addresses are no secret.
_ADDRESSES = {}
_ADDRESSES_KEPT = 1024


def server_address(value: bytes):
    """(family, normalised address) for an IP literal as nginx accepts it, else None.

    IPv4 octets are decimal with leading zeros allowed; 255.255.255.255 is refused because nginx reads it
    as INADDR_NONE. IPv6 without brackets and without a zone.
    """
    try:
        return _ADDRESSES[value]
    except KeyError:
        pass
    if len(_ADDRESSES) >= _ADDRESSES_KEPT:
        _ADDRESSES.clear()
    found = _ADDRESSES[value] = _server_address(value)
    return found


def _server_address(value: bytes):
    match = _IPV4.fullmatch(value)
    if match is not None:
        octets = [int(part) for part in match.groups()]
        if max(octets) > 255 or octets == [255, 255, 255, 255]:
            return None
        return socket.AF_INET, "%d.%d.%d.%d" % tuple(octets)
    if b"%" in value or b":" not in value:
        return None
    try:
        return socket.AF_INET6, str(ipaddress.IPv6Address(value.decode("ascii")))
    except (UnicodeDecodeError, ValueError):
        return None


def decide(reply: AuthReply, protocol: str, method: str):
    """What the session does next (spec 3.4, in its order; 9.6 for Auth-Error-SASL).

    Without Auth-Pass, IMAP and POP3 need a password the backend can take: EXTERNAL has none, and the
    APOP/CRAM-MD5 digest is useless to a backend.

    nginx re-queries at once, and forever, when WAIT comes without a positive Auth-Wait; here that reply is
    an internal error with its own log line instead.
    """
    peer = reply.peer
    failure = reply.failure
    # nginx words the SMTP reply from the status text alone, so an empty one is no failure there.
    if failure is not None and not (protocol == "smtp" and failure == b""):
        error_code = None
        if protocol == "smtp" and reply.error_code:
            error_code = _text(reply.error_code)
        sasl_error = None
        if method in OAUTH_METHODS and reply.error_sasl is not None:
            sasl_error = _text(reply.error_sasl)
        return AuthFail(_text(failure), reply.wait or 0, error_code, sasl_error)
    if reply.wait_status:
        if reply.wait:
            return AuthRetry(reply.wait)
        return AuthError(
            "auth http server %s sent \"Auth-Status: WAIT\" without a positive Auth-Wait" % peer
        )
    if not reply.server or not reply.port:
        return AuthError("auth http server %s did not send server or port" % peer)
    if protocol != "smtp" and reply.password is None and method in _NO_PASSWORD_METHODS:
        return AuthError("auth http server %s did not send password" % peer)
    address = server_address(reply.server)
    if address is None:
        return AuthError('auth http server %s sent invalid server address:"%s"' % (peer, _text(reply.server)))
    port = int(reply.port) if _DIGITS.fullmatch(reply.port) and len(reply.port) < 10 else 0
    if not 1 <= port <= 65535:
        return AuthError('auth http server %s sent invalid server port:"%s"' % (peer, _text(reply.port)))
    family, addr = address
    # Any other Auth-Method value is ignored, as nginx ignores the header: an auth server echoing the
    # request's "Auth-Method: cram-md5" must not change the backend login.
    smtp_auth = None
    if protocol == "smtp" and reply.method is not None and reply.method.lower() in _SMTP_AUTH_METHODS:
        smtp_auth = _text(reply.method.lower())
    # Positional, as every value made per login: keywords to a class call are packed into a dict.
    return AuthOk(addr, port, "%s:%s" % (_text(reply.server), _text(reply.port)), reply.user, reply.password,
                  family, (reply.ssl_upstream or b"").lower() == b"on", smtp_auth)
