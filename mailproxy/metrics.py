"""Prometheus metrics (`metrics_listen`, ours, off by default).

prometheus_client in multiprocess mode: every process (master and workers) writes its samples to mmap
files in a private directory the master creates before it forks (PROMETHEUS_MULTIPROC_DIR), and the master
serves their sum from a thread, so a scrape never touches a worker and never depends on which worker the
kernel would have routed it to. prometheus_client does this better than code we would write: the file
format, the multiprocess merge and the text exposition are its whole job, and Prometheus users know its
semantics (livesum gauges, counters that survive a worker's restart).

The mode is decided once per process when this module is imported (prometheus_client picks its value
class from the environment at import): the master imports it only after it set the directory, and a
worker imports it after fork through session.py, while still root. Without the directory every metric is
a no-op object, so a configuration without `metrics_listen` pays one empty method call per event.

Hot path: label children are resolved once and kept in plain dicts keyed by a tuple (no `labels(**kw)`
dict per login); an `inc()` on an mmap-backed value costs about a microsecond.

Labels carry no user names and no addresses: protocol, method, result, direction only.
"""

import errno
import math
import os
import select
import socket
import threading
import time

ENV = "PROMETHEUS_MULTIPROC_DIR"
ENABLED = bool(os.environ.get(ENV))

if ENABLED:
    import prometheus_client
    from prometheus_client import multiprocess

# Login results (labels of mailproxy_logins_total and the session log's `result`):
#   ok         the backend accepted the login; the session is relayed
#   invalid    the auth server refused the credentials (Auth-Status other than OK)
#   temporary  an internal error: the auth server failed or answered nonsense, or the backend refused,
#              failed or could not be reached
#   timeout    the auth server or the backend did not answer in time
LOGIN_RESULTS = ("ok", "invalid", "temporary", "timeout")

# Latencies of loopback or LAN round trips: 1 ms .. 10 s.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _Noop:
    """Stands in for every metric and label child when metrics are off."""

    def labels(self, *values):
        return self

    def inc(self, amount=1):
        pass

    def dec(self, amount=1):
        pass

    def set(self, value):
        pass

    def observe(self, value):
        pass


def _counter(name, doc, labels=()):
    return prometheus_client.Counter(name, doc, labels) if ENABLED else _Noop()


def _gauge(name, doc, labels=(), mode="livesum"):
    return prometheus_client.Gauge(name, doc, labels, multiprocess_mode=mode) if ENABLED else _Noop()


def _histogram(name, doc, labels=()):
    return prometheus_client.Histogram(name, doc, labels, buckets=LATENCY_BUCKETS) if ENABLED else _Noop()


# -- workers ------------------------------------------------------------------------------------------

SESSIONS_OPEN = _gauge("mailproxy_sessions_open", "Sessions in progress.", ("protocol",))
SESSIONS = _counter("mailproxy_sessions_total", "Sessions accepted.", ("protocol",))
LOGINS = _counter("mailproxy_logins", "Login attempts by result: ok, invalid (auth server refused), "
                  "temporary (internal or backend error), timeout (auth server or backend).",
                  ("protocol", "method", "result"))
AUTH_HTTP_SECONDS = _histogram("mailproxy_auth_http_request_duration_seconds",
                               "auth_http request latency, failures included.", ("protocol",))
AUTH_HTTP_ERRORS = _counter("mailproxy_auth_http_errors", "auth_http requests that failed "
                            "(connect, timeout, bad reply).", ("protocol",))
BACKEND_CONNECT_SECONDS = _histogram("mailproxy_backend_connect_duration_seconds",
                                     "TCP connect to the backend (successful ones).", ("protocol",))
BACKEND_LOGIN_SECONDS = _histogram("mailproxy_backend_login_duration_seconds",
                                   "From backend connect to its login reply (successful ones).", ("protocol",))
RELAYED_BYTES = _counter("mailproxy_relayed_bytes", "Bytes relayed after login.", ("protocol", "direction"))
TLS_HANDSHAKES = _counter("mailproxy_tls_handshakes", "TLS handshakes started (listen ssl and STARTTLS).",
                          ("protocol",))
TLS_FAILURES = _counter("mailproxy_tls_handshake_failures", "TLS handshakes that failed or timed out.",
                        ("protocol",))

# -- master -------------------------------------------------------------------------------------------

WORKER_RESTARTS = _counter("mailproxy_worker_restarts", "Workers that died unexpectedly and were respawned.")
RELOADS = _counter("mailproxy_reloads", "Reloads (HUP) by result.", ("result",))
CONFIG_OK = _gauge("mailproxy_config_last_load_successful", "Whether the last configuration load worked.",
                   mode="max")
