"""ManageSieve before login (RFC 5804), the client machine alone: bytes in, replies out.

Beside test_sieve_machine.py: the string syntax of RFC 5804 section 4 (quoted strings with their two
QUOTED-SPECIALS, literals ``{n}`` and ``{n+}``, the bare atoms lazy clients send), what each pre-login
command takes, the capability response before and after STARTTLS (section 1.7 and 2.2), SASL challenges
and responses as strings with ``"*"`` cancelling (2.1), and the session's bounds (the client buffer,
max_errors, max_commands). nginx has no ManageSieve module; where RFC 5804 leaves a choice, the rules
nginx applies to IMAP hold (spec 2.0): a parse error is counted, a refused command is not, input too long
for the buffer ends the session.

Only the machine's public surface is used: the config's build()/from_server(), greeting(),
receive_data(), auth_failed(), tls_established(), trailing_data() and the actions.
"""

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailproxy.conf import load_config
from mailproxy.protocol.common import AuthAttempt, Authenticate, Close, Log, Send, StartTLS
from mailproxy.protocol.sieve import SieveConfig, SieveMachine

NOOP_OK = b'OK "NOOP completed"\r\n'
INVALID = b'NO "invalid command"\r\n'
BYE_INVALID = b'BYE "invalid command"\r\n'
TOO_LONG = b'BYE "Command too long"\r\n'
USERNAME = b'"VXNlcm5hbWU6"\r\n'  # "Username:", a string (RFC 5804 2.1), not IMAP's "+ "
PASSWORD = b'"UGFzc3dvcmQ6"\r\n'  # "Password:"


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def machine(tls=False, **kw):
    settings = dict(auth_methods=("plain", "login"), extensions=("fileinto",), starttls="on",
                    client_buffer=256, max_errors=3, max_commands=50)
    settings.update(kw)
    return SieveMachine(SieveConfig.build(**settings), tls)


def tag(value: bytes) -> bytes:
    return b'OK (TAG ' + value + b') "Done"\r\n'


# -- the greeting: the capability response (RFC 5804 1.7) --------------------------------------------


def test_from_server_takes_the_directives(tmp_path):
    conf = tmp_path / "mailproxy.conf"
    conf.write_text("events {}\nmail {\n auth_http 127.0.0.1:9/auth;\n server { listen 127.0.0.1:4190;"
                    " sieve_auth plain login xoauth2; sieve_capabilities fileinto vacation MAXREDIRECTS=4;"
                    " sieve_client_buffer 64; max_errors 2; max_commands 3; }\n}\n")
    m = SieveMachine(SieveConfig.from_server(load_config(str(conf)).servers[0]))
    # Every capability RFC 5804 requires, a NAME=value word on a line of its own, no STARTTLS (off).
    assert m.greeting() == [Send(
        b'"IMPLEMENTATION" "mailproxy"\r\n"SASL" "PLAIN LOGIN XOAUTH2"\r\n"SIEVE" "fileinto vacation"\r\n'
        b'"MAXREDIRECTS" "4"\r\n"VERSION" "1.0"\r\nOK\r\n')]
    assert m.receive_data(b"STARTTLS\r\n") == [Send(INVALID)]
    # sieve_client_buffer 64, max_errors 2, max_commands 3 reached the machine.
    assert m.receive_data(b"NOOP\r\nNOOP\r\nNOOP\r\n") == [
        Send(NOOP_OK), Send(NOOP_OK), Log("info", "client sent too many commands"),
        Send(b'BYE "Too many commands"\r\n'), Close()]
    other = SieveMachine(SieveConfig.from_server(load_config(str(conf)).servers[0]))
    assert other.receive_data(b"FOO\r\nBAR\r\n")[-2:] == [Send(b'BYE "Too many invalid commands"\r\n'), Close()]
    other = SieveMachine(SieveConfig.from_server(load_config(str(conf)).servers[0]))
    assert other.receive_data(b"N" * 64)[-2:] == [Send(TOO_LONG), Close()]


