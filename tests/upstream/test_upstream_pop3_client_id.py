"""POP3 backend login with proxy_client_id (ours) and proxy_starttls, and the credentials POP3 cannot carry.

README: POP3 backends that offer XCLIENT (Dovecot's ``[XCLIENT]`` greeting code, or ``XCLIENT`` in
``CAPA``, RFC 2449's multi-line list) get ``XCLIENT ADDR=<ip> PORT=<port>`` before ``USER``; a backend
refusing it still gets the login. Each transcript runs whole and byte by byte.
"""

import pytest

from mailproxy.upstream import Failed, LoggedIn, LogPhase, Pop3UpstreamLogin, Send
from mailproxy.upstream.common import StartTLS

READ = LogPhase("reading response from upstream")
CLIENT = ("192.0.2.7", 40123, "10.0.0.1", 110)
CAPA = [LogPhase("sending CAPA to upstream"), Send(b"CAPA\r\n"), READ]
XCLIENT = [LogPhase("sending XCLIENT to upstream"), Send(b"XCLIENT ADDR=192.0.2.7 PORT=40123\r\n"), READ]
USER = [LogPhase("sending user name to upstream"), Send(b"USER bob\r\n"), READ]
PASS = [LogPhase("sending password to upstream"), Send(b"PASS pw\r\n"), READ]
LOGGED_IN = (b"+OK Logged in.\r\n", [LoggedIn(b"+OK Logged in.\r\n", b"")])


def machine(**kw):
    args = dict(login=b"bob", password=b"pw", client_id=CLIENT)
    args.update(kw)
    return Pop3UpstreamLogin(**args)


def run(steps, bytewise, **kw):
    m = machine(**kw)
    for data, expected in steps:
        got = []
        for piece in ([data[i:i + 1] for i in range(len(data))] if bytewise else [data]):
            got += m.receive_data(piece)
        assert got == expected, (data, got)
    return m


@pytest.fixture(params=[False, True], ids=["whole", "bytewise"])
def bytewise(request):
    return request.param


def test_xclient_offered_in_the_greeting(bytewise):
    run([(b"+OK [XCLIENT] Dovecot ready.\r\n", XCLIENT), (b"+OK\r\n", USER), (b"+OK\r\n", PASS), LOGGED_IN],
        bytewise)


def test_xclient_found_in_capa(bytewise):
    capa = b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nxclient\r\nSASL PLAIN\r\n.\r\n"
    run([(b"+OK Dovecot ready.\r\n", CAPA), (capa, XCLIENT), (b"+OK\r\n", USER), (b"+OK\r\n", PASS), LOGGED_IN],
        bytewise)


@pytest.mark.parametrize("capa", [
    b"+OK\r\nTOP\r\nUIDL\r\n.\r\n",  # not offered
    b"+OK\r\n.\r\n",  # an empty list
    b"+OK\r\nX-XCLIENT-LIKE\r\nTOP XCLIENT\r\n.\r\n",  # only a line naming XCLIENT first counts
    b"-ERR unknown command\r\n",  # a backend without CAPA
])
def test_no_xclient_without_the_offer(capa, bytewise):
    run([(b"+OK hi\r\n", CAPA), (capa, USER), (b"+OK\r\n", PASS), LOGGED_IN], bytewise)


def test_a_refused_xclient_still_logs_in(bytewise):
    run([(b"+OK [XCLIENT] hi\r\n", XCLIENT), (b"-ERR not from a trusted network\r\n", USER), (b"+OK\r\n", PASS),
         LOGGED_IN], bytewise)


def test_without_client_id_nothing_is_asked():
    run([(b"+OK [XCLIENT] hi\r\n", USER), (b"+OK\r\n", PASS), LOGGED_IN], False, client_id=None)


def test_capa_waits_for_the_end_of_its_list():
    m = machine()
    m.receive_data(b"+OK hi\r\n")
    assert m.receive_data(b"+OK\r\nTOP\r\n") == []
    assert m.receive_data(b"XCLIENT\r\n.") == []
    assert m.receive_data(b"\r\n") == XCLIENT


def test_a_capa_list_longer_than_proxy_buffer():
    m = machine(proxy_buffer=16)
    m.receive_data(b"+OK hi\r\n")
    assert m.receive_data(b"+OK\r\nXCLIENT\r\nTOP\r\n.\r\n") == [
        Failed("error", 'upstream sent too long response line: "+OK\r\nXCLIENT\r\nT"', None)]


def test_a_bad_greeting_is_refused_before_any_command():
    assert machine().receive_data(b"-ERR [XCLIENT] busy\r\n") == [
        Failed("error", 'upstream sent invalid response: "-ERR [XCLIENT] busy"', None)]


def test_stls_then_capa_over_tls(bytewise):
    """proxy_starttls: STLS, the handshake, then CAPA over TLS (the clear-text list is not to be trusted)."""
    run([(b"+OK hi\r\n", [LogPhase("sending STARTTLS to upstream"), Send(b"STLS\r\n"), READ]),
         (b"+OK Begin TLS\r\n", [StartTLS()] + CAPA),
         (b"+OK\r\nXCLIENT\r\n.\r\n", XCLIENT), (b"+OK\r\n", USER)], bytewise, starttls=True)


def test_stls_refused():
    m = machine(starttls=True, client_id=None)
    m.receive_data(b"+OK hi\r\n")
    assert m.receive_data(b"-ERR TLS unavailable\r\n") == [
        Failed("error", 'upstream sent invalid response: "-ERR TLS unavailable"', None)]


@pytest.mark.parametrize("login, password", [(b"bob\r\nDELE 1", b"pw"), (b"bob", b"pw\nDELE 1"), (b"bob\0", b"pw"),
                                             (b"bob", b"p\rw")])
@pytest.mark.parametrize("client_id", [None, CLIENT], ids=["plain", "client_id"])
def test_credentials_with_line_breaks_or_nul_are_never_sent(login, password, client_id):
    """POP3 has no quoting: a CR, LF or NUL would end USER or PASS and inject a command into the user's
    backend session (SASL PLAIN and LOGIN can carry them), so the login stops before either is sent."""
    m = machine(login=login, password=password, client_id=client_id)
    out = m.receive_data(b"+OK hi\r\n")
    if client_id is not None:
        assert out == CAPA
        out = m.receive_data(b"+OK\r\n.\r\n")
    assert out == [Failed("error", "login or password contains CR, LF or NUL, not sent to upstream", None)]
    assert m.finished


def test_proxy_buffer_must_hold_a_reply():
    with pytest.raises(ValueError):
        machine(proxy_buffer=3)
    assert machine(proxy_buffer=5).receive_data(b"+OK\r\n") == CAPA
