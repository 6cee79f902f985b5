"""The ManageSieve machines (mailproxy/protocol/sieve.py, mailproxy/upstream/sieve.py) without sockets.

Every transcript is fed whole and byte by byte and must give the same actions (glued Sends compared as
one byte string, since a cut can only change how replies are grouped, never what they say).
"""

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailproxy.protocol.common import Authenticate, Close, Log, Send, StartTLS
from mailproxy.protocol.sieve import Kind, SieveConfig, SieveMachine, parse_line, string
from mailproxy.upstream.common import Failed, LoggedIn, LogPhase
from mailproxy.upstream.sieve import SieveUpstreamLogin, response_end

CAPS = (
    b'"IMPLEMENTATION" "mailproxy"\r\n"SASL" "PLAIN LOGIN"\r\n"SIEVE" "fileinto vacation"\r\n'
    b'"NOTIFY" "mailto"\r\n'
)
CAPS_PLAIN = CAPS + b'"STARTTLS"\r\n"VERSION" "1.0"\r\nOK\r\n'
CAPS_TLS = CAPS + b'"VERSION" "1.0"\r\nOK\r\n'


def config(**kw):
    base = dict(auth_methods=("plain", "login"), extensions=("fileinto", "vacation", "NOTIFY=mailto"),
                starttls="on", client_buffer=256, max_errors=3, max_commands=20)
    base.update(kw)
    return SieveConfig.build(**base)


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def run(data: bytes, cut: bool, **kw):
    """Feed ``data`` whole or byte by byte; returns (sent bytes, other actions in order, machine)."""
    machine = SieveMachine(config(**kw))
    actions = []
    chunks = [data[i:i + 1] for i in range(len(data))] if cut else [data]
    for chunk in chunks:
        actions += machine.receive_data(chunk)
    sent = b"".join(a.data for a in actions if isinstance(a, Send))
    others = [a for a in actions if not isinstance(a, (Send, Log))]
    return sent, others, machine


def both(data, **kw):
    whole = run(data, False, **kw)
    cut = run(data, True, **kw)
    assert whole[:2] == cut[:2]
    return whole


def test_greeting_is_the_capability_response():
    assert SieveMachine(config()).greeting() == [Send(CAPS_PLAIN)]
    assert SieveMachine(config(), tls=True).greeting() == [Send(CAPS_TLS)]
    only = SieveMachine(config(starttls="only")).greeting()[0].data
    assert b'"SASL" ""\r\n' in only and b'"STARTTLS"\r\n' in only
    assert b'"STARTTLS"' not in SieveMachine(config(starttls="off")).greeting()[0].data


@pytest.mark.parametrize("data, reply", [
    (b"NOOP\r\n", b'OK "NOOP completed"\r\n'),
    (b'noop "sync-42"\r\n', b'OK (TAG "sync-42") "Done"\r\n'),
    (b'NOOP {3+}\r\na"b\r\n', b'OK (TAG "a\\"b") "Done"\r\n'),
    (b"NOOP {2}\r\n\r\n\r\n", b'OK (TAG {2}\r\n\r\n) "Done"\r\n'),
    (b"CAPABILITY\r\n", CAPS_PLAIN),
    (b"capability\n", CAPS_PLAIN),
    (b"HAVESPACE \"x\" 10\r\n", b'NO "invalid command"\r\n'),
    (b"NOOP \"a\\b\"\r\n", b'NO "invalid command"\r\n'),
    (b"\r\n", b'NO "invalid command"\r\n'),
    (b"NOOP \"a\" \"b\"\r\n", b'NO "invalid command"\r\n'),
])
def test_simple_commands(data, reply):
    sent, others, machine = both(data)
    assert sent == reply and others == []


def test_logout_closes():
    sent, others, machine = both(b"LOGOUT\r\nNOOP\r\n")
    assert sent == b'OK "Logout completed"\r\n' and others == [Close()] and machine.closed


@pytest.mark.parametrize("data", [
    b'AUTHENTICATE "PLAIN" "%s"\r\n' % b64(b"\0alice\0pa ss\"\\"),
    b'AUTHENTICATE "plain" {%d+}\r\n%s\r\n' % (len(b64(b"\0alice\0pa ss\"\\")), b64(b"\0alice\0pa ss\"\\")),
    b'AUTHENTICATE "PLAIN"\r\n"%s"\r\n' % b64(b"\0alice\0pa ss\"\\"),
    b'AUTHENTICATE "PLAIN"\r\n{%d}\r\n%s\r\n' % (len(b64(b"\0alice\0pa ss\"\\")), b64(b"\0alice\0pa ss\"\\")),
    b'AUTHENTICATE "LOGIN"\r\n"%s"\r\n"%s"\r\n' % (b64(b"alice"), b64(b"pa ss\"\\")),
    b'AUTHENTICATE "LOGIN" "%s"\r\n"%s"\r\n' % (b64(b"alice"), b64(b"pa ss\"\\")),
])
def test_authenticate(data):
    sent, others, machine = both(data + b"LISTSCRIPTS\r\n")
    assert others == [Authenticate(others[0].request)]
    request = others[0].request
    assert (request.method, request.login, request.password, request.attempt) == (
        "plain", b"alice", b"pa ss\"\\", 1)
    assert sent in (b"", b'""\r\n', b'"VXNlcm5hbWU6"\r\n"UGFzc3dvcmQ6"\r\n', b'"UGFzc3dvcmQ6"\r\n')
    assert machine.awaiting_auth and machine.trailing_data() == b"LISTSCRIPTS\r\n"


