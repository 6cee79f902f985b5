"""The auth_http exchange step by step: what its debug lines say (and never say), cancelling, a kept-alive
reply whose body comes later, cut short or overlong, and a request larger than the socket buffers.

Real sockets on loopback, the server a thread: each test scripts the bytes it writes and when.
"""

import re
import socket
import struct
import threading
from types import SimpleNamespace

import gevent
import pytest

from mailproxy.auth_http import client as client_module
from mailproxy.auth_http import request
from mailproxy.auth_http.client import AuthHttpClient, close_pools
from mailproxy.auth_http.response import AuthHttpError

from support.authhttp import OK_REPLY, Answer, attempt, keepalive_answer, settings, url_for
from support.servers import TcpServer

PASSWORD = b"pa55-word"
WAIT = 10.0  # for a thread's event: the test fails rather than hangs
HEAD = b"HTTP/1.1 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: 143\r\nContent-Length: 5\r\n\r\n"


@pytest.fixture(autouse=True)
def fresh_pools():
    close_pools()
    yield
    close_pools()


def build(conf, login=b"alice"):
    return request.build(conf, attempt(login=login, password=PASSWORD), "imap", "127.0.0.1")


class Scripted(TcpServer):
    """A listener whose connections run ``script(conn)`` in a thread each (an OSError there is the
    client closing first: what some tests provoke)."""

    def __init__(self, script):
        self.script = script
        super().__init__()
        self.url = SimpleNamespace(host_header="127.0.0.1", uri="/auth", sockaddr=("127.0.0.1", self.port),
                                   family=socket.AF_INET, peer="127.0.0.1:%d" % self.port)

    def serve_connection(self, conn):
        self.script(conn)


@pytest.fixture
def scripted():
    made = []

    def make(script):
        server = Scripted(script)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


def read_request(conn):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            raise OSError("client closed")
        data += chunk
    return data


def test_debug_lines_tell_the_steps_and_never_the_secrets(auth_server):
    reply = (b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: 143\r\n"
             b"Auth-User: bob\r\nAuth-Pass: backend-secret\r\n\r\n")
    server = auth_server(lambda req, n, i: Answer(reply))
    lines = []
    got = AuthHttpClient(settings(url_for(server))).ask(build(settings(url_for(server))), debug=lines.append)
    assert got.password == b"backend-secret"
    peer = "127.0.0.1:%d" % server.port
    shapes = [re.sub(r"fd:\d+", "fd:N", line) for line in lines]
    assert shapes[0] == "mail auth http connect to %s, fd:N" % peer
    assert shapes[1].startswith("mail auth http send: fd:N ") and shapes[1].endswith(" bytes")
    assert any(line.startswith("mail auth http recv: fd:N ") for line in shapes)
    assert shapes[-2:] == [
        "close http auth connection: fd:N",
        'mail auth http reply: 200, Auth-Status: "OK", Auth-Server: "127.0.0.1", Auth-Port: "143", '
        'Auth-User: "bob", Auth-Pass: (not logged)']
    text = "\n".join(lines)
    assert PASSWORD.decode() not in text and "backend-secret" not in text


def test_debug_lines_of_a_kept_alive_connection(auth_server):
    server = auth_server(lambda req, n, i: keepalive_answer(b"{}"))
    conf = settings(url_for(server), keepalive=True)
    first, second = [], []
    AuthHttpClient(conf).ask(build(conf), debug=first.append)
    AuthHttpClient(conf).ask(build(conf), debug=second.append)
    assert any(re.fullmatch(r"mail auth http keeps fd:\d+ alive", line) for line in first)
    assert re.fullmatch(r"mail auth http reuses a kept-alive connection to 127\.0\.0\.1:\d+, fd:\d+", second[0])
    assert not any("connect to" in line for line in second)
    assert server.connections == 1


def test_debug_line_when_a_kept_alive_connection_died(auth_server):
    def handler(req, n, i):
        answer = keepalive_answer()
        answer.close = True  # says keep-alive, then hangs up
        return answer

    server = auth_server(handler)
    conf = settings(url_for(server), keepalive=True)
    for _ in range(3):
        lines = []
        assert AuthHttpClient(conf).ask(build(conf), debug=lines.append).status == b"OK"
    assert server.connections == 3
    # Whichever side noticed the close first, the request succeeded; when the exchange did, it says so.
    retried = [line for line in lines if "asking again" in line]
    assert retried in ([], ["mail auth http kept-alive connection was closed by the server, asking again"])


