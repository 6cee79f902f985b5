"""OAuth 2.0 logins end to end (issue 17 items 1-3, 5): curl, imaplib and smtplib with bearer tokens,
through mailproxy and a real mailproxy-auth process, to Dovecot and Postfix.

The backends never see a token: mailproxy-auth maps the token's subject to a users-file entry and hands
back that user's login and password (spec 9.7). Expected bytes are freenginx's (spec 9.3, 9.6, 9.8).
"""

import base64
import imaplib
import smtplib
import subprocess

import pytest

from support.backends import USERS
from support.oauthkit import (BEARER_ERROR, AuthProcess, IntrospectionEndpoint, Wire, free_port, issue, oauthbearer,
                              require_curl, xoauth2)

SERVERS = ("imap", "imapx", "pop3", "smtp", "imap5", "pop35", "smtp5", "pop3narrow")
# ~1 KiB, as issuers that put roles and names in their access tokens make them.
FAT = {"name": "Alice Liddell", "roles": ["mail.read", "mail.send"] * 40, "email": "alice@example.test"}

CONFIG = """
worker_processes 1;
error_log logs/error.log info;
events { worker_connections 256; }
mail {
    auth_http %(auth)s;
    timeout 20s;
    server_name mail.example.test;
    xclient on;
    server { listen 127.0.0.1:%(imap)d; protocol imap; imap_auth plain xoauth2 oauthbearer; }
    server { listen 127.0.0.1:%(imapx)d; protocol imap; imap_auth xoauth2; }
    server { listen 127.0.0.1:%(pop3)d; protocol pop3; pop3_auth plain xoauth2 oauthbearer; }
    server { listen 127.0.0.1:%(smtp)d; protocol smtp; smtp_auth plain login xoauth2 oauthbearer; }
    server { listen 127.0.0.1:%(imap5)d; protocol imap; max_commands 5; }
    server { listen 127.0.0.1:%(pop35)d; protocol pop3; max_commands 5; }
    server { listen 127.0.0.1:%(smtp5)d; protocol smtp; max_commands 5; }
    server { listen 127.0.0.1:%(pop3narrow)d; protocol pop3; pop3_auth plain xoauth2 oauthbearer;
             pop3_client_buffer 128; }
}
"""


def users_file(dovecot, postfix):
    return (
        "backend imap 127.0.0.1:%d\nbackend pop3 127.0.0.1:%d\nbackend smtp 127.0.0.1:%d\n"
        "user alice {PLAIN}%s\n" % (dovecot.imap_port, dovecot.pop3_port, postfix.smtp_port, USERS["alice"])
    )


@pytest.fixture(scope="module")
def auth(dovecot, postfix):
    # --wait 1: a refused token is answered after 1 s and the session stays open (spec 9.6 step 5).
    server = AuthProcess(users_file(dovecot, postfix), "--wait", "1", "--max-failures", "1000",
                         "--jwt-key", "{secret}", "--jwt-algorithms", "HS256", "--jwt-audience", "mail")
    yield server
    server.stop()


def start_edge(mailproxy_master, auth, dovecot, postfix):
    ports = {name: free_port() for name in SERVERS}
    master = mailproxy_master(CONFIG % dict(ports, auth=auth.url), handler=None)
    edge = type("Edge", (), {})()
    edge.ports, edge.auth, edge.master, edge.dovecot, edge.postfix = ports, auth, master, dovecot, postfix
    return edge


@pytest.fixture
def edge(mailproxy_master, auth, dovecot, postfix):
    edge = start_edge(mailproxy_master, auth, dovecot, postfix)
    yield edge
    log = edge.master.error_log()
    assert "[alert]" not in log, log


def token(**claims):
    claims.setdefault("aud", "mail")
    return issue(**claims)


def curl(*args):
    require_curl()
    done = subprocess.run(["curl", "-sS", "-v", "--max-time", "30", *args], capture_output=True, timeout=60)
    return done.returncode, done.stdout, done.stderr


# -- real clients with tokens ------------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["XOAUTH2", "OAUTHBEARER"])
def test_curl_imap(edge, mechanism):
    # curl takes OAUTHBEARER whenever it is offered, so XOAUTH2 is tried where it is the only method.
    port = edge.ports["imap" if mechanism == "OAUTHBEARER" else "imapx"]
    code, out, err = curl("imap://127.0.0.1:%d/INBOX" % port, "-u", "alice:", "--oauth2-bearer", token(),
                          "-X", "EXAMINE INBOX")
    assert code == 0, err
    assert b"> A001 CAPABILITY" in err and b" AUTH=XOAUTH2" in err, err.decode()
    assert b"> A002 AUTHENTICATE " + mechanism.encode() in err, err.decode()
    assert b"< A002 OK" in err and b"A003 OK" in err
    assert b"EXISTS" in out
    edge.master.wait_log('client logged in')


