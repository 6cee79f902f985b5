"""`listen ... proxy_protocol` and `set_real_ip_from` through a real master, session and Dovecot (spec
2.0.10, 1.3, 3.2): what the auth server and the error log see of the client, and what is refused."""

import os
import shutil
import socket
import struct
import tempfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

from mailproxy.proxy_protocol import V2_SIGNATURE  # noqa: E402

from support.authserver import RecordingAuthServer
from support.backends import USERS
from support.edgekit import connect, imap_command, imap_login, read_tagged, read_to_close, read_until
from support.harness import free_port, mail_config

NAMES = ("trusted", "untrusted", "unset", "short", "pop3")


def v1(src, sport, dst, dport, proto="TCP4"):
    return b"PROXY %s %s %s %d %d\r\n" % (proto.encode(), src.encode(), dst.encode(), sport, dport)


def v2_tcp6(src, sport, dst, dport):
    body = socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
    body += struct.pack("!HH", sport, dport)
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x21, len(body)) + body


@pytest.fixture(scope="module")
def edge(dovecot, tmp_path_factory):
    from support import harness

    auth = RecordingAuthServer(
        USERS, {"imap": ("127.0.0.1", dovecot.imap_port), "pop3": ("127.0.0.1", dovecot.pop3_port)}
    )
    ports = {name: free_port() for name in NAMES}
    unix_dir = tempfile.mkdtemp(prefix="mpe")
    unix_path = os.path.join(unix_dir, "imap.sock")
    config = mail_config(auth.url, """
    server { listen 127.0.0.1:%d proxy_protocol; protocol imap; set_real_ip_from 127.0.0.0/8; }
    server { listen 127.0.0.1:%d proxy_protocol; protocol imap;
             set_real_ip_from 10.0.0.0/8; set_real_ip_from 127.0.0.1; }
    server { listen 127.0.0.1:%d proxy_protocol; protocol imap; }
    server { listen 127.0.0.1:%d proxy_protocol; protocol imap; timeout 1s; }
    server { listen 127.0.0.1:%d proxy_protocol; protocol pop3; set_real_ip_from 127.0.0.0/8; }
    server { listen unix:%s proxy_protocol; protocol imap; set_real_ip_from unix:; }
}
""" % (tuple(ports[name] for name in NAMES) + (unix_path,)), timeout="10s")
    # The module shares one master; the function-scoped factory cannot be used from here.
    master = harness.MasterProcess(str(tmp_path_factory.mktemp("mp")), config, None, None)
    master.start()
    edge = type("Edge", (), {})()
    edge.ports, edge.auth, edge.master, edge.unix_path = ports, auth, master, unix_path
    try:
        yield edge
        log = master.error_log()
        assert "[alert]" not in log, log
    finally:
        master.kill_leftovers()
        auth.close()
        shutil.rmtree(unix_dir, ignore_errors=True)


def login_and_leave(sock, user="alice"):
    reply = imap_login(sock, user, USERS[user])
    assert b"a1 OK" in reply, reply
    assert b"a2 OK" in imap_command(sock, b"a2", b"SELECT INBOX")
    assert b"a3 OK" in imap_command(sock, b"a3", b"LOGOUT")
    sock.close()


def last_request(edge):
    return edge.auth.requests[-1]


def test_trusted_balancer_passes_the_real_client(edge):
    port = edge.ports["trusted"]
    sock = connect(("127.0.0.1", port), source="127.0.0.2", header=v1("203.0.113.7", 40001, "127.0.0.1", port))
    peer_port = sock.getsockname()[1]
    login_and_leave(sock)
    raw, headers = last_request(edge)
    assert (
        b"Client-IP: 203.0.113.7\r\nProxy-Protocol-Addr: 203.0.113.7\r\nProxy-Protocol-Port: 40001\r\n"
        b"Proxy-Protocol-Server-Addr: 127.0.0.1\r\nProxy-Protocol-Server-Port: %d\r\n" % port
    ) in raw
    server = "server: 127.0.0.1:%d" % port
    edge.master.wait_log("client logged in, client: 203.0.113.7, %s" % server)
    # The connected line is written before the header is read: it names the balancer.
    assert "client 127.0.0.2:%d connected to 127.0.0.1:%d" % (peer_port, port) in edge.master.error_log()


def test_v2_tcp6_header_from_a_trusted_peer(edge):
    port = edge.ports["trusted"]
    sock = connect(("127.0.0.1", port), source="127.0.0.9", header=v2_tcp6("2001:db8::7", 1234, "2001:db8::1", 993))
    login_and_leave(sock)
    raw, headers = last_request(edge)
    assert headers["client-ip"] == b"2001:db8::7"
    assert headers["proxy-protocol-addr"] == b"2001:db8::7" and headers["proxy-protocol-port"] == b"1234"
    assert headers["proxy-protocol-server-addr"] == b"2001:db8::1"
    assert headers["proxy-protocol-server-port"] == b"993"


