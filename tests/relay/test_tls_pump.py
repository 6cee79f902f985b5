"""The TLS relay pump (mailproxy/_openssl.pyx TlsPump) with TLS towards the client, the backend, or
both: bytes intact both ways, how peers close (with and without close_notify), a corrupted record, and
memory bounded by one read (proxy_buffer, or a TLS record when that is larger). The semantic checks run the Python copy loop too (MAILPROXY_TLS_PUMP=off)
and expect the same outcome from both."""

import hashlib
import json
import os
import queue
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from mailproxy import relay

from .conftest import ROOT, WAIT, Backend, drain, duplex, half_close, send_payload
from support.harness import missing

SIDES = ["client", "backend", "both"]
BAD_RECORD = "SSL_read() failed (SSL: decryption failed or bad record mac)"



@pytest.fixture(autouse=True)
def tls_pump_in_use():
    if not relay.TLS_PUMP_AVAILABLE:
        missing("the TLS pump (the OpenSSL bridge active, MAILPROXY_TLS_PUMP unset)")


class TlsProxy:
    """support/tlsproc.py in its own process: `side` says which connections speak TLS."""

    def __init__(self, side, backend_addr, certs, engine="pump", **conf):
        conf["backend"] = list(backend_addr)
        if side in ("client", "both"):
            conf["client_tls"] = {"cert": certs.cert, "key": certs.key}
        if side in ("backend", "both"):
            conf["backend_tls"] = {"ca": certs.ca_file}
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
        env.pop("MAILPROXY_TLS_PUMP", None)
        if engine == "copy":
            env["MAILPROXY_TLS_PUMP"] = "off"
        self.side, self.certs = side, certs
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(conf, f)
        self.conf_path = f.name
        self.proc = subprocess.Popen([sys.executable, "-m", "support.tlsproc", self.conf_path], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, cwd=ROOT)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        port, self.engine = self._next("ready").split()
        self.port = int(port)
        assert self.engine == engine

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.decode().rstrip("\n"))
        self.lines.put(None)

    def _next(self, kind):
        line = self.lines.get(timeout=WAIT)
        assert line is not None, "proxy process exited (rc=%s)" % self.proc.poll()
        head, _, rest = line.partition(" ")
        assert head == kind, "expected %r from the proxy, got %r" % (kind, line)
        return rest

    def closed(self):
        return tuple(json.loads(self._next("closed")))

    def ask(self, cmd):
        self.proc.stdin.write(cmd.encode() + b"\n")
        self.proc.stdin.flush()
        return self._next(cmd)

    def client_tls(self):
        return self.side in ("client", "both")

    def connect(self, **wrap):
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=WAIT)
        if self.client_tls():
            sock = self.certs.client_context().wrap_socket(sock, server_hostname="localhost", **wrap)
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


class TlsCerts:
    def __init__(self, certs, folder):
        self.cert, self.key, self.ca = certs.cert, certs.key, certs.ca
        self.ca_file = str(folder / "ca.pem")
        certs.ca.cert_pem.write_to_path(self.ca_file)

    def client_context(self):
        return ssl.create_default_context(cafile=self.ca_file)

    def server_context(self):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert, self.key)
        return ctx


@pytest.fixture(scope="module")
def tls_certs(certs, tmp_path_factory):
    return TlsCerts(certs, tmp_path_factory.mktemp("tls-pump"))


@pytest.fixture
def tls_proxy(tls_certs):
    """tls_proxy(side, handler, engine="pump", raw_backend=False, **conf) -> (proxy, backend).
    With TLS towards the backend, ``handler`` gets the backend's SSL socket (handshake done) unless
    ``raw_backend``: then the plain socket, to speak TLS by hand."""
    made = []

    def make(side, handler, engine="pump", raw_backend=False, **conf):
        run = handler
        if side in ("backend", "both") and not raw_backend:
            ctx = tls_certs.server_context()

            def run(conn):
                with ctx.wrap_socket(conn, server_side=True, suppress_ragged_eofs=False) as tls:
                    return handler(tls)
        backend = Backend(run)
        proxy = TlsProxy(side, backend.addr, tls_certs, engine, **conf)
        made.append((proxy, backend))
        return proxy, backend

    yield make
    for proxy, backend in made:
        proxy.stop()
        backend.close()


def ids(size):
    return "%dB" % size


# -- byte integrity ----------------------------------------------------------------------------------

# 16 KiB + 1 crosses a TLS record; 100 MiB keeps the pump at its budget for many wake-ups.
SIZES = [0, 1, 16 * 1024 + 1, 100 * 1024 * 1024]


