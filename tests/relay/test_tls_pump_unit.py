"""mailproxy._openssl.TlsPump on its own, in this process, on socket pairs with real TLS: statuses, the
held bytes that proxy_buffer bounds, errors in the copy loop's words, and a released pump."""

import socket
import ssl
import struct
import threading

import pytest

from mailproxy import relay
from mailproxy.events import failed_call

from support.harness import missing


@pytest.fixture(autouse=True)
def tls_pump_in_use():
    if not relay.TLS_PUMP_AVAILABLE:
        missing("the TLS pump (the OpenSSL bridge active, MAILPROXY_TLS_PUMP unset)")

bridge = relay._tls_bridge


def _tls_over(a, b, certs, tmp_path):
    """(server-side SSLSocket on ``a``, non-blocking, for the pump; client-side SSLSocket on ``b``,
    blocking, the peer)."""
    ca = str(tmp_path / "ca.pem")
    certs.ca.cert_pem.write_to_path(ca)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs.cert, certs.key)
    made = {}
    thread = threading.Thread(target=lambda: made.setdefault("server", server_ctx.wrap_socket(a, server_side=True)))
    thread.start()
    client = ssl.create_default_context(cafile=ca).wrap_socket(b, server_hostname="localhost")
    thread.join(10)
    server = made["server"]
    server.setblocking(False)
    client.settimeout(10)
    return server, client


@pytest.fixture
def tls_pair(certs, tmp_path):
    server, client = _tls_over(*socket.socketpair(), certs, tmp_path)
    yield server, client
    server.close()
    client.close()


@pytest.fixture
def tls_tcp_pair(certs, tmp_path):
    """tls_pair over loopback TCP, the server's side with TCP_NODELAY as every listener sets it."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        b = socket.create_connection(listener.getsockname())
        a, _ = listener.accept()
    a.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    server, client = _tls_over(a, b, certs, tmp_path)
    yield server, client
    server.close()
    client.close()


def segments_sent(sock):
    # struct tcp_info (linux/tcp.h): tcpi_segs_out is the u32 at offset 136.
    return struct.unpack_from("I", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256), 136)[0]


@pytest.fixture
def plain_pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.settimeout(10)
    yield a, b
    a.close()
    b.close()


def recv_exactly(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk
        data += chunk
    return data


def test_tls_to_plain_moves_and_waits(tls_pair, plain_pair):
    server, client = tls_pair
    dst, peer = plain_pair
    pump = bridge.TlsPump(server, server.fileno(), None, dst.fileno(), 4096)
    assert pump.run(1 << 30) == (0, bridge.PUMP_AGAIN_SRC)
    client.sendall(b"x" * 10000)
    moved = 0
    while moved < 10000:
        n, status = pump.run(1 << 30)
        moved += n
        assert status == bridge.PUMP_AGAIN_SRC
    assert recv_exactly(peer, 10000) == b"x" * 10000
    assert pump.held == 0


def test_budget_says_when_the_ssl_holds_bytes(tls_pair, plain_pair):
    """Two records that arrived together are read ahead at once: once the first is delivered and the
    budget spent, the second sits inside the SSL where no socket event announces it, and the pump says
    so (relay.py then runs it again: AGAIN)."""
    server, client = tls_pair
    dst, peer = plain_pair
    pump = bridge.TlsPump(server, server.fileno(), None, dst.fileno(), 100)
    client.sendall(b"y" * 8192)  # a record a call, both in the socket before the pump reads
    client.sendall(b"z" * 8192)
    assert pump.run(1) == (8192, bridge.PUMP_BUDGET_PENDING)
    assert pump.run(1) == (8192, bridge.PUMP_BUDGET)
    assert pump.run(1) == (0, bridge.PUMP_AGAIN_SRC)
    assert recv_exactly(peer, 16384) == b"y" * 8192 + b"z" * 8192


def test_a_stalled_destination_holds_one_record_at_most(plain_pair, tls_pair):
    """Plain source, TLS destination whose peer reads nothing: the pump stops with at most one read
    held (proxy_buffer, 4 KiB here, raised to a record), and delivers it once the peer reads."""
    src, feeder = plain_pair
    server, client = tls_pair
    pump = bridge.TlsPump(None, src.fileno(), server, server.fileno(), 4096)
    block = b"z" * 65536
    feeder.settimeout(0)
    fed = 0
    status = None
    while status != bridge.PUMP_AGAIN_DST:
        try:
            fed += feeder.send(block)
        except BlockingIOError:
            pass  # the source socket is full too: the pump below drains it
        moved, status = pump.run(1 << 30)
        assert 0 < pump.held <= 16384 or status != bridge.PUMP_AGAIN_DST
    assert 0 < pump.held <= 16384
    got = 0
    while got < fed:
        pump.run(1 << 30)
        got += len(client.recv(1 << 20))
    assert got == fed
    assert pump.held == 0


def test_a_plain_source_is_read_a_record_at_a_time(plain_pair, tls_pair):
    """proxy_buffer (4 KiB here) smaller than a record: towards a TLS destination every write is a
    record, so 16 KiB that arrived together leave as one record (one encryption, one write(2)), not
    four (eight streams down: CPU per GiB 1.48 with four, 1.16 with one). The peer's first read
    decrypts one record; what it did not take of it is SSL_pending."""
    src, feeder = plain_pair
    server, client = tls_pair
    pump = bridge.TlsPump(None, src.fileno(), server, server.fileno(), 4096)
    feeder.sendall(b"d" * 16384)
    assert pump.run(1 << 30) == (16384, bridge.PUMP_AGAIN_SRC)
    assert client.recv(1) == b"d"
    assert client.pending() == 16383
    assert recv_exactly(client, 16383) == b"d" * 16383


def test_records_of_one_run_leave_in_full_segments_and_nothing_stays_corked(plain_pair, tls_tcp_pair):
    """Bulk towards a TLS client: four 16 KiB records in one run. With the listener's TCP_NODELAY each
    would be a segment of its own; the pump corks the socket from the second record to the run's end,
    and uncorks it then, so that the last partial segment does not wait for the kernel's 200 ms."""
    src, feeder = plain_pair
    server, client = tls_tcp_pair
    pump = bridge.TlsPump(None, src.fileno(), server, server.fileno(), 4096)
    feeder.sendall(b"a" * 100)
    before = segments_sent(server)
    assert pump.run(1 << 30) == (100, bridge.PUMP_AGAIN_SRC)
    assert recv_exactly(client, 100) == b"a" * 100  # a lone reply goes at once
    assert segments_sent(server) - before == 1
    feeder.sendall(b"b" * 65536)
    before = segments_sent(server)
    assert pump.run(1 << 30) == (65536, bridge.PUMP_AGAIN_SRC)
    assert server.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK) == 0
    assert segments_sent(server) - before <= 4
    assert recv_exactly(client, 65536) == b"b" * 65536


