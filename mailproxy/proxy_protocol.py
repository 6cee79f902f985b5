"""The PROXY protocol, both ways, sans-IO: the header a balancer puts in front of a client's bytes
(spec 2.0.10) and the one mailproxy writes to a backend before its greeting (spec 4.1).

``parse(data)`` takes the bytes peeked from a fresh connection and answers ``(ProxyHeader, consumed)``
or raises ``BrokenHeader`` whose ``log_message`` is the error-log text. The whole header must be in
``data``: nginx peeks once and does not wait for the rest, so a header cut by the network is as broken
as a malformed one, and this module never asks for more bytes.

``header(version, ...)`` spells the header towards a backend. The source is the client after realip, the
destination the listener the client connected to; both are plain values, so the session decides what
"the client" is.
"""

import ipaddress
import socket
import struct
from dataclasses import dataclass

PEEK_SIZE = 4096

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_FIXED = 16  # signature, version/command, family/transport, length
# The text form's own limit (haproxy's proxy-protocol.txt): 107 bytes with the CRLF.
_V1_MAX = 107

_V2_FAMILIES = {0x11: (4, 12), 0x21: (6, 36)}  # TCP over IPv4 / IPv6: (version, address block size)


@dataclass(frozen=True)
class ProxyHeader:
    """What the balancer said. Addresses are None for ``PROXY UNKNOWN``, v2 LOCAL and v2 families other
    than TCP over IPv4/IPv6: the connection is then taken as it is, as nginx does."""

    version: int  # 1 or 2
    src_addr: str | None = None
    src_port: int | None = None
    dst_addr: str | None = None
    dst_port: int | None = None


class BrokenHeader(ValueError):
    """The connection must close; ``log_message`` is what the error log says about it."""

    def __init__(self, log_message):
        super().__init__(log_message)
        self.log_message = log_message


def parse(data: bytes):
    """``(ProxyHeader, bytes consumed)`` for a complete header at the start of ``data``."""
    data = bytes(data[:PEEK_SIZE])
    if len(data) >= _V2_FIXED and data.startswith(V2_SIGNATURE):
        return _parse_v2(data)
    return _parse_v1(data)


def broken(data: bytes) -> BrokenHeader:
    # The log shows the input up to its first line break; arbitrary bytes are escaped so the error log
    # stays one readable line whatever a client sends.
    end = len(data)
    for stop in (b"\r", b"\n"):
        found = data.find(stop)
        if 0 <= found < end:
            end = found
    text = "".join(chr(b) if 0x20 <= b < 0x7F else "\\x%02x" % b for b in data[:end])
    return BrokenHeader('broken header: "%s"' % text)


# -- v1: "PROXY TCP4 src dst sport dport\r\n" ------------------------------------------------------


def _parse_v1(data: bytes):
    end = data.find(b"\r\n", 0, _V1_MAX)
    if not data.startswith(b"PROXY ") or end < 0:
        raise broken(data)
    fields = data[len(b"PROXY "):end].split(b" ")
    consumed = end + 2
    if fields[0] == b"UNKNOWN":
        # Whatever follows UNKNOWN on the line is ignored by the protocol's definition.
        return ProxyHeader(version=1), consumed
    if len(fields) != 5 or fields[0] not in (b"TCP4", b"TCP6"):
        raise broken(data)
    version = 4 if fields[0] == b"TCP4" else 6
    src = _v1_address(fields[1], version)
    dst = _v1_address(fields[2], version)
    src_port, dst_port = _v1_port(fields[3]), _v1_port(fields[4])
    if None in (src, dst, src_port, dst_port):
        raise broken(data)
    return ProxyHeader(1, src, src_port, dst, dst_port), consumed


def _v1_address(field: bytes, version: int):
    try:
        text = field.decode("ascii")
        address = ipaddress.ip_address(text)
    except (UnicodeDecodeError, ValueError):
        return None
    if address.version != version or "%" in text:
        return None
    # The text as received, as nginx passes it on (Proxy-Protocol-Addr, Client-IP after realip).
    return text


def _v1_port(field: bytes):
    if not 1 <= len(field) <= 5 or not field.isdigit():
        return None
    port = int(field)
    return port if port <= 65535 else None


# -- v2: binary, signature + 4 bytes + addresses + TLVs ---------------------------------------------