def test_a_reply_without_a_status_line_is_shown_as_such(auth_server):
    server = auth_server(lambda req, n, i: Answer(b"Auth-Status: Invalid login\r\nAuth-Wait: 3\r\n\r\n"))
    lines = []
    AuthHttpClient(settings(url_for(server))).ask(build(settings(url_for(server))), debug=lines.append)
    assert lines[-1] == 'mail auth http reply: no status, Auth-Status: "Invalid login", Auth-Wait: "3"'


def test_cancel_calls_nobody_and_drops_the_connection(scripted):
    seen = threading.Event()
    closed = threading.Event()

    def script(conn):
        read_request(conn)
        seen.set()
        if conn.recv(1) == b"":  # the proxy's close, not a reply, ends this connection
            closed.set()

    server = scripted(script)
    conf = settings(server.url, timeout=WAIT)
    calls = []
    exchange = AuthHttpClient(conf).start(build(conf), lambda reply, error: calls.append((reply, error)))
    while not seen.is_set():
        gevent.sleep(0.01)  # the hub runs the exchange
    exchange.cancel()
    assert closed.wait(WAIT)
    gevent.sleep(0.05)
    assert calls == []


def test_a_kept_alive_body_that_comes_after_the_reply(scripted):
    """The session gets its reply as soon as the header block is in; the body is read and dropped after,
    and only then does the connection join the pool."""
    release = threading.Event()

    def script(conn):
        while True:
            read_request(conn)
            conn.sendall(HEAD)
            assert release.wait(WAIT)
            conn.sendall(b"hello")

    server = scripted(script)
    conf = settings(server.url, keepalive=True, timeout=WAIT)
    pool = client_module.pool_for(server.url)
    assert AuthHttpClient(conf).ask(build(conf)).status == b"OK"  # before the body was written
    assert len(pool) == 0
    release.set()
    for _ in range(int(WAIT / 0.01)):
        if len(pool):
            break
        gevent.sleep(0.01)
    assert len(pool) == 1
    assert AuthHttpClient(conf).ask(build(conf)).status == b"OK"
    assert server.accepted == 1


@pytest.mark.parametrize("rest", [b"hel", b"hello, and more"], ids=["cut-short", "overlong"])
def test_a_kept_alive_body_that_does_not_match_its_length_retires_the_connection(scripted, rest):
    """A body cut by EOF, or bytes beyond Content-Length, leave the stream unusable: the next request
    goes over a new connection, and the first one's reply stands."""
    def script(conn):
        read_request(conn)
        conn.sendall(HEAD)
        # Pacing, not synchronising: the rest usually comes in a read of its own; if not, the outcome
        # is the same.
        threading.Event().wait(0.2)
        conn.sendall(rest)
        if rest == b"hel":
            conn.shutdown(socket.SHUT_WR)
        else:
            conn.recv(1)  # hold the connection until the client closes it

    server = scripted(script)
    conf = settings(server.url, keepalive=True, timeout=WAIT)
    pool = client_module.pool_for(server.url)
    assert AuthHttpClient(conf).ask(build(conf)).status == b"OK"
    gevent.sleep(0.5)
    assert len(pool) == 0
    assert AuthHttpClient(conf).ask(build(conf)).status == b"OK"
    assert server.accepted == 2


def test_a_request_larger_than_the_socket_buffers(auth_server):
    """An auth_http_header long enough that the request goes out in several writes, each when the socket
    can take more; the auth server gets it whole."""
    server = auth_server(lambda req, n, i: Answer(OK_REPLY))
    big = "x" * (1 << 20)
    conf = settings(url_for(server), headers=[("X-Big", big)], timeout=WAIT)
    assert AuthHttpClient(conf).ask(build(conf)).status == b"OK"
    assert server.requests[0][1].endswith(b"X-Big: " + big.encode() + b"\r\n\r\n")


def test_the_auth_server_resetting_mid_request(scripted):
    def script(conn):
        conn.recv(65536)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends a reset

    server = scripted(script)
    conf = settings(server.url, headers=[("X-Big", "x" * (8 << 20))], timeout=WAIT)
    with pytest.raises(AuthHttpError) as info:
        AuthHttpClient(conf).ask(build(conf))
    assert re.fullmatch(r"(send|recv)\(\) failed \((104: Connection reset by peer|32: Broken pipe)\)",
                        info.value.message), info.value.message
