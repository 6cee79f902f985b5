"""Two mailproxy nodes, each asking its own mailproxy-auth, the two auth servers sharing one real
redis-server (`--redis`): failed logins from one client address count once across both nodes.

Real processes throughout: two mailproxy masters with two workers each running the real session, two
mailproxy-auth (`--wait 1`), one redis-server, a tiny IMAP backend for the logins that succeed.
Clients bind 127.0.0.2 and 127.0.0.3, both loopback addresses on Linux, to be two client addresses.
"""

import importlib.util
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from support.harness import free_port, read_line, read_to_close, wait_listening
from support.throttlekit import require

ATTACKER = "127.0.0.2"
OTHER = "127.0.0.3"
INVALID = b"a NO Invalid login or password\r\n"
LOCKED = b"a NO Too many invalid logins, try again later\r\n"

CONFIG = """
worker_processes 2;
error_log logs/error.log info;
events { worker_connections 256; }
mail {
    auth_http 127.0.0.1:%d/auth;
    server { listen 127.0.0.1:%d; protocol imap; }
}
"""


@pytest.fixture
def two_nodes(tmp_path, redis_url, backend, mailproxy_master):
    """two_nodes(limit) -> ([IMAP port of each node], [access log of each node's mailproxy-auth]); each
    node asks its own mailproxy-auth, both on the shared Redis, `limit` failures per address or login."""
    # mailproxy-auth imports the client only with --redis; the test only needs to know it is there.
    require("the redis Python client", importlib.util.find_spec("redis") is not None)
    users = tmp_path / "users"
    users.write_text("backend imap 127.0.0.1:%d\nuser alice@example.com {PLAIN}wonderland\n" % backend.port)
    processes = []

    def start(limit):
        ports, access_logs = [], []
        for _ in range(2):
            auth_port = free_port()
            access_logs.append(tmp_path / ("access%d.log" % auth_port))
            # --wait 1: a refusal below the limit carries Auth-Wait, so the proxy keeps the session open
            # (and answers after a second); the lock-out carries none, so the proxy closes after its NO.
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "mailproxy.authserver.app", "--users", str(users),
                 "--listen", "127.0.0.1:%d" % auth_port, "--max-failures", str(limit), "--lockout", "60",
                 "--wait", "1", "--redis", redis_url, "--access-log", str(access_logs[-1])]))
            wait_listening(auth_port, processes[-1], "mailproxy-auth")
            port = free_port()
            mailproxy_master(CONFIG % (auth_port, port), handler=None)
            ports.append(port)
        return ports, access_logs

    try:
        yield start
    finally:
        for process in processes:
            process.terminate()
            process.wait(10)


def connect(port, source):
    sock = socket.create_connection(("127.0.0.1", port), timeout=15, source_address=(source, 0))
    assert read_line(sock).startswith(b"* OK"), "no greeting from port %d" % port
    return sock


def login(sock, user, password):
    sock.sendall(b"a LOGIN %s %s\r\n" % (user.encode(), password.encode()))
    return read_line(sock)


def refused_but_open(port, user):
    """A failure below the limit: NO, and the session goes on (LOGOUT still answered)."""
    with connect(port, ATTACKER) as sock:
        reply = login(sock, user, "wrong")
        sock.sendall(b"b LOGOUT\r\n")
        return reply, read_to_close(sock)


def locked_and_closed(port, user, password):
    """The reply to a login, and whatever follows it until the proxy closes the connection."""
    with connect(port, ATTACKER) as sock:
        return login(sock, user, password), read_to_close(sock)


def test_failures_spread_over_two_nodes_lock_the_address_out(two_nodes):
    (first, second), _ = two_nodes(5)
    # Four failures, two on each node, under distinct logins so that only the per-address count can
    # reach the limit. They run side by side: each answer comes after Auth-Wait's second.
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda job: refused_but_open(*job),
                                [(first, "u1@example.com"), (second, "u2@example.com"),
                                 (first, "u3@example.com"), (second, "u4@example.com")]))
    for reply, rest in results:
        assert reply == INVALID
        assert rest == b"* BYE\r\nb OK completed\r\n", rest
    # The fifth failure, on either node, reaches the limit of five counted across both: no Auth-Wait,
    # so the proxy says NO and closes at once.
    assert locked_and_closed(second, "u5@example.com", "wrong") == (LOCKED, b"")
    # From now on the right password does not help that address, on either node.
    assert locked_and_closed(first, "alice@example.com", "wonderland") == (LOCKED, b"")
    assert locked_and_closed(second, "alice@example.com", "wonderland") == (LOCKED, b"")
    # Another address logs in through both nodes.
    for port in (first, second):
        with connect(port, OTHER) as sock:
            assert login(sock, "alice@example.com", "wonderland") == b"a OK done\r\n"
            sock.sendall(b"b LOGOUT\r\n")
            assert read_to_close(sock).endswith(b"b OK bye\r\n")


def fails(port, user):
    """One failed login from the attacking address: the reply; the session is then ended as the reply
    allows (LOGOUT after "invalid", which keeps it open; nothing after "locked", which closes it)."""
    with connect(port, ATTACKER) as sock:
        reply = login(sock, user, "wrong")
        if reply == INVALID:
            sock.sendall(b"b LOGOUT\r\n")
            assert read_to_close(sock) == b"* BYE\r\nb OK completed\r\n"
        else:
            assert read_to_close(sock) == b""
        return reply


def logs_in(port, source):
    with connect(port, source) as sock:
        reply = login(sock, "alice@example.com", "wonderland")
        sock.sendall(b"b LOGOUT\r\n")
        return reply, read_to_close(sock)


def test_thousand_failures_over_two_nodes_cut_off_at_the_limit(two_nodes):
    limit = 10
    ports, access_logs = two_nodes(limit)
    attempts = 1000
    # Another address keeps logging in through both nodes for as long as the attack lasts.
    attack_over = threading.Event()
    other_replies = []

    def other_address():
        while not attack_over.is_set() or len(other_replies) < 20:
            other_replies.append(logs_in(ports[len(other_replies) % 2], OTHER))

    bystander = threading.Thread(target=other_address)
    bystander.start()
    try:
        # Sixteen clients side by side over both nodes (two workers each), a distinct login per attempt
        # so that only the per-address count can reach the limit.
        with ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(
                lambda n: fails(ports[n % 2], "u%d@example.com" % n), range(attempts)))
    finally:
        attack_over.set()
        bystander.join(60)
    # Redis counts each failure once, atomically, whichever auth server saw it: exactly limit - 1 are
    # told "invalid" (with Auth-Wait, the proxy answering after a second), every later one is locked out.
    assert replies.count(INVALID) == limit - 1
    assert replies.count(LOCKED) == attempts - (limit - 1)
    # Every attempt was decided by an auth server: the two access logs hold them all, split between them.
    results = {"invalid": 0, "locked": 0}
    for log in access_logs:
        lines = [line for line in log.read_text().splitlines() if line.split()[1] == ATTACKER]
        assert lines, "node with %s saw none of the attack" % log.name
        for line in lines:
            results[line.rsplit('result="', 1)[1].rstrip('"')] += 1
    assert results == {"invalid": limit - 1, "locked": attempts - (limit - 1)}
    assert len(other_replies) >= 20
    assert all(reply == (b"a OK done\r\n", b"* BYE\r\nb OK bye\r\n") for reply in other_replies), other_replies[:3]
    # Still locked: the right password from the attacking address is refused on both nodes.
    for port in ports:
        assert locked_and_closed(port, "alice@example.com", "wonderland") == (LOCKED, b"")
