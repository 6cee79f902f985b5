"""Client-side TLS: one ssl.SSLContext per server block, and what the session learns from a handshake.

Where contexts are made, and why there. `prepare(config)` runs in the master (at start, at reload and
for `-t`) before any worker is forked, so:

* a bad certificate, key or CA file fails `-t` and start with nginx's `cannot load certificate ...`
  wording, and a reload with one keeps the old configuration;
* key files are read as root, before workers drop to `user`;
* session tickets resume across workers. Python's ssl cannot install ticket keys, but OpenSSL makes a
  context's ticket keys when the context is created; every worker forked from the master holds a copy of
  the same context, hence the same keys, so a ticket issued by one worker is accepted by all the others.
  The keys change at each reload (new contexts), as nginx's do without `ssl_session_ticket_key`.

What Python's ssl module cannot do, and what happens instead (never silently):

* `ssl_session_ticket_key`, `ssl_conf_command`, `ssl_certificate_compression on`, a list of curves in
  `ssl_ecdh_curve`, `ssl_verify_client optional_no_ca`, an `ssl_session_timeout` other than OpenSSL's
  300 s, and `engine:`/`store:` keys fail the configuration test with a message naming the directive.
* A client certificate that does not verify ends the handshake with an alert (OpenSSL checks it while
  handshaking; Python offers no hook that lets the handshake finish), so the `SSL certificate error`
  reply of spec 2.0.9 is sent only for the case checked afterwards: `ssl_verify_depth 1` and a
  certificate not issued directly by a trusted CA.
* `ssl_session_cache`: sessions are kept in each worker's OpenSSL cache, whatever the directive says;
  resumption across workers comes from tickets (above). The session id context is CPython's, not "MAIL".
* ALPN: the server's protocol name is offered and selected when the client lists it; a client whose list
  lacks it is served without ALPN instead of being refused (CPython's selection callback does not fail).
"""

import hashlib
import os
import ssl
import warnings
from dataclasses import dataclass
from typing import Optional

from mailproxy import tls_by_name
from mailproxy.conf.lexer import ConfigError

_VERSIONS = {
    "SSLv3": ssl.TLSVersion.SSLv3,
    "TLSv1": ssl.TLSVersion.TLSv1,
    "TLSv1.1": ssl.TLSVersion.TLSv1_1,
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}
_NO_VERSION = {
    "TLSv1": "OP_NO_TLSv1",
    "TLSv1.1": "OP_NO_TLSv1_1",
    "TLSv1.2": "OP_NO_TLSv1_2",
}
_ORDER = ["SSLv3", "TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"]

# X509_V_ERR_CERT_CHAIN_TOO_LONG, as OpenSSL numbers and words it.
_CHAIN_TOO_LONG = (22, "certificate chain too long")

# OpenSSL's short names (what XN_FLAG_RFC2253 prints) for the long names CPython reports.
_SHORT_NAMES = {
    "commonName": "CN", "countryName": "C", "localityName": "L", "stateOrProvinceName": "ST",
    "organizationName": "O", "organizationalUnitName": "OU", "streetAddress": "street",
    "domainComponent": "DC", "userId": "UID", "surname": "SN", "givenName": "GN", "title": "title",
    "serialNumber": "serialNumber", "emailAddress": "emailAddress", "initials": "initials",
    "generationQualifier": "generationQualifier", "dnQualifier": "dnQualifier", "pseudonym": "pseudonym",
    "postalCode": "postalCode", "name": "name", "description": "description",
    "businessCategory": "businessCategory", "jurisdictionCountryName": "jurisdictionC",
    "jurisdictionStateOrProvinceName": "jurisdictionST", "jurisdictionLocalityName": "jurisdictionL",
}

# id(server) -> (server, context): the server is kept so an id reused after a reload never matches.
_contexts = {}


# (family, sockaddr) -> SniGroup, for addresses that several servers share (certificates by SNI, ours).
_groups = {}


