"""SMTP through a running mailproxy with `resolver`: Client-Host, XCLIENT NAME and the log (spec 5).

The DNS server, the auth server and the SMTP backend are real sockets on loopback. Clients connect
from different 127.0.0.0/8 source addresses, so each test case has a PTR of its own.
"""

import os
import socket
import time

import dns.rcode
import pytest

from support.authserver import RecordingAuthServer
from support.harness import free_port, mail_config, read_line
from support.servers import TcpServer

NAME = "mx.example.test"
SMTP_USERS = {"alice": "secret"}


class XclientBackend(TcpServer):
    """Just enough of an SMTP server to accept mailproxy's login and record its XCLIENT line."""

    def __init__(self):
        self.lines = []
        super().__init__()

    def xclients(self):
        return [line for line in self.lines if line.startswith(b"XCLIENT ")]

    def serve_connection(self, conn):
        replies = {b"EHLO": b"250 backend\r\n", b"HELO": b"250 backend\r\n", b"XCLIENT": b"220 backend\r\n",
                   b"MAIL": b"250 2.1.0 Ok\r\n", b"RCPT": b"250 2.1.5 Ok\r\n", b"QUIT": b"221 Bye\r\n"}
        with conn.makefile("rb") as reader:
            conn.sendall(b"220 backend ESMTP\r\n")
            for line in reader:
                line = line.rstrip(b"\r\n")
                self.lines.append(line)
                verb = line.split(b" ", 1)[0].upper()
                conn.sendall(replies.get(verb, b"502 5.5.2 Error\r\n"))
                if verb == b"QUIT":
                    return


@pytest.fixture
def edge(dns_server, mailproxy_master, tmp_path, request):
    backend = XclientBackend()
    auth = RecordingAuthServer(SMTP_USERS, {"smtp": ("127.0.0.1", backend.port)})
    edge = type("Edge", (), {})()
    edge.dns, edge.auth, edge.backend = dns_server, auth, backend
    edge.smtp, edge.off, edge.imap, edge.pop3 = (free_port() for _ in range(4))
    edge.unix = os.path.join(str(tmp_path), "smtp.sock")
    # resolver_timeout 1s unless a test asks for another (indirect parametrization of this fixture).
    resolver = "resolver %s; resolver_timeout %s;" % (dns_server.address, getattr(request, "param", "1s"))
    config = mail_config(auth.url, """
    smtp_auth none;
    server { listen 127.0.0.1:%d; listen unix:%s; protocol smtp; %s }
    server { listen 127.0.0.1:%d; protocol smtp; }
    server { listen 127.0.0.1:%d; protocol imap; %s }
    server { listen 127.0.0.1:%d; protocol pop3; %s }
}
""" % (edge.smtp, edge.unix, resolver, edge.off, edge.imap, resolver, edge.pop3, resolver), timeout="10s")
    edge.master = mailproxy_master(config, handler=None)
    yield edge
    auth.close()
    backend.close()
    log = edge.master.error_log()
    assert "[alert]" not in log, log


