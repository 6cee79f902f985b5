"""The real-backend fixtures proven directly (stdlib clients) and with the upstream login machines."""

import base64
import imaplib  # noqa: E402
import poplib  # noqa: E402
import smtplib  # noqa: E402
import socket
import time

import pytest  # noqa: E402

from mailproxy.proxy_protocol import header  # noqa: E402
from mailproxy.upstream import (Failed, ImapUpstreamLogin, LoggedIn, Pop3UpstreamLogin, Send,  # noqa: E402
                                SmtpUpstreamLogin)

from support.backends import USERS, require, wait_for_log


def test_missing_binary_skips_but_fails_under_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require("/nonexistent/dovecot")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        require("/nonexistent/dovecot")


def drive(port, machine, preamble=b""):
    """Run a login machine over a real socket; returns (verdict, socket)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if preamble:
        sock.sendall(preamble)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        data = sock.recv(4096)
        for action in machine.receive_data(data):
            if isinstance(action, Send):
                sock.sendall(action.data)
            elif isinstance(action, (LoggedIn, Failed)):
                return action, sock
    raise AssertionError("login did not finish")


def read_reply(sock, end=b"\r\n"):
    data = b""
    while not data.endswith(end):
        piece = sock.recv(4096)
        assert piece, data
        data += piece
    return data


# -- Dovecot, directly ------------------------------------------------------------------------------


def test_dovecot_imap_direct(dovecot):
    dovecot.deliver("alice", b"Subject: direct\r\n\r\nhello imap\r\n")
    client = imaplib.IMAP4("127.0.0.1", dovecot.imap_port)
    assert client.login("alice", USERS["alice"])[0] == "OK"
    typ, data = client.select("INBOX")
    assert typ == "OK" and int(data[0]) >= 1
    typ, data = client.fetch(b"1", "(BODY[TEXT])")
    assert b"hello imap" in data[0][1]
    client.logout()
    with pytest.raises(imaplib.IMAP4.error):
        imaplib.IMAP4("127.0.0.1", dovecot.imap_port).login("alice", "wrong")


def test_dovecot_cram_md5_works_so_passwords_are_plaintext(dovecot):
    client = imaplib.IMAP4("127.0.0.1", dovecot.imap_port)
    assert client.login_cram_md5("bob", USERS["bob"])[0] == "OK"
    client.logout()


def test_dovecot_pop3_direct_with_apop(dovecot):
    dovecot.deliver("bob", b"Subject: pop\r\n\r\nhello pop\r\n")
    client = poplib.POP3("127.0.0.1", dovecot.pop3_port)
    assert b"<" in client.getwelcome()  # APOP timestamp offered
    assert client.apop("bob", USERS["bob"]).startswith(b"+OK")
    count, _ = client.stat()
    assert count >= 1
    assert b"hello pop" in b"\n".join(client.retr(1)[1])
    client.quit()


def test_dovecot_trusts_id_from_proxy(dovecot):
    sock = socket.create_connection(("127.0.0.1", dovecot.imap_port), timeout=10)
    read_reply(sock)
    sock.sendall(b'i1 ID ("x-originating-ip" "192.0.2.55" "x-originating-port" "4242")\r\n')
    reply = b""
    while b"i1 " not in reply:
        reply += sock.recv(4096)
    assert b"i1 OK" in reply
    sock.sendall(b'i2 LOGIN alice "%s"\r\n' % USERS["alice"].encode())
    reply = b""
    while b"i2 " not in reply:
        reply += sock.recv(4096)
    assert b"i2 OK" in reply
    sock.close()
    wait_for_log(dovecot.log_path, "user=<alice>, method=PLAIN, rip=192.0.2.55")


def test_dovecot_haproxy_listeners(dovecot):
    hdr = header("v1", "198.51.100.9", 5555, "127.0.0.1", dovecot.imap_haproxy_port, socket.AF_INET)
    machine = ImapUpstreamLogin(login=b"alice", password=USERS["alice"].encode(), tag=b"p1")
    verdict, sock = drive(dovecot.imap_haproxy_port, machine, preamble=hdr)
    sock.close()
    assert isinstance(verdict, LoggedIn), verdict
    wait_for_log(dovecot.log_path, "user=<alice>, method=PLAIN, rip=198.51.100.9")
    hdr = header("v2", "198.51.100.10", 5556, "127.0.0.1", dovecot.pop3_haproxy_port, socket.AF_INET)
    machine = Pop3UpstreamLogin(login=b"bob", password=USERS["bob"].encode())
    verdict, sock = drive(dovecot.pop3_haproxy_port, machine, preamble=hdr)
    sock.close()
    assert isinstance(verdict, LoggedIn), verdict
    wait_for_log(dovecot.log_path, "user=<bob>, method=PLAIN, rip=198.51.100.10")


# -- Dovecot through the login machines --------------------------------------------------------------


def test_imap_machine_logs_in_and_session_continues(dovecot):
    machine = ImapUpstreamLogin(login=b"bob", password=USERS["bob"].encode(), tag=b"t7")
    verdict, sock = drive(dovecot.imap_port, machine)
    assert isinstance(verdict, LoggedIn)
    assert (verdict.client_reply + verdict.backend_pending).rstrip().split(b"\r\n")[-1].startswith(
        b"t7 OK"
    )
    sock.sendall(b"t8 SELECT INBOX\r\n")
    assert b"t8 OK" in read_reply(sock)
    sock.close()


def test_imap_machine_wrong_password(dovecot):
    machine = ImapUpstreamLogin(login=b"alice", password=b"nope", tag=b"x1", pass_error_message=True)
    verdict, sock = drive(dovecot.imap_port, machine)
    sock.close()
    assert isinstance(verdict, Failed) and verdict.level == "info"
    assert verdict.client_reply.startswith(b"x1 NO [AUTHENTICATIONFAILED]")
    assert "AUTHENTICATIONFAILED" in verdict.log_message and "nope" not in verdict.log_message


def test_pop3_machine_login_and_wrong_password(dovecot):
    machine = Pop3UpstreamLogin(login=b"alice", password=USERS["alice"].encode())
    verdict, sock = drive(dovecot.pop3_port, machine)
    assert verdict == LoggedIn(b"+OK Logged in.\r\n", b"")
    sock.sendall(b"STAT\r\n")
    assert read_reply(sock).startswith(b"+OK")
    sock.close()
    machine = Pop3UpstreamLogin(login=b"alice", password=b"bad")
    verdict, sock = drive(dovecot.pop3_port, machine)
    sock.close()
    assert verdict == Failed(
        "error", 'upstream sent invalid response: "-ERR [AUTH] Authentication failed."', None
    )


# -- Postfix ----------------------------------------------------------------------------------------


def test_postfix_direct_delivery(postfix):
    with smtplib.SMTP("127.0.0.1", postfix.smtp_port) as client:
        client.sendmail("x@sender.test", ["alice@example.test"], b"Subject: s\r\n\r\ndirect-1\r\n")
    assert b"direct-1" in postfix.wait_for_message("alice", b"direct-1")


def smtp_machine(**kw):
    args = dict(server_name="proxy.test", login=b"alice", password=b"", method="plain",
                helo=b"laptop.test", esmtp=True, client_addr="192.0.2.77",
                client_host="[UNAVAILABLE]", xclient=True, smtp_auth=False)
    args.update(kw)
    return SmtpUpstreamLogin(**args)


def send_message(sock, rcpt, body):
    for line in (b"MAIL FROM:<x@sender.test>\r\n", b"RCPT TO:<%s>\r\n" % rcpt, b"DATA\r\n"):
        sock.sendall(line)
        assert read_reply(sock)[:1] in b"23", line
    sock.sendall(b"Subject: t\r\n\r\n" + body + b"\r\n.\r\n")
    assert read_reply(sock).startswith(b"250")
    sock.sendall(b"QUIT\r\n")
    read_reply(sock)
    sock.close()


def test_smtp_machine_xclient_accepted_and_delivered(postfix):
    verdict, sock = drive(postfix.smtp_port, smtp_machine())
    assert verdict == LoggedIn(b"235 2.0.0 OK\r\n", b"")
    send_message(sock, b"alice@example.test", b"xclient-1")
    message = postfix.wait_for_message("alice", b"xclient-1")
    # XCLIENT took: Postfix records the proxied client and the client's own HELO, not ours.
    assert b"Received: from laptop.test (unknown [192.0.2.77])" in message
    wait_for_log(postfix.log_path, "client=unknown[192.0.2.77], sasl_method=XCLIENT, sasl_username=alice")


def test_smtp_machine_method_none_forwards_rcpt_reply(postfix):
    machine = smtp_machine(method="none", login=b"", mail_from=b"MAIL FROM:<y@sender.test>\r\n",
                           rcpt_to=b"RCPT TO:<nobody@example.test>\r\n")
    verdict, sock = drive(postfix.smtp_port, machine)
    sock.close()
    assert isinstance(verdict, LoggedIn)
    assert verdict.client_reply.startswith(b"550")  # unknown mailbox: relayed, not an error


def test_smtp_machine_over_proxy_protocol_port(postfix):
    hdr = header("v1", "203.0.113.5", 1234, "127.0.0.1", postfix.smtp_proxy_port, socket.AF_INET)
    verdict, sock = drive(postfix.smtp_proxy_port, smtp_machine(xclient=False), preamble=hdr)
    assert verdict == LoggedIn(b"235 2.0.0 OK\r\n", b"")
    send_message(sock, b"bob@example.test", b"haproxy-1")
    postfix.wait_for_message("bob", b"haproxy-1")
    wait_for_log(postfix.log_path, "client=unknown[203.0.113.5]")


def test_smtp_machine_auth_without_sasl_fails_with_backend_text(postfix):
    machine = smtp_machine(xclient=False, smtp_auth=True, password=b"pw", pass_error_message=True)
    verdict, sock = drive(postfix.smtp_port, machine)
    sock.close()
    assert isinstance(verdict, Failed) and verdict.client_reply.startswith(b"503")
    assert base64.b64encode(b"\0alice\0pw").decode() not in verdict.log_message
