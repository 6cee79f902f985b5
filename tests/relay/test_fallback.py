"""A kernel that refuses splice (EINVAL) mid-session: the relay copies in user space from then on,
after delivering what was already in the pipe, in order. Runs the relay in this process on gevent
socket pairs, with the pump replaced by one that fails the way such a kernel does."""

import errno
import os

import gevent
import gevent.event
import pytest
from gevent import socket

from mailproxy import relay

from support.harness import missing


@pytest.fixture(autouse=True)
def splice_in_use():
    if not relay.SPLICE_AVAILABLE:
        missing("the splice relay (mailproxy._splice built, MAILPROXY_NO_SPLICE unset)")


def refusing_pump(real, refused):
    def pump(src_fd, pipe, dst_fd, max_bytes):
        if refused:
            return real(src_fd, pipe, dst_fd, max_bytes)
        # Read into the pipe as the kernel would, then refuse the write side.
        data = os.read(src_fd, 1000)
        os.write(pipe.w, data)
        pipe.fill += len(data)
        refused.append(len(data))
        exc = relay._splice.SpliceError(errno.EINVAL, os.strerror(errno.EINVAL))
        exc.side, exc.moved = "dst", 0
        raise exc
    return pump


def read_all(sock):
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def test_einval_falls_back_to_copy_without_losing_bytes(monkeypatch):
    refused = []
    monkeypatch.setattr(relay._splice, "pump", refusing_pump(relay._splice.pump, refused))
    client_app, client_proxy = socket.socketpair()
    backend_proxy, backend_app = socket.socketpair()
    results = []
    done = gevent.event.Event()

    def on_close(result):
        results.append(result)
        done.set()

    relay.start(client_proxy, backend_proxy, client_pending=b"first ", backend_pending=b"",
                proxy_timeout=10.0, proxy_buffer=4096, client_buffer=4096, tls=False, on_close=on_close)
    payload = os.urandom(300000)
    client_app.sendall(payload)
    client_app.shutdown(socket.SHUT_WR)
    got = gevent.spawn(read_all, backend_app)
    assert done.wait(10)
    assert got.get(timeout=10) == b"first " + payload
    assert refused and refused[0] > 0
    assert results == [relay.RelayResult("client closed", len(payload) + 6, 0)]
    client_app.close()
    backend_app.close()
