"""SMTP backend login transcripts (spec 4.4, 4.5), each fed whole and byte by byte."""

import base64

import pytest

from mailproxy.upstream import Failed, LoggedIn, LogPhase, Send, SmtpUpstreamLogin
from mailproxy.upstream.smtp import xtext

READ = LogPhase("reading response from upstream")
OK235 = b"235 2.0.0 OK\r\n"
GREETING = b"220 mx ESMTP\r\n"
EHLO_REPLY = b"250-mx\r\n250-XCLIENT NAME ADDR LOGIN\r\n250 8BITMIME\r\n"


def step(action, data):
    return [LogPhase(action), Send(data), READ]


HELO = step("sending HELO/EHLO to upstream", b"HELO proxy.test\r\n")
EHLO = step("sending HELO/EHLO to upstream", b"EHLO proxy.test\r\n")


def machine(**kw):
    args = dict(
        server_name="proxy.test",
        login=b"alice",
        password=b"pw",
        method="plain",
        helo=b"",
        esmtp=False,
        mail_from=b"",
        rcpt_to=b"",
        client_addr="192.0.2.7",
        client_host="[UNAVAILABLE]",
        xclient=False,
        smtp_auth=False,
        proxy_buffer=4096,
        pass_error_message=False,
    )
    args.update(kw)
    return SmtpUpstreamLogin(**args)


def run(steps, bytewise=False, **kw):
    m = machine(**kw)
    for data, expected in steps:
        if bytewise and data:
            got = []
            for i in range(len(data)):
                if m.finished:
                    break
                got += m.receive_data(data[i : i + 1])
        else:
            got = m.receive_data(data)
        assert got == expected, (data, got)
    return m


def both(steps, **kw):
    run(steps, **kw)
    run(steps, bytewise=True, **kw)


def test_plain_no_xclient_no_auth():
    both([(GREETING, HELO), (b"250 mx\r\n", [LoggedIn(OK235, b"")])])


def test_ehlo_sticky_and_multiline_reply():
    both([(GREETING, EHLO), (EHLO_REPLY, [LoggedIn(OK235, b"")])], esmtp=True)


def test_multiline_greeting():
    both([(b"220-mx\r\n220-more\r\n220 mx ESMTP\r\n", HELO)])


def test_xclient_full_path_with_client_helo():
    xc = step(
        "sending XCLIENT to upstream",
        b"XCLIENT ADDR=192.0.2.7 LOGIN=alice NAME=client.example\r\n",
    )
    chelo = step("sending client HELO/EHLO to upstream", b"HELO laptop\r\n")
    steps = [
        (GREETING, EHLO),
        (EHLO_REPLY, xc),
        (b"220 mx ESMTP\r\n", chelo),
        (b"250 mx\r\n", [LoggedIn(OK235, b"")]),
    ]
    both(steps, xclient=True, helo=b"laptop", client_host="client.example")


def test_xclient_250_accepted_and_no_client_helo():
    steps = [(GREETING, EHLO), (EHLO_REPLY, step("sending XCLIENT to upstream",
             b"XCLIENT ADDR=192.0.2.7 LOGIN=alice NAME=[UNAVAILABLE]\r\n")),
             (b"250 ok\r\n", [LoggedIn(OK235, b"")])]
    both(steps, xclient=True)


def test_xclient_ipv6_and_encoded_login_and_esmtp_client_helo():
    m = machine(xclient=True, client_addr="2001:db8::1", login=b"a b+c=d\xff\x7f", esmtp=True,
                helo=b"h", client_host="[TEMPUNAVAIL]")
    m.receive_data(GREETING)
    assert m.receive_data(EHLO_REPLY)[1] == Send(
        b"XCLIENT ADDR=IPV6:2001:db8::1 LOGIN=a+20b+2Bc+3Dd+FF+7F NAME=[TEMPUNAVAIL]\r\n"
    )
    assert m.receive_data(b"220 ok\r\n")[1] == Send(b"EHLO h\r\n")


def test_xclient_without_login_or_with_smtp_auth_omits_login():
    m = machine(xclient=True, login=b"")
    assert m.xclient_line() == b"XCLIENT ADDR=192.0.2.7 NAME=[UNAVAILABLE]\r\n"
    m = machine(xclient=True, smtp_auth=True)
    assert m.xclient_line() == b"XCLIENT ADDR=192.0.2.7 NAME=[UNAVAILABLE]\r\n"


