"""Fixtures for the relay battery: a proxy process, a threaded backend, clients in three modes.

Every test that takes `mode` runs against the splice relay, the user-space copy relay
(MAILPROXY_NO_SPLICE=1) and the TLS relay, so the two code paths answer to one set of checks.
"""

import hashlib
import json
import os
import queue
import random
import selectors
import socket
import ssl
import subprocess
import sys
import tempfile
import threading

import pytest

from support.servers import TcpServer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WAIT = 60.0  # upper bound for any single readiness wait; tests fail rather than hang
# How a session ends when a peer resets mid-stream; which side notices first is the kernel's choice.
RESET_ENDS = ("recv() failed (104: Connection reset by peer)", "send() failed (104: Connection reset by peer)",
              "send() failed (32: Broken pipe)")


def payload_chunks(size, seed, chunk=1 << 20):
    """Deterministic random bytes in chunks, so 100 MiB never sits in memory at once."""
    rng = random.Random(seed)
    left = size
    while left > 0:
        n = min(chunk, left)
        yield rng.randbytes(n)
        left -= n


def send_payload(sock, size, seed):
    h = hashlib.sha256()
    for block in payload_chunks(size, seed):
        h.update(block)
        sock.sendall(block)
    return h.hexdigest()


def drain(sock, limit=None):
    """Read until EOF (or `limit` bytes); return (count, sha256). A reset after data counts as EOF."""
    h = hashlib.sha256()
    count = 0
    while limit is None or count < limit:
        try:
            data = sock.recv(min(1 << 20, (limit - count) if limit is not None else 1 << 20))
        except (ConnectionResetError, ssl.SSLError):
            break
        if not data:
            break
        h.update(data)
        count += len(data)
    return count, h.hexdigest()


def duplex(sock, size, seed, limit):
    """Send `size` payload bytes while reading `limit` bytes, from one thread: an OpenSSL connection
    must not be read and written by two threads at once. Returns (sent_hash, (got, got_hash))."""
    sock.setblocking(False)
    out_hash, in_hash = hashlib.sha256(), hashlib.sha256()
    chunks = payload_chunks(size, seed, chunk=65536)
    pending = b""
    got = 0
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
    try:
        while got < limit or pending or chunks is not None:
            if not pending and chunks is not None:
                pending = next(chunks, None)
                if pending is None:
                    chunks, pending = None, b""
                else:
                    out_hash.update(pending)
            progressed = False
            try:
                if pending:
                    n = sock.send(pending)
                    pending = pending[n:]
                    progressed = n > 0
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                pass  # not writable now; the select below waits for the peer
            try:
                while got < limit:
                    data = sock.recv(65536)
                    assert data, "EOF after %d of %d bytes" % (got, limit)
                    in_hash.update(data)
                    got += len(data)
                    progressed = True
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                pass  # nothing to read now
            if not progressed:
                assert sel.select(WAIT), "no progress in %s s" % WAIT
    finally:
        sel.close()
        sock.setblocking(True)
        sock.settimeout(WAIT)
    return out_hash.hexdigest(), (got, in_hash.hexdigest())


def half_close(sock):
    """Stop sending and return the socket to keep reading from. TLS ends its write side with
    close_notify (unwrap); the proxy answers by closing, which completes the exchange."""
    if isinstance(sock, ssl.SSLSocket):
        return sock.unwrap()
    sock.shutdown(socket.SHUT_WR)
    return sock


class Backend(TcpServer):
    """Each connection runs `handler(sock)` in a thread; its result (or the OSError it met) goes to .results."""

    backlog = 1024

    def __init__(self, handler):
        self.handler = handler
        self.results = queue.Queue()
        super().__init__()
        self.addr = self.listener.getsockname()

    def serve_connection(self, conn):
        try:
            self.results.put(self.handler(conn))
        except OSError as exc:
            self.results.put(exc)

    def result(self):
        return self.results.get(timeout=WAIT)


class Proxy:
    def __init__(self, mode, backend_addr, certs=None, **conf):
        conf["backend"] = list(backend_addr)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
        env.pop("MAILPROXY_NO_SPLICE", None)
        if mode == "copy":
            env["MAILPROXY_NO_SPLICE"] = "1"
        if mode == "tls":
            conf["tls"] = {"cert": certs.cert, "key": certs.key}
        self.mode = mode
        self.certs = certs
        # A file, not argv: login leftovers in the tests can exceed the kernel's per-argument limit.
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(conf, f)
        self.conf_path = f.name
        self.proc = subprocess.Popen([sys.executable, "-m", "support.proxyproc", self.conf_path], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, cwd=ROOT)
        self.lines = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        kind, port = self._next("ready")
        self.port = int(port)
        self.pid = self.proc.pid

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.decode().rstrip("\n"))
        self.lines.put(None)

    def _next(self, kind):
        line = self.lines.get(timeout=WAIT)
        assert line is not None, "proxy process exited (rc=%s)" % self.proc.poll()
        head, _, rest = line.partition(" ")
        assert head == kind, "expected %r from the proxy, got %r" % (kind, line)
        return head, rest

    def closed(self):
        """The next session end: (reason, client_to_backend, backend_to_client)."""
        return tuple(json.loads(self._next("closed")[1]))

    def send(self, cmd):
        self.proc.stdin.write(cmd.encode() + b"\n")
        self.proc.stdin.flush()

    def ask(self, cmd):
        self.send(cmd)
        return self._next(cmd)[1]

    def fds(self):
        return int(self.ask("fds").split()[0])

    def rss(self):
        return int(self.ask("rss"))

    def connect(self):
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=WAIT)
        if self.mode == "tls":
            ctx = ssl.create_default_context()
            self.certs.ca.configure_trust(ctx)
            sock = ctx.wrap_socket(sock, server_hostname="localhost")
        return sock

    def stop(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        os.unlink(self.conf_path)


class Certs:
    def __init__(self, tmp):
        import trustme

        self.ca = trustme.CA()
        server = self.ca.issue_cert("localhost")
        self.cert = str(tmp / "cert.pem")
        self.key = str(tmp / "key.pem")
        server.cert_chain_pems[0].write_to_path(self.cert)
        for pem in server.cert_chain_pems[1:]:
            pem.write_to_path(self.cert, append=True)
        server.private_key_pem.write_to_path(self.key)


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    return Certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(params=["splice", "copy", "tls"])
def mode(request):
    return request.param


@pytest.fixture
def make_proxy(certs):
    """make_proxy(mode, handler, **conf) -> (proxy, backend); both are torn down after the test."""
    made = []

    def make(mode, handler, **conf):
        backend = Backend(handler)
        proxy = Proxy(mode, backend.addr, certs, **conf)
        made.append((proxy, backend))
        return proxy, backend

    yield make
    for proxy, backend in made:
        proxy.stop()
        backend.close()
