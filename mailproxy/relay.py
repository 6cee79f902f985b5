"""The relay after login: two sockets and the bytes between them (spec §4.6, §7).

Shape, and why:

* No greenlet per session. start() arms libev io watchers on the hub's loop and returns; every step runs
  in a watcher callback in the hub. An idle relayed session is two read watchers, one timer and a few
  small objects (no greenlet stack, no buffer): ~2 KiB RSS per idle session measured over 5,000
  (bench/relay_throughput.py; 3.5-6 KiB if all 5,000 log in at once, the allocator keeping the freed
  login greenlets), against nginx's ~11 KiB and a two-greenlet relay's ~29 KiB.
* Plain sessions move bulk with splice(2) through a pipe borrowed from a per-process pool only while a
  direction has bytes in flight, and returned as soon as the pipe is empty (mailproxy/_splice.pyx). A
  direction starts with recv/send and turns to splice at its first read that fills the buffer: the
  commands and replies of a mail dialogue (a LOGOUT and its BYE) cost two calls each that way, not a
  pipe round trip.
* TLS on either side (client, backend, or both) cannot be spliced. When the OpenSSL bridge is active
  (mailproxy/tls/openssl.py: `bridge`), such a session's directions run the TLS pump (mailproxy/_openssl.pyx,
  TlsPump): SSL_read/SSL_write, or recv/send on a plain side, in C with the GIL released, until
  something would block or the budget is spent; bytes a peer did not take wait in a buffer of at most
  one read, freed as soon as they are delivered. Without the bridge (or with MAILPROXY_TLS_PUMP=off),
  and for any session whose kernel refuses splice with EINVAL or a process started with
  MAILPROXY_NO_SPLICE=1, one user-space loop does the same in Python: read into a shared per-process
  scratch buffer, send at once, and keep a private copy only of what the peer did not take. Reads are
  bounded as nginx bounds them: client_buffer client->backend, proxy_buffer backend->client; the TLS
  pump raises either to a TLS record (16 KiB) when it is smaller, so that each read and each write of
  a TLS side is one whole record. The splice path has no user buffer; its pipe (PIPE_SIZE) plays that
  part.
* Readiness comes from the gevent hub, not from an event loop of our own in C. Measured with
  bench/relay_throughput.py on this (2-CPU, shared) host: a 1 GiB stream costs 560-770 pump calls, each
  wrapped in ~9 us of Python (callback, run, re-arm) around the system calls, i.e. <0.01 CPU-s/GiB of a
  0.17-0.31 CPU-s/GiB total; blocking splice threads with no event loop at all cost 0.16-0.32. A C
  loop could win at most those few per cent and would need its own thread or to replace the hub.

Semantics are nginx's: login leftovers go first and in order; no half-close (the session ends when
either side's EOF has been forwarded); a read error counts as EOF, a write error ends at once;
proxy_timeout counts only client-socket events; close_now() is the worker_shutdown_timeout path.
"""

import errno
import os
import ssl
from dataclasses import dataclass
from typing import Callable

import _socket
import gevent

from mailproxy import _netio
from mailproxy.events import failed_call

if os.environ.get("MAILPROXY_NO_SPLICE") == "1":
    _splice = None
else:
    try:
        from mailproxy import _splice
    except ImportError as exc:
        raise ImportError(
            "mailproxy: the splice relay extension mailproxy._splice is not built (%s); build it with "
            "`python setup.py build_ext --inplace` or `pip install .`, or set MAILPROXY_NO_SPLICE=1 to run "
            "with the slower user-space relay" % exc
        ) from exc

SPLICE_AVAILABLE = _splice is not None


def _tls_pump_bridge():
    # The pump reaches the SSL behind Python's objects, so it runs only where mailproxy/tls/openssl.py found
    # the bridge's layout and library checks to hold; elsewhere TLS sessions keep the copy loop.
    if os.environ.get("MAILPROXY_TLS_PUMP", "").lower() == "off":
        return None
    from mailproxy.tls import openssl

    return openssl.bridge


_tls_bridge = _tls_pump_bridge()
TLS_PUMP_AVAILABLE = _tls_bridge is not None

# Pool pipe capacity, chosen by bench/relay_throughput.py (relay process CPU-s per GiB on this 2-CPU host,
# 3 runs each, 1 x 1 GiB / 8 x 128 MiB): 64 KiB 0.52-0.63 / 0.58-0.64, 256 KiB 0.29-0.33 / 0.42-0.49,
# 1 MiB 0.25-0.29 / 0.25-0.27. Fewer, larger splices win. The cost: a direction stalled on a slow peer
# parks up to 1 MiB in its pipe (kernel pages, not RSS), the same order as one TCP socket buffer.
PIPE_SIZE = 1024 * 1024
# Idle pipes kept per process; beyond this a returned pipe is closed. Empty pipes hold no data pages.
POOL_KEEP = 64
# Bytes one direction may move per wakeup before yielding to other sessions; libev's io watchers are
# level-triggered, so a direction that stops early is woken again on the next loop iteration.
BUDGET = 4 * 1024 * 1024