def test_curl_pop3_fat_token_fits_widened_buffer(edge):
    edge.dovecot.deliver("alice", b"Subject: pop3 oauth\r\n\r\nbearer body\r\n")
    fat = token(**FAT)
    assert len(fat) > 1024
    code, out, err = curl("pop3://127.0.0.1:%d/1" % edge.ports["pop3"], "-u", "alice:", "--oauth2-bearer", fat)
    assert code == 0, err
    assert b"> AUTH OAUTHBEARER\r\n< + \r\n> " in err, err.decode()
    assert b"bearer body" in out
    # With nginx's 128 bytes set explicitly the same line is "too long" (spec 9.7).
    code, out, err = curl("pop3://127.0.0.1:%d/1" % edge.ports["pop3narrow"], "-u", "alice:", "--oauth2-bearer", fat)
    assert code != 0
    assert b"< -ERR invalid command" in err
    edge.master.wait_log("client sent too long command")


def test_curl_smtp_upload_to_postfix(edge, tmp_path):
    message = tmp_path / "message.eml"
    message.write_bytes(b"From: alice@example.test\r\nTo: alice@example.test\r\nSubject: curl oauth\r\n\r\n"
                        b"sent with a bearer token\r\n")
    code, out, err = curl("smtp://127.0.0.1:%d" % edge.ports["smtp"], "-u", "alice:", "--oauth2-bearer", token(),
                          "--mail-from", "alice@example.test", "--mail-rcpt", "alice@example.test",
                          "--upload-file", str(message))
    assert code == 0, err
    assert b"< 235 2.0.0 OK" in err
    assert b"sent with a bearer token" in edge.postfix.wait_for_message("alice", b"curl oauth")


def test_imaplib_xoauth2(edge):
    imap = imaplib.IMAP4("127.0.0.1", edge.ports["imap"], timeout=20)
    typ, _ = imap.authenticate("XOAUTH2", lambda _: xoauth2("alice", token()))
    assert typ == "OK"
    assert imap.select("INBOX")[0] == "OK"
    imap.logout()


def test_smtplib_oauthbearer(edge):
    bearer = token()

    def mechanism(challenge=None):
        # smtplib asks again with the server's challenge on 334: RFC 7628's dummy response is ^A.
        return oauthbearer("alice", bearer).decode() if challenge is None else "\x01"

    with smtplib.SMTP("127.0.0.1", edge.ports["smtp"], timeout=20) as smtp:
        smtp.ehlo("client.example.test")
        assert "OAUTHBEARER" in smtp.esmtp_features["auth"]
        assert smtp.auth("OAUTHBEARER", mechanism) == (235, b"2.0.0 OK")
        smtp.sendmail("alice@example.test", ["alice@example.test"],
                      b"Subject: smtplib oauth\r\n\r\nOAUTHBEARER through Postfix\r\n")
    assert edge.postfix.wait_for_message("alice", b"smtplib oauth")


def test_smtplib_refused_token_gets_sasl_error(edge):
    def mechanism(challenge=None):
        if challenge is None:
            return oauthbearer("alice", token(sub="alice", lifetime=-60)).decode()
        mechanism.challenge = challenge
        return "\x01"

    with smtplib.SMTP("127.0.0.1", edge.ports["smtp"], timeout=20) as smtp:
        smtp.ehlo("client.example.test")
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            smtp.auth("OAUTHBEARER", mechanism)
        assert refused.value.smtp_code == 535 and refused.value.smtp_error == b"5.7.0 invalid token"
        assert mechanism.challenge == b'{"status":"401","schemes":"bearer"}'


def test_passwords_still_work(edge):
    imap = imaplib.IMAP4("127.0.0.1", edge.ports["imap"], timeout=20)
    assert imap.login("alice", USERS["alice"])[0] == "OK"
    imap.logout()
    code, out, err = curl("pop3://127.0.0.1:%d/" % edge.ports["pop3"], "-u", "alice:" + USERS["alice"])
    assert code == 0, err
    with smtplib.SMTP("127.0.0.1", edge.ports["smtp"], timeout=20) as smtp:
        smtp.ehlo("client.example.test")
        assert smtp.login("alice", USERS["alice"])[0] == 235


# -- a refused token on the wire (spec 9.6) ------------------------------------------------------------


def b64(data):
    return base64.b64encode(data)


def test_imap_refused_token_exchange(edge):
    wire = Wire(edge.ports["imap"])
    assert wire.line() == b"* OK IMAP4 ready\r\n"
    wire.send(b"1 AUTHENTICATE OAUTHBEARER " + b64(oauthbearer("alice", token(sub="alice", aud="other"))) + b"\r\n")
    assert wire.line() == b"+ " + BEARER_ERROR + b"\r\n"
    wire.send(b"AQ==\r\n")
    assert wire.line() == b"1 NO invalid token\r\n"
    wire.send(b"2 NOOP\r\n")  # Auth-Wait kept the session (spec 9.6 step 5)
    assert wire.line() == b"2 OK completed\r\n"
    wire.close()
    assert 'result="invalid token: jwt: ' in edge.auth.log()


