"""Exact request bytes (spec 3.2, 9.5)."""

import socket
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailproxy.auth_http import request

from support.authhttp import attempt, settings

URL = SimpleNamespace(
    host_header="127.0.0.1", uri="/auth", sockaddr=("127.0.0.1", 8080), family=socket.AF_INET,
    peer="127.0.0.1:8080",
)
SERVER = settings(URL)
SALT = b"<1896.697170952@mail.example.org>\r\n"


def test_imap_plain():
    assert request.build(SERVER, attempt(), "imap", "127.0.0.1") == (
        b"GET /auth HTTP/1.0\r\n"
        b"Host: 127.0.0.1\r\n"
        b"Auth-Method: plain\r\n"
        b"Auth-User: user\r\n"
        b"Auth-Pass: secret\r\n"
        b"Auth-Protocol: imap\r\n"
        b"Auth-Login-Attempt: 1\r\n"
        b"Client-IP: 127.0.0.1\r\n"
        b"\r\n"
    )


def test_pop3_apop_salt_after_pass_with_its_crlf():
    a = attempt("apop", b"bob", b"c4c9334bac560ecc979e58001b3e22fb", salt=SALT, attempt=3)
    assert request.build(SERVER, a, "pop3", "10.0.0.7") == (
        b"GET /auth HTTP/1.0\r\nHost: 127.0.0.1\r\n"
        b"Auth-Method: apop\r\nAuth-User: bob\r\nAuth-Pass: c4c9334bac560ecc979e58001b3e22fb\r\n"
        b"Auth-Salt: <1896.697170952@mail.example.org>\r\n"
        b"Auth-Protocol: pop3\r\nAuth-Login-Attempt: 3\r\nClient-IP: 10.0.0.7\r\n\r\n"
    )


def test_smtp_cram_md5_has_salt_and_client_host():
    a = attempt("cram-md5", b"bob", b"b913a602c7eda7a495b4e6e7334d3890", salt=SALT)
    assert request.build(SERVER, a, "smtp", "127.0.0.1", "[UNAVAILABLE]") == (
        b"GET /auth HTTP/1.0\r\nHost: 127.0.0.1\r\n"
        b"Auth-Method: cram-md5\r\nAuth-User: bob\r\nAuth-Pass: b913a602c7eda7a495b4e6e7334d3890\r\n"
        b"Auth-Salt: <1896.697170952@mail.example.org>\r\n"
        b"Auth-Protocol: smtp\r\nAuth-Login-Attempt: 1\r\nClient-IP: 127.0.0.1\r\n"
        b"Client-Host: [UNAVAILABLE]\r\n\r\n"
    )


@pytest.mark.parametrize("method", ["plain", "external", "xoauth2", "oauthbearer"])
def test_no_salt_for_other_methods_even_when_the_session_has_one(method):
    a = attempt(method, b"test@example.com", b"secretok", salt=SALT)
    assert b"Auth-Salt" not in request.build(SERVER, a, "pop3", "127.0.0.1")


def test_oauthbearer_as_freenginx_documents():
    a = attempt("oauthbearer", b"test@example.com", b"secretok")
    assert request.build(SERVER, a, "imap", "127.0.0.1") == (
        b"GET /auth HTTP/1.0\r\nHost: 127.0.0.1\r\nAuth-Method: oauthbearer\r\n"
        b"Auth-User: test@example.com\r\nAuth-Pass: secretok\r\nAuth-Protocol: imap\r\n"
        b"Auth-Login-Attempt: 1\r\nClient-IP: 127.0.0.1\r\n\r\n"
    )


def test_xoauth2_token_escaped():
    a = attempt("xoauth2", b"u@x", b"Bearer ya29\x01")
    assert b"Auth-Method: xoauth2\r\nAuth-User: u@x\r\nAuth-Pass: Bearer%20ya29%01\r\n" in request.build(
        SERVER, a, "smtp", "127.0.0.1", "mx.example.com"
    )


def test_external_has_empty_password():
    out = request.build(SERVER, attempt("external", b"", b""), "imap", "127.0.0.1")
    assert b"Auth-Method: external\r\nAuth-User: \r\nAuth-Pass: \r\nAuth-Protocol: imap\r\n" in out