def test_cancel_and_bad_base64_are_rejections():
    sent, others, machine = both(b'AUTHENTICATE "PLAIN"\r\n"*"\r\nAUTHENTICATE "PLAIN" "@@"\r\nNOOP\r\n')
    assert sent == b'""\r\nNO "Authentication cancelled"\r\nNO "invalid command"\r\nOK "NOOP completed"\r\n'
    assert machine.errors == 0


def test_gated_and_unknown_mechanisms():
    sent, _, _ = both(b'AUTHENTICATE "XOAUTH2" "x"\r\nAUTHENTICATE "CRAM-MD5"\r\nAUTHENTICATE\r\n')
    assert sent == b'NO "invalid command"\r\n' * 3


def test_auth_failure_with_and_without_wait():
    machine = SieveMachine(config())
    machine.receive_data(b'AUTHENTICATE "PLAIN" "%s"\r\nNOOP\r\n' % b64(b"\0a\0b"))
    out = machine.auth_failed('Bad "pass"', wait=True)
    assert [a for a in out if isinstance(a, Send)] == [
        Send(b'NO "Bad \\"pass\\""\r\n'), Send(b'OK "NOOP completed"\r\n')]
    machine.receive_data(b'AUTHENTICATE "PLAIN" "%s"\r\n' % b64(b"\0a\0c"))
    out = machine.auth_failed("Nope", wait=False)
    assert out[1:] == [Send(b'NO "Nope"\r\n'), Close()]


def test_oauth_error_challenge():
    machine = SieveMachine(config(auth_methods=("plain", "oauthbearer")))
    token = b64(b"n,a=alice,\x01auth=Bearer tok\x01\x01")
    out = machine.receive_data(b'AUTHENTICATE "OAUTHBEARER" "%s"\r\n' % token)
    assert out[0].request.method == "oauthbearer" and out[0].request.password == b"tok"
    out = machine.auth_failed("denied", wait=True, sasl_error="eyJ9")
    assert out[1:] == [Send(b'"eyJ9"\r\n')]
    assert machine.receive_data(b'"AQ=="\r\n') == [Send(b'NO "denied"\r\n')]


def test_starttls_resends_capabilities():
    machine = SieveMachine(config())
    assert machine.receive_data(b"STARTTLS\r\nNOOP\r\n") == [
        Send(b'OK "Begin TLS negotiation now"\r\n'), StartTLS()]
    assert machine.receive_data(b"\x16\x03\x01") == []
    assert machine.tls_established() == [Send(CAPS_TLS)]
    assert machine.receive_data(b"STARTTLS\r\n") == [Send(b'NO "invalid command"\r\n')]


def test_starttls_only_refuses_login_in_clear():
    sent, _, _ = both(b'AUTHENTICATE "PLAIN" "%s"\r\n' % b64(b"\0a\0b"), starttls="only")
    assert sent == b'NO "invalid command"\r\n'


def test_max_errors_and_max_commands():
    sent, others, _ = both(b"FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n")
    assert sent == b'NO "invalid command"\r\n' * 2 + b'BYE "Too many invalid commands"\r\n'
    assert others == [Close()]
    sent, others, _ = both(b"NOOP\r\n" * 3, max_commands=2)
    assert sent == b'OK "NOOP completed"\r\n' * 2 + b'BYE "Too many commands"\r\n' and others == [Close()]


def test_too_long_and_unresyncable_literal():
    sent, others, _ = both(b"NOOP \"" + b"x" * 300)
    assert sent == b'BYE "Command too long"\r\n' and others == [Close()]
    sent, others, _ = both(b"NOOP {1000+}\r\n" + b"x" * 300)
    assert sent == b'BYE "Command too long"\r\n'
    # An unknown command is tokenized whole, literal included: answered, nothing lost.
    sent, others, _ = both(b"FOO {5+}\r\nNOOP\r\n")
    assert sent == b'NO "invalid command"\r\n' and others == []
    # A line that does not tokenize but announces a literal: its bytes cannot be told from commands.
    sent, others, _ = both(b'NOOP "a\\q" {5+}\r\nNOOP\r\n')
    assert sent == b'BYE "invalid command"\r\n' and others == [Close()]