CONFIG_LOADED_AT = _gauge("mailproxy_config_last_load_success_timestamp_seconds",
                          "When the running configuration was loaded.", mode="max")
CONFIG_LOAD_SECONDS = _gauge("mailproxy_config_load_duration_seconds",
                             "How long the last configuration load took.", mode="max")


class _Children(dict):
    """Label children by value tuple, made on first use: a dict lookup on the hot path."""

    def __init__(self, metric):
        super().__init__()
        self.metric = metric

    def __missing__(self, key):
        child = self[key] = self.metric.labels(*key)
        return child


class ProtocolMetrics:
    """The children one protocol's sessions use, resolved once per protocol per worker."""

    def __init__(self, protocol):
        p = (protocol,)
        self.open = SESSIONS_OPEN.labels(*p)
        self.sessions = SESSIONS.labels(*p)
        self.auth_seconds = AUTH_HTTP_SECONDS.labels(*p)
        self.auth_errors = AUTH_HTTP_ERRORS.labels(*p)
        self.connect_seconds = BACKEND_CONNECT_SECONDS.labels(*p)
        self.login_seconds = BACKEND_LOGIN_SECONDS.labels(*p)
        self.to_backend = RELAYED_BYTES.labels(protocol, "client_to_backend")
        self.to_client = RELAYED_BYTES.labels(protocol, "backend_to_client")
        self.tls = TLS_HANDSHAKES.labels(*p)
        self.tls_failed = TLS_FAILURES.labels(*p)
        self.protocol = protocol
        self._logins = _Children(LOGINS)

    def login(self, method, result):
        self._logins[(self.protocol, method, result)].inc()


_by_protocol = {}


def for_protocol(protocol):
    found = _by_protocol.get(protocol)
    if found is None:
        found = _by_protocol[protocol] = ProtocolMetrics(protocol)
    return found


# -- the master's side: the directory and the endpoint -------------------------------------------------


def process_dead(pid):
    """A worker was reaped: its live gauges (sessions open) leave the sum; its counters stay."""
    if ENABLED:
        multiprocess.mark_process_dead(pid, os.environ[ENV])


# Descriptors of the scrapes in progress (a reload may briefly run two endpoints). A worker forked
# while one is open inherits it; this closes the copies in the child so workers hold no scraper's
# socket. An entry leaves the set before its close in the master: a fork in between leaks a copy
# (the master's shutdown still ends the connection), never closes a number the child reused.
_held = set()


def _close_held_in_child():
    for fd in _held:
        try:
            os.close(fd)
        except OSError:
            pass  # the interpreter's own fork cleanup may have closed it already
    _held.clear()


if ENABLED:
    os.register_at_fork(after_in_child=_close_held_in_child)


class _Scrape:
    __slots__ = ("sock", "fd", "deadline", "request", "reply")

    def __init__(self, sock, deadline):
        self.sock = sock
        self.fd = sock.fileno()
        self.deadline = deadline
        self.request = b""
        self.reply = None  # a memoryview of what is left to send, once the request is complete