def smtp_session(address, source=None, family=socket.AF_INET):
    """Greeting, EHLO, MAIL, RCPT (method none asks the auth server), QUIT; returns the replies."""
    with socket.socket(family, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        if source:
            conn.bind((source, 0))
        conn.connect(address)
        replies = [read_line(conn)]
        conn.sendall(b"EHLO client.test\r\n")
        line = read_line(conn)
        while line[3:4] == b"-":
            line = read_line(conn)
        replies.append(line)
        for command in (b"MAIL FROM:<a@example.test>", b"RCPT TO:<b@example.test>", b"QUIT"):
            conn.sendall(command + b"\r\n")
            replies.append(read_line(conn))
        return replies


def client_host(edge, source="127.0.0.1", port=None):
    replies = smtp_session(("127.0.0.1", port or edge.smtp), source)
    assert replies[0].startswith(b"220 ") and replies[3] == b"250 2.1.5 Ok\r\n", replies
    headers = edge.auth.requests[-1][1]
    assert headers["client-ip"] == source.encode()
    return headers.get("client-host")


def suffix(edge, action, source="127.0.0.1"):
    return " while %s, client: %s, server: 127.0.0.1:%d" % (action, source, edge.smtp)


def test_confirmed_name_in_client_host_and_xclient(edge):
    edge.dns.ptr("127.0.0.1", NAME)
    edge.dns.a(NAME, "127.0.0.1")
    assert client_host(edge) == NAME.encode()
    assert edge.backend.xclients()[-1] == b"XCLIENT ADDR=127.0.0.1 NAME=" + NAME.encode()
    assert "[error]" not in edge.master.error_log()


def test_ptr_nxdomain(edge):
    assert client_host(edge, "127.0.0.2") == b"[UNAVAILABLE]"
    assert edge.backend.xclients()[-1] == b"XCLIENT ADDR=127.0.0.2 NAME=[UNAVAILABLE]"
    edge.master.wait_log("[error] ")
    assert "127.0.0.2 could not be resolved (3: Host not found)" + suffix(
        edge, "in resolving client address", "127.0.0.2") in edge.master.error_log()


def test_ptr_servfail(edge):
    edge.dns.fail("3.0.0.127.in-addr.arpa", "PTR", dns.rcode.SERVFAIL)
    assert client_host(edge, "127.0.0.3") == b"[TEMPUNAVAIL]"
    assert "127.0.0.3 could not be resolved (2: Server failure)" + suffix(
        edge, "in resolving client address", "127.0.0.3") in edge.master.error_log()


def test_ptr_timeout(edge):
    edge.dns.silent("4.0.0.127.in-addr.arpa", "PTR")
    started = time.monotonic()
    assert client_host(edge, "127.0.0.4") == b"[TEMPUNAVAIL]"
    assert time.monotonic() - started < 10  # it fired at all: 10x resolver_timeout
    assert "127.0.0.4 could not be resolved (110: Operation timed out)" + suffix(
        edge, "in resolving client address", "127.0.0.4") in edge.master.error_log()


def test_invalid_host_name(edge):
    edge.dns.ptr("127.0.0.5", "bad_name.example.test")
    assert client_host(edge, "127.0.0.5") == b"[TEMPUNAVAIL]"
    assert '127.0.0.5 resolved to invalid host name "bad_name.example.test"' + suffix(
        edge, "in resolving client address", "127.0.0.5") in edge.master.error_log()


def test_forward_servfail(edge):
    edge.dns.ptr("127.0.0.6", NAME)
    edge.dns.fail(NAME, "A", dns.rcode.SERVFAIL)
    edge.dns.fail(NAME, "AAAA", dns.rcode.SERVFAIL)
    assert client_host(edge, "127.0.0.6") == b"[TEMPUNAVAIL]"
    assert '"%s" could not be resolved (2: Server failure)' % NAME + suffix(
        edge, "in resolving client hostname", "127.0.0.6") in edge.master.error_log()


def test_forward_nxdomain(edge):
    edge.dns.ptr("127.0.0.7", NAME)
    assert client_host(edge, "127.0.0.7") == b"[UNAVAILABLE]"
    assert '"%s" could not be resolved (3: Host not found)' % NAME + suffix(
        edge, "in resolving client hostname", "127.0.0.7") in edge.master.error_log()


def test_forward_mismatch(edge):
    edge.dns.ptr("127.0.0.8", NAME)
    edge.dns.a(NAME, "10.9.8.7")
    assert client_host(edge, "127.0.0.8") == b"[UNAVAILABLE]"
    assert "[error]" not in edge.master.error_log()


def test_resolver_off_and_unix_client(edge):
    assert client_host(edge, "127.0.0.1", port=edge.off) == b"[UNAVAILABLE]"
    assert edge.dns.queries == []
    replies = smtp_session(edge.unix, family=socket.AF_UNIX)
    assert replies[3] == b"250 2.1.5 Ok\r\n", replies
    headers = edge.auth.requests[-1][1]
    assert (headers["client-ip"], headers["client-host"]) == (b"unix:", b"[TEMPUNAVAIL]")
    assert edge.dns.queries == []


def test_imap_and_pop3_never_look_up_nor_send_client_host(edge):
    edge.dns.ptr("127.0.0.1", NAME)
    edge.dns.a(NAME, "127.0.0.1")
    with socket.create_connection(("127.0.0.1", edge.imap), timeout=10) as conn:
        assert read_line(conn).startswith(b"* OK")
        conn.sendall(b"a LOGIN alice wrong\r\n")
        assert read_line(conn).startswith(b"a NO")
    with socket.create_connection(("127.0.0.1", edge.pop3), timeout=10) as conn:
        assert read_line(conn).startswith(b"+OK")
        conn.sendall(b"USER alice\r\nPASS wrong\r\n")
        assert read_line(conn).startswith(b"+OK")
        assert read_line(conn).startswith(b"-ERR")
    protocols = [headers["auth-protocol"] for _, headers in edge.auth.requests]
    assert protocols == [b"imap", b"pop3"]
    assert all("client-host" not in headers for _, headers in edge.auth.requests)
    assert edge.dns.queries == []


@pytest.mark.parametrize("edge", ["10s"], indirect=True)
def test_slow_ptr_delays_only_its_own_greeting(edge):
    # The slow answer comes at 3 s, inside resolver_timeout 10s: the 50 other clients are all greeted while
    # it is still pending, and the slow client after it.
    edge.dns.ptr("127.0.0.9", "slow.example.test", delay=3.0)
    for i in range(1, 51):
        edge.dns.ptr("127.0.1.%d" % i, "h%d.example.test" % i)
    slow = socket.socket()
    slow.settimeout(10)
    slow.bind(("127.0.0.9", 0))
    slow.connect(("127.0.0.1", edge.smtp))
    with slow:
        edge.dns.wait_query("9.0.0.127.in-addr.arpa", "PTR")  # the slow lookup is in flight
        clients = []
        for i in range(1, 51):
            conn = socket.socket()
            conn.settimeout(10)
            conn.bind(("127.0.1.%d" % i, 0))
            conn.connect(("127.0.0.1", edge.smtp))
            clients.append(conn)
        for conn in clients:
            assert read_line(conn).startswith(b"220 ")
            conn.close()
        slow.setblocking(False)
        with pytest.raises(BlockingIOError):
            slow.recv(1)  # still waiting for its PTR
        slow.setblocking(True)
        assert read_line(slow).startswith(b"220 ")

