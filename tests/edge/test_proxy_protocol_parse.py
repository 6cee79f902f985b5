"""The client-side PROXY header parser (spec 2.0.10): exact cases, then any bytes at all."""

import ipaddress
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailproxy.proxy_protocol import (PEEK_SIZE, V2_SIGNATURE, BrokenHeader, ProxyHeader, header_v1,  # noqa: E402
                                      header_v2, parse, trusted)


def broken_message(data):
    with pytest.raises(BrokenHeader) as caught:
        parse(data)
    return caught.value.log_message


# -- v1 ----------------------------------------------------------------------------------------------


def test_v1_tcp4_consumes_exactly_the_header():
    data = b"PROXY TCP4 192.0.2.1 127.0.0.1 5555 143\r\na LOGIN x y\r\n"
    header, consumed = parse(data)
    assert header == ProxyHeader(1, "192.0.2.1", 5555, "127.0.0.1", 143)
    assert data[consumed:] == b"a LOGIN x y\r\n"


def test_v1_tcp6_keeps_the_address_text_as_received():
    header, consumed = parse(b"PROXY TCP6 2001:DB8::1 ::1 65535 1\r\n")
    assert header == ProxyHeader(1, "2001:DB8::1", 65535, "::1", 1)
    assert consumed == 36


@pytest.mark.parametrize("data", [
    b"PROXY UNKNOWN\r\n",
    b"PROXY UNKNOWN 192.0.2.1 127.0.0.1 1 2\r\n",
    b"PROXY UNKNOWN whatever the balancer says\r\n",
])
def test_v1_unknown_is_accepted_without_addresses(data):
    assert parse(data + b"rest") == (ProxyHeader(1), len(data))


@pytest.mark.parametrize("data, line", [
    (b"", ""),
    (b"a LOGIN x y\r\n", "a LOGIN x y"),
    (b"PROXY TCP4 192.0.2.1 127.0.0.1 5555", "PROXY TCP4 192.0.2.1 127.0.0.1 5555"),  # fragment
    (b"PROXY TCP4 192.0.2.1 127.0.0.1 5555 143\n", "PROXY TCP4 192.0.2.1 127.0.0.1 5555 143"),  # no CR
    (b"PROXY TCP4 192.0.2.1 127.0.0.1 5555 143\r", "PROXY TCP4 192.0.2.1 127.0.0.1 5555 143"),
    (b"PROXY TCP4 ::1 127.0.0.1 5555 143\r\n", "PROXY TCP4 ::1 127.0.0.1 5555 143"),  # wrong family
    (b"PROXY TCP6 192.0.2.1 ::1 5555 143\r\n", "PROXY TCP6 192.0.2.1 ::1 5555 143"),
    (b"PROXY TCP4 192.0.2.1 127.0.0.1 65536 143\r\n", "PROXY TCP4 192.0.2.1 127.0.0.1 65536 143"),
    (b"PROXY TCP4 192.0.2.1 127.0.0.1 -1 143\r\n", "PROXY TCP4 192.0.2.1 127.0.0.1 -1 143"),
    (b"PROXY TCP4 192.0.2.1  127.0.0.1 1 143\r\n", "PROXY TCP4 192.0.2.1  127.0.0.1 1 143"),
    (b"PROXY TCP4 192.0.2.1 127.0.0.1 1 143 x\r\n", "PROXY TCP4 192.0.2.1 127.0.0.1 1 143 x"),
    (b"PROXY UDP4 192.0.2.1 127.0.0.1 1 143\r\n", "PROXY UDP4 192.0.2.1 127.0.0.1 1 143"),
    (b"proxy TCP4 192.0.2.1 127.0.0.1 1 143\r\n", "proxy TCP4 192.0.2.1 127.0.0.1 1 143"),
    (b"PROXY \xff\x01\r\n", "PROXY \\xff\\x01"),
])
def test_v1_broken_headers_log_their_first_line(data, line):
    assert broken_message(data) == 'broken header: "%s"' % line