def test_capability_command_repeats_the_greeting_and_takes_no_argument():
    m = machine()
    assert m.receive_data(b"CAPABILITY\r\n") == m.greeting()
    assert m.receive_data(b'CAPABILITY "x"\r\n') == [Send(INVALID)]


def test_capabilities_after_starttls():
    """RFC 5804 2.2: after the handshake the server sends its capabilities unasked, now without
    STARTTLS; with starttls only, the SASL list is empty until then (1.7) and AUTHENTICATE refused."""
    m = machine(starttls="only")
    before = m.greeting()[0].data
    assert b'"SASL" ""\r\n' in before and b'"STARTTLS"\r\n' in before
    assert m.receive_data(b'AUTHENTICATE "PLAIN" "%s"\r\n' % b64(b"\0a\0b")) == [Send(INVALID)]
    assert m.receive_data(b"STARTTLS\r\n") == [Send(b'OK "Begin TLS negotiation now"\r\n'), StartTLS()]
    after = m.tls_established()
    assert after == [Send(b'"IMPLEMENTATION" "mailproxy"\r\n"SASL" "PLAIN LOGIN"\r\n"SIEVE" "fileinto"\r\n'
                          b'"VERSION" "1.0"\r\nOK\r\n')]
    assert m.receive_data(b"STARTTLS\r\n") == [Send(INVALID)]  # once is enough
    out = m.receive_data(b'AUTHENTICATE "PLAIN" "%s"\r\n' % b64(b"\0a\0b"))
    assert out == [Authenticate(AuthAttempt("plain", b"a", b"b", 1))]


def test_capabilities_come_again_only_after_starttls():
    m = machine()
    try:
        assert m.tls_established() == []
    except RuntimeError:
        pass  # out of turn: the session never reports a handshake it did not start
    # Still the clear-text session: the capabilities offer STARTTLS, which works.
    assert b'"STARTTLS"\r\n' in m.receive_data(b"CAPABILITY\r\n")[0].data
    assert m.receive_data(b"STARTTLS\r\n") == [Send(b'OK "Begin TLS negotiation now"\r\n'), StartTLS()]


def test_commands_pipelined_behind_starttls_are_dropped():
    m = machine()
    assert m.receive_data(b"STARTTLS\r\nNOOP\r\n") == [Send(b'OK "Begin TLS negotiation now"\r\n'), StartTLS()]
    assert m.receive_data(b"NOOP\r\n") == []  # handshake bytes as far as the machine knows
    m.tls_established()
    assert m.receive_data(b"NOOP\r\n") == [Send(NOOP_OK)]  # one reply: the clear-text NOOP never ran


def test_starttls_refused_when_off_or_with_an_argument():
    assert machine(starttls="off").receive_data(b"STARTTLS\r\n") == [Send(INVALID)]
    assert machine().receive_data(b'STARTTLS "now"\r\n') == [Send(INVALID)]
    assert machine(tls=True).receive_data(b"STARTTLS\r\n") == [Send(INVALID)]


# -- strings (RFC 5804 4), through NOOP's tag (2.11) -----------------------------------------------------


@pytest.mark.parametrize("argument, echoed", [
    (b'"a\\\\b"', b'"a\\\\b"'),  # a quoted backslash stays one, quoted again on the way out
    (b'"a\\"b"', b'"a\\"b"'),
    (b'""', b'""'),
    (b"42", b'"42"'),  # a bare atom, as lazy clients send, is taken as a string
    (b"{0+}\r\n", b'""'),
    (b"{2}\nab", b'"ab"'),  # a bare LF after the count ends that line as any other
    (b"{3+}\r\na\0b", b"{3}\r\na\0b"),  # NUL, CR and LF cannot be quoted: the server sends a literal
    (b"{4+}\r\na\r\nb", b"{4}\r\na\r\nb"),
    (b"{1025+}\r\n" + b"x" * 1025, b"{1025}\r\n" + b"x" * 1025),  # longer than a quoted string may be
])
def test_noop_echoes_its_tag_as_a_string(argument, echoed):
    m = machine(client_buffer=4096)
    assert m.receive_data(b"NOOP " + argument + b"\r\n") == [Send(tag(echoed))]


