"""The ManageSieve backend login (mailproxy/upstream/sieve.py, RFC 5804) alone: backend bytes in, actions out.

A ManageSieve response is lines closed by one starting with OK, NO or BYE (section 4), any line may end
in a literal ``{n}`` whose bytes, CRLFs included, belong to it; the greeting is such a response (the
capabilities, 1.7), and the proxy answers it with one ``AUTHENTICATE "PLAIN"`` and its initial response
(2.1). Every transcript runs whole and byte by byte.
"""

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailproxy.upstream.common import Failed, LoggedIn, LogPhase, Send, StartTLS
from mailproxy.upstream.sieve import SieveUpstreamLogin

READING = LogPhase("reading response from upstream")
GREETING = b'"IMPLEMENTATION" "Dovecot Pigeonhole"\r\n"SASL" "PLAIN"\r\n"VERSION" "1.0"\r\nOK "ready"\r\n'
STARTTLS_GREETING = GREETING.replace(b'"VERSION"', b'"STARTTLS"\r\n"VERSION"')


def authenticate(login=b"alice", password=b"secret"):
    line = b'AUTHENTICATE "PLAIN" "%s"\r\n' % base64.b64encode(b"\0" + login + b"\0" + password)
    return [LogPhase("sending AUTHENTICATE to upstream"), Send(line), READING]


def feed(machine, data, bytewise):
    if not bytewise:
        return machine.receive_data(data)
    out = []
    for i in range(len(data)):
        out += machine.receive_data(data[i:i + 1])
    return out


@pytest.fixture(params=[False, True], ids=["whole", "bytewise"])
def bytewise(request):
    return request.param


def test_login(bytewise):
    m = SieveUpstreamLogin(login=b"alice", password=b"secret")
    assert feed(m, GREETING, bytewise) == authenticate()
    assert not m.finished
    reply = b'OK (SASL "xyz") "Logged in."\r\n'
    assert feed(m, reply, bytewise) == [LoggedIn(reply, b"")]
    assert m.finished
    with pytest.raises(RuntimeError):
        m.receive_data(b"more")  # the relay owns what follows


def test_credentials_survive_any_byte():
    """PLAIN's initial response is base64: quotes, backslashes, spaces and NUL need no quoting."""
    m = SieveUpstreamLogin(login=b'a "b"', password=b'p\\ "w"\0x')
    assert m.receive_data(GREETING) == authenticate(b'a "b"', b'p\\ "w"\0x')


@pytest.mark.parametrize("greeting", [
    b'"SIEVE" {4}\r\nOK\r\n\r\nOK\r\n',  # an "OK" inside a literal is data, not the verdict
    b'"X" "OK"\r\n"OKAY"\r\nOKAY\r\nok\r\n',  # a string or another word is no verdict; case does not matter
    b'OK\r\n',
])
def test_where_a_response_ends(greeting, bytewise):
    m = SieveUpstreamLogin(login=b"alice", password=b"secret")
    assert feed(m, greeting[:-1], bytewise) == []  # one byte short: still waiting
    assert m.receive_data(greeting[-1:]) == authenticate()


@pytest.mark.parametrize("greeting, shown", [
    (b'NO "maintenance"\r\n', 'NO "maintenance"'),
    (b'"IMPLEMENTATION" "x"\r\nBYE "Too many connections"\r\n', 'BYE "Too many connections"'),
    (b'BYE {4}\r\nab\r\n\r\n', 'BYE {4}\r\nab\r\n'),  # the literal belongs to the verdict line
])
def test_a_refusing_greeting(greeting, shown, bytewise):
    m = SieveUpstreamLogin(login=b"alice", password=b"secret")
    message = 'upstream sent invalid response: "%s"' % shown
    assert feed(m, greeting, bytewise) == [Failed("error", message, None)]
    # proxy_pass_error_message on: the client gets the backend's whole response as it came.
    m = SieveUpstreamLogin(login=b"alice", password=b"secret", pass_error_message=True)
    assert feed(m, greeting, bytewise) == [Failed("info", message, greeting)]


def test_a_refused_login():
    m = SieveUpstreamLogin(login=b"alice", password=b"secret", pass_error_message=True)
    m.receive_data(GREETING)
    reply = b'NO (AUTH-TOO-WEAK) "Authentication failed."\r\n'
    assert m.receive_data(reply) == [
        Failed("info", 'upstream sent invalid response: "NO (AUTH-TOO-WEAK) "Authentication failed.""', reply)]


def test_bytes_behind_the_login_reply_go_to_the_relay():
    m = SieveUpstreamLogin(login=b"alice", password=b"secret")
    m.receive_data(GREETING)
    assert m.receive_data(b'OK\r\n"script" ACTIVE\r\n') == [LoggedIn(b"OK\r\n", b'"script" ACTIVE\r\n')]


