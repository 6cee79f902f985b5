"""The auth_http request, byte for byte as nginx writes it (spec 3.2, 9.5).

Sans-IO: ``build`` turns one login attempt into the bytes of one HTTP request. The server settings, the
attempt, the TLS facts and the PROXY protocol addresses are read by attribute, so any object with the
names from docs/internals.md will do.

Header injection. Only Auth-User, Auth-Pass and Auth-SSL-Cert are %-escaped, as nginx does; every other
value goes out raw. Raw values cannot carry a line break in practice (the SMTP machine splits commands at
LF, PTR names are sanitised, configuration values come from the lexer), but a request line is the one place
where a stray CR or LF would let a client write its own ``Auth-Status``-like header towards the auth server.
So every raw value passes ``_one_line``: CR, LF and NUL become ``%0D``, ``%0A``, ``%00`` and nothing else
changes, which keeps nginx's bytes for every value nginx could actually send.
"""

import re

CRLF = b"\r\n"

# Methods whose password is replaced by a digest of the salt, so the salt must travel (spec 3.2, 9.13).
SALTED_METHODS = frozenset(("apop", "cram-md5"))

_ESCAPED = re.compile(rb"[\x00-\x20%]")
_LINE_BREAKING = re.compile(rb"[\r\n\x00]")


def _percent(match) -> bytes:
    return b"%%%02X" % match.group()[0]


def escape(value: bytes) -> bytes:
    """nginx's mail escaping: controls, space and '%' as %XX (upper-case hex), every other byte raw."""
    if _ESCAPED.search(value) is None:
        return value
    return _ESCAPED.sub(_percent, value)


def imap_id_line(fields) -> bytes:
    """imap_client_id (ours): ``Auth-IMAP-ID: name=value name=value ...`` CRLF, each part escaped as
    Auth-User is, ``=`` too so that a name cannot swallow its value; a NIL value leaves ``name`` alone."""
    parts = []
    for name, value in fields:
        part = escape(name).replace(b"=", b"%3D")
        if value is not None:
            part += b"=" + escape(value).replace(b"=", b"%3D")
        parts.append(part)
    return b"Auth-IMAP-ID: " + b" ".join(parts) + CRLF


def _as_bytes(value) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    # Text values (addresses, DNs, configured headers) are UTF-8 on the wire, as typed in the config.
    return str(value).encode("utf-8", "surrogateescape")


def _one_line(value) -> bytes:
    value = _as_bytes(value)
    if _LINE_BREAKING.search(value) is None:
        return value
    return _LINE_BREAKING.sub(_percent, value)


def _salt_line(salt: bytes) -> bytes:
    # The salt carries its own CRLF (nginx writes it as stored); anything inside it must not break lines.
    if salt.endswith(CRLF):
        salt = salt[:-2]
    return b"Auth-Salt: " + _one_line(salt) + CRLF


def request_head(url, keepalive: bool) -> bytes:
    """The request line and Host (plus Connection for keep-alive): fixed per server, built once."""
    version = b" HTTP/1.1\r\n" if keepalive else b" HTTP/1.0\r\n"
    head = b"GET " + _one_line(url.uri or "/") + version + b"Host: " + _one_line(url.host_header) + CRLF
    if keepalive:
        head += b"Connection: keep-alive\r\n"
    return head


def configured_headers(pairs) -> bytes:
    """``auth_http_header`` pairs in configuration order, ready to append."""
    return b"".join(_one_line(name) + b": " + _one_line(value) + CRLF for name, value in pairs)


def _ssl_lines(ssl, pass_client_cert: bool) -> list:
    # nginx writes each Auth-SSL-* line only when its value is non-empty: Verify only exists when
    # ssl_verify_client is on, the certificate fields only when the client presented one.
    lines = [b"Auth-SSL: on\r\n"]
    for name, value in (
        (b"Auth-SSL-Protocol: ", getattr(ssl, "protocol", None)),
        (b"Auth-SSL-Cipher: ", getattr(ssl, "cipher", None)),
        (b"Auth-SSL-Verify: ", getattr(ssl, "verify", None)),
        (b"Auth-SSL-Subject: ", getattr(ssl, "subject", None)),
        (b"Auth-SSL-Issuer: ", getattr(ssl, "issuer", None)),
        (b"Auth-SSL-Serial: ", getattr(ssl, "serial", None)),
        (b"Auth-SSL-Fingerprint: ", getattr(ssl, "fingerprint", None)),
    ):
        if value:
            lines.append(name + _one_line(value) + CRLF)
    cert = getattr(ssl, "cert_pem", None)
    if pass_client_cert and cert:
        lines.append(b"Auth-SSL-Cert: " + escape(_as_bytes(cert)) + CRLF)
    return lines