@pytest.mark.parametrize("line", [
    b'NOOP "a\\q"',  # only \" and \\ are QUOTED-SPECIALS
    b'NOOP "a"b',  # a string must end at a space or the line's end
    b'NOOP a"b"',
    b"NOOP {2}xab",  # the count's brace must close the line
    b"NOOP \rX",  # CR alone is no line end
    b'NOOP "a" "b"',  # NOOP takes one string at most
    b'AUTHENTICATE "PLAIN" "a" "b"',  # mechanism and one initial response at most
    b'AUTHENTICATE "PLAIN" "a" "b" "c"',
    b"HAVESPACE \"x\" 10",  # after login only: the proxy never serves it
    b"NOOP1",
    b"",
])
def test_bad_lines_get_no_and_the_session_goes_on(line):
    m = machine()
    assert m.receive_data(line + b"\r\nNOOP\r\n") == [Send(INVALID), Send(NOOP_OK)]


@pytest.mark.parametrize("line", [b"NOOP a{3}\r\nabc\r\n", b"NOOP {x}\r\n", b'NOOP "a\\q" {3+}\r\nabc\r\n'])
def test_a_bad_line_announcing_a_literal_ends_the_session(line):
    """Client literals are never acknowledged, so the literal's bytes follow at once and could not be
    told from commands: BYE, and the bytes after it are never read as commands."""
    m = machine()
    assert m.receive_data(line + b"NOOP\r\n") == [Send(BYE_INVALID), Close()]
    assert m.receive_data(b"NOOP\r\n") == []


@pytest.mark.parametrize("first, second, reply", [
    (b'NOOP "a\\', b'"b"\r\n', tag(b'"a\\"b"')),  # cut inside an escape
    (b"NOOP {5", b"+}\r\nhello\r\n", tag(b'"hello"')),  # inside the count
    (b"NOOP {5+}\r\nhel", b"lo\r\n", tag(b'"hello"')),  # inside the literal
    (b"NOOP \r", b"\n", NOOP_OK),  # between CR and LF
    (b"NO", b"OP\r\n", NOOP_OK),  # inside the verb
])
def test_a_line_cut_anywhere_waits_for_its_end(first, second, reply):
    m = machine()
    assert m.receive_data(first) == []
    assert m.receive_data(second) == [Send(reply)]


def test_a_bare_lf_ends_a_line():
    m = machine()
    assert m.receive_data(b'NOOP\nNOOP "t"\nCAPABILITY\n') == [Send(NOOP_OK), Send(tag(b'"t"'))] + m.greeting()


def test_logout_and_eof():
    m = machine()
    assert m.receive_data(b"LOGOUT\r\n") == [Send(b'OK "Logout completed"\r\n'), Close()]
    assert m.receive_data(b"NOOP\r\n") == []
    assert machine().receive_data(b"") == [Close()]


# -- bounds ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [
    b"N" * 64, b"NOOP" + b" " * 60, b'NOOP "' + b"x" * 58, b"NOOP" + b" " * 59 + b"\r",
    b'NOOP "' + b"x" * 57 + b"\\",  # the buffer ends inside an escape
    b"NOOP {" + b"1" * 59,  # ... inside a literal's count
    b'NOOP "a\\q' + b"x" * 55,  # ... on a line already bad: too long all the same
])
def test_a_full_buffer_without_a_line_end_is_too_long(data):
    m = machine(client_buffer=64)
    out = m.receive_data(data)
    assert out[1:] == [Send(TOO_LONG), Close()]
    assert out[0].level == "info" and out[0].message.startswith('client sent too long command "')


