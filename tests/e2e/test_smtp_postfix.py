"""smtplib through mailproxy to a real Postfix, with a real HTTP auth server (issue 7).

Postfix trusts XCLIENT from loopback, so what it logs about the client (``client=...``,
``sasl_username=...``) proves which attributes mailproxy sent. Two cases Postfix cannot play (a backend
that refuses XCLIENT, one that takes AUTH PLAIN) use a scripted backend on a real socket.
"""

import base64
import hashlib
import os
import smtplib
import socket
import subprocess
import time

import pytest

from support.authserver import RecordingAuthServer
from support.backends import USERS, wait_for_log
from support.harness import free_port, mail_config
from support.servers import SmtpBackend

BIG_LIMIT = 40 << 20
SERVERS = ("auth", "relay", "delay", "passerr", "smtpauth")


@pytest.fixture(scope="module")
def roomy_postfix(postfix):
    """Postfix taking 40 MiB messages (its default 10 MB is below the 20 MiB case)."""
    limits = ["message_size_limit=%d" % BIG_LIMIT, "virtual_mailbox_limit=%d" % BIG_LIMIT]
    subprocess.run(["postconf", "-c", postfix.config_dir, "-e"] + limits, check=True)
    subprocess.run(["postfix", "-c", postfix.config_dir, "reload"], check=True, capture_output=True)
    deadline = time.monotonic() + 20
    while True:  # the reload is asynchronous: new smtpd processes advertise the new limit
        with smtplib.SMTP("127.0.0.1", postfix.smtp_port, timeout=10) as probe:
            probe.ehlo("probe.test")
            if probe.esmtp_features.get("size") == str(BIG_LIMIT):
                return postfix
        assert time.monotonic() < deadline, "postfix did not take message_size_limit=0"
        time.sleep(0.1)


@pytest.fixture
def edge(roomy_postfix, mailproxy_master):
    auth = RecordingAuthServer(USERS, {"smtp": ("127.0.0.1", roomy_postfix.smtp_port)})
    ports = {name: free_port() for name in SERVERS}
    config = mail_config(auth.url, """
    server_name mail.example.test;
    xclient on;
    server { listen 127.0.0.1:%d; protocol smtp; smtp_auth plain login cram-md5; }
    server { listen 127.0.0.1:%d; protocol smtp; smtp_auth none; }
    server { listen 127.0.0.1:%d; protocol smtp; smtp_greeting_delay 1s; }
    server { listen 127.0.0.1:%d; protocol smtp; proxy_pass_error_message on; }
    server { listen 127.0.0.1:%d; protocol smtp; xclient off; proxy_smtp_auth on; }
}
""" % tuple(ports[name] for name in SERVERS), timeout="20s")
    master = mailproxy_master(config, handler=None)
    edge = type("Edge", (), {})()
    edge.ports, edge.auth, edge.master, edge.postfix = ports, auth, master, roomy_postfix
    yield edge
    auth.close()
    log = master.error_log()
    assert "[alert]" not in log, log


