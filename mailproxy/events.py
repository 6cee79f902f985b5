"""A socket on the worker's libev loop, as nginx's connection with its read and write events: what the
session, the backend login and the auth_http exchange do with one socket before the relay.

Why not gevent sockets: a gevent socket call runs on a greenlet, switches to the hub to wait, and arms a
Timeout per wait; a login costs three such sockets. Here a socket is a bare non-blocking one, a wait is a
libev io watcher armed with the next step as its callback, and the phase's deadline is one timer that the
owner keeps (bench/RESULTS.md has the cost per login of both shapes).

``recv`` and ``send`` keep nginx's meaning of a call: data, EOF (b""), or "would block" (None / 0) with
``want`` saying which readiness lets the call go on: a TLS connection may need the socket writable to read
(and readable to write) while OpenSSL renegotiates or sends a key update. Failures raise the OSError (for
TLS, the ssl.SSLError) the caller words with ``failed_call``.
"""

import errno
import ssl

import _socket

from mailproxy import _netio
from mailproxy.log import errno_text
from mailproxy.tls.openssl import bridge as _bridge
from mailproxy.tls.openssl import ssl_error_text

READ, WRITE = 1, 2
IN_PROGRESS = (errno.EINPROGRESS, errno.EALREADY)


class Socket(_socket.socket):
    """A bare socket that takes weak references: OpenSSL's SSL object, when TLS comes, keeps one to it
    (tls.client.ServerTls) without a wrapper socket made anew for it."""

    __slots__ = ("__weakref__",)


def connect(sock, address) -> int:
    """A non-blocking connect: 0 once connected, an errno in IN_PROGRESS while the handshake runs (wait
    until writable, then read SO_ERROR), else the errno of the failure.

    A connect to this host or a near one is often complete by the time connect(2) returns EINPROGRESS
    (loopback handles the whole handshake inside the call): one getpeername(2) then spares the write
    watcher, its descriptor check and epoll changes, a turn of the loop and the SO_ERROR read. A
    connection not up yet (or refused) answers ENOTCONN and is waited for as usual, so every failure
    is still the one SO_ERROR reports."""
    code = sock.connect_ex(address)
    if code in IN_PROGRESS and _netio.connected(sock.fileno()):
        return 0
    return code


def failed_call(call: str, exc: OSError) -> str:
    """nginx's words for a failed ``recv``/``send``: the kernel's errno, or for a TLS connection OpenSSL's
    reason under SSL_read/SSL_write (an SSLError's errno is OpenSSL's error class, not an errno: strerror
    would turn SSL_ERROR_SSL into "Operation not permitted")."""
    if isinstance(exc, ssl.SSLError):
        return "SSL_%s() failed (SSL: %s)" % ("read" if call == "recv" else "write", ssl_error_text(exc))
    return "%s() failed %s" % (call, errno_text(exc.errno or 0))


class Connection:
    __slots__ = ("loop", "sock", "fd", "sslobj", "want", "_reader", "_writer")

    def __init__(self, loop, sock):
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        # The SSL object once TLS is up (a ServerTls's, or the one under the backend's gevent SSLSocket):
        # its read/write report would-block (gevent's wrappers would wait on a greenlet instead).
        self.sslobj = None
        self.want = READ
        self._reader = None
        self._writer = None

    def use_tls(self, tls_sock):
        """The socket is now ``tls_sock`` (a ServerTls, or the backend's gevent SSLSocket, on the same
        descriptor, handshake done)."""
        self.sock = tls_sock
        self.sslobj = tls_sock._sslobj

    def recv(self, size):
        """Bytes, b"" at EOF, or None when the call would block (``want`` says on what)."""
        sslobj = self.sslobj
        if sslobj is None:
            data = _netio.recv(self.fd, size)
            if data is None:
                self.want = READ
            return data
        try:
            return sslobj.read(size)
        except ssl.SSLWantReadError:
            self.want = READ
        except ssl.SSLWantWriteError:
            self.want = WRITE
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return b""  # a close without close_notify is an EOF, as nginx reads it
        return None

    def pending(self) -> bool:
        """Bytes wait inside OpenSSL, decrypted or read ahead (client contexts read ahead, as nginx's,
        where the bridge can set it): no socket event will announce them."""
        sslobj = self.sslobj
        if sslobj is None:
            return False
        if _bridge is not None:
            return _bridge.has_pending(sslobj)
        return sslobj.pending() > 0

    def send(self, data) -> int:
        """Bytes of ``data`` written; 0 when the call would block (``want`` says on what)."""
        sslobj = self.sslobj
        if sslobj is None:
            sent = _netio.send(self.fd, data)
            if sent is None:
                self.want = WRITE
                return 0
            return sent
        try:
            return sslobj.write(data)
        except ssl.SSLWantWriteError:
            self.want = WRITE
        except ssl.SSLWantReadError:
            self.want = READ
        return 0

    def wait(self, want, callback, *args):
        """Call ``callback(*args)`` from the loop once the socket is ready for ``want``; one wait at a
        time, so a new one replaces the last."""
        if want == READ:
            other, watcher = self._writer, self._reader
            if watcher is None:
                watcher = self._reader = self.loop.io(self.fd, READ)
        else:
            other, watcher = self._reader, self._writer
            if watcher is None:
                watcher = self._writer = self.loop.io(self.fd, WRITE)
        if other is not None and other.active:
            other.stop()
        if watcher.active:
            # Armed again for the same step (a read that leaves the next read to the same callback):
            # restarting would cost libev a descriptor check.
            if watcher.args == args and watcher.callback == callback:
                return
            watcher.stop()
        watcher.start(callback, *args)

    def stop(self):
        """No callback until the next ``wait``."""
        if self._reader is not None:
            self._reader.stop()
        if self._writer is not None:
            self._writer.stop()

    def take_reader(self):
        """Hand the read watcher (stopped) on, to the relay; its descriptor stays registered with the
        loop, where a new watcher would register it again. The write watcher is dropped."""
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.stop()
        self.release_watchers()
        return reader

    def release_watchers(self):
        """Drop the watchers (the socket itself stays open: it may be handed on, to the relay)."""
        for watcher in (self._reader, self._writer):
            if watcher is not None:
                watcher.stop()
                watcher.close()
        self._reader = self._writer = None

    def close(self):
        self.release_watchers()
        self.sock.close()