def test_the_pump_is_what_relays(tls_proxy):
    """This machine's bridge is active, so TLS sessions go through the pump unless switched off."""
    pump, _ = tls_proxy("client", drain)
    copy, _ = tls_proxy("client", drain, engine="copy")
    assert (pump.engine, copy.engine) == ("pump", "copy")


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("size", SIZES, ids=ids)
def test_client_to_backend(tls_proxy, side, size):
    proxy, backend = tls_proxy(side, drain)
    with proxy.connect() as client:
        sent = send_payload(client, size, seed=size)
        assert drain(half_close(client))[0] == 0
    assert backend.result() == (size, sent)
    assert proxy.closed() == ("client closed", size, 0)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("size", SIZES, ids=ids)
def test_backend_to_client(tls_proxy, side, size):
    proxy, backend = tls_proxy(side, lambda sock: send_payload(sock, size, seed=size + 1))
    with proxy.connect() as client:
        got = drain(client)
    assert got == (size, backend.result())
    assert proxy.closed() == ("backend closed", 0, size)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("size", [16 * 1024 + 1, 100 * 1024 * 1024], ids=ids)
def test_both_ways_at_once(tls_proxy, side, size):
    def backend_side(sock):
        sock.settimeout(WAIT)
        return duplex(sock, size, seed=7, limit=size)

    proxy, backend = tls_proxy(side, backend_side)
    with proxy.connect() as client:
        sent, got = duplex(client, size, seed=8, limit=size)
        backend_sent, backend_got = backend.result()
    assert got == (size, backend_sent)
    assert backend_got == (size, sent)
    reason, c2b, b2c = proxy.closed()
    assert (c2b, b2c) == (size, size)
    assert reason in ("client closed", "backend closed")


@pytest.mark.parametrize("side", SIDES)
def test_login_leftovers_go_first_small_buffers(tls_proxy, side):
    """Leftovers larger than a read (proxy_buffer and client_buffer of 7, which the pump raises to a
    TLS record): the leftovers go whole and first, in order, then the session's own bytes."""
    leftovers_c, leftovers_b = os.urandom(70000), os.urandom(70000)
    body = os.urandom(50000)

    def backend_side(sock):
        got = b""
        while len(got) < len(leftovers_c) + len(body):
            chunk = sock.recv(65536)
            assert chunk
            got += chunk
        sock.sendall(body)
        return hashlib.sha256(got).hexdigest()

    proxy, backend = tls_proxy(side, backend_side, client_pending=leftovers_c.hex(),
                               backend_pending=leftovers_b.hex(), proxy_buffer=7, client_buffer=7)
    with proxy.connect() as client:
        client.sendall(body)
        assert backend.result() == hashlib.sha256(leftovers_c + body).hexdigest()
        assert drain(client) == (len(leftovers_b) + len(body), hashlib.sha256(leftovers_b + body).hexdigest())
    assert proxy.closed() == ("backend closed", len(leftovers_c) + len(body), len(leftovers_b) + len(body))


def test_openssl_s_client_through_the_pump(tls_proxy, tmp_path):
    """A real client that is not Python: openssl s_client sends a file, gets the backend's bytes back."""
    up = os.urandom(3 << 20)
    down_hash = []

    def backend_side(sock):
        got = drain(sock, limit=len(up))
        down_hash.append(send_payload(sock, 5 << 20, seed=11))
        return got

    proxy, backend = tls_proxy("both", backend_side)
    (tmp_path / "up").write_bytes(up)
    with open(tmp_path / "up", "rb") as stdin, open(tmp_path / "down", "wb") as stdout:
        # -quiet implies -ign_eof: s_client keeps reading after its stdin ends, until the proxy closes.
        client = subprocess.run(["openssl", "s_client", "-connect", "127.0.0.1:%d" % proxy.port, "-quiet",
                                 "-servername", "localhost", "-CAfile", proxy.certs.ca_file,
                                 "-verify_return_error"],
                                stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, timeout=WAIT)
    assert backend.result() == (len(up), hashlib.sha256(up).hexdigest())
    down = (tmp_path / "down").read_bytes()
    assert (len(down), hashlib.sha256(down).hexdigest()) == (5 << 20, down_hash[0]), client.stderr
    assert proxy.closed() == ("backend closed", len(up), 5 << 20)


# -- how peers close -------------------------------------------------------------------------------

ENGINES = ["pump", "copy"]