def _parse_v2(data: bytes):
    version_command, family, length = struct.unpack_from("!BBH", data, len(V2_SIGNATURE))
    if version_command >> 4 != 2:
        raise BrokenHeader("unknown PROXY protocol version: %d" % (version_command >> 4))
    command = version_command & 0x0F
    if command > 1:
        raise BrokenHeader("PROXY protocol v2 unsupported command %d" % command)
    consumed = _V2_FIXED + length
    if consumed > len(data):
        # Either cut by the network or longer than one peek can hold: both cannot be read whole.
        raise BrokenHeader("header is too large")
    if command == 0 or family not in _V2_FAMILIES:
        # LOCAL is the balancer's own health check; other families carry nothing we could use.
        return ProxyHeader(version=2), consumed
    ip_version, block = _V2_FAMILIES[family]
    if length < block:
        raise BrokenHeader("PROXY protocol v2 address block is too short")
    size = 4 if ip_version == 4 else 16
    start = _V2_FIXED
    src = ipaddress.ip_address(data[start:start + size])
    dst = ipaddress.ip_address(data[start + size:start + 2 * size])
    src_port, dst_port = struct.unpack_from("!HH", data, start + 2 * size)
    # TLVs after the addresses (ALPN, SSL facts, unique id) are consumed and not interpreted.
    return ProxyHeader(2, _text(src), src_port, _text(dst), dst_port), consumed


def _text(address):
    # nginx writes IPv4-mapped addresses with a dotted quad; Python 3.11 would give "::ffff:c000:201".
    mapped = getattr(address, "ipv4_mapped", None)
    return "::ffff:%s" % mapped if mapped is not None else str(address)


# -- realip (spec 1.3) ------------------------------------------------------------------------------


def trusted(peer_ip: str, networks) -> bool:
    """Whether the TCP peer may speak for the client: ``networks`` is ``set_real_ip_from``."""
    if peer_ip == "unix:":
        return "unix:" in networks
    try:
        address = ipaddress.ip_address(peer_ip)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    for network in networks:
        if network == "unix:":
            continue
        if address.version == network.version and address in network:
            return True
        # A dual-stack listener sees IPv4 balancers as ::ffff:a.b.c.d; the operator wrote a.b.c.d.
        if mapped is not None and network.version == 4 and mapped in network:
            return True
    return False


# -- towards a backend (spec 4.1) ----------------------------------------------------------------

_V2_VERSION = 0x20
_V2_LOCAL = 0x00
_V2_PROXY = 0x01
_V2_UNSPEC = 0x00
_V2_TCP4 = 0x11
_V2_TCP6 = 0x21


def _pair(client_addr, local_addr, family):
    """Both addresses as one family, or None when there is no IP client (unix sockets).

    realip can turn an IPv6 listener's client into an IPv4 one; a header with mixed families is
    invalid, so IPv4 is then written in its IPv4-mapped IPv6 form.
    """
    if family == socket.AF_UNIX:
        return None
    client = ipaddress.ip_address(client_addr)
    local = ipaddress.ip_address(local_addr)
    if client.version != local.version:
        if client.version == 4:
            client = ipaddress.IPv6Address("::ffff:" + str(client))
        else:
            local = ipaddress.IPv6Address("::ffff:" + str(local))
    return client, local


def header_v1(client_addr, client_port, local_addr, local_port, family) -> bytes:
    pair = _pair(client_addr, local_addr, family)
    if pair is None:
        return b"PROXY UNKNOWN\r\n"
    client, local = pair
    proto = "TCP4" if client.version == 4 else "TCP6"
    return ("PROXY %s %s %s %d %d\r\n" % (proto, client, local, client_port, local_port)).encode(
        "ascii"
    )


def header_v2(client_addr, client_port, local_addr, local_port, family) -> bytes:
    pair = _pair(client_addr, local_addr, family)
    if pair is None:
        # LOCAL tells the backend to use the connection's own addresses: a unix client has none
        # that would mean anything to it.
        return V2_SIGNATURE + struct.pack("!BBH", _V2_VERSION | _V2_LOCAL, _V2_UNSPEC, 0)
    client, local = pair
    fam = _V2_TCP4 if client.version == 4 else _V2_TCP6
    body = client.packed + local.packed + struct.pack("!HH", client_port, local_port)
    return V2_SIGNATURE + struct.pack("!BBH", _V2_VERSION | _V2_PROXY, fam, len(body)) + body


def header(version: str, client_addr, client_port, local_addr, local_port, family) -> bytes:
    """The header for ``proxy_protocol`` ("v1" or "v2"; nginx's "on" means v1)."""
    build = header_v2 if version == "v2" else header_v1
    return build(client_addr, client_port, local_addr, local_port, family)
