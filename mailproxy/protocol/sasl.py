"""SASL payloads as nginx decodes them (spec 2.0.8, 9.4), for every protocol.

Every parser returns its result or raises ``SaslError`` carrying the info-level log text; the protocol
machine words the reply. Nothing here knows which protocol asked.
"""

import base64
import binascii
import random
import time

# Mechanisms in the order nginx advertises them (spec 2.0.8, 9.2).
ADVERTISED_ORDER = ("plain", "login", "cram-md5", "external", "xoauth2", "oauthbearer")
MECHANISM_NAMES = {
    "plain": "PLAIN",
    "login": "LOGIN",
    "cram-md5": "CRAM-MD5",
    "external": "EXTERNAL",
    "xoauth2": "XOAUTH2",
    "oauthbearer": "OAUTHBEARER",
}
MECHANISM_BY_NAME = {name.encode(): method for method, name in MECHANISM_NAMES.items()}

USERNAME_PROMPT = b"VXNlcm5hbWU6"  # base64("Username:")
PASSWORD_PROMPT = b"UGFzc3dvcmQ6"  # base64("Password:")

_B64_ALPHABET = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")


class SaslError(ValueError):
    """The client's SASL data is unusable; ``str(err)`` is nginx's info log text."""


def mechanism(word: bytes):
    """The method name ("plain", ...) for a mechanism word in any case, or None."""
    return MECHANISM_BY_NAME.get(word.upper())


def decode_base64(data: bytes, mech: str) -> bytes:
    """Decode like nginx: stop at the first '=', tolerate missing padding, refuse stray bytes."""
    end = data.find(b"=")
    if end >= 0:
        data = data[:end]
    if len(data) % 4 == 1 or not _B64_ALPHABET.issuperset(data):
        raise SaslError(
            "client sent invalid base64 encoding in AUTH %s command" % MECHANISM_NAMES[mech]
        )
    try:
        return base64.b64decode(data + b"=" * (-len(data) % 4))
    except binascii.Error:
        raise SaslError(
            "client sent invalid base64 encoding in AUTH %s command" % MECHANISM_NAMES[mech]
        ) from None


def parse_plain(decoded: bytes):
    """``authzid NUL authcid NUL passwd`` -> (login, password); the authzid is ignored as nginx does."""
    first = decoded.find(b"\0")
    if first < 0:
        raise SaslError("client sent invalid login in AUTH PLAIN command")
    second = decoded.find(b"\0", first + 1)
    if second < 0:
        raise SaslError("client sent invalid password in AUTH PLAIN command")
    return decoded[first + 1 : second], decoded[second + 1 :]


def parse_cram_md5(decoded: bytes):
    """``user SP digest`` -> (login, digest); the digest must be 32 bytes, not checked for hex."""
    login, space, digest = decoded.partition(b" ")
    if not space or len(digest) != 32:
        raise SaslError("client sent invalid CRAM-MD5 hash in AUTH CRAM-MD5 command")
    return login, digest


def parse_oauthbearer(decoded: bytes):
    """RFC 7628 ``gs2-header ^A kvpairs ^A`` -> (identity, token) as freenginx reads it (spec 9.4)."""
    invalid_login = SaslError("client sent invalid login in AUTH OAUTHBEARER command")
    head_end = decoded.find(b"\x01")
    head = decoded if head_end < 0 else decoded[:head_end]
    # The gs2 flag field is skipped; the identity is the first "a=" field closed by a comma.
    identity = None
    position = head.find(b",")
    while position >= 0:
        field_end = head.find(b",", position + 1)
        if field_end < 0:
            break
        field = head[position + 1 : field_end]
        if field[:2] in (b"a=", b"A=") and len(field) > 2:
            identity = field[2:]
            break
        position = field_end
    if identity is None:
        raise invalid_login
    token = None
    rest = decoded[head_end + 1 :] if head_end >= 0 else b""
    while head_end >= 0:
        segment_end = rest.find(b"\x01")
        if segment_end < 0:
            break
        segment = rest[:segment_end]
        if segment[:12].lower() == b"auth=bearer " and len(segment) > 12:
            token = segment[12:]
            break
        rest = rest[segment_end + 1 :]
    if token is None:
        raise SaslError("client sent invalid token in AUTH OAUTHBEARER command")
    return _unescape_gs2(identity, invalid_login), token


def _unescape_gs2(identity: bytes, error: SaslError) -> bytes:
    out = bytearray()
    index = 0
    while index < len(identity):
        byte = identity[index]
        if byte != 0x3D:  # "="
            out.append(byte)
            index += 1
            continue
        code = identity[index + 1 : index + 3].upper()
        if code == b"2C":
            out += b","
        elif code == b"3D":
            out += b"="
        else:
            raise error
        index += 3
    return bytes(out)


def parse_xoauth2(decoded: bytes):
    """``user=<id> ^A auth=Bearer <token> ^A ^A`` -> (identity, token) (spec 9.4)."""
    user_part, separator, rest = decoded.partition(b"\x01")
    if not separator or user_part[:5].lower() != b"user=":
        raise SaslError("client sent invalid login in AUTH XOAUTH2 command")
    if rest[:12].lower() != b"auth=bearer " or len(rest) < 14 or rest[-2:] != b"\x01\x01":
        raise SaslError("client sent invalid token in AUTH XOAUTH2 command")
    return user_part[5:], rest[12:-2]


def make_salt(server_name: str) -> bytes:
    """The APOP/CRAM-MD5 challenge ``<random.time@server_name>`` with its CRLF, as nginx keeps it."""
    return b"<%d.%d@%s>\r\n" % (random.getrandbits(31), int(time.time()), server_name.encode())


def cram_md5_challenge(salt: bytes) -> bytes:
    """The base64 challenge text (without prefix or CRLF) for a salt kept with its CRLF."""
    return base64.b64encode(salt[:-2])