def test_a_tls_source_is_read_a_record_at_a_time(tls_pair, plain_pair):
    """client_buffer (4 KiB here) bounds the reads from a plain source only. A TLS record, which OpenSSL
    holds decrypted whole, is read whole and sent with one send(2), not four (an upload's CPU per GiB:
    0.92 with four, 0.76 with one): towards a stalled destination the pump holds the record it read."""
    server, client = tls_pair
    dst, backend = plain_pair
    while True:  # the destination's socket buffer full: its peer reads nothing yet
        try:
            dst.send(b"\0" * 65536)
        except BlockingIOError:
            break
    pump = bridge.TlsPump(server, server.fileno(), None, dst.fileno(), 4096)
    client.sendall(b"r" * 16384)  # one record
    assert pump.run(1 << 30) == (0, bridge.PUMP_AGAIN_DST)
    assert pump.held == 16384
    got = b""
    while not got.endswith(b"r" * 16384):
        got += backend.recv(1 << 20)  # within 10 s, or the pump never delivered the record
        pump.run(1 << 30)
    assert pump.held == 0


def test_errors_are_worded_as_the_copy_loop_words_them(tls_pair, plain_pair):
    server, client = tls_pair
    dst, peer = plain_pair
    peer.close()
    pump = bridge.TlsPump(server, server.fileno(), None, dst.fileno(), 4096)
    client.sendall(b"to nowhere")
    with pytest.raises(bridge.PumpSyscallError) as info:
        while True:
            pump.run(1 << 30)
    assert (info.value.side, info.value.moved) == ("dst", 0)
    assert failed_call("send", info.value) == "send() failed (32: Broken pipe)"


def test_eof_without_close_notify_is_an_end(tls_pair, plain_pair):
    server, client = tls_pair
    dst, peer = plain_pair
    pump = bridge.TlsPump(server, server.fileno(), None, dst.fileno(), 4096)
    client.sendall(b"last words")
    socket.socket.shutdown(client, socket.SHUT_WR)  # a FIN, no close_notify
    moved, status = 0, bridge.PUMP_AGAIN_SRC
    while status == bridge.PUMP_AGAIN_SRC:
        n, status = pump.run(1 << 30)
        moved += n
    assert (moved, status) == (10, bridge.PUMP_EOF)
    assert recv_exactly(peer, 10) == b"last words"


def test_a_released_pump_refuses_to_run(tls_pair, plain_pair):
    server, client = tls_pair
    dst, _ = plain_pair
    pump = bridge.TlsPump(server, server.fileno(), None, dst.fileno(), 4096, b"leftovers")
    assert pump.held == 9
    pump.release()
    assert pump.held == 0
    with pytest.raises(ValueError):
        pump.run(1)


def test_only_python_ssl_objects(plain_pair):
    dst, _ = plain_pair
    with pytest.raises(TypeError):
        bridge.TlsPump(object(), 0, None, dst.fileno(), 4096)
    with pytest.raises(ValueError):
        bridge.TlsPump(None, 0, None, dst.fileno(), 4096)