def test_a_literal_larger_than_the_buffer_ends_when_the_buffer_is_full():
    m = machine(client_buffer=64)
    head = b"NOOP {100+}\r\n"
    assert m.receive_data(head) == []
    assert m.receive_data(b"x" * (63 - len(head))) == []  # still room: waits
    assert m.receive_data(b"x")[-2:] == [Send(TOO_LONG), Close()]
    huge = machine(client_buffer=64)  # a count of 20 digits costs no more than a small one
    assert huge.receive_data(b"NOOP {99999999999999999999}\r\n") == []
    assert huge.receive_data(b"x" * 64)[-2:] == [Send(TOO_LONG), Close()]


def test_a_too_long_sasl_response_is_not_logged():
    m = machine(client_buffer=64)
    assert m.receive_data(b'AUTHENTICATE "PLAIN"\r\n') == [Send(b'""\r\n')]
    secret = b64(b"\0alice\0" + b"s" * 60)
    out = m.receive_data(b'"' + secret)
    assert out == [Log("info", 'client sent too long command "..."'), Send(TOO_LONG), Close()]


def test_refusals_are_not_counted_but_parse_errors_are():
    m = machine(starttls="off", max_errors=2)
    assert m.receive_data(b"STARTTLS\r\n" * 4 + b'CAPABILITY "x"\r\n') == [Send(INVALID)] * 5
    assert m.receive_data(b"PUTSCRIPT\r\n") == [Send(INVALID)]
    assert m.receive_data(b"PUTSCRIPT\r\n") == [
        Log("info", "client sent too many invalid commands"), Send(b'BYE "Too many invalid commands"\r\n'), Close()]


# -- SASL (RFC 5804 2.1): challenges and responses are strings ----------------------------------------


def test_login_exchange_with_quoted_and_literal_responses():
    m = machine()
    assert m.receive_data(b'AUTHENTICATE "LOGIN"\r\n') == [Send(USERNAME)]
    assert m.receive_data(b'"%s"\r\n' % b64(b"alice")) == [Send(PASSWORD)]
    out = m.receive_data(b"{8+}\r\n%s\r\nNOOP\r\n" % b64(b"secret"))
    assert out == [Authenticate(AuthAttempt("plain", b"alice", b"secret", 1))]
    # Nothing is read while the auth server decides; the pipelined command waits for the backend.
    assert m.receive_data(b"NOOP\r\n") == []
    assert m.trailing_data() == b"NOOP\r\nNOOP\r\n"


def test_undecodable_responses_are_refused_with_nginx_log_lines():
    m = machine(max_errors=1)
    assert m.receive_data(b'AUTHENTICATE "PLAIN" "@@"\r\n') == [
        Log("info", "client sent invalid base64 encoding in AUTH PLAIN command"), Send(INVALID)]
    assert m.receive_data(b'AUTHENTICATE "PLAIN"\r\n"%s"\r\n' % b64(b"\0alice")) == [
        Send(b'""\r\n'), Log("info", "client sent invalid password in AUTH PLAIN command"), Send(INVALID)]
    assert m.receive_data(b'AUTHENTICATE "LOGIN"\r\n"@"\r\n') == [
        Send(USERNAME), Log("info", "client sent invalid base64 encoding in AUTH LOGIN command"), Send(INVALID)]
    # Refusals, not parse errors: max_errors 1 is not reached.
    assert m.receive_data(b"NOOP\r\n") == [Send(NOOP_OK)]


def test_a_response_is_exactly_one_string():
    m = machine()
    assert m.receive_data(b'AUTHENTICATE "LOGIN"\r\n') == [Send(USERNAME)]
    assert m.receive_data(b'"a" "b"\r\n') == [Send(INVALID)]
    assert m.receive_data(b'AUTHENTICATE "PLAIN"\r\n') == [Send(b'""\r\n')]
    assert m.receive_data(b"\r\n") == [Send(INVALID)]
    assert m.receive_data(b"NOOP\r\n") == [Send(NOOP_OK)]


@pytest.mark.parametrize("start", [b'AUTHENTICATE "LOGIN"\r\n', b'AUTHENTICATE "PLAIN"\r\n'])
def test_star_cancels_at_any_step_without_counting(start):
    m = machine(max_errors=1)
    for _ in range(3):
        m.receive_data(start)
        assert m.receive_data(b'"*"\r\n') == [Send(b'NO "Authentication cancelled"\r\n')]
    assert m.receive_data(b"NOOP\r\n") == [Send(NOOP_OK)]