def test_v1_longer_than_107_bytes_is_broken():
    data = b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n"
    assert len(data) == 107 and parse(data)[1] == 107
    assert broken_message(b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n").startswith('broken header: "PROXY UNKNOWN')


def test_round_trip_with_the_backend_builder():
    for build in (header_v1, header_v2):
        for src, dst, family in (("198.51.100.7", "127.0.0.1", 4), ("2001:db8::7", "::1", 6)):
            data = build(src, 40000, dst, 993, socket.AF_INET if family == 4 else socket.AF_INET6)
            header, consumed = parse(data + b"* tail")
            assert consumed == len(data)
            assert (header.src_addr, header.src_port, header.dst_addr, header.dst_port) == (src, 40000, dst, 993)


# -- v2 ----------------------------------------------------------------------------------------------


def v2(command=1, family=0x11, body=b"", version=2, length=None):
    length = len(body) if length is None else length
    return V2_SIGNATURE + struct.pack("!BBH", version << 4 | command, family, length) + body


def test_v2_with_tlvs_consumes_them_too():
    body = bytes([192, 0, 2, 9, 127, 0, 0, 1]) + struct.pack("!HH", 1234, 143) + b"\x05\x00\x02id"
    data = v2(body=body) + b"a NOOP\r\n"
    header, consumed = parse(data)
    assert header == ProxyHeader(2, "192.0.2.9", 1234, "127.0.0.1", 143)
    assert data[consumed:] == b"a NOOP\r\n"


def test_v2_local_and_other_families_carry_no_addresses():
    assert parse(v2(command=0, family=0x11, body=b"\0" * 12)) == (ProxyHeader(2), 28)
    assert parse(v2(family=0x00)) == (ProxyHeader(2), 16)
    assert parse(v2(family=0x31, body=b"\0" * 216)) == (ProxyHeader(2), 232)  # AF_UNIX
    assert parse(v2(family=0x12, body=b"\0" * 12)) == (ProxyHeader(2), 28)  # UDP


def test_v2_ipv4_mapped_source_is_spelled_as_nginx_does():
    body = ipaddress.ip_address("::ffff:192.0.2.1").packed + ipaddress.ip_address("::1").packed
    header, _ = parse(v2(family=0x21, body=body + b"\0\1\0\2"))
    assert header == ProxyHeader(2, "::ffff:192.0.2.1", 1, "::1", 2)


@pytest.mark.parametrize("data, message", [
    (v2(version=1), "unknown PROXY protocol version: 1"),
    (v2(command=2), "PROXY protocol v2 unsupported command 2"),
    (v2(body=b"\0" * 11, length=12), "header is too large"),  # a fragment
    (v2(length=PEEK_SIZE), "header is too large"),
    (v2(body=b"\0" * 8), "PROXY protocol v2 address block is too short"),
    (v2(family=0x21, body=b"\0" * 12), "PROXY protocol v2 address block is too short"),
    (V2_SIGNATURE + b"\x21\x11", 'broken header: ""'),  # too short to be v2, and not v1
])
def test_v2_errors(data, message):
    assert broken_message(data) == message


# -- realip ------------------------------------------------------------------------------------------


def test_trusted_peers():
    nets = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("2001:db8::/32"))
    assert trusted("127.0.0.9", nets) and trusted("2001:db8::5", nets)
    assert trusted("::ffff:127.0.0.2", nets)
    assert not trusted("10.0.0.1", nets) and not trusted("::1", nets) and not trusted("unix:", nets)
    assert trusted("unix:", ("unix:",)) and not trusted("127.0.0.1", ("unix:",))
    assert not trusted("127.0.0.1", ())


# -- any bytes at all --------------------------------------------------------------------------------

_prefixes = st.sampled_from([b"", b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN", V2_SIGNATURE])


@given(prefix=_prefixes, tail=st.binary(max_size=300))
def test_any_input_parses_or_fails_cleanly(prefix, tail):
    data = prefix + tail
    try:
        header, consumed = parse(data)
    except BrokenHeader as exc:
        assert exc.log_message and "\n" not in exc.log_message and "\r" not in exc.log_message
        return
    assert 0 < consumed <= len(data)
    assert header.version in (1, 2)
    if header.src_addr is not None:
        ipaddress.ip_address(header.src_addr)
        assert 0 <= header.src_port <= 65535 and 0 <= header.dst_port <= 65535


@given(src=st.ip_addresses(v=4), dst=st.ip_addresses(v=4), sport=st.integers(0, 65535),
       dport=st.integers(0, 65535), v=st.sampled_from([header_v1, header_v2]), cut=st.integers(0, 200))
def test_any_valid_header_round_trips_and_any_cut_is_refused(src, dst, sport, dport, v, cut):
    data = v(str(src), sport, str(dst), dport, socket.AF_INET)
    header, consumed = parse(data)
    assert consumed == len(data)
    assert (header.src_addr, header.src_port, header.dst_addr, header.dst_port) == (str(src), sport, str(dst), dport)
    with pytest.raises(BrokenHeader):
        parse(data[:cut % len(data)])
