"""A client that keeps talking while its login is decided (pipelining, or an attacker) costs nothing: the
session stops reading it until the auth server answers (issue 24: the session runs on level-triggered io
watchers, where a watcher left armed on unread bytes would fire without end and take a whole CPU), and the
bytes are still there for the machine afterwards."""

import os
import socket
import threading

import pytest

from mailproxy_testing import free_port

HOLD = 1.5  # seconds the auth server sits on its answer


class HeldAuthServer:
    """Answers each request only when ``release`` is set: a refusal without Auth-Wait."""

    def __init__(self):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.asked = threading.Event()
        self.release = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self):
        return "127.0.0.1:%d/auth" % self.listener.getsockname()[1]

    def _serve(self):
        conn, _ = self.listener.accept()
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(4096)
            self.asked.set()
            self.release.wait(30)
            conn.sendall(b"HTTP/1.0 200 OK\r\nAuth-Status: Invalid login or password\r\n\r\n")

    def close(self):
        self.release.set()
        self.listener.close()
        self.thread.join(5)


def _cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("extra", [b"b NOOP\r\n", b"x" * 3000])
def test_bytes_sent_while_the_auth_server_thinks_are_not_spun_on(mailproxy_master, extra):
    auth = HeldAuthServer()
    port = free_port()
    master = mailproxy_master("""
worker_processes 1;
error_log logs/error.log info;
events { worker_connections 16; }
mail {
    auth_http %s;
    server { listen 127.0.0.1:%d; protocol imap; }
}
""" % (auth.url, port), handler=None)
    try:
        (worker,) = master.workers()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            assert client.recv(4096).startswith(b"* OK")
            client.sendall(b"a LOGIN alice secret\r\n")
            assert auth.asked.wait(10)
            client.sendall(extra)
            before = _cpu_seconds(worker)
            # The worker has nothing to do but wait: a spinning watcher would burn the whole hold.
            threading.Event().wait(HOLD)
            spent = _cpu_seconds(worker) - before
            auth.release.set()
            client.settimeout(10)
            reply = b""
            while b"a NO" not in reply:
                chunk = client.recv(4096)
                assert chunk, reply
                reply += chunk
        assert spent < HOLD / 3, "the worker spent %.2f s of CPU during a %.1f s wait" % (spent, HOLD)
        assert b"a NO Invalid login or password" in reply
    finally:
        auth.close()
    assert "[alert]" not in master.error_log()