def test_failed_logins_count_attempts_and_the_last_one_closes():
    m = machine()
    line = b'AUTHENTICATE "PLAIN" "%s"\r\n'
    assert m.receive_data(line % b64(b"\0alice\0one")) == [Authenticate(AuthAttempt("plain", b"alice", b"one", 1))]
    assert m.auth_failed("Temporary failure", wait=True) == [
        Log("info", 'client login failed: "Temporary failure"'), Send(b'NO "Temporary failure"\r\n')]
    assert m.receive_data(line % b64(b"\0alice\0two")) == [Authenticate(AuthAttempt("plain", b"alice", b"two", 2))]
    assert m.auth_failed(b'Say "no"', wait=False)[1:] == [Send(b'NO "Say \\"no\\""\r\n'), Close()]
    assert m.receive_data(line % b64(b"\0alice\0three")) == []


def test_xoauth2_when_enabled_with_its_error_challenge():
    m = machine(auth_methods=("plain", "xoauth2"))
    assert b'"SASL" "PLAIN XOAUTH2"' in m.greeting()[0].data
    token = b64(b"user=alice\x01auth=Bearer t0k\x01\x01")
    out = m.receive_data(b'AUTHENTICATE "XOAUTH2" "%s"\r\n' % token)
    assert out == [Authenticate(AuthAttempt("xoauth2", b"alice", b"t0k", 1))]
    # RFC 7628 3.2.2: the error comes as a challenge; the client's empty answer gets the verdict.
    assert m.auth_failed("denied", wait=True, sasl_error="eyJzdGF0dXMiOiI0MDEifQ==")[1:] == [
        Send(b'"eyJzdGF0dXMiOiI0MDEifQ=="\r\n')]
    assert m.receive_data(b'""\r\n') == [Send(b'NO "denied"\r\n')]
    assert m.receive_data(b"NOOP\r\n") == [Send(NOOP_OK)]
    # Not enabled: refused like an unknown mechanism, even with a valid token.
    assert machine().receive_data(b'AUTHENTICATE "XOAUTH2" "%s"\r\n' % token) == [Send(INVALID)]


# -- any input, any cut ------------------------------------------------------------------------------

_PIECES = [b"NOOP\r\n", b'NOOP "t"\r\n', b"NOOP {2+}\r\nab\r\n", b"CAPABILITY\r\n", b"FOO\r\n", b'"*"\r\n',
           b'AUTHENTICATE "LOGIN"\r\n', b'"YQ=="\r\n', b"STARTTLS\r\n", b"LOGOUT\r\n", b"\r\n", b'NOOP "', b"{",
           b"\x00", b"x" * 40]


@given(st.lists(st.sampled_from(_PIECES), min_size=1, max_size=12),
       st.lists(st.integers(1, 9), min_size=1, max_size=20))
def test_any_cut_gives_the_same_replies(pieces, cuts):
    data = b"".join(pieces)
    whole = machine(client_buffer=96, max_errors=4).receive_data(data)
    m = machine(client_buffer=96, max_errors=4)
    got, at, i = [], 0, 0
    while at < len(data):
        step = cuts[i % len(cuts)]
        got += m.receive_data(data[at:at + step])
        at, i = at + step, i + 1
    # Log lines by level: the text of a too-long line's shows what the buffer held when it filled, which
    # one big read can overfill (unlike IMAP and POP3, which show client_buffer bytes at most).
    def shape(actions):
        return [a.level if isinstance(a, Log) else a for a in actions if not isinstance(a, Send)]

    assert shape(got) == shape(whole)
    assert b"".join(a.data for a in got if isinstance(a, Send)) == b"".join(
        a.data for a in whole if isinstance(a, Send))
    # Once closed, the machine is silent whatever comes.
    if Close() in whole:
        assert whole[-1] == Close() and m.receive_data(b"NOOP\r\n") == []