class Raw:
    """A client that sends exact bytes and reads whole SMTP replies (multi-line included)."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.reader = self.sock.makefile("rb")

    def reply(self):
        lines = b""
        while True:
            line = self.reader.readline()
            lines += line
            if not line or line[3:4] != b"-":
                return lines

    def ask(self, data):
        self.sock.sendall(data)
        return self.reply()

    def at_eof(self):
        return self.reader.read() == b""

    def close(self):
        self.reader.close()
        self.sock.close()


def smtp(edge, server="auth"):
    client = smtplib.SMTP("127.0.0.1", edge.ports[server], local_hostname="laptop.example.test", timeout=30)
    client.user, client.password = "alice", USERS["alice"]
    return client


def log_line(edge, needle):
    edge.master.wait_log(needle)
    return next(line for line in edge.master.error_log().splitlines() if needle in line)


def message(tag, body=b"hello\r\n"):
    return b"From: x@sender.test\r\nTo: alice@example.test\r\nSubject: %s\r\n\r\n%s" % (tag, body)


# -- authenticated submission ------------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
@pytest.mark.parametrize("initial_response", [True, False])
def test_auth_and_deliver(edge, mechanism, initial_response):
    tag = b"sub-%s-%d" % (mechanism.encode(), initial_response)
    with smtp(edge) as client:
        code, features = client.ehlo()
        assert (code, features) == (250, b"mail.example.test\nAUTH PLAIN LOGIN CRAM-MD5")
        handler = getattr(client, "auth_" + mechanism.lower().replace("-", "_"))
        code, text = client.auth(mechanism, handler, initial_response_ok=initial_response)
        assert (code, text) == (235, b"2.0.0 OK")
        assert client.sendmail("x@sender.test", ["alice@example.test"], message(tag)) == {}
    assert b"hello" in edge.postfix.wait_for_message("alice", tag)
    headers = edge.auth.requests[-1][1]
    assert headers["auth-method"] == (b"cram-md5" if mechanism == "CRAM-MD5" else b"plain")
    assert headers["auth-user"] == b"alice" and headers["client-host"] == b"[UNAVAILABLE]"
    # Postfix logs the client mailproxy vouched for with XCLIENT, not the proxy's own connection.
    wait_for_log(edge.postfix.log_path, "client=unknown[127.0.0.1], sasl_method=XCLIENT, sasl_username=alice")
    edge.master.wait_log('client logged in, client: 127.0.0.1, server: 127.0.0.1:%d, login: "alice", '
                         "upstream: 127.0.0.1:%d" % (edge.ports["auth"], edge.postfix.smtp_port))


def test_client_helo_replayed_after_xclient(edge):
    with smtp(edge) as client:
        client.login("bob", USERS["bob"])  # smtplib picks CRAM-MD5, the strongest advertised
        client.sendmail("x@sender.test", ["bob@example.test"], message(b"helo-replay"))
    delivered = edge.postfix.wait_for_message("bob", b"helo-replay")
    assert b"Received: from laptop.example.test (unknown [127.0.0.1])" in delivered
    wait_for_log(edge.postfix.log_path, "sasl_username=bob")


def test_20_mib_message_intact(edge):
    body = os.urandom(10 * 1024 * 1024).hex().encode()  # 20 MiB of 7-bit text
    lines = [body[i: i + 998] for i in range(0, len(body), 998)]
    with smtp(edge) as client:
        client.login("alice", USERS["alice"])
        client.sendmail("x@sender.test", ["alice@example.test"], message(b"big", b"\r\n".join(lines) + b"\r\n"))
    delivered = edge.postfix.wait_for_message("alice", b"Subject: big", timeout=60)
    # Maildir stores LF line ends; the body must be every line we sent, in order, and nothing else.
    delivered_body = delivered.split(b"\n\n", 1)[1]
    expected = b"\n".join(lines) + b"\n"
    assert hashlib.sha256(delivered_body).hexdigest() == hashlib.sha256(expected).hexdigest()


# -- smtp_auth none: the envelope goes to Postfix ----------------------------------------------------


def test_relay_mode_delivers_and_forwards_rcpt_reply(edge):
    client = Raw(edge.ports["relay"])
    assert client.reply() == b"220 mail.example.test ESMTP ready\r\n"
    # none is never advertised, so there is no AUTH line at all.
    assert client.ask(b"EHLO laptop.example.test\r\n") == b"250 mail.example.test\r\n"
    assert client.ask(b"MAIL FROM:<x@sender.test>\r\n") == b"250 2.0.0 OK\r\n"
    assert client.ask(b"RCPT TO:<alice@example.test>\r\n") == b"250 2.1.5 Ok\r\n"  # Postfix's words
    assert client.ask(b"DATA\r\n").startswith(b"354 ")
    assert client.ask(message(b"relay-1") + b".\r\n").startswith(b"250 2.0.0 Ok: queued as ")
    assert client.ask(b"QUIT\r\n") == b"221 2.0.0 Bye\r\n"
    client.close()
    edge.postfix.wait_for_message("alice", b"relay-1")
    raw, headers = edge.auth.requests[-1]
    assert headers["auth-method"] == b"none" and headers["auth-user"] == b""
    assert raw.endswith(b"Client-IP: 127.0.0.1\r\nClient-Host: [UNAVAILABLE]\r\n"
                        b"Auth-SMTP-Helo: laptop.example.test\r\nAuth-SMTP-From: MAIL FROM:<x@sender.test>\r\n"
                        b"Auth-SMTP-To: RCPT TO:<alice@example.test>\r\n\r\n")
    wait_for_log(edge.postfix.log_path, "client=unknown[127.0.0.1]")


def test_relay_mode_rejected_recipient_passed_through(edge):
    client = Raw(edge.ports["relay"])
    client.reply()
    client.ask(b"HELO laptop\r\n")
    client.ask(b"MAIL FROM:<x@sender.test>\r\n")
    reply = client.ask(b"RCPT TO:<nobody@example.test>\r\n")
    assert reply.startswith(b"550 5.1.1 <nobody@example.test>: Recipient address rejected"), reply
    # The session is Postfix's now: a refused RCPT does not end it.
    assert client.ask(b"RCPT TO:<bob@example.test>\r\n") == b"250 2.1.5 Ok\r\n"
    assert client.ask(b"RSET\r\n") == b"250 2.0.0 Ok\r\n"
    assert client.ask(b"QUIT\r\n") == b"221 2.0.0 Bye\r\n"
    client.close()


def test_relay_mode_mail_needs_none(edge):
    client = Raw(edge.ports["auth"])
    client.reply()
    assert client.ask(b"MAIL FROM:<x@sender.test>\r\n") == b"530 5.7.1 Authentication required\r\n"
    client.close()
    edge.master.wait_log('client was rejected: "MAIL FROM:<x@sender.test>__"')


# -- failures ----------------------------------------------------------------------------------------


def test_wrong_password(edge):
    with smtp(edge) as client:
        client.ehlo()
        client.password = "wrong"
        with pytest.raises(smtplib.SMTPAuthenticationError) as failure:
            # One mechanism: login() would try the next one on a connection already closed.
            client.auth("PLAIN", client.auth_plain)
        assert (failure.value.smtp_code, failure.value.smtp_error) == (535, b"5.7.0 Invalid login or password")
    edge.master.wait_log('client login failed: "Invalid login or password"')


def test_auth_error_code_replaces_535(edge):
    edge.auth.script.append(b"HTTP/1.0 200 OK\r\nAuth-Status: Go away\r\nAuth-Error-Code: 550 5.7.1\r\n\r\n")
    client = Raw(edge.ports["auth"])
    client.reply()
    assert client.ask(b"AUTH PLAIN AGFsaWNlAHg=\r\n") == b"550 5.7.1 Go away\r\n"
    assert client.at_eof()
    client.close()


def test_auth_wait_allows_retry(edge):
    edge.auth.wait_on_failure = 1
    with smtp(edge) as client:
        client.ehlo()
        client.password = "wrong"
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.auth("LOGIN", client.auth_login)
        client.password = USERS["alice"]
        assert client.auth("LOGIN", client.auth_login)[0] == 235
        assert client.sendmail("x@sender.test", ["alice@example.test"], message(b"retry")) == {}
    attempts = [headers["auth-login-attempt"] for _, headers in edge.auth.requests[-2:]]
    assert attempts == [b"1", b"2"]


def internal_error_after_login(edge):
    client = Raw(edge.ports["auth"])
    client.reply()
    reply = client.ask(b"AUTH PLAIN %s\r\n" % base64.b64encode(b"\0alice\0" + USERS["alice"].encode()))
    assert reply == b"451 4.3.2 Internal server error\r\n"
    assert client.at_eof()
    client.close()


def test_auth_server_down(edge):
    edge.auth.close()
    internal_error_after_login(edge)
    edge.master.wait_log("connect() to 127.0.0.1:%d failed (111: Connection refused)" % edge.auth.port)


def test_backend_down(edge):
    edge.auth.backends["smtp"] = ("127.0.0.1", free_port())
    internal_error_after_login(edge)
    edge.master.wait_log("failed (111: Connection refused) while connecting to upstream")


def test_backend_refusing_xclient_without_pass_error_message(edge):
    with SmtpBackend(xclient=b"550 5.7.0 XCLIENT denied\r\n") as backend:
        edge.auth.backends["smtp"] = ("127.0.0.1", backend.port)
        internal_error_after_login(edge)
    line = log_line(edge, 'upstream sent invalid response: "550 5.7.0 XCLIENT denied"')
    assert "[error]" in line


def test_backend_refusing_xclient_with_pass_error_message(edge):
    with SmtpBackend(xclient=b"550-5.7.0 XCLIENT denied\r\n550 5.7.0 go away\r\n") as backend:
        edge.auth.backends["smtp"] = ("127.0.0.1", backend.port)
        client = Raw(edge.ports["passerr"])
        client.reply()
        client.sock.sendall(b"AUTH LOGIN YWxpY2U=\r\n")
        assert client.reply() == b"334 UGFzc3dvcmQ6\r\n"
        client.sock.sendall(base64.b64encode(USERS["alice"].encode()) + b"\r\n")
        # The whole buffered reply, every line, then the end.
        assert client.reader.read() == b"550-5.7.0 XCLIENT denied\r\n550 5.7.0 go away\r\n"
        client.close()
    line = log_line(edge, 'upstream sent invalid response: "550-5.7.0 XCLIENT denied')
    assert "[info]" in line


def test_postfix_proxy_port_refuses_xclient_client_gets_its_text(edge):
    # Postfix's haproxy listener wants a PROXY header first; without one it hangs up during XCLIENT
    # or answers an error: either way the client must get a reply, not a stuck session.
    edge.auth.backends["smtp"] = ("127.0.0.1", edge.postfix.smtp_proxy_port)
    client = Raw(edge.ports["passerr"])
    client.reply()
    reply = client.ask(b"AUTH PLAIN %s\r\n" % base64.b64encode(b"\0alice\0" + USERS["alice"].encode()))
    assert reply[:1] in (b"4", b"5") and reply.endswith(b"\r\n"), reply
    assert client.at_eof()
    client.close()


def test_proxy_smtp_auth_sends_auth_plain(edge):
    with SmtpBackend(xclient=b"220 ok\r\n") as backend:
        edge.auth.backends["smtp"] = ("127.0.0.1", backend.port)
        with smtp(edge, "smtpauth") as client:
            assert client.login("bob", USERS["bob"])[0] == 235
            client.noop()
        backend.done.wait(10)
    assert backend.lines[:2] == [b"EHLO mail.example.test\r\n",
                                 b"AUTH PLAIN %s\r\n" % base64.b64encode(b"\0bob\0" + USERS["bob"].encode())]
    assert b"noop\r\n" in backend.lines  # the relay carried the client's next command


# -- greeting delay and hang-ups ---------------------------------------------------------------------


def test_greeting_delay_rejects_early_talker(edge):
    client = Raw(edge.ports["delay"])
    client.sock.sendall(b"EHLO early\r\n")
    assert client.reader.read() == b"503 5.5.0 Improper use of SMTP command pipelining\r\n"
    client.close()
    edge.master.wait_log('client was rejected before greeting: "EHLO early__" while in delay pipelining state')


def test_greeting_delay_patient_client(edge):
    started = time.monotonic()
    with smtp(edge, "delay") as client:
        assert time.monotonic() - started >= 0.9
        assert client.login("alice", USERS["alice"])[0] == 235


def test_client_hangs_up_at_every_step(edge):
    plain = base64.b64encode(b"\0alice\0" + USERS["alice"].encode())
    transcripts = {
        "auth": b"EHLO a\r\nAUTH LOGIN\r\nYWxpY2U=\r\n%s\r\nMAIL FROM:<x@y.test>\r\n" % base64.b64encode(
            USERS["alice"].encode()) + b"RCPT TO:<alice@example.test>\r\nDATA\r\n",
        "relay": b"HELO a\r\nMAIL FROM:<x@y.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nx\r\n",
    }
    for server, transcript in transcripts.items():
        for cut in range(0, len(transcript) + 1, 4):
            with socket.create_connection(("127.0.0.1", edge.ports[server]), timeout=20) as conn:
                conn.recv(100)
                conn.sendall(transcript[:cut])
    with socket.create_connection(("127.0.0.1", edge.ports["auth"]), timeout=20) as conn:
        conn.recv(100)
        conn.sendall(b"AUTH PLAIN %s\r\n" % plain)  # hang up while the auth server is asked
    with smtp(edge) as client:
        assert client.login("alice", USERS["alice"])[0] == 235
    assert len(edge.master.workers()) == 1