def test_imap_refused_token_other_response_is_bad(edge):
    wire = Wire(edge.ports["imap"])
    wire.line()
    wire.send(b"1 AUTHENTICATE XOAUTH2 " + b64(xoauth2("alice", token(key=b"x" * 40))) + b"\r\n")
    assert wire.line() == b"+ " + BEARER_ERROR + b"\r\n"
    wire.send(b"2 NOOP\r\n")
    assert wire.line() == b"1 BAD invalid command\r\n"
    wire.close()


def test_pop3_refused_token_exchange(edge):
    wire = Wire(edge.ports["pop3"])
    assert wire.line().startswith(b"+OK")
    wire.send(b"AUTH XOAUTH2 " + b64(xoauth2("alice", token(sub="mallory"))) + b"\r\n")
    assert wire.line() == b"+ " + BEARER_ERROR + b"\r\n"
    wire.send(b"\r\n")
    assert wire.line() == b"-ERR invalid token\r\n"
    wire.close()
    assert "'mallory' is not in the users file" in edge.auth.log()


def test_smtp_refused_token_exchange(edge):
    wire = Wire(edge.ports["smtp"])
    assert wire.line().startswith(b"220 ")
    wire.send(b"EHLO client.example.test\r\n")
    wire.lines_until(b"250 ")
    # The token is alice's but the client claims to be bob: refused, not silently logged in as alice.
    wire.send(b"AUTH OAUTHBEARER " + b64(oauthbearer("bob", token())) + b"\r\n")
    assert wire.line() == b"334 " + BEARER_ERROR + b"\r\n"
    wire.send(b"AQ==\r\n")
    assert wire.line() == b"535 5.7.0 invalid token\r\n"
    wire.close()


# -- max_commands (spec 9.8) ---------------------------------------------------------------------------


def test_imap_max_commands(edge):
    wire = Wire(edge.ports["imap5"])
    wire.line()
    for tag in b"abcde":
        wire.send(b"%c NOOP\r\n" % tag)
        assert wire.line() == b"%c OK completed\r\n" % tag
    wire.send(b"f NOOP\r\n")
    assert wire.line() == b"f BAD invalid command\r\n"
    assert wire.closed()
    edge.master.wait_log("client sent too many commands")


def test_pop3_max_commands(edge):
    wire = Wire(edge.ports["pop35"])
    wire.line()
    wire.send(b"NOOP\r\n" * 6)  # pipelined: the 6th is refused unexecuted
    assert [wire.line() for _ in range(6)] == [b"+OK\r\n"] * 5 + [b"-ERR invalid command\r\n"]
    assert wire.closed()


def test_smtp_max_commands(edge):
    wire = Wire(edge.ports["smtp5"])
    wire.line()
    wire.send(b"NOOP\r\n" * 7)
    assert [wire.line() for _ in range(6)] == [b"250 2.0.0 OK\r\n"] * 5 + [b"500 5.5.1 Invalid command\r\n"]
    assert wire.closed()  # the 7th NOOP is dropped


# -- introspection (RFC 7662) --------------------------------------------------------------------------


@pytest.fixture
def introspected(mailproxy_master, dovecot, postfix):
    endpoint = IntrospectionEndpoint({"opaque-alice-token": {"sub": "alice", "scope": "mail"}})
    server = AuthProcess(users_file(dovecot, postfix), "--wait", "0", "--introspection-url", endpoint.url,
                         "--introspection-auth", "mailproxy:s3cret")
    try:
        yield endpoint, start_edge(mailproxy_master, server, dovecot, postfix)
    finally:
        server.stop()
        endpoint.close()


def test_introspection(introspected):
    endpoint, edge = introspected
    for _ in range(2):
        code, out, err = curl("imap://127.0.0.1:%d/INBOX" % edge.ports["imap"], "-u", "alice:",
                              "--oauth2-bearer", "opaque-alice-token", "-X", "EXAMINE INBOX")
        assert code == 0, err
        assert b"EXISTS" in out
    assert endpoint.asked == ["opaque-alice-token"]  # the second login came from the cache
    wire = Wire(edge.ports["imap"])
    wire.line()
    wire.send(b"1 AUTHENTICATE XOAUTH2 " + b64(xoauth2("alice", "revoked")) + b"\r\n")
    assert wire.line() == b"+ " + BEARER_ERROR + b"\r\n"
    wire.send(b"\r\n")
    assert wire.line() == b"1 NO invalid token\r\n"
    assert wire.closed()  # no Auth-Wait (--wait 0): closed after the reply
    assert endpoint.asked == ["opaque-alice-token", "revoked"]