def read_to_eof(sock):
    """(bytes, how the TLS stream ended): "close_notify", or "no close_notify" (an SSLEOFError with
    suppress_ragged_eofs off), or "tcp" for a plain socket."""
    h, count = hashlib.sha256(), 0
    while True:
        try:
            data = sock.recv(1 << 20)
        except ssl.SSLEOFError:
            return (count, h.hexdigest()), "no close_notify"
        if not data:
            return (count, h.hexdigest()), "close_notify" if isinstance(sock, ssl.SSLSocket) else "tcp"
        h.update(data)
        count += len(data)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("notify", [True, False], ids=["close_notify", "no_close_notify"])
@pytest.mark.parametrize("side", SIDES)
def test_client_closes(tls_proxy, side, notify, engine):
    size = 300000
    proxy, backend = tls_proxy(side, read_to_eof, engine=engine)
    client = proxy.connect(suppress_ragged_eofs=False)
    sent = send_payload(client, size, seed=5)
    if notify:
        rest = half_close(client)
        assert drain(rest)[0] == 0
        rest.close()
    else:
        # A FIN after the data, no close_notify. Not close(): the proxy's session tickets sit unread
        # in this socket, and closing over unread bytes sends a reset that may discard the data.
        client.shutdown(socket.SHUT_WR)  # an SSLSocket drops its SSL here: recv() reads the raw socket
        while client.recv(65536):
            pass
        client.close()
    got, ending = backend.result()
    assert got == (size, sent)
    # The proxy ends a TLS backend connection with its own close_notify, as nginx does.
    assert ending == ("close_notify" if side != "client" else "tcp")
    assert proxy.closed() == ("client closed", size, 0)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("notify", [True, False], ids=["close_notify", "no_close_notify"])
@pytest.mark.parametrize("side", SIDES)
def test_backend_closes(tls_proxy, side, notify, engine):
    size = 300000

    def backend_side(sock):
        digest = send_payload(sock, size, seed=6)
        if notify and isinstance(sock, ssl.SSLSocket):
            sock.unwrap().close()
        return digest

    proxy, backend = tls_proxy(side, backend_side, engine=engine)
    with proxy.connect(suppress_ragged_eofs=False) as client:
        got, ending = read_to_eof(client)
    assert got == (size, backend.result())
    assert ending == ("close_notify" if side != "backend" else "tcp")
    assert proxy.closed() == ("backend closed", 0, size)


# -- a corrupted record ----------------------------------------------------------------------------


class HandTls:
    """TLS over a plain socket through memory BIOs, so that records can be altered before sending."""

    def __init__(self, sock, ctx, server_side, hostname=None):
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=server_side,
                                server_hostname=hostname)
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.flush()
                data = sock.recv(65536)
                assert data, "peer closed during the handshake"
                self.incoming.write(data)
        self.flush()

    def flush(self):
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def records(self, data):
        self.obj.write(data)
        return self.outgoing.read()

    def read_until(self, marker):
        data = b""
        while marker not in data:
            try:
                data += self.obj.read(65536)
            except ssl.SSLWantReadError:
                chunk = self.sock.recv(65536)
                assert chunk, "peer closed after %r" % data
                self.incoming.write(chunk)
        return data


def corrupt(records):
    # The last byte is the AEAD tag of the last record: its decryption must fail, nothing before it.
    return records[:-1] + bytes([records[-1] ^ 0x55])


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("side", ["client", "both"])
def test_corrupted_record_from_the_client(tls_proxy, tls_certs, side, engine):
    good = os.urandom(40000)
    proxy, backend = tls_proxy(side, drain, engine=engine)
    raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=WAIT)
    with raw:
        tls = HandTls(raw, tls_certs.client_context(), False, "localhost")
        raw.sendall(tls.records(good) + corrupt(tls.records(b"this record is damaged")))
        assert drain(raw, limit=1 << 20)[0] >= 0  # the proxy closes; whatever came first is tickets
    assert backend.result() == (len(good), hashlib.sha256(good).hexdigest())
    assert proxy.closed() == (BAD_RECORD, len(good), 0)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("side", ["backend", "both"])
def test_corrupted_record_from_the_backend(tls_proxy, tls_certs, side, engine):
    good = os.urandom(40000)
    done = threading.Event()

    def backend_side(sock):
        tls = HandTls(sock, tls_certs.server_context(), True)
        sock.sendall(tls.records(good) + corrupt(tls.records(b"this record is damaged")))
        done.wait(WAIT)  # open until the client has seen the end: the close must come from the proxy
        return True

    proxy, backend = tls_proxy(side, backend_side, engine=engine, raw_backend=True)
    with proxy.connect() as client:
        got = drain(client)
    done.set()
    assert got == (len(good), hashlib.sha256(good).hexdigest())
    assert backend.result() is True
    assert proxy.closed() == (BAD_RECORD, 0, len(good))


