"""IMAP backend login transcripts (spec 4.3, 4.5), each fed whole and byte by byte."""

import pytest
from hypothesis import given, strategies as st

from mailproxy.upstream import Failed, ImapUpstreamLogin, LoggedIn, LogPhase, Send

READ = LogPhase("reading response from upstream")
GREETING = b"* OK [CAPABILITY IMAP4rev1] ready\r\n"
LOGIN = [LogPhase("sending LOGIN command to upstream"), Send(b"a1 LOGIN {5}\r\n"), READ]
USER = [LogPhase("sending user name to upstream"), Send(b"alice {5}\r\n"), READ]
PASSWORD = [LogPhase("sending password to upstream"), Send(b"s3 {t\r\n"), READ]
CONT = b"+ OK\r\n"


def machine(**kw):
    args = dict(login=b"alice", password=b"s3 {t", tag=b"a1", proxy_buffer=4096)
    args.update(kw)
    return ImapUpstreamLogin(**args)


def feed_bytewise(m, data):
    """Feed one byte at a time; bytes after the verdict belong to the relay and join the pending."""
    got = []
    for i in range(len(data)):
        if m.finished:
            tail = data[i:]
            if got and isinstance(got[-1], LoggedIn):
                got[-1] = LoggedIn(got[-1].client_reply, got[-1].backend_pending + tail)
            break
        got += m.receive_data(data[i : i + 1])
    return got


def run(steps, bytewise=False, **kw):
    m = machine(**kw)
    for data, expected in steps:
        got = feed_bytewise(m, data) if bytewise and data else m.receive_data(data)
        assert got == expected, (data, got)
    return m


def both(steps, **kw):
    run(steps, **kw)
    run(steps, bytewise=True, **kw)


def up_to_password():
    return [(GREETING, LOGIN), (CONT, USER), (CONT, PASSWORD)]


def test_initial_phase_is_reading():
    assert machine().phase == "reading response from upstream"


def test_success_plain():
    both(up_to_password() + [(b"a1 OK Logged in\r\n", [LoggedIn(b"a1 OK Logged in\r\n", b"")])])


def test_success_with_one_untagged_line_and_pending_bytes():
    reply = b"* CAPABILITY IMAP4rev1 IDLE\r\na1 OK [CAPABILITY X] Logged in\r\n"
    both(up_to_password() + [(reply + b"* 3 EXISTS\r\n", [LoggedIn(reply, b"* 3 EXISTS\r\n")])])


def test_untagged_and_tagged_in_separate_reads():
    steps = up_to_password() + [
        (b"* CAPABILITY IMAP4rev1\r\n", []),
        (b"a1 OK done\r\n", [LoggedIn(b"* CAPABILITY IMAP4rev1\r\na1 OK done\r\n", b"")]),
    ]
    both(steps)


def test_two_untagged_lines_fail():
    reply = b"* CAPABILITY A\r\n* FLAGS ()\r\na1 OK done\r\n"
    fail = Failed("error", 'upstream sent invalid response: "* FLAGS ()"', None)
    both(up_to_password() + [(reply, [fail])])


@pytest.mark.parametrize("greeting", [b"* PREAUTH ready\r\n", b"* BYE go away\r\n", b"+OK pop\r\n"])
def test_wrong_greeting(greeting):
    text = greeting[:-2].decode()
    both([(greeting, [Failed("error", 'upstream sent invalid response: "%s"' % text, None)])])


def test_wrong_greeting_passed_on():
    greeting = b"* BYE too many connections\r\n"
    fail = Failed("info", 'upstream sent invalid response: "* BYE too many connections"', greeting)
    both([(greeting, [fail])], pass_error_message=True)


def test_login_command_refused():
    fail = Failed("error", 'upstream sent invalid response: "a1 BAD literals off"', None)
    both([(GREETING, LOGIN), (b"a1 BAD literals off\r\n", [fail])])


def test_user_literal_refused():
    fail = Failed("error", 'upstream sent invalid response: "a1 NO nope"', None)
    both([(GREETING, LOGIN), (CONT, USER), (b"a1 NO nope\r\n", [fail])])


def test_no_to_login_off_and_on():
    reply = b"a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
    text = 'upstream sent invalid response: "a1 NO [AUTHENTICATIONFAILED] Authentication failed."'
    both(up_to_password() + [(reply, [Failed("error", text, None)])])
    both(up_to_password() + [(reply, [Failed("info", text, reply)])], pass_error_message=True)


