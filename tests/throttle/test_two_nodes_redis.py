"""Two mailproxy nodes, each asking its own mailproxy-auth, the two auth servers sharing one real
redis-server (`--redis`): failed logins from one client address count once across both nodes.

Real processes throughout: two mailproxy masters running the real session, two mailproxy-auth
(`--max-failures 5 --wait 1`), one redis-server, a tiny IMAP backend for the login that succeeds.
Clients bind 127.0.0.2 and 127.0.0.3, both loopback addresses on Linux, to be two client addresses.
"""

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from mailproxy_testing import free_port, read_line, read_to_close, wait_for

ATTACKER = "127.0.0.2"
OTHER = "127.0.0.3"
INVALID = b"a NO Invalid login or password\r\n"
LOCKED = b"a NO Too many invalid logins, try again later\r\n"

CONFIG = """
worker_processes 1;
error_log logs/error.log info;
events { worker_connections 64; }
mail {
    auth_http 127.0.0.1:%d/auth;
    server { listen 127.0.0.1:%d; protocol imap; }
}
"""


def require(what, present):
    # In CI a missing dependency is a broken setup (.ci/run installs it), not a reason to skip.
    if not present:
        if os.environ.get("CI") == "true":
            pytest.fail("%s is required in CI" % what)
        pytest.skip("%s is not installed" % what)


def wait_listening(port, process, what):
    """Readiness: the port accepts; fails at once if the process died instead."""
    def accepts():
        assert process.poll() is None, "%s exited with %s" % (what, process.returncode)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        except OSError:
            return False
        return True

    wait_for(accepts, 20, "%s to listen" % what)


class TinyImapBackend:
    """Greets, takes LOGIN (in literals, as the proxy sends it), says OK to anything, BYE on LOGOUT."""

    def __init__(self):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed by the test
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn):
        with conn, conn.makefile("rb") as reader:
            conn.sendall(b"* OK backend ready\r\n")
            command = b""
            for line in reader:
                command += line
                if line.endswith(b"}\r\n"):
                    size = int(line[line.rindex(b"{") + 1:-3])
                    conn.sendall(b"+ go on\r\n")
                    command += reader.read(size)
                    continue
                tag, _, rest = command.partition(b" ")
                command = b""
                if rest.upper().startswith(b"LOGOUT"):
                    conn.sendall(b"* BYE\r\n" + tag + b" OK bye\r\n")
                    return
                conn.sendall(tag + b" OK done\r\n")

    def close(self):
        self.listener.close()


@pytest.fixture
def redis_url(tmp_path):
    require("redis-server", shutil.which("redis-server"))
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL)
    try:
        wait_listening(port, process, "redis-server")
        yield "redis://127.0.0.1:%d/0" % port
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture
def backend():
    server = TinyImapBackend()
    yield server
    server.close()


@pytest.fixture
def nodes(tmp_path, redis_url, backend, mailproxy_master):
    """The IMAP ports of two mailproxy nodes, each with its own mailproxy-auth on the shared Redis."""
    # mailproxy-auth imports the client only with --redis; the test only needs to know it is there.
    require("the redis Python client", importlib.util.find_spec("redis") is not None)
    users = tmp_path / "users"
    users.write_text("backend imap 127.0.0.1:%d\nuser alice@example.com {PLAIN}wonderland\n" % backend.port)
    processes, ports = [], []
    try:
        for _ in range(2):
            auth_port = free_port()
            # --wait 1: a refusal below the limit carries Auth-Wait, so the proxy keeps the session open
            # (and answers after a second); the lock-out carries none, so the proxy closes after its NO.
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "mailproxy.authserver.app", "--users", str(users),
                 "--listen", "127.0.0.1:%d" % auth_port, "--max-failures", "5", "--lockout", "60", "--wait", "1",
                 "--redis", redis_url, "--access-log", str(tmp_path / ("access%d.log" % auth_port))]))
            wait_listening(auth_port, processes[-1], "mailproxy-auth")
            port = free_port()
            mailproxy_master(CONFIG % (auth_port, port), handler=None)
            ports.append(port)
        yield ports
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


def test_failures_spread_over_two_nodes_lock_the_address_out(nodes):
    first, second = nodes
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
