"""`proxy_protocol on|v2` towards real backends (spec 4.1): Dovecot's haproxy listeners and Postfix's
smtpd_upstream_proxy_protocol port log the client the header named, so their logs prove what was sent,
including the client that realip took from a balancer's header."""

import base64
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

from support.authserver import RecordingAuthServer
from support.backends import USERS, wait_for_log
from support.edgekit import connect, imap_command, imap_login, read_until
from support.harness import free_port, mail_config


def start(mailproxy_master, auth, servers):
    body = "    server_name mail.example.test;\n%s\n}\n" % servers
    return mailproxy_master(mail_config(auth.url, body, timeout="20s"), handler=None)


@pytest.fixture
def imap_edge(dovecot, mailproxy_master):
    auth = RecordingAuthServer(
        USERS, {"imap": ("127.0.0.1", dovecot.imap_haproxy_port), "pop3": ("127.0.0.1", dovecot.pop3_haproxy_port)}
    )
    ports = [free_port() for _ in range(3)]
    master = start(mailproxy_master, auth, """
    server { listen 127.0.0.1:%d; protocol imap; proxy_protocol on; }
    server { listen 127.0.0.1:%d proxy_protocol; protocol imap; proxy_protocol v2;
             set_real_ip_from 127.0.0.0/8; }
    server { listen 127.0.0.1:%d; protocol pop3; proxy_protocol v2; }
""" % tuple(ports))
    yield ports, dovecot
    auth.close()
    assert "[alert]" not in master.error_log()


@pytest.fixture
def smtp_edge(postfix, mailproxy_master):
    # Two auth servers: the PROXY port cannot take XCLIENT (the header's client is not trusted for it),
    # the plain port can.
    via_proxy = RecordingAuthServer(USERS, {"smtp": ("127.0.0.1", postfix.smtp_proxy_port)})
    via_xclient = RecordingAuthServer(USERS, {"smtp": ("127.0.0.1", postfix.smtp_port)})
    ports = [free_port() for _ in range(2)]
    master = start(mailproxy_master, via_proxy, """
    server { listen 127.0.0.1:%d proxy_protocol; protocol smtp; set_real_ip_from 127.0.0.0/8;
             proxy_protocol on; xclient off; }
    server { listen 127.0.0.1:%d proxy_protocol; protocol smtp; set_real_ip_from 127.0.0.0/8;
             xclient on; auth_http %s; }
""" % (ports[0], ports[1], via_xclient.url))
    yield ports, postfix
    via_proxy.close()
    via_xclient.close()
    assert "[alert]" not in master.error_log()


def imap_round(sock, user="alice"):
    assert b"a1 OK" in imap_login(sock, user, USERS[user])
    assert b"a2 OK" in imap_command(sock, b"a2", b"SELECT INBOX")
    assert b"a3 OK" in imap_command(sock, b"a3", b"LOGOUT")
    sock.close()


def test_imap_v1_header_carries_the_tcp_client(imap_edge):
    (v1_port, _, _), dovecot = imap_edge
    imap_round(connect(("127.0.0.1", v1_port), source="127.0.0.5"))
    wait_for_log(dovecot.log_path, "user=<alice>, method=PLAIN, rip=127.0.0.5, lip=127.0.0.1")


def test_imap_v2_header_carries_the_client_realip_found(imap_edge):
    (_, realip_port, _), dovecot = imap_edge
    header = b"PROXY TCP4 198.51.100.44 127.0.0.1 50000 %d\r\n" % realip_port
    imap_round(connect(("127.0.0.1", realip_port), source="127.0.0.2", header=header))
    # lip is the listener the balancer connected to, not the balancer's idea of it.
    wait_for_log(dovecot.log_path, "user=<alice>, method=PLAIN, rip=198.51.100.44, lip=127.0.0.1")


def test_pop3_v2(imap_edge):
    (_, _, pop3_port), dovecot = imap_edge
    sock = connect(("127.0.0.1", pop3_port), source="127.0.0.6")
    for command in (None, b"USER bob", b"PASS " + USERS["bob"].encode(), b"STAT", b"QUIT"):
        if command:
            sock.sendall(command + b"\r\n")
        assert read_until(sock, b"\r\n").startswith(b"+OK"), command
    sock.close()
    wait_for_log(dovecot.log_path, "user=<bob>, method=PLAIN, rip=127.0.0.6")


class Smtp:
    def __init__(self, port, header):
        self.sock = connect(("127.0.0.1", port), source="127.0.0.3", header=header)

    def reply(self):
        data = b""
        while True:
            data += read_until(self.sock, b"\n")
            last = data[data.rfind(b"\n", 0, len(data) - 1) + 1:]
            if last[3:4] != b"-":
                return data

    def ask(self, line, code):
        self.sock.sendall(line + b"\r\n")
        reply = self.reply()
        assert reply.startswith(code), (line, reply)
        return reply

    def deliver(self, user, tag):
        plain = base64.b64encode(b"\0%s\0%s" % (user.encode(), USERS[user].encode()))
        assert self.reply().startswith(b"220")
        self.ask(b"EHLO client.test", b"250")
        self.ask(b"AUTH PLAIN " + plain, b"235")
        self.ask(b"MAIL FROM:<sender@client.test>", b"250")
        self.ask(b"RCPT TO:<bob@example.test>", b"250")
        self.ask(b"DATA", b"354")
        self.ask(b"Subject: %s\r\n\r\n%s\r\n." % (tag, tag), b"250")
        self.ask(b"QUIT", b"221")
        self.sock.close()


def test_smtp_proxy_header_to_postfix(smtp_edge):
    (proxy_port, _), postfix = smtp_edge
    header = b"PROXY TCP4 203.0.113.60 127.0.0.1 41000 %d\r\n" % proxy_port
    Smtp(proxy_port, header).deliver("alice", b"edge-proxy-1")
    postfix.wait_for_message("bob", b"edge-proxy-1")
    wait_for_log(postfix.log_path, "client=unknown[203.0.113.60]")


def test_smtp_xclient_addr_is_the_client_after_realip(smtp_edge):
    (_, xclient_port), postfix = smtp_edge
    header = b"PROXY TCP4 192.0.2.61 127.0.0.1 41001 %d\r\n" % xclient_port
    Smtp(xclient_port, header).deliver("alice", b"edge-xclient-1")
    postfix.wait_for_message("bob", b"edge-xclient-1")
    wait_for_log(postfix.log_path, "client=unknown[192.0.2.61], sasl_method=XCLIENT, sasl_username=alice")
