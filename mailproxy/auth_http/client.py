"""Talking to the auth server over gevent sockets (spec 3.1, 3.5).

Two transports behind one ``ask``:

- nginx's (default): a new connection for every request, HTTP/1.0, the whole reply header due within
  ``auth_http_timeout`` of the connect, closed as soon as the header block ends (the body is never read);
- keep-alive (``auth_http_keepalive on``, ours): HTTP/1.1 over connections kept idle in a small pool shared
  by every server of this worker that names the same auth server. The body is read and dropped by
  ``Content-Length`` so that the next reply starts on a clean stream; a reply without a length, or one
  that says ``Connection: close``, retires its connection.

A pooled connection may have been closed by the auth server while idle. If it fails before the first reply
byte arrives, the request goes once more over a fresh connection: GET to an auth server is safe to repeat,
and nothing of the first reply was seen. Any later failure is reported, never retried.

Errors are ``AuthHttpError`` carrying nginx's error-log text (``connect() to ... failed (111: ...)``,
``auth http server ... timed out (110: Connection timed out)``, ``recv() failed (...)``).

``ask(request, debug)``: with error_log at debug the session passes its debug writer, and the transport
says what it does (connect, reuse, each send and read, keep or close); the bytes themselves are never
logged, since the request carries the password.
"""

import errno
import os
import time
from collections import deque

from gevent import socket

from mailproxy.netio import send_all

from .response import AuthHttpError, ReplyParser

RECV_SIZE = 4096
# Idle connections kept per auth server; more concurrent requests open more, and the surplus is closed.
POOL_IDLE = 16

_monotonic = time.monotonic


def _os_error(call: str, peer_text: str, exc: OSError) -> AuthHttpError:
    code = exc.errno or errno.EIO
    return AuthHttpError("%s%s failed (%d: %s)" % (call, peer_text, code, os.strerror(code)))


class _Connection:
    """One socket to the auth server with the deadline of the request it is serving."""

    __slots__ = ("sock", "deadline", "debug")

    def __init__(self, sock):
        self.sock = sock
        self.deadline = 0.0
        self.debug = None

    def close(self):
        self.sock.close()


class _DeadBeforeReply(Exception):
    """A reused connection failed before any reply byte: the request may go over a fresh one."""

    def __init__(self, error: AuthHttpError):
        super().__init__(error.message)
        self.error = error


class IdlePool:
    """Idle keep-alive connections to one auth server (last in, first out: the warmest is reused)."""

    def __init__(self, size: int = POOL_IDLE):
        self.size = size
        self._idle = deque()

    def take(self):
        while self._idle:
            conn = self._idle.pop()
            if _still_open(conn.sock):
                return conn
            conn.close()
        return None

    def give_back(self, conn: _Connection) -> None:
        if len(self._idle) >= self.size:
            conn.close()
        else:
            self._idle.append(conn)

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()

    def __len__(self):
        return len(self._idle)


def _still_open(sock) -> bool:
    # An idle connection has nothing to read; EOF or stray bytes both mean it cannot carry a request.
    try:
        sock.settimeout(0.0)  # gevent would otherwise wait for the byte instead of reporting EAGAIN
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


# The reply headers a debug line shows; Auth-Pass (the backend password) is named, never shown.
_SHOWN = (("Auth-Status", "status"), ("Auth-Server", "server"), ("Auth-Port", "port"), ("Auth-User", "user"),
          ("Auth-Wait", "wait"), ("Auth-Error-Code", "error_code"), ("Auth-Method", "method"),
          ("Auth-SSL-Upstream", "ssl_upstream"))


def reply_text(reply) -> str:
    parts = ["mail auth http reply: %s" % (reply.http_status if reply.http_status is not None else "no status")]
    for header, field in _SHOWN:
        value = getattr(reply, field)
        if value is not None:
            shown = value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value
            parts.append('%s: "%s"' % (header, shown))
    if reply.password is not None:
        parts.append("Auth-Pass: (not logged)")
    return ", ".join(parts)


_pools = {}


def pool_for(url) -> IdlePool:
    """The worker's pool for the auth server at ``url``: servers naming the same address share it."""
    key = (url.family, url.sockaddr)
    pool = _pools.get(key)
    if pool is None:
        pool = _pools[key] = IdlePool()
    return pool


def close_pools() -> None:
    """Drop every idle connection (after fork, at worker shutdown)."""
    for pool in _pools.values():
        pool.close()
    _pools.clear()


