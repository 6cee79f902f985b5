"""The login path's socket calls (mailproxy/netio.py) over real sockets: same bytes, same errors."""

import errno
import socket as stdlib_socket

import gevent
import gevent._socketcommon
import pytest
from gevent import socket

from mailproxy import netio


def _pair():
    left, right = socket.socketpair()
    return left, right


def _read_all(sock, size):
    got = bytearray()
    while len(got) < size:
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return bytes(got)


def test_small_write_arrives_whole():
    left, right = _pair()
    with left, right:
        left.settimeout(1)
        netio.send_all(left, b"a OK LOGIN completed\r\n")
        assert right.recv(100) == b"a OK LOGIN completed\r\n"


def test_write_larger_than_the_socket_buffer_is_finished_by_sendall():
    left, right = _pair()
    payload = bytes(range(256)) * (16 * 1024)  # 4 MiB: far past one send(2)
    with left, right:
        left.settimeout(5)
        reader = gevent.spawn(_read_all, right, len(payload))
        netio.send_all(left, payload)
        assert reader.get(timeout=5) == payload


def test_write_times_out_under_the_socket_timeout_when_the_peer_never_reads():
    left, right = _pair()
    with left, right:
        left.settimeout(0.2)
        with pytest.raises(stdlib_socket.timeout):
            netio.send_all(left, b"x" * (64 << 20))


def test_write_to_a_closed_peer_raises_the_kernel_error():
    left, right = _pair()
    right.close()
    with left:
        left.settimeout(1)
        with pytest.raises(OSError) as caught:
            for _ in range(3):  # the first write may still be accepted before the reset is seen
                netio.send_all(left, b"x" * 100000)
        assert caught.value.errno in (errno.EPIPE, errno.ECONNRESET)


def test_other_socket_classes_keep_their_sendall():
    calls = []

    class Wrapped(socket.socket):  # stands for gevent's SSLSocket, whose send() ignores the timeout
        def sendall(self, data, flags=0):
            calls.append(bytes(data))
            return super().sendall(data, flags)

    left, right = _pair()
    wrapped = Wrapped(left.family, left.type, 0, fileno=left.detach())
    with wrapped, right:
        wrapped.settimeout(1)
        netio.send_all(wrapped, b"hello\r\n")
        assert calls == [b"hello\r\n"]
        assert right.recv(100) == b"hello\r\n"


@pytest.fixture
def listener():
    server = socket.socket(stdlib_socket.AF_INET, stdlib_socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield server
    server.close()


def test_connect_ip_never_asks_the_resolver(listener, monkeypatch):
    def no_resolver(*args, **kwargs):
        raise AssertionError("getaddrinfo called for an IP literal")

    monkeypatch.setattr(gevent._socketcommon, "getaddrinfo", no_resolver)
    port = listener.getsockname()[1]
    sock = netio.connect_ip("127.0.0.1", port, 1.0)
    with sock:
        assert sock.family == stdlib_socket.AF_INET
        accepted, _ = listener.accept()
        with accepted:
            assert accepted.getpeername() == sock.getsockname()


def test_connect_ip_ipv6_literal():
    if not stdlib_socket.has_ipv6:
        pytest.skip("no IPv6")
    server = socket.socket(stdlib_socket.AF_INET6, stdlib_socket.SOCK_STREAM)
    try:
        server.bind(("::1", 0))
    except OSError:
        server.close()
        pytest.skip("no ::1")
    with server:
        server.listen(1)
        sock = netio.connect_ip("::1", server.getsockname()[1], 1.0)
        with sock:
            assert sock.family == stdlib_socket.AF_INET6


def test_connect_ip_refused_raises_econnrefused(listener):
    port = listener.getsockname()[1]
    listener.close()
    with pytest.raises(OSError) as caught:
        netio.connect_ip("127.0.0.1", port, 1.0)
    assert caught.value.errno == errno.ECONNREFUSED
