"""How sessions end (spec §4.6, §7) and what goes first: login leftovers, no half-close, timeouts,
shutdown, errors, and no descriptor left behind by any of them."""

import queue
import random
import socket
import struct
import threading
import time

import pytest

from .conftest import RESET_ENDS, WAIT, drain, half_close


def recv_exactly(sock, n):
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "EOF after %d of %d bytes" % (len(data), n)
        data += chunk
    return bytes(data)


@pytest.mark.parametrize("pending_size", [9, 300 * 1024], ids=["line", "300KiB"])
def test_login_leftovers_go_first_and_in_order(make_proxy, mode, pending_size):
    rng = random.Random(pending_size)
    client_pending = rng.randbytes(pending_size)
    backend_pending = rng.randbytes(pending_size)

    def backend_side(sock):
        got = recv_exactly(sock, pending_size + 5)
        sock.sendall(b"after")
        return got

    proxy, backend = make_proxy(mode, backend_side, client_pending=client_pending.hex(),
                                backend_pending=backend_pending.hex())
    with proxy.connect() as client:
        client.sendall(b"later")
        assert backend.result() == client_pending + b"later"
        assert recv_exactly(client, pending_size + 5) == backend_pending + b"after"
        assert drain(client)[0] == 0
    assert proxy.closed() == ("backend closed", pending_size + 5, pending_size + 5)


def test_client_half_close_ends_the_session(make_proxy, mode):
    """No half-close: after the client's EOF is forwarded the backend is closed too, so a reply the
    backend sends afterwards never reaches the client (nginx's sharp edge 13)."""
    def backend_side(sock):
        got = drain(sock)
        try:
            sock.sendall(b"* BYE\r\n")
        except OSError:
            pass  # the proxy already closed this connection; that is the behaviour under test
        return got

    proxy, backend = make_proxy(mode, backend_side)
    with proxy.connect() as client:
        client.sendall(b"a1 LOGOUT\r\n")
        rest = half_close(client)
        assert drain(rest)[0] == 0
    assert backend.result()[0] == len(b"a1 LOGOUT\r\n")
    assert proxy.closed() == ("client closed", 11, 0)


def test_backend_close_mid_stream(make_proxy, mode):
    def backend_side(sock):
        got = recv_exactly(sock, 1 << 20)
        # Unread data in the receive queue turns this close into a reset, the harshest case.
        return len(got)

    proxy, backend = make_proxy(mode, backend_side)
    baseline = proxy.fds()

    with proxy.connect() as client:
        block = b"x" * (1 << 16)
        with pytest.raises(OSError):
            for _ in range(64 * 16):  # 64 MiB: far more than the buffers between here and the backend
                client.sendall(block)
    assert backend.result() == 1 << 20
    reason, c2b, b2c = proxy.closed()
    assert reason == "backend closed" or reason in RESET_ENDS, reason
    assert c2b >= 1 << 20 and b2c == 0
    assert proxy.fds() == baseline


class Arrivals:
    """Backend handler that reports the first n bytes as soon as they arrive, then reads to EOF: the
    test learns that a session is relaying without guessing at timing."""

    def __init__(self, n):
        self.n = n
        self.seen = queue.Queue()

    def __call__(self, sock):
        self.seen.put(recv_exactly(sock, self.n))
        return drain(sock)

    def wait(self):
        return self.seen.get(timeout=WAIT)


def test_client_reset_is_logged_as_a_recv_error(make_proxy, mode):
    arrivals = Arrivals(3)
    proxy, backend = make_proxy(mode, arrivals)
    with proxy.connect() as client:
        client.sendall(b"abc")
        assert arrivals.wait() == b"abc"
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    reason, c2b, b2c = proxy.closed()
    if mode == "tls":
        # OpenSSL 3 reports a reset under TLS as an unexpected EOF and Python keeps no errno for it.
        assert reason == "client closed"
    else:
        assert reason == "recv() failed (104: Connection reset by peer)"
    assert (c2b, b2c) == (3, 0)


def test_proxy_timeout_fires_on_an_idle_client(make_proxy, mode):
    proxy, backend = make_proxy(mode, drain, proxy_timeout=0.3)
    with proxy.connect() as client:
        t0 = time.monotonic()
        assert drain(client)[0] == 0
        elapsed = time.monotonic() - t0
    assert proxy.closed() == ("timed out", 0, 0)
    assert 0.25 <= elapsed < 5


def test_backend_traffic_does_not_extend_proxy_timeout(make_proxy, mode):
    stop = threading.Event()

    def chatty_backend(sock):
        sent = 0
        while not stop.wait(0.05):  # pacing the backend, not synchronising with it
            try:
                sock.sendall(b"* OK still here\r\n")
            except OSError:
                break
            sent += 1
        return sent

    proxy, backend = make_proxy(mode, chatty_backend, proxy_timeout=0.4)
    with proxy.connect() as client:
        t0 = time.monotonic()
        received, _ = drain(client)
        elapsed = time.monotonic() - t0
    stop.set()
    assert backend.result() >= 1
    reason, c2b, b2c = proxy.closed()
    assert reason == "timed out" and b2c == received > 0
    # Not before proxy_timeout; the upper bound only says it fired at all (10x, for a busy machine).
    assert 0.35 <= elapsed < 4.0


def test_client_traffic_extends_proxy_timeout(make_proxy, mode):
    # A byte every 0.05 s, a tenth of the timeout, for 0.6 s, longer than the timeout: every byte is relayed
    # only if each one restarted it; then the session times out a whole proxy_timeout after the last.
    proxy, backend = make_proxy(mode, drain, proxy_timeout=0.5)
    with proxy.connect() as client:
        for _ in range(12):
            time.sleep(0.05)  # pacing the client, not synchronising with it
            client.sendall(b".")
        last = time.monotonic()
        assert drain(client)[0] == 0
        after_last = time.monotonic() - last
    assert proxy.closed() == ("timed out", 12, 0)
    assert after_last >= 0.45


def test_close_now_is_the_shutdown_timeout(make_proxy, mode):
    arrivals = Arrivals(1)
    proxy, backend = make_proxy(mode, arrivals)
    baseline = proxy.fds()
    clients = [proxy.connect() for _ in range(3)]
    for c in clients:
        c.sendall(b"x")
    for _ in clients:
        assert arrivals.wait() == b"x"
    assert proxy.ask("active") == "3"
    proxy.send("shutdown")
    assert [proxy.closed() for _ in clients] == [("shutdown", 1, 0)] * 3
    assert proxy._next("shutdown")[1] == "done"
    for c in clients:
        assert drain(c)[0] == 0
        c.close()
    assert proxy.fds() == baseline
