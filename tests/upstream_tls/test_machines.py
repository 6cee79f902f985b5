"""proxy_starttls in the sans-IO backend logins: the StartTLS action sits exactly where the handshake
must happen, bytes the backend sent in the clear behind its "go ahead" never reach the login, and with
starttls off the dialogue is nginx's unchanged."""

import pytest

from mailproxy.protocol.common import StartTLS
from mailproxy.upstream import imap, pop3, smtp
from mailproxy.upstream.common import Failed, LoggedIn, Send


def sends_and_tls(actions):
    return [a.data if isinstance(a, Send) else "TLS" for a in actions if isinstance(a, (Send, StartTLS))]


def feed_each(machine, replies):
    out = []
    for reply in replies:
        # Byte by byte: a reply cut anywhere must give the same actions as the whole reply.
        for i in range(len(reply)):
            out += machine.receive_data(reply[i:i + 1])
    return out


def test_imap_starttls_then_login():
    m = imap.ImapUpstreamLogin(b"alice", b"pw", b"a1", starttls=True)
    out = feed_each(m, [b"* OK ready\r\n", b"* CAPABILITY IMAP4rev1\r\na1 OK Begin TLS\r\n", b"+ go\r\n",
                        b"+ go\r\n", b"a1 OK done\r\n"])
    assert sends_and_tls(out) == [b"a1 STARTTLS\r\n", "TLS", b"a1 LOGIN {5}\r\n", b"alice {2}\r\n", b"pw\r\n"]
    assert isinstance(out[-1], LoggedIn)


def test_imap_starttls_refused():
    m = imap.ImapUpstreamLogin(b"alice", b"pw", b"a1", starttls=True)
    m.receive_data(b"* OK ready\r\n")
    out = m.receive_data(b"a1 BAD no TLS here\r\n")
    assert isinstance(out[-1], Failed)
    assert out[-1].log_message == 'upstream sent invalid response: "a1 BAD no TLS here"'
    assert out[-1].client_reply is None


def test_cleartext_after_go_ahead_is_dropped():
    """STARTTLS injection: a line the backend (or a man in the middle) sent in the clear behind the
    OK must not be read as the reply to LOGIN after the handshake."""
    m = imap.ImapUpstreamLogin(b"alice", b"pw", b"a1", starttls=True)
    m.receive_data(b"* OK ready\r\n")
    out = m.receive_data(b"a1 OK go\r\n+ injected\r\n")
    assert sends_and_tls(out) == ["TLS", b"a1 LOGIN {5}\r\n"]
    assert not any(isinstance(a, Send) and b"alice" in a.data for a in out)


def test_pop3_stls():
    m = pop3.Pop3UpstreamLogin(b"alice", b"pw", starttls=True)
    out = feed_each(m, [b"+OK hi\r\n", b"+OK Begin TLS\r\n", b"+OK\r\n", b"+OK in\r\n"])
    assert sends_and_tls(out) == [b"STLS\r\n", "TLS", b"USER alice\r\n", b"PASS pw\r\n"]
    assert out[-1] == LoggedIn(b"+OK in\r\n", b"")


@pytest.mark.parametrize("esmtp,helo", [(True, b"EHLO"), (False, b"EHLO")])
def test_smtp_starttls_before_xclient(esmtp, helo):
    m = smtp.SmtpUpstreamLogin("mail.example.test", b"alice", b"pw", "plain", helo=b"client.test",
                               esmtp=esmtp, client_addr="192.0.2.1", xclient=True, starttls=True)
    out = feed_each(m, [b"220 mx ESMTP\r\n", b"250-mx\r\n250 STARTTLS\r\n", b"220 2.0.0 Ready\r\n",
                        b"250-mx\r\n250 XCLIENT ADDR\r\n", b"220 mx ESMTP\r\n", b"250 mx\r\n"])
    assert sends_and_tls(out) == [
        b"EHLO mail.example.test\r\n", b"STARTTLS\r\n", "TLS", helo + b" mail.example.test\r\n",
        b"XCLIENT ADDR=192.0.2.1 LOGIN=alice NAME=[UNAVAILABLE]\r\n",
        (b"EHLO" if esmtp else b"HELO") + b" client.test\r\n",
    ]
    assert out[-1] == LoggedIn(smtp.AUTH_OK, b"")


def test_smtp_starttls_refused():
    m = smtp.SmtpUpstreamLogin("mx", b"alice", b"pw", "plain", starttls=True, xclient=False)
    m.receive_data(b"220 mx\r\n")
    m.receive_data(b"250 mx\r\n")
    out = m.receive_data(b"454 4.7.0 TLS not available\r\n")
    assert out[-1].log_message == 'upstream sent invalid response: "454 4.7.0 TLS not available"'


def test_off_is_nginx():
    m = smtp.SmtpUpstreamLogin("mx", b"alice", b"pw", "plain", esmtp=False, xclient=False)
    assert sends_and_tls(m.receive_data(b"220 mx\r\n")) == [b"HELO mx\r\n"]
    m = pop3.Pop3UpstreamLogin(b"alice", b"pw")
    assert sends_and_tls(m.receive_data(b"+OK\r\n")) == [b"USER alice\r\n"]