def test_pass_error_message_sends_untagged_line_too_but_logs_only_tagged():
    reply = b"* CAPABILITY A\r\na1 NO bad\r\n"
    fail = Failed("info", 'upstream sent invalid response: "a1 NO bad"', reply)
    both(up_to_password() + [(reply, [fail])], pass_error_message=True)


def test_other_tag_is_not_ok():
    fail = Failed("error", 'upstream sent invalid response: "a2 OK done"', None)
    both(up_to_password() + [(b"a2 OK done\r\n", [fail])])


def test_tag_given_with_separator():
    run([(GREETING, LOGIN)], tag=b"a1 ")


def test_empty_tag():
    m = machine(tag=b"", login=b"u", password=b"p")
    assert m.receive_data(GREETING)[1] == Send(b" LOGIN {1}\r\n")
    m.receive_data(CONT)
    m.receive_data(CONT)
    assert m.receive_data(b" OK done\r\n") == [LoggedIn(b" OK done\r\n", b"")]


def test_short_continuation_waits_for_four_bytes():
    # "+\r\n" alone is 3 bytes: nginx waits and judges it together with what follows.
    m = machine()
    m.receive_data(GREETING)
    assert m.receive_data(b"+\r\n") == []
    assert m.receive_data(b"+ x\r\n") == USER


def test_no_crlf_no_verdict():
    m = machine()
    assert m.receive_data(b"* OK ready\n") == []
    assert m.receive_data(b"\r\n") == LOGIN


def test_too_long_line():
    data = b"* OK " + b"x" * 100
    fail = Failed("error", 'upstream sent too long response line: "%s"' % data[:63].decode(), None)
    both([(data, [fail])], proxy_buffer=64)


def test_reply_larger_than_buffer_even_with_crlf():
    data = b"* OK " + b"x" * 100 + b"\r\n"
    m = machine(proxy_buffer=64)
    assert m.receive_data(data) == [
        Failed("error", 'upstream sent too long response line: "%s"' % data[:63].decode(), None)
    ]


def test_untagged_plus_tagged_must_fit_buffer():
    m = machine(proxy_buffer=32)
    m.receive_data(b"* OK\r\n")
    m.receive_data(CONT)
    m.receive_data(CONT)
    got = m.receive_data(b"* CAPABILITY " + b"Y" * 10 + b"\r\na1 OK a long tail\r\n")
    assert got[0].log_message.startswith("upstream sent too long response line")


@pytest.mark.parametrize("steps", range(4))
def test_eof_at_each_step(steps):
    m = run(up_to_password()[:steps])
    m.receive_data(b"a1 O")  # partial reply is discarded with the connection
    assert m.receive_data(b"") == [Failed("error", "upstream prematurely closed connection", None)]
    assert m.finished


def test_eof_with_pass_error_message_is_internal_error():
    m = machine(pass_error_message=True)
    assert m.receive_data(b"")[0].client_reply is None


def test_finished_machine_refuses_data():
    m = machine()
    m.receive_data(b"* BYE\r\n")
    with pytest.raises(RuntimeError):
        m.receive_data(b"more")


def test_credentials_never_logged():
    m = run(up_to_password())
    failed = m.receive_data(b"a1 NO bad\r\n")[0]
    assert "s3 {t" not in failed.log_message


def test_unsolicited_bytes_after_greeting_are_dropped():
    m = machine()
    assert m.receive_data(GREETING + b"* extra\r\n") == LOGIN
    assert m.receive_data(CONT) == USER


def test_backend_bytes_are_escaped_in_log():
    failed = machine().receive_data(b"* NO \x1b[31m\xff\r\n")[0]
    assert failed.log_message == 'upstream sent invalid response: "* NO \\x1B[31m\\xFF"'


@given(st.lists(st.integers(1, 12), min_size=1, max_size=40))
def test_any_cut_gives_same_transcript(cuts):
    stream = [GREETING, CONT, CONT, b"* CAPABILITY A B\r\na1 OK yes\r\n"]
    whole = []
    m = machine()
    for part in stream:
        whole += m.receive_data(part)
    m = machine()
    got, i = [], 0
    # Cuts never straddle two backend writes: the backend writes only after reading our command.
    for part in stream:
        pos = 0
        while pos < len(part):
            size = cuts[i % len(cuts)]
            i += 1
            got += m.receive_data(part[pos : pos + size])
            pos += size
    assert got == whole