def test_smtp_none_sends_envelope_raw_and_the_order_holds():
    a = attempt(
        "none", b"", b"", helo=b"client.example", mail_from=b"MAIL FROM:<a@b> SIZE=100",
        rcpt_to=b"RCPT TO:<c%d@e>",
    )
    proxy = SimpleNamespace(src_addr="192.0.2.1", src_port=5555, dst_addr="192.0.2.2", dst_port=25)
    server = settings(URL, headers=[("X-Auth-Key", "secret pass"), ("X-Second", "2")])
    assert request.build(server, a, "smtp", "192.0.2.1", "client.example", None, proxy) == (
        b"GET /auth HTTP/1.0\r\nHost: 127.0.0.1\r\n"
        b"Auth-Method: none\r\nAuth-User: \r\nAuth-Pass: \r\n"
        b"Auth-Protocol: smtp\r\nAuth-Login-Attempt: 1\r\nClient-IP: 192.0.2.1\r\n"
        b"Client-Host: client.example\r\n"
        b"Proxy-Protocol-Addr: 192.0.2.1\r\nProxy-Protocol-Port: 5555\r\n"
        b"Proxy-Protocol-Server-Addr: 192.0.2.2\r\nProxy-Protocol-Server-Port: 25\r\n"
        b"Auth-SMTP-Helo: client.example\r\nAuth-SMTP-From: MAIL FROM:<a@b> SIZE=100\r\n"
        b"Auth-SMTP-To: RCPT TO:<c%d@e>\r\n"
        b"X-Auth-Key: secret pass\r\nX-Second: 2\r\n\r\n"
    )


def test_proxy_unknown_adds_nothing():
    proxy = SimpleNamespace(src_addr=None, src_port=None, dst_addr=None, dst_port=None)
    assert b"Proxy-Protocol" not in request.build(SERVER, attempt(), "imap", "127.0.0.1", None, None, proxy)


def test_ssl_lines_and_client_cert_escaped():
    ssl = SimpleNamespace(
        protocol="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384", verify="SUCCESS", subject="CN=client,O=x",
        issuer="CN=ca", serial="1A2B", fingerprint="ab" * 20,
        cert_pem="-----BEGIN CERTIFICATE-----\nMIIB+x/=\n-----END CERTIFICATE-----\n",
    )
    server = settings(URL, headers=[("X-After", "ssl")], pass_client_cert=True)
    out = request.build(server, attempt(), "imap", "127.0.0.1", ssl=ssl)
    assert out.endswith(
        b"Client-IP: 127.0.0.1\r\n"
        b"Auth-SSL: on\r\nAuth-SSL-Protocol: TLSv1.3\r\nAuth-SSL-Cipher: TLS_AES_256_GCM_SHA384\r\n"
        b"Auth-SSL-Verify: SUCCESS\r\nAuth-SSL-Subject: CN=client,O=x\r\nAuth-SSL-Issuer: CN=ca\r\n"
        b"Auth-SSL-Serial: 1A2B\r\nAuth-SSL-Fingerprint: " + b"ab" * 20 + b"\r\n"
        b"Auth-SSL-Cert: -----BEGIN%20CERTIFICATE-----%0AMIIB+x/=%0A-----END%20CERTIFICATE-----%0A\r\n"
        b"X-After: ssl\r\n\r\n"
    )


def test_ssl_without_verify_or_cert():
    ssl = SimpleNamespace(protocol="TLSv1.2", cipher="ECDHE-RSA-AES128-GCM-SHA256", verify=None,
                          subject=None, issuer=None, serial=None, fingerprint=None, cert_pem=None)
    out = request.build(settings(URL, pass_client_cert=True), attempt(), "pop3", "::1", ssl=ssl)
    assert out.endswith(
        b"Client-IP: ::1\r\nAuth-SSL: on\r\nAuth-SSL-Protocol: TLSv1.2\r\n"
        b"Auth-SSL-Cipher: ECDHE-RSA-AES128-GCM-SHA256\r\n\r\n"
    )