# Readiness a direction can wait for. AGAIN asks for a plain rerun: TLS may hold decrypted bytes that
# no socket event will announce.
CR, CW, BR, BW, AGAIN = 1, 2, 4, 8, 16
_WATCHED = CR | CW | BR | BW  # the bits a watcher stands for; AGAIN is a loop callback
_READ, _WRITE = 1, 2


@dataclass(slots=True)
class RelayResult:
    reason: str
    client_to_backend: int
    backend_to_client: int


class _End(Exception):
    """Raised inside a direction to end the whole session (no half-close, spec §4.6)."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


class _PipePool:
    __slots__ = ("size", "keep", "idle")

    def __init__(self, size, keep):
        self.size = size
        self.keep = keep
        self.idle = []

    def take(self):
        if self.idle:
            return self.idle.pop()
        try:
            return _splice.Pipe(self.size)
        except PermissionError:
            # A non-root worker past pipe-user-pages-soft may not enlarge pipes; a default 64 KiB pipe
            # still splices, only with more wakeups per byte.
            return _splice.Pipe(0)

    def give(self, pipe):
        if pipe.fill == 0 and not pipe.closed and len(self.idle) < self.keep:
            self.idle.append(pipe)
        else:
            # Bytes that can no longer be delivered die with the pipe; a pipe is never reused dirty.
            pipe.close()

    def drop(self):
        while self.idle:
            self.idle.pop().close()


_pool = _PipePool(PIPE_SIZE, POOL_KEEP)
# A worker forked from a process that relayed must not share pipes with its parent.
os.register_at_fork(after_in_child=_pool.drop)

_scratch = bytearray(0)


def _scratch_for(size):
    # One buffer per process: callbacks run one at a time in the hub, and a direction keeps a private
    # copy of whatever its peer did not take, so nothing points into this between callbacks. It is
    # replaced, never resized, in case a view of the old one is still being released.
    global _scratch
    if len(_scratch) < size:
        _scratch = bytearray(size)
    return _scratch


class _Direction:
    """One way of the relay: src -> dst. run() moves what it can and returns the readiness it needs."""

    __slots__ = (
        "read", "write", "src_fd", "dst_fd", "src_ssl", "bufsize", "backlog", "scratch_view",
        "pipe", "use_splice", "may_splice", "moved", "eof", "eof_reason", "need",
        "src_read", "src_write", "dst_read", "dst_write", "tls_pump", "pump_needs",
    )

    def __init__(self, src, src_fd, dst, dst_fd, src_tls, dst_tls, pending, bufsize, eof_reason, from_client):
        # For TLS the SSL object itself is used (a ServerTls's, or the one under the backend's gevent
        # SSLSocket): gevent's send() reports would-block as 0 without saying whether SSL wants to read
        # or to write, and the watcher must know which.
        # A plain side is its descriptor, read and written with mailproxy._netio (would-block is None;
        # socket.socket's methods parse their arguments and drop the GIL for a call that cannot block).
        self.src_ssl = src if src_tls else None
        self.read = src.read if src_tls else None
        self.write = dst.write if dst_tls else None
        self.src_fd = src_fd
        self.dst_fd = dst_fd
        self.bufsize = max(1, bufsize)
        self.backlog = bytes(pending) if pending else None
        self.scratch_view = False
        self.pipe = None
        self.use_splice = False  # splicing now
        self.may_splice = False  # splice once a read fills the buffer (see _copy)
        self.moved = 0
        self.eof = False
        self.eof_reason = eof_reason
        if from_client:
            self.src_read, self.src_write, self.dst_read, self.dst_write = CR, CW, BR, BW
        else:
            self.src_read, self.src_write, self.dst_read, self.dst_write = BR, BW, CR, CW
        self.need = self.src_read | self.dst_write
        self.tls_pump = None
        # A kTLS direction (both ends plain to user space once the kernel encrypts) would be chosen
        # here and spliced; see the seam described in mailproxy/_openssl.pyx.
        if (src_tls or dst_tls) and _tls_bridge is not None:
            self.tls_pump = _tls_bridge.TlsPump(src if src_tls else None, src_fd, dst if dst_tls else None,
                                                dst_fd, self.bufsize, self.backlog)
            self.backlog = None
            # Indexed by the pump's status (PUMP_AGAIN_SRC ... PUMP_BUDGET_PENDING; PUMP_EOF ends).
            self.pump_needs = (self.src_read, self.src_write, self.dst_write, self.dst_read, 0,
                               self.src_read, self.src_read | AGAIN)

    def run(self):
        if self.tls_pump is not None:
            return self._pump_tls()
        if self.use_splice:
            return self._splice()
        return self._copy()

    def _pump_tls(self):
        try:
            moved, status = self.tls_pump.run(BUDGET)
        except OSError as exc:
            # PumpSyscallError or the pump's ssl.SSLError, worded as the copy path words its own. The
            # pump reads only once nothing is held, so a read error (nginx: an EOF) leaves nothing
            # undelivered, and a write error ends at once.
            self.moved += exc.moved
            raise _End(failed_call("recv" if exc.side == "src" else "send", exc)) from None
        self.moved += moved
        if status == _tls_bridge.PUMP_EOF:
            raise _End(self.eof_reason)
        return self.pump_needs[status]

    def _flush(self):
        """Send the backlog; return 0 when it is gone, else the readiness to wait for."""
        while self.backlog:
            try:
                if self.write is None:
                    n = _netio.send(self.dst_fd, self.backlog)
                    if n is None:
                        return self._park(self.dst_write)
                else:
                    n = self.write(self.backlog)
            except (BlockingIOError, ssl.SSLWantWriteError):
                return self._park(self.dst_write)
            except ssl.SSLWantReadError:
                return self._park(self.dst_read)
            except OSError as exc:
                raise _End(failed_call("send", exc)) from None
            self.moved += n
            self.backlog = self.backlog[n:] if n < len(self.backlog) else None
        self.scratch_view = False
        return 0

    def _park(self, need):
        if self.scratch_view:
            self.backlog = bytes(self.backlog)
            self.scratch_view = False
        return need

    def _copy(self):
        start = self.moved
        while True:
            if self.backlog:
                need = self._flush()
                if need:
                    return need
            if self.eof:
                raise _End(self.eof_reason)
            if self.moved - start >= BUDGET:
                if self.src_ssl is not None and self.src_ssl.pending():
                    return self.src_read | AGAIN
                return self.src_read
            buf = _scratch_for(self.bufsize)
            try:
                if self.src_ssl is not None:
                    n = self.read(self.bufsize, buf)
                else:
                    n = _netio.recv_into(self.src_fd, buf, self.bufsize)
                    if n is None:
                        return self.src_read
            except (BlockingIOError, ssl.SSLWantReadError):
                return self.src_read
            except ssl.SSLWantWriteError:
                return self.src_write
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                n = 0
            except OSError as exc:
                # nginx counts a read error as EOF: what was read before it is still delivered.
                self.eof = True
                self.eof_reason = failed_call("recv", exc)
                continue
            if n == 0:
                self.eof = True
                continue
            self.backlog = memoryview(buf)[:n]
            self.scratch_view = True
            if self.src_ssl is None and n < self.bufsize:
                # A short read from a plain socket drained it: the level-triggered watcher says when more
                # (or the EOF) comes, so no read is spent to hear EAGAIN. A full one means bulk, which the
                # splice pump moves with fewer calls a byte; the few bytes of a command or a LOGOUT never
                # take a pipe (two calls where splice needs three, and no pipe round trip).
                need = self._flush()
                return need or self.src_read
            if self.may_splice and not self.use_splice:
                self.use_splice = True
                return self._splice()

    def _splice(self):
        if self.backlog:
            need = self._flush()
            if need:
                return need
        pipe = self.pipe
        if pipe is None:
            try:
                pipe = _pool.take()
            except OSError:
                # Out of descriptors for a pipe (EMFILE/ENFILE): copy this burst in user space.
                return self._copy()
        try:
            moved, status = _splice.pump(self.src_fd, pipe, self.dst_fd, BUDGET)
        except _splice.SpliceError as exc:
            self.moved += exc.moved
            self.pipe = None
            if exc.errno == errno.EINVAL:
                self._salvage(pipe)
                self.use_splice = self.may_splice = False
                return self._copy()
            if exc.side == "src":
                # The pump drains the pipe before every read, so nothing is lost here.
                _pool.give(pipe)
                raise _End(failed_call("recv", exc)) from None
            pipe.close()
            raise _End(failed_call("send", exc)) from None
        self.moved += moved
        if status == _splice.AGAIN_DST:
            self.pipe = pipe
            return self.dst_write
        self.pipe = None
        _pool.give(pipe)
        if status == _splice.EOF:
            raise _End(self.eof_reason)
        return self.src_read

    def _salvage(self, pipe):
        # splice refused this descriptor pair; whatever already sits in the pipe goes out first by copy.
        chunks = []
        while pipe.fill > 0:
            data = os.read(pipe.r, pipe.fill)
            if not data:
                break
            pipe.fill -= len(data)
            chunks.append(data)
        if chunks:
            self.backlog = b"".join(chunks) + (bytes(self.backlog) if self.backlog else b"")
        _pool.give(pipe)

    def release(self):
        if self.tls_pump is not None:
            self.tls_pump.release()
        pipe, self.pipe = self.pipe, None
        if pipe is not None:
            _pool.give(pipe)
        self.backlog = None


def _detach(gsock):
    """Trade a gevent socket for a bare _socket.socket: the gevent object carries two io watchers and a
    Python wrapper that an idle relayed session does not need. A bare socket is kept as it is."""
    if isinstance(gsock, _socket.socket):
        return gsock
    # Family, type and protocol are passed, not probed: from a descriptor alone the socket module asks
    # the kernel for each (three system calls a socket, six a login).
    raw = _socket.socket(gsock.family, gsock.type, gsock.proto, gsock.detach())
    raw.setblocking(False)
    return raw


def _nodelay(sock):
    # The relay forwards whatever fragment it read; with Nagle a small fragment waits behind an unACKed
    # one for the peer's delayed ACK (40 ms a reply, measured on TLS sessions whose tickets went first).
    if sock.family in (_socket.AF_INET, _socket.AF_INET6):
        sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)


class Relay:
    """A running relay. The worker keeps it only to call close_now() at worker_shutdown_timeout."""

    __slots__ = (
        "_loop", "_client", "_backend", "_client_fd", "_backend_fd", "_tls", "_backend_tls", "_c2b", "_b2c",
        "_watchers", "_armed", "_timer", "_timeout", "_last", "_on_close", "_closed", "_again_queued",
    )

    def __init__(self, client_sock, backend_sock, client_pending, backend_pending, proxy_timeout,
                 proxy_buffer, client_buffer, tls, on_close, backend_tls=False, nodelay=True, readers=None):
        self._loop = loop = gevent.get_hub().loop
        self._tls = tls
        self._backend_tls = backend_tls
        self._on_close = on_close
        self._closed = False
        self._again_queued = False
        if backend_tls:
            self._backend = backend_sock
            self._backend_fd = backend_sock.fileno()
            backend_end = backend_sock._sslobj
        else:
            self._backend = _detach(backend_sock)
            self._backend_fd = self._backend.fileno()
            backend_end = self._backend
        if tls:
            self._client = client_sock
            self._client_fd = client_sock.fileno()
            client_end = client_sock._sslobj
        else:
            self._client = _detach(client_sock)
            self._client_fd = self._client.fileno()
            client_end = self._client
        if nodelay:
            for sock in (self._client, self._backend):
                _nodelay(sock)
        self._c2b = _Direction(client_end, self._client_fd, backend_end, self._backend_fd,
                               tls, backend_tls, client_pending, client_buffer, "client closed", True)
        self._b2c = _Direction(backend_end, self._backend_fd, client_end, self._client_fd,
                               backend_tls, tls, backend_pending, proxy_buffer, "backend closed", False)
        if SPLICE_AVAILABLE and not tls and not backend_tls:
            self._c2b.may_splice = self._b2c.may_splice = True
        self._watchers = [None, None, None, None]
        self._armed = 0  # the readiness bits whose watcher is started (the readers come stopped)
        if readers is not None:
            self._watchers[0], self._watchers[2] = readers
        self._timeout = proxy_timeout
        self._last = loop.now()
        self._timer = None
        if proxy_timeout and proxy_timeout > 0:
            self._timer = loop.timer(proxy_timeout)
            self._timer.start(self._on_timer)
        if tls or backend_tls or client_pending or backend_pending:
            # Bytes to deliver, or decrypted bytes OpenSSL may hold that no socket event will announce:
            # the first moves run from the loop, not from here (on_close must never run before the
            # caller holds the Relay).
            loop.run_callback(self._event, CR | CW | BR | BW)
        else:
            # Plain sockets with nothing pending: their readiness says when there is work.
            self._c2b.need, self._b2c.need = CR, BR
            self._arm(CR | BR)

    # -- readiness -------------------------------------------------------------------------------

    def _on_cr(self):
        self._last = self._loop.now()
        self._event(CR)

    def _on_cw(self):
        self._last = self._loop.now()
        self._event(CW)

    def _on_br(self):
        self._event(BR)

    def _on_bw(self):
        self._event(BW)

    def _on_again(self):
        self._again_queued = False
        self._event(AGAIN)

    def _event(self, bits):
        if self._closed:
            return
        c2b, b2c = self._c2b, self._b2c
        try:
            if c2b.need & bits:
                c2b.need = c2b.run()
            if b2c.need & bits:
                b2c.need = b2c.run()
        except _End as end:
            self._finish(end.reason)
            return
        except BaseException:
            # A bug must not leave two sockets and a pipe behind; the hub prints the traceback.
            self._finish("relay internal error")
            raise
        self._arm(c2b.need | b2c.need)

    def _arm(self, want):
        # Most events leave the wanted readiness as it was (a read that drained its socket wants the
        # same read again): then no watcher is touched.
        changed = (want ^ self._armed) & _WATCHED
        if changed:
            watchers = self._watchers
            for i, bit, handler in _ARMED:
                if changed & bit:
                    w = watchers[i]
                    if want & bit:
                        if w is None:
                            fd = self._client_fd if bit & (CR | CW) else self._backend_fd
                            w = watchers[i] = self._loop.io(fd, _READ if bit & (CR | BR) else _WRITE)
                        w.start(handler, self)
                    else:
                        w.stop()
            self._armed = want & _WATCHED
        if want & AGAIN and not self._again_queued:
            self._again_queued = True
            self._loop.run_callback(self._on_again)

    def _on_timer(self):
        if self._closed:
            return
        left = self._last + self._timeout - self._loop.now()
        if left > 0.001:
            # Lazy re-arm: client events only stamp _last, so a busy session costs no timer work.
            self._timer.close()
            self._timer = self._loop.timer(left)
            self._timer.start(self._on_timer)
            return
        self._finish("timed out")

    # -- end -------------------------------------------------------------------------------------

    def close_now(self):
        """worker_shutdown_timeout (spec §7): close both sockets at once, no protocol message."""
        self._finish("shutdown")

    @property
    def closed(self):
        return self._closed

    def _finish(self, reason):
        if self._closed:
            return
        self._closed = True
        for w in self._watchers:
            if w is not None:
                w.stop()
                w.close()
        self._watchers = [None, None, None, None]
        self._armed = 0
        if self._timer is not None:
            self._timer.close()
            self._timer = None
        self._c2b.release()
        self._b2c.release()
        if self._tls:
            self._tls_goodbye(self._client)
        if self._backend_tls:
            self._tls_goodbye(self._backend)
        self._client.close()
        self._backend.close()
        on_close, self._on_close = self._on_close, None
        on_close(RelayResult(reason, self._c2b.moved, self._b2c.moved))

    def _tls_goodbye(self, sock):
        # nginx sends close_notify when it can do so without waiting; a peer that is gone or a full
        # socket buffer simply means no close_notify, which is what a TCP-level close gives anyway.
        try:
            sock._sslobj.shutdown()
        except (ssl.SSLError, OSError, ValueError, AttributeError):
            return


# (watcher index, readiness bit, handler): a watcher calls handler(relay), so that arming one makes no
# bound method.
_ARMED = ((0, CR, Relay._on_cr), (1, CW, Relay._on_cw), (2, BR, Relay._on_br), (3, BW, Relay._on_bw))


def start(client_sock, backend_sock, *, client_pending: bytes, backend_pending: bytes,
          proxy_timeout: float, proxy_buffer: int, client_buffer: int, tls: bool,
          on_close: Callable[[RelayResult], None], backend_tls: bool = False, nodelay: bool = True,
          readers=None) -> Relay:
    """Hand both sockets to the relay and return at once; on_close(RelayResult) runs exactly once, in
    the hub, after both sockets are closed. It must not block (spawn a greenlet for anything slow).
    ``tls``/``backend_tls``: that side is TLS, handshake done, on a non-blocking descriptor (the
    client's a tls.client.ServerTls, the backend's a gevent SSLSocket), relayed by the TLS pump when the
    OpenSSL bridge is active, else by copy. Bare ``_socket.socket``s are taken as they are (non-blocking).
    ``nodelay``: set TCP_NODELAY on both (a caller whose sockets already have it says False: one system
    call each).
    ``readers``: the caller's stopped read watchers of the client's and the backend's descriptor (either
    None), taken over instead of made anew."""
    return Relay(client_sock, backend_sock, client_pending, backend_pending, proxy_timeout,
                 proxy_buffer, client_buffer, tls, on_close, backend_tls, nodelay, readers)
