"""Reply parsing (spec 3.3, 9.6) and the decision (spec 3.4), fed whole, byte by byte and fuzzed."""

import socket

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mailproxy.auth_http import response
from mailproxy.auth_http.response import (AuthError, AuthFail, AuthHttpError, AuthOk, AuthReply, AuthRetry, ReplyParser,
                                          decide, parse)

PEER = "127.0.0.1:9000"
OK = b"Auth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: 143\r\n"


def feed_whole(data):
    return ReplyParser(PEER).feed(data)


def feed_bytewise(data):
    parser = ReplyParser(PEER)
    for i in range(len(data)):
        reply = parser.feed(data[i : i + 1])
        if reply is not None:
            return reply
    return None


FEEDS = pytest.mark.parametrize("feed", [feed_whole, feed_bytewise], ids=["whole", "bytewise"])


def outcome(data, protocol="imap", method="plain"):
    reply = feed_whole(data)
    assert reply is not None
    assert feed_bytewise(data) == reply
    return decide(reply, protocol, method)


def raises(data):
    for feed in (feed_whole, feed_bytewise):
        with pytest.raises(AuthHttpError) as info:
            feed(data)
    return info.value.message


@FEEDS
def test_ok_with_status_line(feed):
    reply = feed(b"HTTP/1.0 200 OK\r\n" + OK + b"\r\n")
    assert decide(reply, "imap", "plain") == AuthOk("127.0.0.1", 143, "127.0.0.1:143", None, None)


def test_status_code_is_ignored_500_with_ok_succeeds():
    assert isinstance(outcome(b"HTTP/1.1 500 Internal Server Error\r\n" + OK + b"\r\n"), AuthOk)


def test_no_status_line_and_bare_lf():
    assert isinstance(outcome(OK.replace(b"\r\n", b"\n") + b"\n"), AuthOk)


def test_htx_is_a_header_not_a_status_line():
    assert outcome(b"HTX: 1\r\n" + OK + b"\r\n").addr == "127.0.0.1"


def test_incomplete_returns_none_and_body_is_kept():
    parser = ReplyParser(PEER)
    assert parser.feed(b"HTTP/1.0 200 OK\r\n" + OK) is None
    assert parser.feed(b"\r\nbody") is not None
    assert parser.body == b"body"
    assert parse(b"Auth-Status: OK\r\n", PEER) is None


def test_bad_cr_at_end_of_status_line():
    assert raises(b"HTTP/1.0 200 OK\rX\n" + OK + b"\r\n") == "auth http server 127.0.0.1:9000 sent invalid response"


@pytest.mark.parametrize(
    "line",
    [b"Auth Status: OK", b"-Auth: x", b"Auth-Status : OK", b"Auth_Status: OK", b"\tAuth: x",
     b" Auth-Status: OK", b"Auth-Status: O\rK", b":x", b"Auth\xff: x"],
)
def test_invalid_header(line):
    assert raises(OK + line + b"\r\n\r\n") == "auth http server 127.0.0.1:9000 sent invalid header in response"


def test_header_syntax_trimming_and_colonless_line():
    reply = feed_whole(b"Auth-Status:    bad  pass   \r\nX-Flag\r\n9x: \tv\t \r\nAuth-Server:\r\n\r\n")
    assert reply.failure == b"bad  pass"
    assert reply.server == b""


def test_header_limit_is_1024_bytes_status_line_included():
    head = b"HTTP/1.0 200 OK\r\n" + OK
    pad = b"X-Pad: " + b"a" * (1024 - len(head) - len(b"X-Pad: ") - 4) + b"\r\n"
    exact = head + pad + b"\r\n"
    assert len(exact) == 1024 and isinstance(outcome(exact), AuthOk)
    assert raises(head + b"X-Pad: a" + pad[7:] + b"\r\n").endswith("sent too big header in response")


def test_limit_reports_a_syntax_error_seen_before_it():
    assert raises(OK + b"Bad name: " + b"x" * 2000).endswith("sent invalid header in response")
    assert raises(b"HTTP/1.0 200\r" + b"x" * 2000).endswith("sent invalid response")


def test_eof_before_header_block():
    parser = ReplyParser(PEER)
    parser.feed(OK)
    with pytest.raises(AuthHttpError, match="^auth http server 127.0.0.1:9000 prematurely closed connection$"):
        parser.eof()


