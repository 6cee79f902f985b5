"""Under load: a slow reader must not make the proxy buffer, and 10,000 sessions must leave no fd."""

import time

import pytest

from .conftest import RESET_ENDS, drain, send_payload
from support.procstate import Watch


def test_slow_reader_under_fast_writer(make_proxy, mode):
    """The backend could send 256 MiB at once; the client takes 10 KiB/s. The proxy must hold no more
    than its one pipe or buffer per direction, so its RSS stays flat and it does not spin."""
    proxy, backend = make_proxy(mode, lambda sock: send_payload(sock, 256 << 20, seed=3), proxy_buffer=16384)
    with proxy.connect() as client:
        got = 0
        samples = []
        reads = 0
        watch = None
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
            samples.append(proxy.rss())
            if watch is None:
                watch = Watch(proxy.pid)  # the first second fills the buffers; from here on it waits
    assert got >= 30 * 1024
    # The first second fills every buffer on the path; from then on nothing may grow.
    growth_kib = max(samples[1:]) - samples[1]
    assert growth_kib < 512, samples
    # Parked on watchers, not spinning (asleep whenever looked at) nor polling (a wakeup or two per read
    # of the client's and per RSS question, not hundreds a second).
    assert watch.asleep_share() >= 0.5, watch.samples
    assert watch.wakeups() < 2 * reads + 10, (watch.wakeups(), reads)
    reason, c2b, b2c = proxy.closed()
    # The client closes with unread bytes, which is a reset.
    assert reason == "client closed" or reason in RESET_ENDS, reason
    assert isinstance(backend.result(), OSError)  # the backend's send broke when the session ended


def echo_line(sock):
    data = sock.recv(64)
    sock.sendall(data)
    return drain(sock)[0]


@pytest.mark.parametrize("mode,sessions", [("splice", 10000), ("copy", 2000), ("tls", 200)])
def test_sessions_in_sequence_leave_no_descriptor(make_proxy, mode, sessions):
    proxy, backend = make_proxy(mode, echo_line)

    def one():
        with proxy.connect() as client:
            client.sendall(b"ping")
            assert client.recv(64) == b"ping"
        assert proxy.closed()[1:] == (4, 4)

    one()
    baseline = proxy.fds()
    for _ in range(sessions):
        one()
    assert proxy.ask("active") == "0"
    assert proxy.fds() == baseline
