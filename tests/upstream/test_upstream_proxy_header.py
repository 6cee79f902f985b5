"""PROXY protocol headers towards backends (spec 4.1), v2 checked by an independent decoder."""

import ipaddress
import socket

import pytest

from mailproxy.proxy_protocol import header, header_v1, header_v2


def decode_v2(data: bytes):
    """Just enough of the HAProxy v2 spec, written from the spec text, to read our headers back."""
    assert data[:12] == bytes([0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A])
    version, command = data[12] >> 4, data[12] & 0x0F
    family, transport = data[13] >> 4, data[13] & 0x0F
    length = int.from_bytes(data[14:16], "big")
    body = data[16:]
    assert version == 2 and len(body) == length
    if family == 1:
        size = 4
    elif family == 2:
        size = 16
    else:
        return {"command": command, "family": family, "transport": transport}
    src = ipaddress.ip_address(body[:size])
    dst = ipaddress.ip_address(body[size : 2 * size])
    sport = int.from_bytes(body[2 * size : 2 * size + 2], "big")
    dport = int.from_bytes(body[2 * size + 2 : 2 * size + 4], "big")
    assert len(body) == 2 * size + 4  # no TLVs
    return {"command": command, "family": family, "transport": transport,
            "src": str(src), "dst": str(dst), "sport": sport, "dport": dport}


def test_v1_tcp4():
    assert header_v1("192.0.2.1", 40000, "127.0.0.1", 143, socket.AF_INET) == (
        b"PROXY TCP4 192.0.2.1 127.0.0.1 40000 143\r\n"
    )


def test_v1_tcp6():
    assert header_v1("2001:db8::1", 5, "::1", 993, socket.AF_INET6) == (
        b"PROXY TCP6 2001:db8::1 ::1 5 993\r\n"
    )


def test_v1_unknown_for_unix():
    assert header_v1("unix:", 0, "unix:/run/x.sock", 0, socket.AF_UNIX) == b"PROXY UNKNOWN\r\n"


def test_v1_mixed_families_become_mapped_ipv6():
    assert header_v1("192.0.2.1", 1, "::1", 2, socket.AF_INET6) == (
        b"PROXY TCP6 ::ffff:c000:201 ::1 1 2\r\n"
    )


def test_v2_tcp4():
    data = header_v2("192.0.2.1", 40000, "127.0.0.1", 143, socket.AF_INET)
    assert len(data) == 16 + 12
    assert decode_v2(data) == {"command": 1, "family": 1, "transport": 1, "src": "192.0.2.1",
                               "dst": "127.0.0.1", "sport": 40000, "dport": 143}


def test_v2_tcp6():
    data = header_v2("2001:db8::1", 65535, "::1", 110, socket.AF_INET6)
    assert len(data) == 16 + 36
    assert decode_v2(data) == {"command": 1, "family": 2, "transport": 1, "src": "2001:db8::1",
                               "dst": "::1", "sport": 65535, "dport": 110}


def test_v2_local_for_unix():
    data = header_v2("unix:", 0, "unix:/x", 0, socket.AF_UNIX)
    assert data[12:] == b"\x20\x00\x00\x00"
    assert decode_v2(data) == {"command": 0, "family": 0, "transport": 0}


@pytest.mark.parametrize("version,first", [("v1", b"PROXY "), ("on", b"PROXY "), ("v2", b"\r\n\r\n")])
def test_dispatch(version, first):
    assert header(version, "10.0.0.1", 1, "10.0.0.2", 2, socket.AF_INET).startswith(first)
