"""Scale-out behind a balancer (issue 9 item 4): Debian's haproxy, PROXY v2, two mailproxy nodes, one
Dovecot. A thousand IMAP sessions from eight client addresses, one node stopped with `quit` halfway
through; sessions already logged in on it must live on, and the auth server must see every client as it
really was, not as the balancer."""

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

from support.authserver import RecordingAuthServer
from support.backends import DOVECOT, Dovecot, require, wait_for_log
from support.edgekit import connect, imap_command, read_until
from support.harness import free_port, wait_for
from support.lbkit import HAPROXY, Haproxy

SESSIONS = 1000
HELD = 20
PARALLEL = 24
CLIENTS = ["127.0.0.%d" % n for n in range(2, 10)]
# Dovecot allows ten connections per user and address: a crowd of users keeps the test clear of that.
USERS = {"u%02d" % n: "pw-%02d" % n for n in range(40)}

NODE = """
worker_processes 2;
error_log logs/error.log info;
events { worker_connections 512; }
mail {
    auth_http %s;
    timeout 20s;
    set_real_ip_from 127.0.0.1;
    proxy_protocol v2;
    server { listen 127.0.0.1:%d proxy_protocol; protocol imap; }
}
"""


@pytest.fixture(scope="module")
def crowd_dovecot():
    require(DOVECOT)
    server = Dovecot()
    server.users = dict(USERS)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def cluster(crowd_dovecot, mailproxy_master, tmp_path):
    require(HAPROXY)
    # Dovecot's PROXY listener: the rip= it logs is the client the node passed on.
    auth = RecordingAuthServer(USERS, {"imap": ("127.0.0.1", crowd_dovecot.imap_haproxy_port)})
    ports = [free_port(), free_port()]
    nodes = [mailproxy_master(NODE % (auth.url, port), handler=None) for port in ports]
    balancer = Haproxy(str(tmp_path), free_port(), ports)
    try:
        balancer.start()
        yield balancer, nodes, auth, crowd_dovecot
    finally:
        balancer.stop()
        auth.close()


def user_for(n):
    return "u%02d" % (n % len(USERS))


def open_session(balancer, n):
    """A logged-in session through the balancer; retries a connection closed before the greeting.

    A node that stops listening resets the connections still in its accept queue: haproxy has no way to
    move those, and a mail client reconnects. Anything after the greeting must not fail.
    """
    user = user_for(n)
    for attempt in range(5):
        sock = connect(("127.0.0.1", balancer.port), source=CLIENTS[n % len(CLIENTS)])
        try:
            greeting = read_until(sock, b"\r\n")
        except (AssertionError, ConnectionResetError):
            sock.close()
            continue
        assert greeting.startswith(b"* OK"), greeting
        reply = imap_command(sock, b"a1", b'LOGIN %s "%s"' % (user.encode(), USERS[user].encode()))
        assert b"\r\na1 OK" in b"\r\n" + reply, reply
        return sock, attempt
    raise AssertionError("session %d: no greeting in 5 connections; haproxy says %s:\n%s"
                         % (n, balancer.states(), balancer.output()))


def logged_in_count(node):
    return node.error_log().count("client logged in")


def test_thousand_sessions_survive_a_node_quit(cluster):
    balancer, (leaving, staying), auth, dovecot = cluster

    held = [open_session(balancer, n)[0] for n in range(HELD)]
    # Round robin put half of them on the node about to leave.
    wait_for(lambda: logged_in_count(leaving) >= HELD // 2, 10, "held sessions on the leaving node")
    held_on_leaving = logged_in_count(leaving)

    done = []
    halfway = threading.Event()
    lock = threading.Lock()

    def one(n):
        sock, retries = open_session(balancer, HELD + n)
        try:
            assert b"a2 OK" in imap_command(sock, b"a2", b"LOGOUT")
        finally:
            sock.close()
        with lock:
            done.append(retries)
            if len(done) == SESSIONS // 2:
                halfway.set()

    with ThreadPoolExecutor(PARALLEL) as pool:
        futures = [pool.submit(one, n) for n in range(SESSIONS)]
        assert halfway.wait(60), "the first half of the sessions did not finish"
        # `quit` returns when the master has exited, which waits for the held sessions: run it aside.
        quit_results = []
        quitter = threading.Thread(target=lambda: quit_results.append(leaving.cli("quit")))
        quitter.start()
        leaving.wait_log("gracefully shutting down")
        errors = [future.exception() for future in futures]
    assert errors == [None] * SESSIONS, [e for e in errors if e][:3]
    assert sum(done) <= PARALLEL, "%d reconnects for one node leaving" % sum(done)

    # The leaving node drained: its held sessions still talk to Dovecot.
    for n, sock in enumerate(held):
        assert b"s1 OK" in imap_command(sock, b"s1", b"SELECT INBOX"), n
        assert b"s2 OK" in imap_command(sock, b"s2", b"LOGOUT"), n
        sock.close()
    quitter.join(30)
    assert quit_results and quit_results[0].returncode == 0, quit_results
    leaving.wait_exit(20)
    balancer.wait_state(lambda states: states.get("node0") == "DOWN", 10, "node0 DOWN")

    # Both nodes served the crowd; the stayer took everything after the quit.
    assert held_on_leaving < logged_in_count(leaving)
    assert logged_in_count(staying) > SESSIONS // 2
    for node in (leaving, staying):
        log = node.error_log()
        assert "[alert]" not in log and "broken header" not in log, log[-2000:]

    # Every auth request names a real client, never the balancer at 127.0.0.1.
    logins = [headers for _, headers in auth.requests]
    assert len(logins) == SESSIONS + HELD
    for headers in logins:
        assert headers["client-ip"].decode() in CLIENTS, headers
        assert headers["proxy-protocol-addr"] == headers["client-ip"]
        assert headers["proxy-protocol-server-port"] == b"%d" % balancer.port
    assert {headers["client-ip"].decode() for headers in logins} == set(CLIENTS)
    wait_for_log(dovecot.log_path, "rip=127.0.0.9")