def _proxy_lines(proxy) -> list:
    # Only a PROXY header that carried addresses (TCP4/TCP6, not UNKNOWN) adds these four lines.
    if proxy is None or getattr(proxy, "src_addr", None) is None:
        return []
    return [
        b"Proxy-Protocol-Addr: " + _one_line(proxy.src_addr) + CRLF,
        b"Proxy-Protocol-Port: %d\r\n" % int(proxy.src_port),
        b"Proxy-Protocol-Server-Addr: " + _one_line(proxy.dst_addr) + CRLF,
        b"Proxy-Protocol-Server-Port: %d\r\n" % int(proxy.dst_port),
    ]


def build(server, attempt, protocol, client_ip, client_host=None, ssl=None, proxy_protocol=None,
          sni_name=None) -> bytes:
    """The whole request for one attempt (spec 3.2).

    ``protocol`` is "imap", "pop3" or "smtp"; ``client_ip`` the address after realip (``unix:`` for unix
    clients); ``client_host`` the SMTP resolver's answer (``[UNAVAILABLE]`` when there is none);
    ``ssl`` None on plain connections, else an object with protocol, cipher, verify, subject, issuer,
    serial, fingerprint, cert_pem; ``proxy_protocol`` None or an object with src_addr, src_port, dst_addr,
    dst_port (src_addr None for ``PROXY UNKNOWN``); ``sni_name`` the TLS server name on addresses shared
    by SNI (ours). The headers of mailproxy's own features come last, so nginx's keep their order.
    """
    return RequestTemplate(server, protocol).build(attempt, client_ip, client_host, ssl, proxy_protocol, sni_name)


class RequestTemplate:
    """What one server's configuration fixes in its requests, made once (a session builds its request from
    its server's, kept in the server's runtime): the request line and Host (with Connection for
    keep-alive), Auth-Protocol, the auth_http_header lines."""

    __slots__ = ("head", "protocol", "protocol_line", "headers", "pass_client_cert")

    def __init__(self, server, protocol):
        self.head = request_head(server.auth_http, bool(getattr(server, "auth_http_keepalive", False)))
        self.protocol = protocol
        self.protocol_line = b"Auth-Protocol: " + _one_line(protocol) + CRLF
        self.headers = configured_headers(getattr(server, "auth_http_header", ()))
        self.pass_client_cert = bool(getattr(server, "auth_http_pass_client_cert", False))

    def build(self, attempt, client_ip, client_host=None, ssl=None, proxy_protocol=None, sni_name=None) -> bytes:
        """The request for one attempt: ``build``'s, for this template's server and protocol."""
        method = attempt.method
        method_line = _METHOD_LINES.get(method)
        if method_line is None:
            method_line = b"Auth-Method: " + _one_line(method) + CRLF
        lines = [
            self.head,
            method_line,
            b"Auth-User: " + escape(attempt.login) + CRLF,
            b"Auth-Pass: " + escape(attempt.password) + CRLF,
        ]
        if method in SALTED_METHODS and attempt.salt:
            lines.append(_salt_line(attempt.salt))
        lines.append(self.protocol_line)
        lines.append(b"Auth-Login-Attempt: %d\r\n" % attempt.attempt)
        lines.append(b"Client-IP: " + _one_line(client_ip) + CRLF)
        if self.protocol == "smtp":
            lines.append(b"Client-Host: " + _one_line(client_host or "[UNAVAILABLE]") + CRLF)
        if proxy_protocol is not None:
            lines.extend(_proxy_lines(proxy_protocol))
        if method == "none":
            lines.append(b"Auth-SMTP-Helo: " + _one_line(attempt.helo) + CRLF)
            lines.append(b"Auth-SMTP-From: " + _one_line(attempt.mail_from) + CRLF)
            lines.append(b"Auth-SMTP-To: " + _one_line(attempt.rcpt_to) + CRLF)
        if ssl is not None:
            lines.extend(_ssl_lines(ssl, self.pass_client_cert))
        lines.append(self.headers)
        if sni_name:
            lines.append(b"Auth-SSL-Server-Name: " + escape(_as_bytes(sni_name)) + CRLF)
        if getattr(attempt, "imap_id", None):
            lines.append(imap_id_line(attempt.imap_id))
        lines.append(CRLF)
        return b"".join(lines)


# The Auth-Method lines of the methods the machines name.
_METHOD_LINES = {method: b"Auth-Method: " + method.encode("ascii") + CRLF
                 for method in ("plain", "login", "apop", "cram-md5", "external", "none", "xoauth2", "oauthbearer")}