def test_names_are_case_insensitive_and_last_wins():
    reply = outcome(b"auth-status: OK\r\nAUTH-SERVER: 10.0.0.1\r\nauth-port: 110\r\nAuth-Server: 10.0.0.2\r\n"
                    b"Auth-User: a\r\nAuth-User: b\r\nAuth-Pass: p1\r\nAuth-Pass: p2\r\n\r\n")
    assert reply == AuthOk("10.0.0.2", 110, "10.0.0.2:110", b"b", b"p2")


def test_failure_status_sticks_over_a_later_ok():
    assert outcome(b"Auth-Status: Invalid login\r\n" + OK + b"\r\n") == AuthFail("Invalid login", 0)


def test_last_failure_text_wins():
    assert outcome(b"Auth-Status: first\r\nAuth-Status: second\r\n\r\n", "pop3").text == "second"


def test_failure_with_wait_and_error_code():
    data = b"Auth-Status: Temporary failure\r\nAuth-Wait: 3\r\nAuth-Error-Code: 451 4.3.0\r\n\r\n"
    assert outcome(data, "smtp") == AuthFail("Temporary failure", 3, "451 4.3.0", None)
    assert outcome(data, "imap") == AuthFail("Temporary failure", 3, None, None)


def test_invalid_auth_wait_is_ignored():
    data = b"Auth-Status: no\r\nAuth-Wait: 2\r\nAuth-Wait: -1\r\nAuth-Wait: 1s\r\nAuth-Wait:\r\n\r\n"
    assert outcome(data).wait == 2


@pytest.mark.parametrize("method", ["xoauth2", "oauthbearer"])
def test_error_sasl_for_oauth_methods(method):
    data = b"Auth-Status: auth failed\r\nAuth-Wait: 1\r\nauth-error-sasl: eyJzdGF0dXMiOiI0MDEifQ==\r\n\r\n"
    assert outcome(data, "imap", method) == AuthFail("auth failed", 1, None, "eyJzdGF0dXMiOiI0MDEifQ==")
    assert outcome(b"Auth-Status: no\r\nAuth-Error-SASL:\r\n\r\n", "smtp", method).sasl_error == ""


def test_error_sasl_ignored_for_other_methods_and_on_success():
    assert outcome(b"Auth-Status: no\r\nAuth-Error-SASL: e30=\r\n\r\n", "imap", "plain").sasl_error is None
    assert isinstance(outcome(OK + b"Auth-Error-SASL: e30=\r\n\r\n", "imap", "xoauth2"), AuthOk)


def test_empty_status_is_a_failure_except_for_smtp():
    assert outcome(b"Auth-Status:\r\n" + OK + b"\r\n", "imap") == AuthFail("", 0)
    assert isinstance(outcome(b"Auth-Status:\r\n" + OK + b"\r\n", "smtp"), AuthOk)
    # For SMTP the later empty text even replaces an earlier failure, as in nginx.
    assert isinstance(outcome(b"Auth-Status: no\r\nAuth-Status:\r\n" + OK + b"\r\n", "smtp"), AuthOk)


def test_ok_and_wait_are_case_sensitive():
    assert outcome(b"Auth-Status: ok\r\n" + OK + b"\r\n") == AuthFail("ok", 0)
    assert outcome(b"Auth-Status: wait\r\n\r\n") == AuthFail("wait", 0)


def test_wait_with_positive_auth_wait_retries():
    assert outcome(b"Auth-Status: WAIT\r\nAuth-Wait: 2\r\n\r\n") == AuthRetry(2)


@pytest.mark.parametrize("extra", [b"", b"Auth-Wait: 0\r\n", b"Auth-Wait: x\r\n"])
def test_wait_without_positive_auth_wait_is_an_error(extra):
    result = outcome(b"Auth-Status: WAIT\r\n" + extra + OK + b"\r\n")
    assert isinstance(result, AuthError) and "WAIT" in result.log_message


@pytest.mark.parametrize("data", [b"Auth-Status: OK\r\nAuth-Port: 143\r\n\r\n",
                                  b"Auth-Status: OK\r\nAuth-Server: 127.0.0.1\r\n\r\n",
                                  b"Auth-Status: OK\r\nAuth-Server:\r\nAuth-Port: 143\r\n\r\n",
                                  b"\r\n"])
def test_missing_server_or_port(data):
    assert outcome(data) == AuthError("auth http server 127.0.0.1:9000 did not send server or port")


