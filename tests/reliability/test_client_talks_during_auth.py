"""A client that keeps talking while its login is decided (pipelining, or an attacker) costs nothing: the
session stops reading it until the auth server answers (issue 24: the session runs on level-triggered io
watchers, where a watcher left armed on unread bytes would fire without end and take a whole CPU), and the
bytes are still there for the machine afterwards."""

import socket
import threading

import pytest

from support.harness import free_port, mail_config
from support.procstate import Watch

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


@pytest.mark.parametrize("extra", [b"b NOOP\r\n", b"x" * 3000])
def test_bytes_sent_while_the_auth_server_thinks_are_not_spun_on(mailproxy_master, extra):
    auth = HeldAuthServer()
    port = free_port()
    master = mailproxy_master(mail_config(auth.url, """
    server { listen 127.0.0.1:%d; protocol imap; }
}
""" % port, timeout=None), handler=None)
    try:
        (worker,) = master.workers()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            assert client.recv(4096).startswith(b"* OK")
            client.sendall(b"a LOGIN alice secret\r\n")
            assert auth.asked.wait(10)
            client.sendall(extra)
            # The worker has nothing to do but wait: a watcher left armed on the unread bytes would fire
            # without end, the worker runnable whenever looked at and never blocking.
            watch = Watch(worker)
            for _ in range(15):
                threading.Event().wait(HOLD / 15)  # pacing the samples, not synchronising
                watch.sample()
            auth.release.set()
            client.settimeout(10)
            reply = b""
            while b"a NO" not in reply:
                chunk = client.recv(4096)
                assert chunk, reply
                reply += chunk
        assert watch.asleep_share() >= 0.5, "the worker was runnable in %s" % watch.samples
        assert watch.wakeups() < 30, "the worker woke %d times while it had nothing to do" % watch.wakeups()
        assert b"a NO Invalid login or password" in reply
    finally:
        auth.close()
    assert "[alert]" not in master.error_log()
