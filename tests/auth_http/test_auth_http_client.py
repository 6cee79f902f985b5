"""The gevent client against a real recording auth server (spec 3.1, 3.5; keep-alive is ours)."""

import socket
import time
from types import SimpleNamespace

import gevent
import pytest

from mailproxy.auth_http import client as client_module
from mailproxy.auth_http import request
from mailproxy.auth_http.client import AuthHttpClient, close_pools
from mailproxy.auth_http.response import AuthHttpError, AuthOk, decide

from support.authhttp import OK_REPLY, Answer, attempt, keepalive_answer, settings, url_for


@pytest.fixture(autouse=True)
def fresh_pools():
    close_pools()
    yield
    close_pools()


def ask(server_settings, login=b"user"):
    req = request.build(server_settings, attempt(login=login), "imap", "127.0.0.1")
    return AuthHttpClient(server_settings).ask(req)


def test_one_connection_per_request_and_exact_bytes(auth_server):
    server = auth_server(lambda req, n, i: Answer(OK_REPLY + b"ignored body"))
    conf = settings(url_for(server), headers=[("X-Key", "k")])
    for _ in range(3):
        reply = ask(conf)
        assert decide(reply, "imap", "plain") == AuthOk("127.0.0.1", 143, "127.0.0.1:143", None, None)
    assert server.connections == 3
    assert [n for n, _ in server.requests] == [1, 2, 3]
    assert server.requests[0][1] == (
        b"GET /auth HTTP/1.0\r\nHost: 127.0.0.1\r\nAuth-Method: plain\r\nAuth-User: user\r\n"
        b"Auth-Pass: secret\r\nAuth-Protocol: imap\r\nAuth-Login-Attempt: 1\r\nClient-IP: 127.0.0.1\r\n"
        b"X-Key: k\r\n\r\n"
    )


def test_closes_at_end_of_header_block_without_waiting_for_the_body(auth_server):
    # The server keeps the connection open after the header: nginx mode must not wait for EOF.
    server = auth_server(lambda req, n, i: Answer(OK_REPLY, close=False))
    started = time.monotonic()
    assert ask(settings(url_for(server), timeout=30)).server == b"127.0.0.1"
    # A client waiting for the server's close would still be waiting at its 30 s timeout (and then fail):
    # the reply came long before that could happen.
    assert time.monotonic() - started < 15


def test_unix_socket_auth_server(auth_server, tmp_path):
    server = auth_server(lambda req, n, i: Answer(OK_REPLY), unix_path=str(tmp_path / "auth.sock"))
    assert ask(settings(url_for(server, uri="/"))).port == b"143"
    assert server.requests[0][1].startswith(b"GET / HTTP/1.0\r\nHost: localhost\r\n")


def test_refused():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    url = type("Url", (), {})()
    url.host_header, url.uri, url.sockaddr, url.family = "127.0.0.1", "/", ("127.0.0.1", port), socket.AF_INET
    url.peer = "127.0.0.1:%d" % port
    with pytest.raises(AuthHttpError) as info:
        ask(settings(url))
    assert info.value.message == "connect() to 127.0.0.1:%d failed (111: Connection refused)" % port


def test_missing_unix_socket(tmp_path):
    from support.authhttp import RecordingAuthServer

    url = url_for(RecordingAuthServer(None, unix_path=str(tmp_path / "none.sock")))
    with pytest.raises(AuthHttpError) as info:
        ask(settings(url))
    assert info.value.message == "connect() to unix:%s failed (2: No such file or directory)" % (
        tmp_path / "none.sock")


def test_server_that_never_answers_times_out_within_auth_http_timeout(auth_server):
    server = auth_server(lambda req, n, i: Answer(None))
    started = time.monotonic()
    with pytest.raises(AuthHttpError) as info:
        ask(settings(url_for(server), timeout=0.5))
    elapsed = time.monotonic() - started
    assert info.value.message == "auth http server 127.0.0.1:%d timed out (110: Connection timed out)" % server.port
    # Not before auth_http_timeout; the upper bound only says it fired at all (10x, for a busy machine).
    assert 0.45 <= elapsed < 5.0