def test_cert_only_with_pass_client_cert():
    ssl = SimpleNamespace(protocol="TLSv1.3", cipher="c", verify="SUCCESS", subject="CN=a", issuer="CN=b",
                          serial="01", fingerprint="00", cert_pem="PEM")
    assert b"Auth-SSL-Cert" not in request.build(SERVER, attempt(), "imap", "127.0.0.1", ssl=ssl)


def test_host_without_port_ipv6_and_unix():
    v6 = SimpleNamespace(host_header="[::1]", uri="/a?b=c", sockaddr=("::1", 9000, 0, 0),
                         family=socket.AF_INET6, peer="[::1]:9000")
    assert request.build(settings(v6), attempt(), "imap", "::1").startswith(
        b"GET /a?b=c HTTP/1.0\r\nHost: [::1]\r\nAuth-Method: plain\r\n")
    unix = SimpleNamespace(host_header="localhost", uri="/", sockaddr="/run/auth.sock",
                           family=socket.AF_UNIX, peer="unix:/run/auth.sock")
    assert request.build(settings(unix), attempt(), "imap", "unix:").startswith(
        b"GET / HTTP/1.0\r\nHost: localhost\r\nAuth-Method: plain\r\n")


def test_keepalive_uses_http11_with_connection_after_host():
    out = request.build(settings(URL, keepalive=True), attempt(), "imap", "127.0.0.1")
    assert out.startswith(b"GET /auth HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n"
                          b"Auth-Method: plain\r\n")


@pytest.mark.parametrize(
    "raw, wire",
    [
        (b"a%b", b"a%25b"),
        (b"a b", b"a%20b"),
        (b"a\rb\nc\x00d", b"a%0Db%0Ac%00d"),
        (b"\x1f\x7f", b"%1F\x7f"),
        ("jörg€".encode(), "jörg€".encode()),
        (b"\xff\x80", b"\xff\x80"),
        (b"+:/=&?\"'\\", b"+:/=&?\"'\\"),
    ],
)
def test_escaping_of_user_and_password(raw, wire):
    out = request.build(SERVER, attempt(login=raw, password=raw), "imap", "127.0.0.1")
    assert b"Auth-User: " + wire + b"\r\nAuth-Pass: " + wire + b"\r\n" in out


def test_raw_values_cannot_inject_headers():
    a = attempt("none", b"", b"", helo=b"h\r\nAuth-Status: OK", mail_from=b"MAIL FROM:<a>\nX: 1",
                rcpt_to=b"RCPT TO:<b>\x00")
    server = settings(URL, headers=[("X-Key", "a\r\nb")])
    out = request.build(server, a, "smtp", "127.0.0.1", "evil\r\nAuth-Pass: x")
    assert b"Auth-SMTP-Helo: h%0D%0AAuth-Status: OK\r\n" in out
    assert b"Auth-SMTP-From: MAIL FROM:<a>%0AX: 1\r\n" in out
    assert b"Auth-SMTP-To: RCPT TO:<b>%00\r\n" in out
    assert b"Client-Host: evil%0D%0AAuth-Pass: x\r\n" in out
    assert b"X-Key: a%0D%0Ab\r\n" in out


@given(
    st.sampled_from(["plain", "apop", "cram-md5", "external", "none", "xoauth2", "oauthbearer"]),
    st.binary(max_size=40), st.binary(max_size=40), st.binary(max_size=40), st.binary(max_size=40),
    st.sampled_from(["imap", "pop3", "smtp"]),
)
def test_every_request_is_well_formed_lines(method, login, password, helo, mail_from, protocol):
    a = attempt(method, login, password, salt=SALT, helo=helo, mail_from=mail_from, rcpt_to=helo)
    out = request.build(SERVER, a, protocol, "127.0.0.1", "h")
    assert out.endswith(b"\r\n\r\n")
    lines = out[:-4].split(b"\r\n")
    assert all(b"\r" not in line and b"\n" not in line and b"\x00" not in line for line in lines)
    names = [line.split(b":", 1)[0] for line in lines[1:]]
    assert len(names) == len(set(names))
    assert names[1] == b"Auth-Method" and b"Auth-Status" not in names