@pytest.mark.parametrize("protocol, method, ok", [
    ("imap", "external", False), ("pop3", "apop", False), ("imap", "cram-md5", False),
    ("pop3", "cram-md5", False), ("imap", "plain", True), ("smtp", "cram-md5", True),
    ("smtp", "external", True),
])
def test_password_needed_for_imap_pop3(protocol, method, ok):
    result = outcome(OK + b"\r\n", protocol, method)
    if ok:
        assert isinstance(result, AuthOk)
    else:
        assert result == AuthError("auth http server 127.0.0.1:9000 did not send password")
        assert isinstance(outcome(OK + b"Auth-Pass:\r\n\r\n", protocol, method), AuthOk)


@pytest.mark.parametrize("value", [b"mail.example.com", b"127.0.0.256", b"1.2.3", b"[::1]", b"::1%lo",
                                   b"255.255.255.255", b"1..2.3", b"\xff", b"1.2.3.4\t", b"fe80::1::2"])
def test_invalid_server_address(value):
    data = b"Auth-Status: OK\r\nAuth-Server: " + value + b"\r\nAuth-Port: 143\r\n\r\n"
    expected = 'auth http server 127.0.0.1:9000 sent invalid server address:"%s"' % value.decode("latin-1")
    assert outcome(data) == AuthError(expected)


def test_ipv6_and_leading_zero_ipv4_addresses():
    ok = outcome(b"Auth-Status: OK\r\nAuth-Server: 2001:DB8::1\r\nAuth-Port: 0143\r\n\r\n")
    assert ok == AuthOk("2001:db8::1", 143, "2001:DB8::1:0143", None, None, socket.AF_INET6)
    assert outcome(b"Auth-Status: OK\r\nAuth-Server: 010.0.0.1\r\nAuth-Port: 25\r\n\r\n").addr == "10.0.0.1"


@pytest.mark.parametrize("value", [b"0", b"65536", b"-1", b"x", b"143x", b"99999999999999999999"])
def test_invalid_server_port(value):
    data = b"Auth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: " + value + b"\r\n\r\n"
    assert outcome(data) == AuthError('auth http server 127.0.0.1:9000 sent invalid server port:"%s"'
                                      % value.decode())


def test_address_checked_before_port():
    data = b"Auth-Status: OK\r\nAuth-Server: host\r\nAuth-Port: 0\r\n\r\n"
    assert "invalid server address" in outcome(data).log_message


def test_failure_text_keeps_raw_bytes_via_latin1():
    fail = outcome(b"Auth-Status: ung\xc3\xbcltig\x01\r\n\r\n")
    assert fail.text.encode("latin-1") == b"ung\xc3\xbcltig\x01"


@pytest.mark.parametrize("head, reusable, length", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n", True, 5),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n", False, 5),
    (b"HTTP/1.1 200 OK\r\n", False, None),
    (b"HTTP/1.1 204 No Content\r\n", True, 0),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n", False, None),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n", False, 0),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: Keep-Alive\r\n", True, 0),
    (b"Content-Length: 0\r\n", False, 0),
])
def test_connection_reuse_facts(head, reusable, length):
    reply = feed_whole(head + OK + b"\r\n")
    assert (reply.reusable, reply.body_length) == (reusable, length)


@given(st.binary(max_size=1500), st.integers(min_value=1, max_value=64))
def test_fuzz_random_bytes(data, chunk):
    """Any bytes end as a reply, a wait for more, or AuthHttpError; chunking never changes which."""
    results = []
    for size in (len(data) or 1, chunk):
        parser = ReplyParser(PEER)
        try:
            reply = None
            for i in range(0, len(data), size):
                reply = parser.feed(data[i : i + size])
                if reply is not None:
                    break
            results.append(("reply", reply))
            if reply is not None:
                for protocol in ("imap", "pop3", "smtp"):
                    for method in ("plain", "apop", "external", "none", "xoauth2"):
                        assert isinstance(decide(reply, protocol, method),
                                          (AuthOk, AuthFail, AuthRetry, AuthError))
        except AuthHttpError as exc:
            results.append(("error", exc.message))
    assert results[0] == results[1]


header_names = st.sampled_from([b"Auth-Status", b"Auth-Server", b"Auth-Port", b"Auth-User", b"Auth-Pass",
                                b"Auth-Wait", b"Auth-Error-Code", b"Auth-Error-SASL", b"X-Other"])
header_values = st.one_of(st.sampled_from([b"OK", b"WAIT", b"127.0.0.1", b"::1", b"143", b"0", b"1", b""]),
                          st.binary(max_size=20).map(lambda v: v.replace(b"\r", b"").replace(b"\n", b"")))