def test_timeout_is_a_deadline_not_an_idle_timer():
    # Header lines that arrive do not extend the wait: the whole header is due within the timeout. The
    # server drips a line every 0.1 s, far inside the 0.5 s timeout, for up to 100 lines: an idle timer
    # would never fire while they come, a deadline ends the exchange while they still do.
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    hung_up = threading.Event()

    def serve():
        conn, _ = listener.accept()
        with conn:
            request_bytes = b""
            while b"\r\n\r\n" not in request_bytes:
                request_bytes += conn.recv(4096)
            conn.sendall(b"HTTP/1.0 200 OK\r\n")
            conn.settimeout(0.1)  # the drip's pace
            try:
                for _ in range(100):
                    try:
                        if conn.recv(1) == b"":
                            break  # the client hung up
                    except socket.timeout:
                        pass
                    conn.sendall(b"X-Drip: 1\r\n")
                else:
                    return  # every line went out and the client still waited
            except OSError:
                pass  # reset by the client's close: hung up as well
            hung_up.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    url = SimpleNamespace(host_header="127.0.0.1", uri="/auth", sockaddr=("127.0.0.1", port),
                          family=socket.AF_INET, peer="127.0.0.1:%d" % port)
    started = time.monotonic()
    try:
        with pytest.raises(AuthHttpError, match="timed out"):
            ask(settings(url, timeout=0.5))
        assert time.monotonic() - started >= 0.45
        assert hung_up.wait(30), "the client waited while header lines kept coming"
    finally:
        listener.close()
        thread.join(30)