class SniGroup:
    """The servers on one address, chosen by the TLS server name; the first is the default.

    The default server gets a context of its own for this address, whose sni_callback swaps in the matched
    server's context: its certificate, CA list and ciphers then serve the handshake. Exact names win over
    `*.domain` ones, the longest such suffix first; no name, or no match, leaves the default.
    """

    def __init__(self, default, servers):
        self.default = default
        self.exact = {}
        self.wildcards = []
        self.by_context = {}
        for server in servers:
            ctx = context_for(server)
            self.by_context[id(ctx)] = server
            name = server.server_name.lower()
            if name.startswith("*."):
                self.wildcards.append((name[1:], ctx))
            else:
                self.exact.setdefault(name, ctx)
        self.wildcards.sort(key=lambda entry: -len(entry[0]))
        self.context = build_context(default)
        self.context.sni_callback = self._choose
        self.by_context[id(self.context)] = default

    def match(self, name):
        name = name.lower().rstrip(".")
        found = self.exact.get(name)
        if found is None:
            found = next((ctx for suffix, ctx in self.wildcards if name.endswith(suffix)), None)
        return found

    def _choose(self, sock, name, _ctx):
        sock = _ssl_socket(sock)
        # The session reads the name back for Auth-SSL-Server-Name.
        sock.mailproxy_server_name = name.lower() if name else None
        if name:
            found = self.match(name)
            # The chosen server (else the default) may find its certificate by this name too.
            by_name = _context_by_name(found if found is not None else self.context, name, sock)
            if by_name is not None:
                sock.context = by_name
            elif found is not None:
                sock.context = found
        return None

    def server_of(self, sock):
        server = getattr(sock.context, "mailproxy_server", None)
        return server if server is not None else self.by_context.get(id(sock.context), self.default)


def _ssl_socket(sock):
    # Under gevent's patching OpenSSL hands over the raw socket, which points back at its SSL socket.
    owner = getattr(sock, "_sslsock", None)
    return owner() if owner is not None else sock


def _context_by_name(ctx, name, sock):
    """The context holding the certificate files named after ``name`` (tls_by_name.py), or None.
    A file that failed to load is named on the socket, for the session to log (load_error)."""
    by_name = getattr(ctx, "mailproxy_by_name", None)
    if by_name is None:
        return None
    return by_name.context(name, lambda text: setattr(sock, "mailproxy_certificate_error", text))


def _choose_by_name(sock, name, ctx):
    """sni_callback of a server whose ssl_certificate names $ssl_server_name (and shares no address)."""
    sock = _ssl_socket(sock)
    found = _context_by_name(ctx, name, sock)
    if found is not None:
        sock.context = found
    return None


def load_error(sock):
    """Why the certificate files for this handshake's server name did not load, or None."""
    return getattr(sock, "mailproxy_certificate_error", None)


def prepare(config):
    """Build the context of every server that uses TLS; raise ConfigError as `-t` should report it."""
    fresh = {}
    for server in config.servers:
        if server.uses_tls:
            fresh[id(server)] = (server, build_context(server))
    # Backend-side contexts are made at the same moment, for the same reasons (mailproxy/upstream_tls.py).
    from mailproxy import upstream_tls

    upstream_tls.prepare(config)
    _contexts.clear()
    _contexts.update(fresh)
    sharing = {}
    for server in config.servers:
        for listen in server.listens:
            sharing.setdefault((listen.family, listen.sockaddr), []).append(server)
    _groups.clear()
    for key, servers in sharing.items():
        if len(servers) > 1:
            _groups[key] = SniGroup(servers[0], servers)


def sni_group(listen):
    """The SniGroup of the address `listen` names, or None when one server has it (nginx's case)."""
    return _groups.get((listen.family, listen.sockaddr))