# -- memory ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", SIDES)
def test_slow_reader_under_fast_writer(tls_proxy, side):
    """The backend could send 256 MiB at once; the client takes ~10 KiB/s. The proxy holds at most one
    read per direction (proxy_buffer), so its RSS stays flat, and it waits on watchers, not polling."""
    from support.procstate import Watch

    proxy, backend = tls_proxy(side, lambda sock: send_payload(sock, 256 << 20, seed=3), proxy_buffer=16384)
    with proxy.connect() as client:
        got, samples, reads, watch = 0, [], 0, None
        for second in range(4):
            t_end = time.monotonic() + 1.0
            while time.monotonic() < t_end:
                data = client.recv(1024)
                assert data
                got += len(data)
                time.sleep(0.1)  # pacing the reader at ~10 KiB/s, not synchronising
                if watch is not None:
                    reads += 1
                    watch.sample()  # a tenth of a second after the last read: nothing left to do
            samples.append(int(proxy.ask("rss")))
            if watch is None:
                watch = Watch(proxy.proc.pid)  # the first second fills the buffers; from here on it waits
    assert got >= 30 * 1024
    assert max(samples[1:]) - samples[1] < 512, samples
    # Parked on watchers: asleep whenever looked at (not spinning), a wakeup or two per read of the
    # client's and per RSS question (not polling).
    assert watch.asleep_share() >= 0.5, watch.samples
    assert watch.wakeups() < 2 * reads + 10, (watch.wakeups(), reads)
    reason, c2b, b2c = proxy.closed()
    assert b2c >= got
    assert isinstance(backend.result(), OSError)  # its send broke when the session ended


@pytest.mark.parametrize("side", SIDES)
def test_idle_sessions_hold_no_buffer(tls_proxy, side):
    """After a burst each way, an idle session's pump has given its buffers back: 100 such sessions
    with a 1 MiB proxy_buffer and client_buffer cost far less than one buffer each."""
    burst = 3 << 20
    ready = queue.Queue()

    def backend_side(sock):
        got = drain(sock, limit=burst)
        sock.sendall(b"x" * burst)
        ready.put(got[0])
        return drain(sock)[0]

    proxy, backend = tls_proxy(side, backend_side, proxy_buffer=1 << 20, client_buffer=1 << 20)
    clients = [proxy.connect() for _ in range(3)]
    before = int(proxy.ask("rss"))
    for _ in range(97):
        clients.append(proxy.connect())
    # One session at a time: the figure is what idle sessions keep, not a peak the allocator may hold on to.
    for client in clients:
        client.sendall(b"y" * burst)
        assert drain(client, limit=burst)[0] == burst
        assert ready.get(timeout=WAIT) == burst
    grown = int(proxy.ask("rss")) - before
    assert proxy.ask("active") == "100"
    # 97 buffers of 1 MiB would be ~97 MiB; sockets, SSL objects and allocator slack stay far below.
    assert grown < 40 * 1024, grown
    for client in clients:
        client.close()
    for _ in clients:
        assert proxy.closed()[0] in ("client closed", "backend closed")


# -- bursts ----------------------------------------------------------------------------------------


def recv_exactly(sock, n):
    got = 0
    while got < n:
        data = sock.recv(min(1 << 20, n - got))
        assert data, "EOF after %d of %d bytes" % (got, n)
        got += len(data)


@pytest.mark.parametrize("direction", ["down", "up"])
@pytest.mark.parametrize("side", SIDES)
def test_a_burst_leaves_nothing_behind(tls_proxy, side, direction):
    """Nothing of a burst stays behind: its tail (here 1 MiB + 777 bytes, not a whole number of
    records or segments) arrives at once, not after a delayed ACK or the kernel's 200 ms cork timer.
    Five exchanges; the fastest must be well under either."""
    size, rounds = (1 << 20) + 777, 5
    block = b"b" * size

    def backend_side(sock):
        for _ in range(rounds):
            if direction == "down":
                recv_exactly(sock, 1)
                sock.sendall(block)
            else:
                recv_exactly(sock, size)
                sock.sendall(b"k")
        return drain(sock)[0]

    proxy, backend = tls_proxy(side, backend_side)
    times = []
    with proxy.connect() as client:
        for _ in range(rounds):
            began = time.monotonic()
            if direction == "down":
                client.sendall(b"g")
                recv_exactly(client, size)
            else:
                client.sendall(block)
                recv_exactly(client, 1)
            times.append(time.monotonic() - began)
    assert backend.result() == 0
    assert min(times) < 0.1, times
    proxy.closed()