class AuthHttpClient:
    """Asks one server's auth_http URL; one instance serves every session of that server."""

    def __init__(self, server):
        url = server.auth_http
        self.url = url
        self.peer = url.peer
        self.timeout = float(server.auth_http_timeout)
        self.keepalive = bool(getattr(server, "auth_http_keepalive", False))
        self.pool = pool_for(url) if self.keepalive else None
        self._connect_text = " to " + url.peer
        self._timed_out = "auth http server %s timed out (%d: %s)" % (
            url.peer,
            errno.ETIMEDOUT,
            os.strerror(errno.ETIMEDOUT),
        )

    def ask(self, request: bytes, debug=None):
        """Send ``request`` (from ``request.build``) and return the ``AuthReply``; ``debug(text)``, if
        given, writes the session's debug lines."""
        reply = self._ask(request, debug)
        if debug:
            debug(reply_text(reply))
        return reply

    def _ask(self, request, debug):
        deadline = _monotonic() + self.timeout
        if not self.keepalive:
            conn = self._connect(deadline, debug)
            try:
                return self._exchange(conn, request, ReplyParser(self.peer))
            finally:
                if debug:
                    debug("close http auth connection: fd:%d" % conn.sock.fileno())
                conn.close()
        conn = self.pool.take()
        if conn is not None:
            conn.deadline = deadline
            conn.debug = debug
            if debug:
                debug("mail auth http reuses a kept-alive connection to %s, fd:%d" % (self.peer, conn.sock.fileno()))
            try:
                return self._exchange_kept(conn, request, fresh=False)
            except _DeadBeforeReply:
                if debug:
                    debug("mail auth http kept-alive connection was closed by the server, asking again")
                conn.close()
        conn = self._connect(deadline, debug)
        return self._exchange_kept(conn, request, fresh=True)

    # --- transport -------------------------------------------------------------------------------------

    def _connect(self, deadline: float, debug=None) -> _Connection:
        url = self.url
        sock = socket.socket(url.family, socket.SOCK_STREAM)
        conn = _Connection(sock)
        conn.deadline = deadline
        conn.debug = debug
        try:
            sock.settimeout(self._remaining(conn))
            sock.connect(url.sockaddr)
        except socket.timeout:
            sock.close()
            raise AuthHttpError(self._timed_out) from None
        except OSError as exc:
            sock.close()
            raise _os_error("connect()", self._connect_text, exc) from None
        if debug:
            debug("mail auth http connect to %s, fd:%d" % (self.peer, sock.fileno()))
        return conn

    def _remaining(self, conn: _Connection) -> float:
        left = conn.deadline - _monotonic()
        if left <= 0:
            raise AuthHttpError(self._timed_out)
        return left

    def _send(self, conn: _Connection, request: bytes) -> None:
        try:
            conn.sock.settimeout(self._remaining(conn))
            send_all(conn.sock, request)
            if conn.debug:
                conn.debug("mail auth http send: fd:%d %d bytes" % (conn.sock.fileno(), len(request)))
        except socket.timeout:
            raise AuthHttpError(self._timed_out) from None
        except OSError as exc:
            raise _os_error("send()", "", exc) from None

    def _recv(self, conn: _Connection) -> bytes:
        try:
            conn.sock.settimeout(self._remaining(conn))
            data = conn.sock.recv(RECV_SIZE)
            if conn.debug:
                conn.debug("mail auth http recv: fd:%d %d of %d" % (conn.sock.fileno(), len(data), RECV_SIZE))
            return data
        except socket.timeout:
            raise AuthHttpError(self._timed_out) from None
        except OSError as exc:
            raise _os_error("recv()", "", exc) from None

    def _exchange(self, conn: _Connection, request: bytes, parser: ReplyParser):
        self._send(conn, request)
        while True:
            data = self._recv(conn)
            if not data:
                parser.eof()
            reply = parser.feed(data)
            if reply is not None:
                return reply

    def _exchange_kept(self, conn: _Connection, request: bytes, fresh: bool):
        parser = ReplyParser(self.peer)
        try:
            if fresh:
                reply = self._exchange(conn, request, parser)
            else:
                reply = self._first_reply_bytes(conn, request, parser)
        except AuthHttpError:
            conn.close()
            raise
        if reply.reusable and self._drain_body(conn, reply, parser.body):
            if conn.debug:
                conn.debug("mail auth http keeps fd:%d alive" % conn.sock.fileno())
            conn.debug = None  # the next session that takes it brings its own
            self.pool.give_back(conn)
        else:
            if conn.debug:
                conn.debug("close http auth connection: fd:%d" % conn.sock.fileno())
            conn.close()
        return reply

    def _first_reply_bytes(self, conn: _Connection, request: bytes, parser: ReplyParser):
        # Until the auth server has said anything, a failure means the idle connection had died.
        try:
            self._send(conn, request)
            data = self._recv(conn)
        except AuthHttpError as exc:
            if exc.message == self._timed_out:
                raise
            raise _DeadBeforeReply(exc) from None
        if not data:
            raise _DeadBeforeReply(AuthHttpError("auth http server %s closed connection" % self.peer))
        reply = parser.feed(data)
        while reply is None:
            data = self._recv(conn)
            if not data:
                parser.eof()
            reply = parser.feed(data)
        return reply

    def _drain_body(self, conn: _Connection, reply, already: bytes) -> bool:
        """Read and drop the body; False when the connection cannot be reused after all."""
        left = reply.body_length - len(already)
        # Bytes past the body would be read as the start of the next reply.
        if left < 0:
            return False
        try:
            while left > 0:
                data = self._recv(conn)
                if not data:
                    return False
                left -= len(data)
        except AuthHttpError:
            # The reply is complete; a body that does not arrive only costs this connection.
            return False
        return left == 0
