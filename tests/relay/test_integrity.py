"""Bytes arrive intact, in order, and counted, in both directions, on every relay path."""

import threading

import pytest

from .conftest import WAIT, drain, duplex, half_close, send_payload

SIZES = [0, 1, 64 * 1024 - 1, 64 * 1024 + 1, 100 * 1024 * 1024]


def ids(size):
    return "%dB" % size


@pytest.mark.parametrize("size", SIZES, ids=ids)
def test_client_to_backend(make_proxy, mode, size):
    proxy, backend = make_proxy(mode, drain)
    with proxy.connect() as client:
        sent = send_payload(client, size, seed=size)
        assert drain(half_close(client))[0] == 0
    assert backend.result() == (size, sent)
    assert proxy.closed() == ("client closed", size, 0)


@pytest.mark.parametrize("size", SIZES, ids=ids)
def test_backend_to_client(make_proxy, mode, size):
    proxy, backend = make_proxy(mode, lambda sock: send_payload(sock, size, seed=size + 1))
    with proxy.connect() as client:
        got = drain(client)
    assert got == (size, backend.result())
    assert proxy.closed() == ("backend closed", 0, size)


@pytest.mark.parametrize("size", [1, 64 * 1024 + 1, 100 * 1024 * 1024], ids=ids)
def test_both_ways_at_once(make_proxy, mode, size):
    def backend_side(sock):
        out = {}
        writer = threading.Thread(target=lambda: out.setdefault("sent", send_payload(sock, size, seed=7)))
        writer.start()
        got = drain(sock, limit=size)
        writer.join(WAIT)
        return got, out["sent"]

    proxy, backend = make_proxy(mode, backend_side)
    with proxy.connect() as client:
        sent, got = duplex(client, size, seed=8, limit=size)
        (backend_got, backend_sent) = backend.result()
    assert got == (size, backend_sent)
    assert backend_got == (size, sent)
    reason, c2b, b2c = proxy.closed()
    assert (c2b, b2c) == (size, size)
    assert reason in ("client closed", "backend closed")
