"""A recording auth server on raw sockets (so it can misbehave) and settings objects for the client."""

import socket
import threading
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import pytest

from mailproxy.protocol.common import AuthAttempt

OK_REPLY = b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: 143\r\n\r\n"


@dataclass
class Answer:
    """What the server does with one request: write ``data`` after ``delay`` s, then close or not."""

    data: Optional[bytes]  # None: never answer (hold the connection until the server stops)
    delay: float = 0.0
    close: bool = True


def keepalive_answer(body: bytes = b"", extra: bytes = b"") -> Answer:
    head = b"HTTP/1.1 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: 143\r\n"
    return Answer(head + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body, close=False)


class RecordingAuthServer:
    """Threads on blocking sockets: one per connection, every request recorded with its connection number.

    ``handler(request, conn_no, index_on_conn) -> Answer`` decides each answer.
    """

    def __init__(self, handler, unix_path=None):
        self.handler = handler
        self.unix_path = unix_path
        self.requests = []  # (connection number, request bytes)
        self.connections = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._socks = []
        self._threads = []

    def start(self):
        if self.unix_path:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(self.unix_path)
        else:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", 0))
        # Listening before start() returns is the readiness: connects queue in the backlog from now on.
        listener.listen(512)
        self.listener = listener
        self.port = None if self.unix_path else listener.getsockname()[1]
        self._spawn(self._accept_loop)
        return self

    def _spawn(self, target, *args):
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept_loop(self):
        while not self._stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                number = self.connections
                self._socks.append(conn)
            self._spawn(self._serve, conn, number)

    def _serve(self, conn, number):
        buf = b""
        index = 0
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                request, _, buf = buf.partition(b"\r\n\r\n")
                request += b"\r\n\r\n"
                with self._lock:
                    self.requests.append((number, request))
                answer = self.handler(request, number, index)
                index += 1
                if answer.data is None:
                    self._stopping.wait()
                    return
                if answer.delay and self._stopping.wait(answer.delay):
                    return
                conn.sendall(answer.data)
                if answer.close:
                    return
        except OSError:
            return
        finally:
            conn.close()

    def stop(self):
        self._stopping.set()
        try:
            # close() alone leaves a thread blocked in accept(); shutdown wakes it on Linux.
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # never listened: nothing to wake
        self.listener.close()
        with self._lock:
            for conn in self._socks:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already closed by its own thread
        for thread in self._threads:
            thread.join(5)


def url_for(server: RecordingAuthServer, uri: str = "/auth"):
    if server.unix_path:
        return SimpleNamespace(
            host_header="localhost",
            uri=uri,
            sockaddr=server.unix_path,
            family=socket.AF_UNIX,
            peer="unix:" + server.unix_path,
        )
    return SimpleNamespace(
        host_header="127.0.0.1",
        uri=uri,
        sockaddr=("127.0.0.1", server.port),
        family=socket.AF_INET,
        peer="127.0.0.1:%d" % server.port,
    )


def settings(url, timeout=5.0, keepalive=False, headers=(), pass_client_cert=False):
    return SimpleNamespace(
        auth_http=url,
        auth_http_header=tuple(headers),
        auth_http_timeout=timeout,
        auth_http_keepalive=keepalive,
        auth_http_pass_client_cert=pass_client_cert,
    )


def attempt(method="plain", login=b"user", password=b"secret", **kw):
    return AuthAttempt(method=method, login=login, password=password, attempt=kw.pop("attempt", 1), **kw)


@pytest.fixture
def auth_server():
    """Factory: ``auth_server(handler, unix_path=None)`` started now, stopped at teardown."""
    started = []

    def start(handler, unix_path=None):
        server = RecordingAuthServer(handler, unix_path).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