def context_for(server, listen=None) -> ssl.SSLContext:
    group = sni_group(listen) if listen is not None else None
    if group is not None:
        return group.context
    entry = _contexts.get(id(server))
    if entry is None or entry[0] is not server:
        # Only a process that skipped prepare() (an embedding test harness) gets here; it still works,
        # it just does not share ticket keys with siblings.
        entry = (server, build_context(server))
        _contexts[id(server)] = entry
    return entry[1]


def build_context(server, pairs=None) -> ssl.SSLContext:
    """The server's context; ``pairs``: (cert, key) files loaded instead of the server's own, for one
    TLS server name (tls_by_name.py)."""
    _refuse_unsupported(server)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _set_protocols(ctx, server.ssl_protocols)
    try:
        ctx.set_ciphers(server.ssl_ciphers)
    except ssl.SSLError:
        # CPython replaces OpenSSL's reason with its own sentence; the only reason is this one.
        raise ConfigError('SSL_CTX_set_cipher_list("%s") failed (SSL: no cipher match)' % server.ssl_ciphers)
    if server.ssl_prefer_server_ciphers:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE  # CPython sets it by default; nginx does not
    if not server.ssl_session_tickets:
        ctx.options |= ssl.OP_NO_TICKET
    if server.ssl_ecdh_curve != "auto":
        try:
            ctx.set_ecdh_curve(server.ssl_ecdh_curve)
        except (ValueError, ssl.SSLError) as exc:
            raise ConfigError('SSL_CTX_set1_curves_list("%s") failed (%s): Python\'s ssl module sets one '
                              'named EC curve only' % (server.ssl_ecdh_curve, exc))
    if server.ssl_dhparam:
        try:
            ctx.load_dh_params(server.ssl_dhparam)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError('PEM_read_bio_DHparams("%s") failed (%s)' % (server.ssl_dhparam, _any_text(exc)))
    static, by_name = tls_by_name.split_pairs(server)
    _load_certificates(ctx, server, static if pairs is None else pairs)
    _load_client_verification(ctx, server)
    ctx.set_alpn_protocols([server.protocol])
    if pairs is not None:
        ctx.mailproxy_server = server
    elif by_name:
        if not static:
            raise ConfigError('"ssl_certificate" with $ssl_server_name needs one without variables too, '
                              "for clients that send no server name or one without files")
        ctx.mailproxy_by_name = tls_by_name.CertificatesByName(
            by_name, lambda files: build_context(server, files))
        ctx.sni_callback = _choose_by_name
    return ctx


def _refuse_unsupported(server):
    def refuse(directive, why):
        raise ConfigError('"%s" is not supported by mailproxy: %s' % (directive, why))

    if server.ssl_session_ticket_key:
        refuse("ssl_session_ticket_key", "Python's ssl module cannot install ticket keys (workers of one "
               "master share the keys OpenSSL made at start or reload)")
    if server.ssl_conf_command:
        refuse("ssl_conf_command", 'Python\'s ssl module has no SSL_CONF_cmd() for "%s"'
               % server.ssl_conf_command[0][0])
    if server.ssl_certificate_compression:
        refuse("ssl_certificate_compression", "the OpenSSL build Python uses cannot compress certificates")
    if server.ssl_verify_client == "optional_no_ca":
        refuse("ssl_verify_client optional_no_ca", "Python's ssl module cannot accept a certificate that "
               "fails verification")
    if server.ssl_session_timeout != 300.0:
        refuse("ssl_session_timeout", "Python's ssl module keeps OpenSSL's 300 seconds")
    for key in server.ssl_certificate_key:
        if key.startswith(("engine:", "store:")):
            refuse("ssl_certificate_key", 'keys from "%s" need an OpenSSL engine or store' % key)