def test_parser_pieces():
    assert parse_line(b'AUTHENTICATE "PLAIN" {3}\r\nabc\r\n', 100, False).args == [b"PLAIN", b"abc"]
    assert parse_line(b'NOOP "a\r\n', 100, False).kind is Kind.INVALID
    assert parse_line(b'NOOP {3}\r\nab', 100, False).kind is Kind.INCOMPLETE
    assert string(b"a\r\nb") == b"{4}\r\na\r\nb"


@given(st.lists(st.binary(max_size=40) | st.sampled_from(
    [b"NOOP\r\n", b'AUTHENTICATE "PLAIN"\r\n', b'"*"\r\n', b"{3+}\r\n", b"STARTTLS\r\n", b'"', b"\r\n"]),
    max_size=12), st.sampled_from(["on", "off", "only"]), st.booleans())
def test_fuzz_never_raises(chunks, starttls, fail):
    machine = SieveMachine(config(starttls=starttls, client_buffer=64, max_errors=100))
    actions = machine.greeting()
    for chunk in chunks:
        for action in machine.receive_data(chunk):
            actions.append(action)
            if isinstance(action, StartTLS):
                actions += machine.tls_established()
        if machine.awaiting_auth:
            actions += machine.auth_failed("no", wait=fail)
    assert all(isinstance(a, (Send, Log, Close, StartTLS, Authenticate)) for a in actions)
    # A session closes once, with nothing after it, and a closed machine reads nothing more.
    assert actions.count(Close()) <= 1
    if Close() in actions:
        assert actions[-1] == Close() and machine.receive_data(b"NOOP\r\n") == []


# -- the backend login ----------------------------------------------------------------------------

DOVECOT_GREETING = (
    b'"IMPLEMENTATION" "Dovecot Pigeonhole"\r\n"SIEVE" "fileinto"\r\n"SASL" "PLAIN"\r\n'
    b'"VERSION" "1.0"\r\nOK "Dovecot ready."\r\n'
)


def login(**kw):
    return SieveUpstreamLogin(login=b"alice", password=b'p "w', **kw)


def test_upstream_login_byte_by_byte():
    machine = login()
    actions = []
    for i in range(len(DOVECOT_GREETING)):
        actions += machine.receive_data(DOVECOT_GREETING[i:i + 1])
    sends = [a for a in actions if isinstance(a, Send)]
    assert sends == [Send(b'AUTHENTICATE "PLAIN" "%s"\r\n' % b64(b'\0alice\0p "w'))]
    out = machine.receive_data(b'OK (SASL "x") "Logged in."\r\nextra')
    assert out == [LoggedIn(b'OK (SASL "x") "Logged in."\r\n', b"extra")]


def test_upstream_refusal_and_bye():
    machine = login(pass_error_message=True)
    machine.receive_data(DOVECOT_GREETING)
    out = machine.receive_data(b'NO {5}\r\nno no\r\n')
    assert out == [Failed("info", 'upstream sent invalid response: "NO {5}\r\nno no"', b"NO {5}\r\nno no\r\n")]
    out = login().receive_data(b'BYE "Too many connections"\r\n')
    assert isinstance(out[0], Failed) and out[0].client_reply is None


def test_upstream_starttls():
    machine = login(starttls=True)
    out = machine.receive_data(DOVECOT_GREETING)
    assert Send(b"STARTTLS\r\n") in out
    assert machine.receive_data(b'OK "Begin TLS negotiation now."\r\n') == [StartTLS()]
    out = machine.receive_data(DOVECOT_GREETING)
    assert any(isinstance(a, Send) and a.data.startswith(b"AUTHENTICATE") for a in out)
    assert any(isinstance(a, LogPhase) for a in out)


def test_response_end_skips_literals():
    assert response_end(b'"SIEVE" {4}\r\nOK\r\n\r\nOK\r\n') == len(b'"SIEVE" {4}\r\nOK\r\n\r\nOK\r\n')
    assert response_end(b'"SIEVE" {40}\r\nOK\r\n') == -1


@given(st.lists(st.binary(max_size=30) | st.sampled_from([b"OK\r\n", b'"X" {2}\r\n', b"NO\r\n"]), max_size=8))
def test_upstream_fuzz(chunks):
    machine = login(proxy_buffer=128, starttls=True)
    actions = []
    for chunk in chunks:
        if machine.finished:
            break
        actions += machine.receive_data(chunk)
    assert all(isinstance(a, (Send, LogPhase, StartTLS, LoggedIn, Failed)) for a in actions)
    # One verdict, the last action, exactly when the login is over.
    verdicts = [a for a in actions if isinstance(a, (LoggedIn, Failed))]
    assert len(verdicts) == int(machine.finished)
    assert not verdicts or actions[-1] is verdicts[0]