class MetricsEndpoint:
    """`GET /metrics` (any path) from a daemon thread of the master.

    Hand-written HTTP/1.0 rather than wsgiref, on purpose: the master forks workers while this thread
    may be serving, and a child inherits any libc lock the thread held at that instant. With wsgiref a
    worker forked during a scrape hung once at its first log line; its Date header calls gmtime(), and
    glibc's time-zone lock, inherited locked, would do exactly that. So this thread makes only syscalls,
    mmap reads and pure-Python formatting, and no call that takes a libc-internal lock.

    One thread serves every scrape at once with non-blocking sockets and poll(): a client that sends
    slowly must not hold up the next one (one that dripped a byte every 3 s once made every scrape fail
    for as long as it stayed). Each connection has TIMEOUT from its accept for the whole exchange, read
    and write; at most MAX_CONNECTIONS are held, and a new one beyond that displaces the oldest, so a
    flood neither grows memory nor locks out a scraper that arrives during it.

    The socket is bound in the master's thread before any fork, so a bad address fails the start or the
    reload like a bad listen does; `fileno()` goes to the master's private fds so workers close it.
    """

    MAX_REQUEST = 8192
    TIMEOUT = 5.0  # for a whole request and its answer, counted from accept
    MAX_CONNECTIONS = 128
    ACCEPT_PAUSE = 0.1  # after accept() failed for want of descriptors or memory: no busy loop meanwhile

    def __init__(self, family, sockaddr):
        self.registry = prometheus_client.CollectorRegistry()
        multiprocess.MultiProcessCollector(self.registry)
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(sockaddr)
            self.sock.listen(64)
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            raise
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, name="metrics", daemon=True)

    def fileno(self):
        return self.sock.fileno()

    def start(self):
        self.thread.start()

    def close(self):
        # shutdown() makes poll() in the thread return (POLLHUP on the listening socket); the thread
        # closes its connections and leaves. The socket is closed after the join so that its number
        # cannot be reused under a poll() still watching it.
        self.stopping = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # a listening socket may report "not connected"; poll() still wakes
        if self.thread.is_alive():
            self.thread.join(self.TIMEOUT + 1)
        self.sock.close()

    def _serve(self):
        poller = select.poll()
        listening = self.sock.fileno()
        poller.register(listening, select.POLLIN)
        scrapes = {}  # fd -> _Scrape, in accept order (oldest first)
        paused_until = None
        try:
            while not self.stopping:
                now = time.monotonic()
                wake = [s.deadline for s in scrapes.values()]
                if paused_until is not None:
                    wake.append(paused_until)
                timeout = None if not wake else max(0, math.ceil((min(wake) - now) * 1000))
                events = poller.poll(timeout)
                if self.stopping:
                    return
                now = time.monotonic()
                for fd, mask in events:
                    if fd == listening:
                        if not self._accept(poller, scrapes, now):
                            poller.unregister(listening)
                            paused_until = now + self.ACCEPT_PAUSE
                        continue
                    scrape = scrapes.get(fd)
                    if scrape is not None and not self._step(poller, scrape, mask):
                        self._drop(poller, scrapes, scrape)
                for scrape in [s for s in scrapes.values() if s.deadline <= now]:
                    self._drop(poller, scrapes, scrape)
                if paused_until is not None and paused_until <= now:
                    paused_until = None
                    poller.register(listening, select.POLLIN)
        finally:
            for scrape in list(scrapes.values()):
                self._drop(poller, scrapes, scrape)

    def _accept(self, poller, scrapes, now):
        """Accept what is queued; False when accept() failed for want of descriptors or memory."""
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return True
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    return False
                return True  # EINVAL after close()'s shutdown: the loop sees `stopping`
            conn.setblocking(False)
            scrape = _Scrape(conn, now + self.TIMEOUT)
            _held.add(scrape.fd)
            if len(scrapes) >= self.MAX_CONNECTIONS:
                self._drop(poller, scrapes, next(iter(scrapes.values())))
            scrapes[scrape.fd] = scrape
            poller.register(scrape.fd, select.POLLIN)

    def _step(self, poller, scrape, mask):
        """Read or write what the socket allows now; False when the connection is finished."""
        try:
            if scrape.reply is None:
                chunk = scrape.sock.recv(4096)
                if not chunk:
                    return False
                scrape.request += chunk
                if b"\r\n\r\n" not in scrape.request and len(scrape.request) < self.MAX_REQUEST:
                    return True
                scrape.reply = memoryview(self._reply(scrape.request))
                scrape.request = b""
                poller.modify(scrape.fd, select.POLLOUT)
            # Also right after the request: the socket's buffer usually takes the whole answer at once.
            sent = scrape.sock.send(scrape.reply, socket.MSG_NOSIGNAL)
            scrape.reply = scrape.reply[sent:]
            return len(scrape.reply) > 0
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False  # the scraper went away

    def _reply(self, request):
        if not request.startswith((b"GET ", b"HEAD ")):
            return b"HTTP/1.0 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        try:
            body = prometheus_client.generate_latest(self.registry)
        except Exception as exc:
            # A damaged sample file must not end this thread and, with it, every later scrape.
            body = ("cannot read the metrics: %s: %s\n" % (type(exc).__name__, exc)).encode("utf-8", "replace")
            head = "HTTP/1.0 500 Internal Server Error\r\nContent-Type: text/plain; charset=utf-8\r\n"
        else:
            head = "HTTP/1.0 200 OK\r\nContent-Type: %s\r\n" % prometheus_client.CONTENT_TYPE_LATEST
        head += "Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        return head.encode("ascii") + (b"" if request.startswith(b"HEAD ") else body)

    def _drop(self, poller, scrapes, scrape):
        del scrapes[scrape.fd]
        _held.discard(scrape.fd)
        poller.unregister(scrape.fd)
        try:
            # shutdown() acts on the connection, not on this descriptor: the scraper sees the end even
            # if a worker forked a moment ago still holds a copy.
            scrape.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already reset by the peer
        scrape.sock.close()
