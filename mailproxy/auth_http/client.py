"""Talking to the auth server on the worker's loop (spec 3.1, 3.5).

An exchange is a few callbacks on the worker's libev loop over a bare non-blocking socket (events.py):
connect, send the request, read the reply, each step armed by the last, and one timer for
``auth_http_timeout``. The session gets ``on_reply(reply, error)`` once, from the loop. ``ask`` is the
same exchange waited for by a greenlet, for callers that can block.

Two transports:

- nginx's (default): a new connection for every request, HTTP/1.0, the whole reply header due within
  ``auth_http_timeout`` of the connect, closed as soon as the header block ends (the body is never read);
- keep-alive (``auth_http_keepalive on``, ours): HTTP/1.1 over connections kept idle in a small pool shared
  by every server of this worker that names the same auth server. The reply goes to the session as soon
  as its header block is in; the body is then read and dropped by ``Content-Length`` so that the next
  reply starts on a clean stream, and the connection joins the pool. A reply without a length, or one
  that says ``Connection: close``, retires its connection.

A pooled connection may have been closed by the auth server while idle. If it fails before the first reply
byte arrives, the request goes once more over a fresh connection: GET to an auth server is safe to repeat,
and nothing of the first reply was seen. Any later failure is reported, never retried.

Errors are ``AuthHttpError`` carrying nginx's error-log text (``connect() to ... failed (111: ...)``,
``auth http server ... timed out (110: Connection timed out)``, ``recv() failed (...)``) and their kind.

``debug``: with error_log at debug the session passes its debug writer, and the exchange says what it
does (connect, reuse, each send and read, keep or close); the bytes themselves are never logged, since the
request carries the password.
"""

import errno
from collections import deque

import _socket

from mailproxy.events import IN_PROGRESS, READ, WRITE, Connection, connect
from mailproxy.log import errno_text

from .response import SOCKET_FAILED, TIMED_OUT, AuthHttpError, ReplyParser

RECV_SIZE = 4096
# Idle connections kept per auth server; more concurrent requests open more, and the surplus is closed.
POOL_IDLE = 16


def _os_error(call: str, peer_text: str, code: int) -> AuthHttpError:
    return AuthHttpError("%s%s failed %s" % (call, peer_text, errno_text(code or errno.EIO)), SOCKET_FAILED)


class IdlePool:
    """Idle keep-alive connections to one auth server (last in, first out: the warmest is reused)."""

    def __init__(self, size: int = POOL_IDLE):
        self.size = size
        self._idle = deque()

    def take(self):
        if self._idle:
            conn = self._idle.pop()
            conn.stop()
            return conn
        return None

    def give_back(self, conn: Connection) -> None:
        if len(self._idle) >= self.size:
            conn.close()
            return
        # An idle connection has nothing to read: the loop watches it, and whatever comes (the auth
        # server's close, or bytes that would be read as the start of the next reply) retires it, with
        # no system call when a session takes it. One closed in the instant before it is taken fails
        # before the first reply byte, and the exchange asks again over a fresh one.
        conn.wait(READ, self._retire, conn)
        self._idle.append(conn)

    def _retire(self, conn):
        try:
            self._idle.remove(conn)
        except ValueError:
            return  # taken in the meantime: its exchange reads it now
        conn.close()

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()

    def __len__(self):
        return len(self._idle)


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
    """Asks one server's auth_http URL; one instance serves every session of that server in a worker."""

    def __init__(self, server, loop=None):
        import gevent

        url = server.auth_http
        self.loop = loop if loop is not None else gevent.get_hub().loop
        self.url = url
        self.peer = url.peer
        self.timeout = float(server.auth_http_timeout)
        self.keepalive = bool(server.auth_http_keepalive)
        self.pool = pool_for(url) if self.keepalive else None
        self.connect_text = " to " + url.peer
        self.timed_out_text = "auth http server %s timed out %s" % (url.peer, errno_text(errno.ETIMEDOUT))

    def start(self, request: bytes, on_reply, debug=None, guard=None) -> "AuthExchange":
        """Send ``request`` (from ``request.build``); ``on_reply(reply, error)`` runs once, from the loop,
        with the ``AuthReply`` or the ``AuthHttpError``. The exchange returned can be cancelled.
        ``guard(step, *args)``, if given, runs each of the exchange's callbacks (the session's, so that a
        bug there ends the session that waits, with its traceback)."""
        return AuthExchange(self, request, on_reply, debug, guard or _call)

    def ask(self, request: bytes, debug=None):
        """The same exchange, waited for: returns the ``AuthReply`` or raises ``AuthHttpError``. Only from a
        greenlet (or a thread whose hub may run)."""
        from gevent.event import AsyncResult

        result = AsyncResult()
        self.start(request, lambda reply, error: result.set((reply, error)), debug)
        reply, error = result.get()
        if error is not None:
            raise error
        return reply


def _call(step, *args):
    step(*args)


