"""imap_client_id (ours, issue 18 item 4): ID before login, from the client's bytes to the auth request
and the backend's ID. With the directive off, ID stays nginx's parse error (tests/protocol/test_imap.py)."""

from mailproxy.auth_http.request import imap_id_line
from mailproxy.protocol.common import Authenticate, Send
from mailproxy.protocol.imap import MAX_ID_BYTES, MAX_ID_PAIRS, ImapConfig, ImapMachine
from mailproxy.upstream import ImapUpstreamLogin, LogPhase
from mailproxy.upstream.imap import id_command

THUNDERBIRD = b'a ID ("name" "Thunderbird" "version" "115.0")\r\n'
ANSWER = Send(b"* ID NIL\r\na OK ID completed\r\n")


def feed(data, on=True, bytewise=False):
    m = ImapMachine(ImapConfig.build(client_id=on, max_errors=2))
    out = []
    for piece in ([data[i:i + 1] for i in range(len(data))] if bytewise else [data]):
        out += m.receive_data(piece)
    return m, out


def test_thunderbird_answered_whole_and_bytewise():
    for bytewise in (False, True):
        m, out = feed(THUNDERBIRD + b"b LOGIN alice pw\r\n", bytewise=bytewise)
        assert out[0] == ANSWER and m.errors == 0
        assert out[1].request.imap_id == ((b"name", b"Thunderbird"), (b"version", b"115.0"))


def test_off_is_nginx_bad_and_counts():
    m, out = feed(THUNDERBIRD + THUNDERBIRD, on=False)
    assert out[0] == Send(b"a BAD invalid command\r\n") and m.errors == 2 and m.closed


def test_id_forms():
    m, out = feed(b"a ID NIL\r\n")
    assert out == [ANSWER] and m.client_fields == ()
    m, out = feed(b'a id ("os" NIL "name" {5}\r\nK-9 x)\r\n')
    assert out == [Send(b"+ OK\r\n"), ANSWER] and m.client_fields == ((b"os", None), (b"name", b"K-9 x"))
    for bad in (b"a ID\r\n", b"a ID (name x)\r\n", b'a ID ("a" "b"\r\n', b'a ID ("a" "b") x\r\n'):
        m, out = feed(bad)
        assert out == [Send(b"a BAD invalid command\r\n")] and m.errors == 1, bad


def test_kept_fields_are_bounded():
    many = b" ".join(b'"k%d" "v"' % i for i in range(40))
    m, _ = feed(b"a ID (" + many + b")\r\n")
    assert len(m.client_fields) == MAX_ID_PAIRS
    big = b'"a" "%s" "b" "%s" "c" "d"' % (b"x" * 1000, b"y" * 100)
    m, _ = feed(b"a ID (" + big + b")\r\n")
    assert m.client_fields == ((b"a", b"x" * 1000),)
    assert sum(len(n) + len(v) for n, v in m.client_fields) <= MAX_ID_BYTES


def test_auth_header_escaped():
    line = imap_id_line(((b"name", b"Mail app"), (b"os", None), (b"a=b", b"1%\r\n")))
    assert line == b"Auth-IMAP-ID: name=Mail%20app os a%3Db=1%25%0D%0A\r\n"


def test_backend_id_merged_quoted_and_filtered():
    fields = ((b"name", b'T"b\\\r\n'), (b"os", None))
    assert id_command(b"a1", ("10.0.0.1", 5, "127.0.0.1", 143), fields) == (
        b'a1 ID ("name" "T\\"b\\\\" "os" NIL "x-originating-ip" "10.0.0.1" "x-originating-port" "5" '
        b'"x-connected-ip" "127.0.0.1" "x-connected-port" "143")\r\n')
    m = ImapUpstreamLogin(b"alice", b"pw", b"a1", client_fields=((b"X-Originating-IP", b"1.2.3.4"),))
    assert [a for a in m.receive_data(b"* OK ready\r\n") if not isinstance(a, LogPhase)] == [
        Send(b"a1 LOGIN {5}\r\n")]  # only x- fields: nothing to say, no ID
    m = ImapUpstreamLogin(b"alice", b"pw", b"a1", client_fields=((b"name", b"TB"),))
    out = m.receive_data(b"* OK ready\r\n")
    assert Send(b'a1 ID ("name" "TB")\r\n') in out
    out = m.receive_data(b'* ID ("name" "Dovecot")\r\na1 OK ID completed\r\n')
    assert Send(b"a1 LOGIN {5}\r\n") in out


def test_authenticate_carries_fields():
    m, out = feed(THUNDERBIRD + b"b AUTHENTICATE PLAIN AGFsaWNlAHB3\r\n")
    assert isinstance(out[-1], Authenticate) and out[-1].request.imap_id[0] == (b"name", b"Thunderbird")
