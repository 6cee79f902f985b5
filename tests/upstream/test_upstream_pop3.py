"""POP3 backend login transcripts (spec 4.2, 4.5), each fed whole and byte by byte."""

import pytest

from mailproxy.upstream import Failed, LoggedIn, LogPhase, Pop3UpstreamLogin, Send

READ = LogPhase("reading response from upstream")
GREETING = b"+OK Dovecot ready. <1.2@host>\r\n"
USER = [LogPhase("sending user name to upstream"), Send(b"USER bob\r\n"), READ]
PASS = [LogPhase("sending password to upstream"), Send(b"PASS b0b pass+=\r\n"), READ]


def machine(**kw):
    args = dict(login=b"bob", password=b"b0b pass+=", proxy_buffer=4096)
    args.update(kw)
    return Pop3UpstreamLogin(**args)


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


def test_success():
    both([(GREETING, USER), (b"+OK\r\n", PASS), (b"+OK Logged in.\r\n", [LoggedIn(b"+OK Logged in.\r\n", b"")])])


def test_pending_bytes_after_pass_reply():
    m = run([(GREETING, USER), (b"+OK\r\n", PASS)])
    assert m.receive_data(b"+OK Logged in.\r\n+OK extra\r\n") == [
        LoggedIn(b"+OK Logged in.\r\n", b"+OK extra\r\n")
    ]


@pytest.mark.parametrize("greeting", [b"-ERR busy\r\n", b"* OK imap\r\n", b"+Ok lower\r\n"])
def test_bad_greeting(greeting):
    text = 'upstream sent invalid response: "%s"' % greeting[:-2].decode()
    both([(greeting, [Failed("error", text, None)])])
    both([(greeting, [Failed("info", text, greeting)])], pass_error_message=True)


def test_user_refused():
    fail = Failed("error", 'upstream sent invalid response: "-ERR no such user"', None)
    both([(GREETING, USER), (b"-ERR no such user\r\n", [fail])])


def test_pass_refused_off_and_on():
    reply = b"-ERR [AUTH] Authentication failed.\r\n"
    text = 'upstream sent invalid response: "-ERR [AUTH] Authentication failed."'
    steps = [(GREETING, USER), (b"+OK\r\n", PASS)]
    both(steps + [(reply, [Failed("error", text, None)])])
    both(steps + [(reply, [Failed("info", text, reply)])], pass_error_message=True)


def test_password_not_in_log():
    m = run([(GREETING, USER), (b"+OK\r\n", PASS)])
    assert "b0b" not in m.receive_data(b"-ERR bad\r\n")[0].log_message


@pytest.mark.parametrize("steps", range(3))
def test_eof_at_each_step(steps):
    m = run([(GREETING, USER), (b"+OK\r\n", PASS)][:steps])
    assert m.receive_data(b"") == [Failed("error", "upstream prematurely closed connection", None)]


def test_too_long():
    data = b"+OK " + b"y" * 200
    fail = Failed("error", 'upstream sent too long response line: "%s"' % data[:127].decode(), None)
    both([(data, [fail])], proxy_buffer=128)


def test_reply_waits_for_crlf():
    m = machine()
    assert m.receive_data(b"+OK") == []
    assert m.receive_data(b"\r") == []
    assert m.receive_data(b"\n") == USER


def test_three_byte_reply_is_joined_with_next_line():
    m = machine()
    assert m.receive_data(b"+\r\n") == []
    failed = m.receive_data(b"+OK\r\n")[0]
    assert failed.log_message == 'upstream sent invalid response: "+\r\n+OK"'