def test_xclient_refused():
    reply = b"550 5.7.0 Insufficient authorization\r\n"
    text = 'upstream sent invalid response: "550 5.7.0 Insufficient authorization"'
    xc = step("sending XCLIENT to upstream",
              b"XCLIENT ADDR=192.0.2.7 LOGIN=alice NAME=[UNAVAILABLE]\r\n")
    steps = [(GREETING, EHLO), (EHLO_REPLY, xc)]
    both(steps + [(reply, [Failed("error", text, None)])], xclient=True)
    both(steps + [(reply, [Failed("info", text, reply)])], xclient=True, pass_error_message=True)


def test_auth_plain():
    payload = base64.b64encode(b"\0alice\0pw")
    auth = step("sending AUTH to upstream", b"AUTH PLAIN " + payload + b"\r\n")
    both([(GREETING, HELO), (b"250 mx\r\n", auth), (b"235 2.7.0 Authentication successful\r\n",
          [LoggedIn(OK235, b"")])], smtp_auth=True)


def test_auth_refused_payload_not_logged():
    m = run([(GREETING, HELO)], smtp_auth=True)
    m.receive_data(b"250 mx\r\n")
    failed = m.receive_data(b"535 5.7.8 Error: authentication failed\r\n")[0]
    assert failed == Failed(
        "error", 'upstream sent invalid response: "535 5.7.8 Error: authentication failed"', None
    )
    assert base64.b64encode(b"\0alice\0pw").decode() not in failed.log_message


def test_no_password_available():
    m = run([(GREETING, HELO)], smtp_auth=True, password=b"", method="external")
    assert m.receive_data(b"250 mx\r\n") == [
        LogPhase("sending AUTH to upstream"),
        Failed("error", "no password available", None),
    ]


def test_method_none_mail_rcpt_reply_forwarded_even_if_refused():
    mail = step("sending MAIL FROM to upstream", b"MAIL FROM:<a@b>\r\n")
    rcpt = step("sending RCPT TO to upstream", b"RCPT TO:<c@d>\r\n")
    reply = b"550-5.1.1 no\r\n550 5.1.1 such user\r\n"
    both([(GREETING, HELO), (b"250 mx\r\n", mail), (b"250 2.1.0 Ok\r\n", rcpt),
          (reply, [LoggedIn(reply, b"")])],
         method="none", smtp_auth=True, password=b"", mail_from=b"MAIL FROM:<a@b>\r\n",
         rcpt_to=b"RCPT TO:<c@d>")


def test_method_none_mail_refused():
    mail = step("sending MAIL FROM to upstream", b"MAIL FROM:<a@b>\n")
    fail = Failed("error", 'upstream sent invalid response: "553 bad sender"', None)
    both([(GREETING, HELO), (b"250 mx\r\n", mail), (b"553 bad sender\r\n", [fail])],
         method="none", mail_from=b"MAIL FROM:<a@b>\n", rcpt_to=b"RCPT TO:<c@d>\n")


@pytest.mark.parametrize("greeting", [b"554 no service\r\n", b"421-busy\r\n421 later\r\n"])
def test_bad_greeting_multiline_text_keeps_inner_crlf(greeting):
    text = 'upstream sent invalid response: "%s"' % greeting[:-2].decode()
    both([(greeting, [Failed("error", text, None)])])
    both([(greeting, [Failed("info", text, greeting)])], pass_error_message=True)


def test_helo_refused():
    fail = Failed("error", 'upstream sent invalid response: "501 bad"', None)
    both([(GREETING, HELO), (b"501 bad\r\n", [fail])])


def test_too_long_multiline():
    data = b"220-" + b"z" * 30 + b"\r\n220-" + b"z" * 30 + b"\r\n"
    fail = Failed("error", 'upstream sent too long response line: "%s"' % data[:63].decode(), None)
    both([(data, [fail])], proxy_buffer=64)


@pytest.mark.parametrize("steps", range(4))
def test_eof_at_each_step(steps):
    script = [(GREETING, EHLO), (EHLO_REPLY, None), (b"220 ok\r\n", None)][:steps]
    m = machine(xclient=True, helo=b"h", smtp_auth=True)
    for data, _ in script:
        m.receive_data(data)
    m.receive_data(b"250-partial\r\n")
    assert m.receive_data(b"") == [Failed("error", "upstream prematurely closed connection", None)]


def test_xtext():
    assert xtext(bytes(range(256))) == b"".join(
        b"+%02X" % b if b <= 0x20 or b >= 0x7F or b in b"+=" else bytes([b]) for b in range(256)
    )
    assert xtext(b"user@example.com") == b"user@example.com"