def test_eof_before_header_block(auth_server):
    server = auth_server(lambda req, n, i: Answer(b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\n"))
    with pytest.raises(AuthHttpError) as info:
        ask(settings(url_for(server)))
    assert info.value.message == "auth http server 127.0.0.1:%d prematurely closed connection" % server.port


def test_invalid_header_from_the_wire(auth_server):
    server = auth_server(lambda req, n, i: Answer(b"HTTP/1.0 200 OK\r\nBad Header: x\r\n\r\n"))
    with pytest.raises(AuthHttpError, match="sent invalid header in response$"):
        ask(settings(url_for(server)))


def test_oversized_header_from_the_wire(auth_server):
    server = auth_server(lambda req, n, i: Answer(b"HTTP/1.0 200 OK\r\n" + b"X-Pad: aaaaaaaa\r\n" * 100))
    with pytest.raises(AuthHttpError, match="too big header"):
        ask(settings(url_for(server)))


def test_keepalive_reuses_one_connection(auth_server):
    server = auth_server(lambda req, n, i: keepalive_answer(b"{}"))
    conf = settings(url_for(server), keepalive=True)
    for _ in range(20):
        assert ask(conf).status == b"OK"
    assert server.connections == 1 and len(server.requests) == 20
    assert server.requests[0][1].startswith(b"GET /auth HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n")


def test_keepalive_pool_shared_by_servers_naming_the_same_auth_server(auth_server):
    server = auth_server(lambda req, n, i: keepalive_answer())
    first = settings(url_for(server), keepalive=True)
    second = settings(url_for(server, uri="/other"), keepalive=True)
    ask(first)
    ask(second)
    assert server.connections == 1


def test_keepalive_body_split_from_header(auth_server):
    server = auth_server(lambda req, n, i: keepalive_answer(b"x" * 3000))
    conf = settings(url_for(server), keepalive=True)
    for _ in range(5):
        ask(conf)
    assert server.connections == 1


def test_keepalive_connection_close_retires_the_connection(auth_server):
    server = auth_server(lambda req, n, i: keepalive_answer(extra=b"Connection: close\r\n"))
    conf = settings(url_for(server), keepalive=True)
    ask(conf)
    ask(conf)
    assert server.connections == 2


def test_keepalive_recovers_when_server_closed_idle_connection(auth_server):
    # The server answers as keep-alive and then closes: the pooled connection is dead when reused.
    def handler(req, n, i):
        answer = keepalive_answer()
        answer.close = True
        return answer

    server = auth_server(handler)
    conf = settings(url_for(server), keepalive=True)
    # Whether the FIN is seen by the idle check or only by the retry, every request must succeed.
    for _ in range(4):
        assert ask(conf).status == b"OK"
    assert server.connections == 4


def test_keepalive_retries_once_when_pooled_connection_dies_before_reply(auth_server):
    # Second request on a connection: the server hangs up without a byte, as after an idle timeout race.
    def handler(req, n, i):
        if i == 1:
            return Answer(b"")
        return keepalive_answer()

    server = auth_server(handler)
    conf = settings(url_for(server), keepalive=True)
    assert ask(conf).status == b"OK"
    assert ask(conf).status == b"OK"
    assert server.connections == 2 and len(server.requests) == 3


def test_keepalive_no_retry_after_a_reply_byte(auth_server):
    def handler(req, n, i):
        if i == 1:
            return Answer(b"HTTP/1.1 200 OK\r\nAuth-Sta")
        return keepalive_answer()

    server = auth_server(handler)
    conf = settings(url_for(server), keepalive=True)
    ask(conf)
    with pytest.raises(AuthHttpError, match="prematurely closed"):
        ask(conf)
    assert server.connections == 1


def test_keepalive_timeout_is_not_retried(auth_server):
    server = auth_server(lambda req, n, i: keepalive_answer() if i == 0 else Answer(None))
    conf = settings(url_for(server), keepalive=True, timeout=0.3)
    ask(conf)
    with pytest.raises(AuthHttpError, match="timed out"):
        ask(conf)
    assert server.connections == 1


@pytest.mark.parametrize("keepalive", [False, True], ids=["nginx", "keepalive"])
def test_a_slow_answer_does_not_hold_up_other_requests(auth_server, keepalive):
    import threading

    # The slow answer is held until the fast ones are all answered: if they waited for it, nothing would.
    asked, release = threading.Event(), threading.Event()

    def handler(req, n, i):
        if b"Auth-User: slow" in req:
            asked.set()
            release.wait(60)
            return Answer(keepalive_answer().data, close=not keepalive)
        return keepalive_answer() if keepalive else Answer(OK_REPLY)

    server = auth_server(handler)
    conf = settings(url_for(server), keepalive=keepalive, timeout=60)
    client = AuthHttpClient(conf)
    slow_req = request.build(conf, attempt(login=b"slow"), "imap", "127.0.0.1")
    fast_req = request.build(conf, attempt(), "imap", "127.0.0.1")
    try:
        slow = gevent.spawn(client.ask, slow_req)
        while not asked.is_set():
            gevent.sleep(0.01)  # the hub runs the slow exchange until the server holds it
        fast = [gevent.spawn(client.ask, fast_req) for _ in range(100)]
        gevent.joinall(fast, timeout=30, raise_error=True)
        assert all(g.ready() and g.value.status == b"OK" for g in fast)
        assert not slow.ready()
    finally:
        release.set()
    assert slow.get(timeout=30).status == b"OK"
    if keepalive:
        assert len(client_module._pools) == 1


def test_keepalive_bytes_on_an_idle_connection_retire_it():
    """Bytes an auth server writes on an idle kept-alive connection (a stray or forged second reply)
    must never be read as the answer to the next request: the pool watches idle connections and drops
    one that becomes readable, and the next request goes over a fresh connection."""
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    stray_sent = threading.Event()
    pooled = threading.Event()
    forged = (b"HTTP/1.1 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 10.9.9.9\r\nAuth-Port: 25\r\n"
              b"Content-Length: 0\r\n\r\n")

    def serve():
        for number in range(2):
            conn, _ = listener.accept()
            with conn:
                request_bytes = b""
                while b"\r\n\r\n" not in request_bytes:
                    request_bytes += conn.recv(4096)
                conn.sendall(keepalive_answer().data)
                if number == 0:
                    assert pooled.wait(5)
                    conn.sendall(forged)  # after the reply, unasked, while the connection sits idle
                    stray_sent.set()
                try:
                    conn.recv(4096)  # hold it open until the client closes it
                except OSError:
                    pass  # the client reset it (unread bytes were left on its side)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    url = SimpleNamespace(host_header="127.0.0.1", uri="/auth", sockaddr=("127.0.0.1", port),
                          family=socket.AF_INET, peer="127.0.0.1:%d" % port)
    conf = settings(url, keepalive=True)
    pool = client_module.pool_for(url)
    try:
        assert ask(conf).server == b"127.0.0.1"
        assert len(pool) == 1
        pooled.set()
        assert stray_sent.wait(5)
        deadline = time.monotonic() + 5
        while len(pool) and time.monotonic() < deadline:
            gevent.sleep(0.01)  # the hub runs: the pool's watcher sees the bytes and retires the connection
        assert len(pool) == 0
        assert ask(conf).server == b"127.0.0.1"
    finally:
        close_pools()
        listener.close()
        thread.join(5)
