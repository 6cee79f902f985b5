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

import os
import socket
import threading

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


class MetricsEndpoint:
    """`GET /metrics` (any path) from a daemon thread of the master, one request at a time.

    Hand-written HTTP/1.0 rather than wsgiref, on purpose: the master forks workers while this thread
    may be serving, and a child inherits any libc lock the thread held at that instant. With wsgiref a
    worker forked during a scrape hung once at its first log line; its Date header calls gmtime(), and
    glibc's time-zone lock, inherited locked, would do exactly that. So this thread makes only syscalls,
    mmap reads and pure-Python formatting, and no call that takes a libc-internal lock.

    The socket is bound in the master's thread before any fork, so a bad address fails the start or the
    reload like a bad listen does; `fileno()` goes to the master's private fds so workers close it.
    """

    MAX_REQUEST = 8192
    TIMEOUT = 5.0  # a scraper that stalls mid-request must not hold the endpoint

    def __init__(self, family, sockaddr):
        self.registry = prometheus_client.CollectorRegistry()
        multiprocess.MultiProcessCollector(self.registry)
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(sockaddr)
            self.sock.listen(64)
        except OSError:
            self.sock.close()
            raise
        self.thread = threading.Thread(target=self._serve, name="metrics", daemon=True)

    def fileno(self):
        return self.sock.fileno()

    def start(self):
        self.thread.start()

    def close(self):
        # shutdown() wakes the thread blocked in accept(); it returns on the error that follows.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # a listening socket may report "not connected"; the close below still stops it
        self.sock.close()
        self.thread.join(self.TIMEOUT + 1)

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed by close()
            with conn:
                conn.settimeout(self.TIMEOUT)
                try:
                    self._answer(conn)
                except OSError:
                    continue  # the scraper went away or stalled; the next one is served as usual

    def _answer(self, conn):
        request = b""
        while b"\r\n\r\n" not in request and len(request) < self.MAX_REQUEST:
            chunk = conn.recv(4096)
            if not chunk:
                return
            request += chunk
        if not request.startswith((b"GET ", b"HEAD ")):
            conn.sendall(b"HTTP/1.0 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return
        body = prometheus_client.generate_latest(self.registry)
        head = "HTTP/1.0 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % (
            prometheus_client.CONTENT_TYPE_LATEST, len(body))
        conn.sendall(head.encode("ascii") + (b"" if request.startswith(b"HEAD ") else body))
