"""A connection on the worker's loop (mailproxy/events.py) over real sockets: what the session, the backend
login and the auth_http exchange rely on."""

import errno
import socket
import ssl

import gevent
import pytest
from gevent.event import Event

from mailproxy.events import IN_PROGRESS, READ, WRITE, Connection, connect, failed_call


def _pair():
    left, right = socket.socketpair()
    left.setblocking(False)
    return Connection(gevent.get_hub().loop, left), right


def test_recv_says_would_block_then_reads_what_came():
    conn, peer = _pair()
    with peer:
        assert conn.recv(100) is None and conn.want == READ
        peer.sendall(b"a LOGIN x y\r\n")
        ready = Event()
        conn.wait(READ, ready.set)
        assert ready.wait(5)
        assert conn.recv(100) == b"a LOGIN x y\r\n"
        peer.close()
        assert conn.recv(100) == b""  # EOF
        conn.close()


def test_send_reports_what_the_kernel_took_and_the_wait_for_the_rest():
    conn, peer = _pair()
    with peer:
        payload = b"x" * (8 << 20)
        sent = conn.send(payload)
        assert 0 < sent < len(payload)
        assert conn.send(payload[sent:]) == 0 and conn.want == WRITE
        writable = Event()
        conn.wait(WRITE, writable.set)
        peer.recv(1 << 20)
        assert writable.wait(5)
        conn.close()


def test_one_wait_at_a_time_the_last_one_counts():
    conn, peer = _pair()
    with peer:
        calls, fired = [], Event()

        def ready(name):
            calls.append(name)
            fired.set()

        conn.wait(READ, ready, "first")
        conn.wait(READ, ready, "second")
        conn.wait(READ, ready, "second")  # the same again: stays armed once
        peer.sendall(b"x")
        assert fired.wait(5)
        conn.stop()
        assert set(calls) == {"second"}
        conn.close()


def test_take_reader_hands_over_a_stopped_watcher_on_the_same_descriptor():
    conn, peer = _pair()
    with peer:
        conn.wait(READ, lambda: None)
        reader = conn.take_reader()
        assert reader is not None and not reader.active and reader.fd == conn.fd
        fired = Event()
        reader.start(fired.set)
        peer.sendall(b"x")
        assert fired.wait(5)
        reader.stop()
        reader.close()
        conn.close()


def test_failed_call_words_kernel_errors_as_nginx():
    error = OSError(errno.ECONNRESET, "reset")
    assert failed_call("recv", error) == "recv() failed (104: Connection reset by peer)"
    assert failed_call("send", OSError(errno.EPIPE, "x")) == "send() failed (32: Broken pipe)"


def test_failed_call_words_tls_errors_with_openssls_reason():
    error = ssl.SSLError(1, "[SSL: DECRYPTION_FAILED_OR_BAD_RECORD_MAC] decryption failed or bad record mac")
    error.reason = "DECRYPTION_FAILED_OR_BAD_RECORD_MAC"
    text = failed_call("recv", error)
    assert text.startswith("SSL_read() failed (SSL: ") and "errno" not in text


def test_send_to_a_closed_peer_raises_the_kernels_error():
    conn, peer = _pair()
    peer.close()
    with pytest.raises(OSError) as caught:
        conn.send(b"x" * 100)
    assert caught.value.errno == errno.EPIPE
    conn.close()


def test_recv_from_a_closed_peer_is_eof():
    conn, peer = _pair()
    peer.close()
    assert conn.recv(100) == b""
    conn.close()


def _nonblocking():
    return socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)


def test_connect_to_a_listener_on_this_host_is_up_at_once():
    # Loopback completes the handshake inside connect(2): no write watcher, no SO_ERROR read.
    with socket.create_server(("127.0.0.1", 0)) as listener, _nonblocking() as sock:
        assert connect(sock, listener.getsockname()) == 0
        accepted, _ = listener.accept()
        with accepted:
            sock.send(b"a1 LOGIN\r\n")
            assert accepted.recv(100) == b"a1 LOGIN\r\n"


def test_connect_refused_is_waited_for_and_read_from_so_error():
    # A refused connect must never pass for a connected one: its errno comes from SO_ERROR as before.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        closed = listener.getsockname()
    with _nonblocking() as sock:
        code = connect(sock, closed)
        assert code != 0
        if code in IN_PROGRESS:
            conn = Connection(gevent.get_hub().loop, sock)
            writable = Event()
            conn.wait(WRITE, writable.set)
            assert writable.wait(5)
            conn.release_watchers()
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        assert code == errno.ECONNREFUSED