class AuthExchange:
    """One request and its reply; every method after __init__ runs as a callback on the loop."""

    __slots__ = ("client", "request", "on_reply", "debug", "guard", "conn", "parser", "timer", "reused",
                 "answered", "unsent", "body_left")

    def __init__(self, client, request, on_reply, debug, guard):
        self.client = client
        self.guard = guard
        self.request = request
        self.on_reply = on_reply
        self.debug = debug
        self.conn = None
        self.parser = ReplyParser(client.peer)
        self.body_left = None  # after the reply: body bytes still to drop before the connection is reused
        self.timer = client.loop.timer(client.timeout)
        self.timer.start(self.guard, self._timed_out)
        self.reused = False  # over a pooled connection: it may have died while idle
        self.answered = False  # a reply byte arrived
        if client.keepalive:
            conn = client.pool.take()
            if conn is not None:
                self.reused = True
                self.conn = conn
                if debug:
                    debug("mail auth http reuses a kept-alive connection to %s, fd:%d" % (client.peer, conn.fd))
                self._send_request()
                return
        self._connect()

    def cancel(self):
        """The session ended first: drop the connection, call nobody."""
        self.on_reply = None
        self._end()

    # --- the steps ---------------------------------------------------------------------------------

    def _connect(self):
        url = self.client.url
        sock = _socket.socket(url.family, _socket.SOCK_STREAM | _socket.SOCK_NONBLOCK)
        self.conn = Connection(self.client.loop, sock)
        code = connect(sock, url.sockaddr)
        if code == 0:
            self._connected()
        elif code in IN_PROGRESS:
            self.conn.wait(WRITE, self.guard, self._connect_done)
        else:
            self._fail(_os_error("connect()", self.client.connect_text, code))

    def _connect_done(self):
        code = self.conn.sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_ERROR)
        if code:
            self._fail(_os_error("connect()", self.client.connect_text, code))
            return
        self._connected()

    def _connected(self):
        if self.debug:
            self.debug("mail auth http connect to %s, fd:%d" % (self.client.peer, self.conn.fd))
        self._send_request()

    def _send_request(self):
        self.unsent = self.request
        self._send()

    def _send(self):
        try:
            sent = self.conn.send(self.unsent)
        except OSError as exc:
            self._fail(_os_error("send()", "", exc.errno), retry=self.reused)
            return
        if sent < len(self.unsent):
            self.unsent = self.unsent[sent:]
            self.conn.wait(self.conn.want, self.guard, self._send)
            return
        if self.debug:
            self.debug("mail auth http send: fd:%d %d bytes" % (self.conn.fd, len(self.request)))
        self.conn.wait(READ, self.guard, self._read)

    def _read(self):
        try:
            data = self.conn.recv(RECV_SIZE)
        except OSError as exc:
            # After the reply, a body that fails costs only this connection (_fail tells nobody).
            self._fail(_os_error("recv()", "", exc.errno), retry=self.reused and not self.answered)
            return
        if data is None:
            return  # the watcher stays armed
        if self.debug:
            self.debug("mail auth http recv: fd:%d %d of %d" % (self.conn.fd, len(data), RECV_SIZE))
        if self.body_left is not None:
            if not data:
                self._end()  # the body never came whole: this connection cannot carry another request
                return
            self.body_left -= len(data)
            self._body_read()
            return
        if not data and self.reused and not self.answered:
            self._fail(AuthHttpError("auth http server %s closed connection" % self.client.peer, SOCKET_FAILED),
                       retry=True)
            return
        self.answered = True
        try:
            if not data:
                self.parser.eof()
            reply = self.parser.feed(data)
        except AuthHttpError as exc:
            self._fail(exc)
            return
        if reply is not None:
            self._replied(reply)

    def _replied(self, reply):
        on_reply, self.on_reply = self.on_reply, None
        debug = self.debug
        # Bytes past the body would be read as the start of the next reply.
        if self.client.keepalive and reply.reusable and reply.body_length >= len(self.parser.body):
            self.body_left = reply.body_length - len(self.parser.body)
            self._body_read()
        else:
            self._end()
        if debug:
            debug(reply_text(reply))
        on_reply(reply, None)

    def _body_read(self):
        """Drop the body as it comes (under the same auth_http_timeout), then pool the connection."""
        if self.body_left < 0:
            self._end()
        elif self.body_left > 0:
            self.conn.wait(READ, self.guard, self._read)
        else:
            if self.debug:
                self.debug("mail auth http keeps fd:%d alive" % self.conn.fd)
                self.debug = None  # the next session that takes it brings its own
            conn, self.conn = self.conn, None
            self.client.pool.give_back(conn)
            self._end()

    # --- endings -----------------------------------------------------------------------------------

    def _timed_out(self):
        self._fail(AuthHttpError(self.client.timed_out_text, TIMED_OUT))

    def _fail(self, error, retry=False):
        on_reply = self.on_reply
        if on_reply is None:
            self._end()  # the reply was delivered (its body failed) or nobody waits any more
            return
        self._close()
        if retry and error.kind != TIMED_OUT:
            # A kept-alive connection the auth server had closed while it sat idle: ask once more anew,
            # under the same deadline (the timer runs on).
            if self.debug:
                self.debug("mail auth http kept-alive connection was closed by the server, asking again")
            self.reused = False
            self.parser = ReplyParser(self.client.peer)
            self._connect()
            return
        self.on_reply = None
        self.timer.close()
        on_reply(None, error)

    def _end(self):
        self._close()
        self.timer.close()

    def _close(self):
        conn, self.conn = self.conn, None
        if conn is not None:
            if self.debug:
                self.debug("close http auth connection: fd:%d" % conn.fd)
            conn.close()
