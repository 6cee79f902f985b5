"""PROXY protocol headers that the proxy writes to a backend before its greeting (spec 4.1).

The source is the client after realip, the destination the listener the client connected to. Both are
plain values so that the session decides what "the client" is; this module only spells the bytes.
"""

import ipaddress
import socket
import struct

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

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