@pytest.mark.parametrize("name, source", [("untrusted", "127.0.0.3"), ("unset", "127.0.0.4")])
def test_untrusted_peer_stays_the_client(edge, name, source):
    port = edge.ports[name]
    sock = connect(("127.0.0.1", port), source=source, header=v1("203.0.113.8", 40002, "127.0.0.1", port))
    login_and_leave(sock)
    raw, headers = last_request(edge)
    assert headers["client-ip"] == source.encode()
    # The header's own facts still travel, realip or not.
    assert headers["proxy-protocol-addr"] == b"203.0.113.8"
    edge.master.wait_log("client logged in, client: %s, server: 127.0.0.1:%d" % (source, port))


def test_unknown_header_keeps_the_peer_and_sends_no_proxy_lines(edge):
    port = edge.ports["trusted"]
    sock = connect(("127.0.0.1", port), source="127.0.0.5", header=b"PROXY UNKNOWN\r\n")
    login_and_leave(sock)
    raw, headers = last_request(edge)
    assert headers["client-ip"] == b"127.0.0.5"
    assert b"Proxy-Protocol" not in raw


def test_header_and_command_in_one_segment(edge):
    port = edge.ports["trusted"]
    sock = connect(("127.0.0.1", port), header=v1("203.0.113.9", 7, "127.0.0.1", port)
                   + b'a1 LOGIN alice "%s"\r\n' % USERS["alice"].encode())
    assert read_until(sock, b"\r\n").startswith(b"* OK")
    assert b"a1 OK" in read_tagged(sock, b"a1")
    assert b"a3 OK" in imap_command(sock, b"a3", b"LOGOUT")
    assert last_request(edge)[1]["client-ip"] == b"203.0.113.9"


@pytest.mark.parametrize("data, line", [
    (b"PROXY TCP4 nonsense\r\n", "PROXY TCP4 nonsense"),
    (b"a1 LOGIN alice secret\r\n", "a1 LOGIN alice secret"),
    (b"PROXY TCP4 203.0.113", "PROXY TCP4 203.0.113"),  # a header cut short is not waited for
])
def test_broken_header_closes_without_a_greeting(edge, data, line):
    port = edge.ports["trusted"]
    sock = connect(("127.0.0.1", port), source="127.0.0.6", header=data)
    assert read_to_close(sock) == b""
    sock.close()
    message = 'broken header: "%s" while reading PROXY protocol, client: 127.0.0.6, server: 127.0.0.1:%d' % (
        line, port)
    edge.master.wait_log(message)
    assert any("[error]" in entry for entry in edge.master.error_log().splitlines() if message in entry)


def test_v2_error_closes(edge):
    port = edge.ports["trusted"]
    sock = connect(("127.0.0.1", port), source="127.0.0.6", header=V2_SIGNATURE + b"\x11\x11\x00\x0c")
    assert read_to_close(sock) == b""
    sock.close()
    edge.master.wait_log("unknown PROXY protocol version: 1 while reading PROXY protocol, client: 127.0.0.6")


def test_silent_balancer_times_out(edge):
    port = edge.ports["short"]
    sock = connect(("127.0.0.1", port), source="127.0.0.7")
    assert read_to_close(sock) == b""
    sock.close()
    edge.master.wait_log(
        "client timed out (110: Connection timed out) while reading PROXY protocol, client: 127.0.0.7"
    )


def test_pop3_trusted(edge):
    port = edge.ports["pop3"]
    sock = connect(("127.0.0.1", port), source="127.0.0.8", header=v1("198.51.100.20", 555, "127.0.0.1", port))
    assert read_until(sock, b"\r\n").startswith(b"+OK")
    sock.sendall(b"USER bob\r\n")
    assert read_until(sock, b"\r\n").startswith(b"+OK")
    sock.sendall(b"PASS %s\r\n" % USERS["bob"].encode())
    assert read_until(sock, b"\r\n").startswith(b"+OK")
    sock.sendall(b"QUIT\r\n")
    assert read_until(sock, b"\r\n").startswith(b"+OK")
    sock.close()
    assert last_request(edge)[1]["client-ip"] == b"198.51.100.20"


def test_unix_listener_trusts_unix_peers(edge):
    sock = connect(edge.unix_path, header=v1("192.0.2.33", 4242, "192.0.2.1", 143), family=socket.AF_UNIX)
    login_and_leave(sock)
    raw, headers = last_request(edge)
    assert headers["client-ip"] == b"192.0.2.33"
    assert headers["proxy-protocol-server-addr"] == b"192.0.2.1"
    edge.master.wait_log("client unix: connected to unix:%s" % edge.unix_path)
    edge.master.wait_log("client logged in, client: 192.0.2.33, server: unix:%s" % edge.unix_path)
