"""SMTP backend login with proxy_smtp_auth (nginx's AUTH PLAIN; AUTH LOGIN is ours) and proxy_starttls.

nginx (ngx_mail_proxy_module, smtp_auth on): after the HELO/EHLO step it sends ``AUTH PLAIN`` with
base64("\\0" login "\\0" password) and wants 235. Ours: ``login`` sends ``AUTH LOGIN``, the base64 user
name after the first 334 and the base64 password after the second; proxy_starttls: EHLO, STARTTLS, the
handshake, then nginx's sequence as over a plain connection (RFC 3207 makes the server forget the
first EHLO).
"""

import base64

import pytest

from mailproxy.upstream import Failed, LoggedIn, LogPhase, Send, SmtpUpstreamLogin
from mailproxy.upstream.common import StartTLS

READ = LogPhase("reading response from upstream")
AUTH = LogPhase("sending AUTH to upstream")
EHLO = [LogPhase("sending HELO/EHLO to upstream"), Send(b"EHLO mx.example.com\r\n"), READ]
OK = LoggedIn(b"235 2.0.0 OK\r\n", b"")


def machine(**kw):
    args = dict(server_name="mx.example.com", login=b"alice", password=b"s3cret", method="plain", esmtp=True,
                xclient=False, smtp_auth="login")
    args.update(kw)
    return SmtpUpstreamLogin(**args)


def feed(m, data, bytewise):
    if not bytewise:
        return m.receive_data(data)
    out = []
    for i in range(len(data)):
        out += m.receive_data(data[i:i + 1])
    return out


@pytest.fixture(params=[False, True], ids=["whole", "bytewise"])
def bytewise(request):
    return request.param


def test_auth_login(bytewise):
    m = machine()
    assert feed(m, b"220 mx ESMTP\r\n", bytewise) == EHLO
    assert feed(m, b"250-mx\r\n250 AUTH PLAIN LOGIN\r\n", bytewise) == [AUTH, Send(b"AUTH LOGIN\r\n"), READ]
    assert feed(m, b"334 VXNlcm5hbWU6\r\n", bytewise) == [AUTH, Send(base64.b64encode(b"alice") + b"\r\n"), READ]
    assert feed(m, b"334 UGFzc3dvcmQ6\r\n", bytewise) == [AUTH, Send(base64.b64encode(b"s3cret") + b"\r\n"), READ]
    # The client gets nginx's own 235, not the backend's text.
    assert feed(m, b"235 2.7.0 Authentication successful\r\n", bytewise) == [OK]


@pytest.mark.parametrize("step, reply", [(1, b"504 5.5.4 Unrecognized authentication type\r\n"),
                                         (2, b"535 5.7.8 Bad user\r\n"), (3, b"535 5.7.8 Bad password\r\n")])
def test_auth_login_refused_at_each_step(step, reply):
    m = machine(pass_error_message=True)
    replies = [b"220 mx\r\n", b"250 mx\r\n", b"334 VXNlcm5hbWU6\r\n", b"334 UGFzc3dvcmQ6\r\n"][:step + 1]
    for data in replies:
        m.receive_data(data)
    text = 'upstream sent invalid response: "%s"' % reply[:-2].decode()
    assert m.receive_data(reply) == [Failed("info", text, reply)]
    assert "s3cret" not in text


def test_auth_plain_is_nginx_smtp_auth_on():
    m = machine(smtp_auth=True, password=b'p "w')
    m.receive_data(b"220 mx\r\n")
    assert m.receive_data(b"250 mx\r\n") == [
        AUTH, Send(b"AUTH PLAIN " + base64.b64encode(b'\0alice\0p "w') + b"\r\n"), READ]
    assert m.receive_data(b"235 ok\r\n") == [OK]


@pytest.mark.parametrize("smtp_auth", [True, "login"])
def test_no_password_to_log_in_with(smtp_auth):
    """An EXTERNAL or CRAM-MD5 client login leaves no clear password unless the auth server sent one."""
    m = machine(smtp_auth=smtp_auth, password=b"")
    m.receive_data(b"220 mx\r\n")
    assert m.receive_data(b"250 mx\r\n") == [AUTH, Failed("error", "no password available", None)]
    assert m.finished


def test_starttls_then_the_login(bytewise):
    m = machine(smtp_auth=True, starttls=True, esmtp=False)
    # STARTTLS is an ESMTP extension: the first greeting gets EHLO even for a HELO client.
    assert feed(m, b"220 mx ESMTP\r\n", bytewise) == EHLO
    assert feed(m, b"250-mx\r\n250 STARTTLS\r\n", bytewise) == [
        LogPhase("sending STARTTLS to upstream"), Send(b"STARTTLS\r\n"), READ]
    assert feed(m, b"220 2.0.0 Ready to start TLS\r\n", bytewise) == [
        StartTLS(), LogPhase("sending HELO/EHLO to upstream"), Send(b"HELO mx.example.com\r\n"), READ]
    assert feed(m, b"250 mx\r\n", bytewise)[1].data.startswith(b"AUTH PLAIN ")


def test_starttls_refused():
    m = machine(starttls=True)
    m.receive_data(b"220 mx\r\n")
    m.receive_data(b"250 mx\r\n")
    assert m.receive_data(b"454 4.7.0 TLS not available\r\n") == [
        Failed("error", 'upstream sent invalid response: "454 4.7.0 TLS not available"', None)]