def _set_protocols(ctx, names):
    usable = sorted((n for n in names if n in _VERSIONS), key=_ORDER.index)
    if not usable:
        # Only SSLv2 asked for: OpenSSL has none, so every handshake fails, as with nginx.
        usable = ["TLSv1.3"]
        ctx.options |= ssl.OP_NO_TLSv1_3
    ctx.minimum_version = _VERSIONS[usable[0]]
    ctx.maximum_version = _VERSIONS[usable[-1]]
    gaps = [n for n in _ORDER[_ORDER.index(usable[0]):_ORDER.index(usable[-1])] if n not in usable]
    with warnings.catch_warnings():
        # Deprecated in favour of min/max versions, but the only way to leave a hole such as TLSv1.1.
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in gaps:
            if name in _NO_VERSION:
                ctx.options |= getattr(ssl, _NO_VERSION[name])


def _load_certificates(ctx, server, pairs):
    passwords = _read_passwords(server.ssl_password_file)
    for cert, key in pairs:
        with _readable(cert) as cert_path, _readable(key) as key_path:
            _check_certificate_file(cert, cert_path)
            _load_pair(ctx, cert, cert_path, key, key_path, passwords)


def _read_passwords(path):
    if path is None:
        return [None]
    try:
        with open(path, "rb") as f:
            lines = [line.rstrip(b"\r\n") for line in f]
    except OSError as exc:
        raise ConfigError('cannot open "%s" (%d: %s)' % (path, exc.errno or 0, exc.strerror))
    lines = [line for line in lines if line]
    if not lines:
        raise ConfigError('no passphrases found in "%s"' % path)
    return lines


def _check_certificate_file(name, path):
    # load_cert_chain reports cert and key problems alike; reading the certificates alone first lets
    # the message name the file at fault, as nginx's does.
    scratch = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        scratch.load_verify_locations(cafile=path)
    except OSError as exc:
        raise ConfigError('cannot load certificate "%s": %s' % (name, _load_failure(exc)))


def _load_pair(ctx, cert, cert_path, key, key_path, passwords):
    last = None
    for password in passwords:
        try:
            ctx.load_cert_chain(cert_path, key_path, password=password)
            return
        except ssl.SSLError as exc:
            if exc.reason in ("KEY_VALUES_MISMATCH", "NO_CERTIFICATE_ASSIGNED"):
                raise ConfigError('SSL_CTX_use_PrivateKey("%s") failed (SSL: %s)' % (key, ssl_error_text(exc)))
            last = exc
        except OSError as exc:
            last = exc
    raise ConfigError('cannot load certificate key "%s": %s' % (key, _load_failure(last)))


def _load_failure(exc):
    if isinstance(exc, ssl.SSLError):
        return "PEM_read_bio() failed (SSL: %s)" % ssl_error_text(exc)
    return "BIO_new_file() failed (%d: %s)" % (exc.errno or 0, exc.strerror or exc)


class _readable:
    """A path OpenSSL can open for a config value: the file itself, or a memfd holding `data:` text."""

    def __init__(self, value):
        self.value = value
        self.fd = None

    def __enter__(self):
        if not self.value.startswith("data:"):
            return self.value
        self.fd = os.memfd_create("mailproxy-tls")
        os.write(self.fd, self.value[5:].encode())
        return "/proc/self/fd/%d" % self.fd

    def __exit__(self, *exc_info):
        if self.fd is not None:
            os.close(self.fd)
        return False


def _load_client_verification(ctx, server):
    if server.ssl_verify_client == "off":
        return
    # OPTIONAL rather than REQUIRED even for `on`: a client without a certificate must get the
    # protocol's "No required SSL certificate" reply (spec 2.0.9), not a handshake alert.
    ctx.verify_mode = ssl.CERT_OPTIONAL
    for directive in ("ssl_client_certificate", "ssl_trusted_certificate"):
        path = getattr(server, directive)
        if path:
            try:
                ctx.load_verify_locations(cafile=path)
            except OSError as exc:
                raise ConfigError('cannot load "%s" file "%s": %s' % (directive, path, _load_failure(exc)))
    if server.ssl_crl:
        try:
            ctx.load_verify_locations(cafile=server.ssl_crl)
        except OSError as exc:
            raise ConfigError('X509_LOOKUP_load_file("%s") failed (%s)' % (server.ssl_crl, _any_text(exc)))
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN


