"""imaplib through mailproxy to a real Dovecot, with a real HTTP auth server (issue 5)."""

import hashlib
import imaplib
import os
import socket

import pytest

from support.authserver import RecordingAuthServer
from support.backends import USERS
from support.harness import free_port, mail_config


@pytest.fixture
def edge(dovecot, mailproxy_master):
    auth = RecordingAuthServer(
        USERS, {"imap": ("127.0.0.1", dovecot.imap_port), "pop3": ("127.0.0.1", dovecot.pop3_port)}
    )
    port = free_port()
    config = mail_config(auth.url, """
    imap_auth plain login cram-md5;
    imap_capabilities IMAP4rev1 IDLE LITERAL+;
    server { listen 127.0.0.1:%d; protocol imap; }
}
""" % port, timeout="10s")
    master = mailproxy_master(config, handler=None)
    edge = type("Edge", (), {})()
    edge.port, edge.auth, edge.master, edge.dovecot = port, auth, master, dovecot
    yield edge
    auth.close()
    log = master.error_log()
    assert "[alert]" not in log, log


def client(edge):
    return imaplib.IMAP4("127.0.0.1", edge.port, timeout=20)


def test_login_select_logout(edge):
    imap = client(edge)
    assert imap.welcome == b"* OK IMAP4 ready"
    typ, _ = imap.login("alice", USERS["alice"])
    assert typ == "OK"
    assert imap.select("INBOX")[0] == "OK"
    assert imap.logout()[0] == "BYE"
    raw, headers = edge.auth.requests[-1]
    assert headers["auth-method"] == b"plain" and headers["auth-protocol"] == b"imap"
    assert raw.startswith(b"GET /auth HTTP/1.0\r\nHost: 127.0.0.1\r\nAuth-Method: plain\r\n")
    edge.master.wait_log("client logged in")


def test_quoted_password_with_space(edge):
    imap = client(edge)
    assert imap.login("bob", USERS["bob"])[0] == "OK"
    imap.logout()
    assert edge.auth.requests[-1][1]["auth-pass"] == b"b0b%20pass+="


def test_literal_login(edge):
    with socket.create_connection(("127.0.0.1", edge.port), timeout=20) as conn:
        reader = conn.makefile("rb")
        assert reader.readline() == b"* OK IMAP4 ready\r\n"
        password = USERS["alice"].encode()
        conn.sendall(b"a1 LOGIN {5}\r\n")
        assert reader.readline() == b"+ OK\r\n"
        conn.sendall(b"alice {%d+}\r\n%s\r\n" % (len(password), password))
        line = reader.readline()
        while line.startswith(b"* "):
            line = reader.readline()
        assert line.startswith(b"a1 OK"), line
        conn.sendall(b"a2 LOGOUT\r\n")
        assert reader.readline().startswith(b"* BYE")


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_authenticate(edge, mechanism):
    imap = client(edge)
    password = USERS["alice"]
    if mechanism == "PLAIN":
        typ, _ = imap.authenticate("PLAIN", lambda _: b"\0alice\0" + password.encode())
    else:
        answers = iter([b"alice", password.encode()])
        typ, _ = imap.authenticate("LOGIN", lambda _: next(answers))
    assert typ == "OK"
    assert imap.select()[0] == "OK"
    imap.logout()


def test_cram_md5(edge):
    imap = client(edge)
    assert imap.login_cram_md5("alice", USERS["alice"])[0] == "OK"
    imap.logout()
    headers = edge.auth.requests[-1][1]
    assert headers["auth-method"] == b"cram-md5" and headers["auth-salt"].startswith(b"<")


def test_append_and_fetch_10_mib(edge):
    body = os.urandom(5 * 1024 * 1024).hex().encode()  # 10 MiB of 7-bit data
    lines = b"\r\n".join(body[i : i + 998] for i in range(0, len(body), 998))
    message = b"From: a@example.test\r\nSubject: big\r\n\r\n" + lines + b"\r\n"
    imap = client(edge)
    imap.login("bob", USERS["bob"])
    assert imap.append("INBOX", None, None, message)[0] == "OK"
    imap.select("INBOX")
    typ, data = imap.search(None, "SUBJECT", "big")
    number = data[0].split()[-1]
    typ, fetched = imap.fetch(number, "(BODY.PEEK[])")
    assert typ == "OK"
    assert hashlib.sha256(fetched[0][1]).hexdigest() == hashlib.sha256(message).hexdigest()
    imap.logout()


def test_idle(edge):
    imap = client(edge)
    imap.login("alice", USERS["alice"])
    imap.select("INBOX")
    tag = imap._new_tag()
    imap.send(tag + b" IDLE\r\n")
    assert imap.readline().startswith(b"+")
    edge.dovecot.deliver("alice", b"Subject: while idle\r\n\r\nhello\r\n")
    line = imap.readline()
    while b"EXISTS" not in line:
        line = imap.readline()
    imap.send(b"DONE\r\n")
    line = imap.readline()
    while not line.startswith(tag):
        line = imap.readline()
    assert b"OK" in line
    imap.logout()


def test_wrong_password_closes(edge):
    imap = client(edge)
    with pytest.raises(imaplib.IMAP4.error, match="Invalid login or password"):
        imap.login("alice", "wrong")
    with pytest.raises((OSError, imaplib.IMAP4.abort)):
        imap.noop()
    edge.master.wait_log('client login failed: "Invalid login or password"')


def test_wrong_password_with_auth_wait_allows_retry(edge):
    edge.auth.wait_on_failure = 1
    imap = client(edge)
    with pytest.raises(imaplib.IMAP4.error):
        imap.login("alice", "wrong")
    assert imap.login("alice", USERS["alice"])[0] == "OK"
    attempts = [headers["auth-login-attempt"] for _, headers in edge.auth.requests[-2:]]
    assert attempts == [b"1", b"2"]
    imap.logout()


def test_auth_server_down(edge):
    edge.auth.close()
    with socket.create_connection(("127.0.0.1", edge.port), timeout=20) as conn:
        reader = conn.makefile("rb")
        reader.readline()
        conn.sendall(b"a LOGIN alice secret\r\n")
        assert reader.readline() == b"* BAD internal server error\r\n"
        assert reader.readline() == b""
    edge.master.wait_log("connect() to 127.0.0.1:%d failed (111: Connection refused)" % edge.auth.port)


def test_backend_down(edge):
    edge.auth.backends["imap"] = ("127.0.0.1", free_port())
    with socket.create_connection(("127.0.0.1", edge.port), timeout=20) as conn:
        reader = conn.makefile("rb")
        reader.readline()
        conn.sendall(b"a LOGIN alice %s\r\n" % USERS["alice"].encode())
        assert reader.readline() == b"* BAD internal server error\r\n"
    edge.master.wait_log("failed (111: Connection refused)")


def test_client_hangs_up_at_every_step(edge):
    password = USERS["alice"].encode()
    transcript = b"a CAPABILITY\r\nb LOGIN {5}\r\nalice {%d}\r\n%s\r\nc SELECT INBOX\r\n" % (
        len(password), password)
    for cut in range(0, len(transcript) + 1, 3):
        with socket.create_connection(("127.0.0.1", edge.port), timeout=20) as conn:
            conn.recv(100)
            conn.sendall(transcript[:cut])
    imap = client(edge)
    assert imap.login("alice", USERS["alice"])[0] == "OK"
    imap.logout()