def test_unasked_bytes_behind_the_greeting_are_dropped():
    m = SieveUpstreamLogin(login=b"alice", password=b"secret")
    assert m.receive_data(GREETING + b'OK "forged login reply"\r\n') == authenticate()
    # The forged OK was not taken as the answer to AUTHENTICATE.
    assert not m.finished
    assert m.receive_data(b'NO "wrong"\r\n')[0].log_message == 'upstream sent invalid response: "NO "wrong""'


def test_starttls_to_the_backend(bytewise):
    """proxy_starttls: STARTTLS after the greeting, the handshake on OK, then the capabilities the
    backend re-sends over TLS (RFC 5804 2.2) before AUTHENTICATE. Clear-text bytes behind the OK
    would be injected ahead of the handshake: they are dropped."""
    m = SieveUpstreamLogin(login=b"alice", password=b"secret", starttls=True)
    assert feed(m, STARTTLS_GREETING, bytewise) == [
        LogPhase("sending STARTTLS to upstream"), Send(b"STARTTLS\r\n"), READING]
    assert feed(m, b'OK "Begin TLS negotiation now."\r\n', bytewise) == [StartTLS()]
    assert feed(m, GREETING, bytewise) == authenticate()
    assert feed(m, b"OK\r\n", bytewise) == [LoggedIn(b"OK\r\n", b"")]


def test_starttls_refused_by_the_backend():
    m = SieveUpstreamLogin(login=b"alice", password=b"secret", starttls=True)
    m.receive_data(STARTTLS_GREETING)
    assert m.receive_data(b'NO "TLS not available"\r\n') == [
        Failed("error", 'upstream sent invalid response: "NO "TLS not available""', None)]


def test_starttls_reply_with_bytes_behind_it():
    m = SieveUpstreamLogin(login=b"alice", password=b"secret", starttls=True)
    m.receive_data(STARTTLS_GREETING)
    assert m.receive_data(b'OK\r\nOK "injected"\r\n') == [StartTLS()]
    assert m.receive_data(b'"SASL" "PLAIN"\r\n') == []  # the injected OK did not end this response
    assert m.receive_data(b"OK\r\n") == authenticate()


def test_too_long_response_and_eof():
    m = SieveUpstreamLogin(login=b"alice", password=b"secret", proxy_buffer=32)
    out = m.receive_data(b'"IMPLEMENTATION" "' + b"x" * 40 + b'"\r\nOK\r\n')
    # nginx shows the full buffer but its last byte, over which it writes its terminating NUL.
    assert out == [Failed("error", 'upstream sent too long response line: ""IMPLEMENTATION" "%s"' % ("x" * 13), None)]
    m = SieveUpstreamLogin(login=b"alice", password=b"secret")
    m.receive_data(GREETING)
    assert m.receive_data(b"") == [Failed("error", "upstream prematurely closed connection", None)]


def test_backend_text_is_escaped_in_the_log():
    m = SieveUpstreamLogin(login=b"alice", password=b"secret")
    assert m.receive_data(b'NO "\x1b[31m\xff"\r\n')[0].log_message == (
        'upstream sent invalid response: "NO "\\x1B[31m\\xFF""')


_CHUNKS = st.sampled_from([b"OK\r\n", b'NO "x"\r\n', b'"SIEVE" {2}\r\n', b"ab", b"\r\n", b'BYE\r\n', b'"X"\r\n',
                           b"O", b"K", b"{", b"}"]) | st.binary(max_size=12)


@given(st.lists(_CHUNKS, min_size=1, max_size=10), st.booleans())
def test_any_backend_bytes_end_in_one_verdict_at_most(chunks, starttls):
    m = SieveUpstreamLogin(login=b"alice", password=b"secret", proxy_buffer=64, starttls=starttls)
    actions = []
    for chunk in chunks:
        if m.finished:
            break
        actions += m.receive_data(chunk)
    verdicts = [a for a in actions if isinstance(a, (LoggedIn, Failed))]
    assert all(isinstance(a, (Send, LogPhase, StartTLS, LoggedIn, Failed)) for a in actions)
    # Exactly one verdict once finished, none before, and it is the last action.
    assert len(verdicts) == (1 if m.finished else 0)
    if verdicts:
        assert actions[-1] is verdicts[0]
    # Each command goes out once: AUTHENTICATE at most once, STARTTLS only when asked for.
    sends = [a.data for a in actions if isinstance(a, Send)]
    assert sum(data.startswith(b"AUTHENTICATE") for data in sends) <= 1
    assert (b"STARTTLS\r\n" in sends) <= starttls