@given(st.lists(st.tuples(header_names, header_values), max_size=12), st.booleans())
def test_fuzz_well_formed_headers(headers, status_line):
    data = (b"HTTP/1.0 200 OK\r\n" if status_line else b"") + b"".join(
        name + b": " + value + b"\r\n" for name, value in headers) + b"\r\n"
    try:
        reply = feed_whole(data)
    except AuthHttpError as exc:
        assert "invalid header" in exc.message or "too big" in exc.message
        return
    assert isinstance(reply, AuthReply) and feed_bytewise(data) == reply
    for protocol in ("imap", "smtp"):
        assert isinstance(decide(reply, protocol, "oauthbearer"), (AuthOk, AuthFail, AuthRetry, AuthError))


class _RegexParser(ReplyParser):
    """The header reading of before the known-name fast path: every line through the one expression."""

    def _header_line(self, line):
        match = response._HEADER.fullmatch(line)
        if match is None or b"\r" in line:
            raise self._invalid_header()
        store = response._HEADERS.get(match.group(1).lower())
        if store is not None:
            store(self.reply, match.group(2) or b"")


def _read_with(parser_class, data):
    try:
        return parser_class(PEER).feed(data)
    except AuthHttpError as exc:
        return exc.message


header_case = st.sampled_from([bytes.lower, bytes.upper, lambda name: name])
separators = st.sampled_from([b":", b": ", b":   ", b" :", b"", b":\t", b"\t:"])
raw_values = st.binary(max_size=12).filter(lambda v: b"\n" not in v)


@given(st.lists(st.tuples(header_names, header_case, separators, raw_values, st.sampled_from([b"", b" ", b"  "])),
                max_size=6))
def test_fuzz_known_names_read_as_the_regular_expression_reads_them(lines):
    """Known header names take a fast path; what it stores, and what it refuses, must be the expression's."""
    data = b"".join(case(name) + sep + value + pad + b"\r\n" for name, case, sep, value, pad in lines) + b"\r\n"
    assert _read_with(ReplyParser, data) == _read_with(_RegexParser, data)


def _outcome_of(feed, data, limit):
    parser = ReplyParser(PEER, limit)
    try:
        if feed == "whole":
            reply = parser.feed(data)
        else:
            reply = None
            for i in range(len(data)):
                reply = parser.feed(data[i : i + 1])
                if reply is not None:
                    if data[i + 1 :]:
                        parser.feed(data[i + 1 :])  # the body's bytes, as the exchange hands them on
                    break
    except AuthHttpError as exc:
        return ("error", exc.message)
    return ("reply", reply, parser.body if reply is not None else None)


# The lines a reply is made of, each with its line end (CRLF mostly, else what must send the reply down
# the line-by-line path: a bare LF, a stray CR, none), then how the block ends and a body.
reply_lines = st.lists(st.tuples(
    st.sampled_from([b"HTTP/1.0 200 OK", b"HTTP/1.1 204 x", b"HTTP/", b"Auth-Status: OK", b"Auth-Status: WAIT",
                     b"Auth-Wait: 1", b"Auth-Server: 127.0.0.1", b"Auth-Port: 143", b"auth-user:bob", b"X-Other: y",
                     b"Content-Length: 3", b"Connection: keep-alive", b"", b" ", b"Auth-Pass: a\rb", b"\x00"]),
    st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b""])), max_size=8)
block_ends = st.sampled_from([b"\r\n", b"\r\n", b"\n", b"", b"\r\n\r\n"])


@settings(max_examples=500)
@example([(b"", b"\r\n"), (b"Auth-Status: OK", b"\r\n")], b"\r\n", b"", 1024)  # the block ends at once
@example([(b"Auth-Status: OK", b"\n"), (b"Auth-Port: 143", b"\r\n")], b"\r\n", b"", 1024)  # a bare LF ends a line
@given(reply_lines, block_ends, st.sampled_from([b"", b"body"]), st.integers(min_value=16, max_value=1100))
def test_fuzz_a_whole_reply_reads_as_one_fed_byte_by_byte(lines, block_end, body, limit):
    """A reply whose whole header block comes at once is read in one go (ReplyParser._whole_block); fed
    byte by byte it takes the line-by-line path. Both must reach the same reply, body and error."""
    data = b"".join(line + end for line, end in lines) + block_end + body
    assert _outcome_of("whole", data, limit) == _outcome_of("bytewise", data, limit)