def ssl_error_text(exc):
    text = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], str) else str(exc)
    if text.startswith("["):
        text = text.partition("] ")[2] or text
    cut = text.rfind(" (_ssl.c:")
    return text[:cut] if cut > 0 else text


def _any_text(exc):
    return "SSL: " + ssl_error_text(exc) if isinstance(exc, ssl.SSLError) else "%d: %s" % (exc.errno or 0, exc.strerror)


# -- after the handshake ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SslInfo:
    """What auth_http's Auth-SSL-* lines carry (spec 3.2); None fields are left out."""

    protocol: Optional[str]
    cipher: Optional[str]
    verify: Optional[str]
    subject: Optional[str] = None
    issuer: Optional[str] = None
    serial: Optional[str] = None
    fingerprint: Optional[str] = None
    cert_pem: Optional[str] = None


@dataclass(frozen=True)
class Verdict:
    """The client-certificate check of spec 2.0.9: ok, or the reply kind and the info message."""

    ok: bool
    reply: Optional[str] = None  # "cert_error" | "no_cert"
    message: Optional[str] = None


def client_verdict(sock, server) -> Verdict:
    mode = server.ssl_verify_client
    if mode == "off":
        return Verdict(True)
    der = sock.getpeercert(binary_form=True)
    if der is None:
        if mode == "on":
            return Verdict(False, "no_cert", "client sent no required SSL certificate")
        return Verdict(True)
    error = _depth_error(sock, server)
    if error is not None:
        return Verdict(False, "cert_error", "client SSL certificate verify error: (%d:%s)" % error)
    return Verdict(True)


def _depth_error(sock, server):
    # OpenSSL verified the chain with its own depth limit; ssl_verify_depth 1 (the default) also demands
    # that the certificate be issued by a trusted CA itself, which the issuer name tells.
    if server.ssl_verify_depth != 1:
        return None
    issuer = sock.getpeercert().get("issuer")
    trusted = [ca.get("subject") for ca in sock.context.get_ca_certs()]
    return None if issuer in trusted else _CHAIN_TOO_LONG


def session_info(sock, server) -> SslInfo:
    cipher = sock.cipher()
    verify = None
    fields = {}
    if server.ssl_verify_client != "off":
        der = sock.getpeercert(binary_form=True)
        if der is None:
            verify = "NONE"
        else:
            error = _depth_error(sock, server)
            verify = "SUCCESS" if error is None else "FAILED:" + error[1]
            decoded = sock.getpeercert()
            fields = dict(
                subject=rfc2253(decoded.get("subject", ())),
                issuer=rfc2253(decoded.get("issuer", ())),
                serial=decoded.get("serialNumber"),
                fingerprint=hashlib.sha1(der).hexdigest(),
                cert_pem=ssl.DER_cert_to_PEM_cert(der),
            )
    return SslInfo(protocol=sock.version(), cipher=cipher[0] if cipher else None, verify=verify, **fields)


def rfc2253(name) -> str:
    """CPython's decoded name (RDNs in certificate order) as OpenSSL prints it with XN_FLAG_RFC2253."""
    rdns = []
    for rdn in reversed(name):
        rdns.append("+".join("%s=%s" % (_SHORT_NAMES.get(attr, attr), _escape_value(value)) for attr, value in rdn))
    return ",".join(rdns)


def _escape_value(value: str) -> str:
    out = []
    last = len(value) - 1
    for i, ch in enumerate(value):
        if ch in ',+"\\<>;' or (ch == "#" and i == 0) or (ch == " " and i in (0, last)):
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append("\\%02X" % ord(ch))
        elif ord(ch) > 0x7F:
            # ASN1_STRFLGS_ESC_MSB: each UTF-8 byte of a non-ASCII character as \XX.
            out.append("".join("\\%02X" % b for b in ch.encode("utf-8")))
        else:
            out.append(ch)
    return "".join(out)
