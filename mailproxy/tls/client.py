"""Client-side TLS: one ssl.SSLContext per server block, and what the session learns from a handshake.

Where contexts are made, and why there. `prepare(config)` runs in the master (at start, at reload and
for `-t`) before any worker is forked, so:

* a bad certificate, key or CA file fails `-t` and start with nginx's `cannot load certificate ...`
  wording, and a reload with one keeps the old configuration;
* key files are read as root, before workers drop to `user`;
* session tickets resume across workers: without `ssl_session_ticket_key`, OpenSSL makes a context's
  ticket keys when the context is created, and every worker forked from the master holds a copy of the
  same context, hence the same keys. They change at each reload (new contexts), unless a shared cache
  holds them (below), as nginx's;
* a shared session cache is mapped before the fork, so that every worker sees one.

nginx's semantics come from OpenSSL itself, through mailproxy/_openssl.pyx (the bridge): it reaches the
SSL_CTX behind each context and the SSL behind each socket, after checking on live objects that CPython
and mailproxy use one libssl and the object layout it expects. With the bridge:

* `ssl_session_cache off|none|builtin[:size]|shared:name:size` and `ssl_session_timeout` are set as
  nginx's ngx_ssl_session_cache() sets them; `none` claims a cache and stores nothing. A shared cache is
  memory mapped in the master before the workers are forked and kept across reloads while its name and
  size stay, so every worker of the master resumes every session (see SharedZone for its sizing).
* `ssl_session_ticket_key` installs nginx's 48- and 80-byte keys (the first encrypts, all decrypt), so
  tickets survive restarts and resume on every node sharing the files. Without it, a server with a
  shared cache keeps its ticket keys in the zone and rotates them there, as nginx 1.23.2 and later do:
  the current key encrypts until ssl_session_timeout after its last ticket, the previous one still
  decrypts, and tickets survive reloads.
* `ssl_verify_client` lets the handshake finish whatever the verification says and reads the result
  afterwards, as nginx does: a refused certificate gets the protocol's `SSL certificate error` reply,
  `optional_no_ca` passes certificates from unknown CAs on, `Auth-SSL-Verify` carries `FAILED:reason`.
* `ssl_ecdh_curve` takes OpenSSL's groups lists, `ssl_conf_command` runs SSL_CONF_cmd() after every
  other directive (as nginx orders them), ALPN refuses a client that lists only other protocols.
* Sessions are marked shut down when their SSL is freed, so a connection closed without close_notify
  stays resumable, as with nginx.

When a check fails (or MAILPROXY_OPENSSL_BRIDGE=off), only Python's ssl module is used: the directives
that need the bridge are refused at `-t` with the reason, ALPN lets a client without the protocol's name
through, sessions are cached per worker whatever `ssl_session_cache` says, and a client certificate that
does not verify ends the handshake with an alert. `mailproxy-master -V` says which case holds.
"""

import hashlib
import ssl
from dataclasses import dataclass
from typing import Optional

from mailproxy.tls import by_name, openssl
from mailproxy.conf.lexer import ConfigError


# X509_V_ERR_* codes ssl_verify_client optional_no_ca lets through (nginx's ngx_ssl_verify_error_optional).
_NO_CA_ERRORS = frozenset({
    2,   # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT
    18,  # X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT
    19,  # X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN
    20,  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21,  # X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE
})

# shared:name:size session caches: name -> SharedZone, kept by the master across reloads.
_zones = {}
_zones_used = set()

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


class ServerTls:
    """A client's TLS connection: OpenSSL's SSL object (CPython's ``_ssl._SSLSocket``, in ``_sslobj``)
    over the session's own non-blocking socket, and what the handshake's callbacks note on it.

    Why not gevent's SSLSocket: building one costs two io watchers and three system calls (getsockname,
    getsockopt, getpeername; and libev's fcntl check per watcher) plus some 10 us of Python a session,
    for waits the session never makes (it steps the handshake and every read and write itself from the
    loop). The SSL object keeps weak references to the socket and to this owner, which CPython's
    server-name callback receives as its first argument (by_name and SniGroup note the name, the
    certificate error and the chosen context here).
    """

    __slots__ = ("_sock", "_sslobj", "mailproxy_server_name", "mailproxy_certificate_error", "__weakref__")

    def __init__(self, sock, context):
        """``sock``: the session's socket (events.Socket, which takes weak references); the handshake has not
        begun. Raises what CPython's wrap raises (ssl.SSLError, OSError)."""
        self._sock = sock
        self.mailproxy_server_name = None
        self.mailproxy_certificate_error = None
        self._sslobj = context._wrap_socket(sock, True, None, owner=self)

    @property
    def context(self):
        return self._sslobj.context

    @context.setter
    def context(self, context):
        # From the server-name callback: OpenSSL's SSL_set_SSL_CTX, the certificate of that name.
        self._sslobj.context = context

    @property
    def family(self):
        return self._sock.family

    def fileno(self):
        return self._sock.fileno()

    def getsockname(self):
        return self._sock.getsockname()

    def getpeercert(self, binary_form=False):
        return self._sslobj.getpeercert(binary_form)

    def cipher(self):
        return self._sslobj.cipher()

    def version(self):
        return self._sslobj.version()

    def close(self):
        self._sslobj = None
        self._sock.close()


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
    """The context holding the certificate files named after ``name`` (by_name.py), or None.
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
    _zones_used.clear()
    for server in config.servers:
        if server.uses_tls:
            fresh[id(server)] = (server, build_context(server))
    for name in set(_zones) - _zones_used:
        del _zones[name]  # workers already forked keep their own mapping of it
    # Backend-side contexts are made at the same moment, for the same reasons (mailproxy/upstream.py).
    from mailproxy.tls import upstream

    upstream.prepare(config)
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
    TLS server name (by_name.py)."""
    _refuse_unsupported(server)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    openssl.set_protocols(ctx, server.ssl_protocols)
    openssl.set_ciphers(ctx, server.ssl_ciphers)
    if server.ssl_prefer_server_ciphers:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE  # CPython sets it by default; nginx does not
    if not server.ssl_session_tickets:
        ctx.options |= ssl.OP_NO_TICKET
    _set_curves(ctx, server.ssl_ecdh_curve)
    if server.ssl_dhparam:
        try:
            ctx.load_dh_params(server.ssl_dhparam)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError('PEM_read_bio_DHparams("%s") failed (%s)' % (server.ssl_dhparam, openssl.any_text(exc)))
    static, named = by_name.split_pairs(server)
    loaded = static if pairs is None else pairs
    _load_certificates(ctx, server, loaded)
    _load_client_verification(ctx, server)
    if openssl.bridge is not None:
        openssl.bridge.alpn(ctx, server.protocol)
        # As nginx: a handshake flight or a command's records in one read(2), not two a record. What is
        # read ahead waits in the SSL, where events.Connection.pending() looks.
        openssl.bridge.read_ahead(ctx)
        _set_sessions(ctx, server, loaded)
        if server.ssl_conf_command:
            # Last, as nginx applies them: a command overrides what the directives above set.
            try:
                openssl.bridge.conf_commands(ctx, server.ssl_conf_command)
            except openssl.bridge.BridgeError as exc:
                raise ConfigError(str(exc))
    else:
        ctx.set_alpn_protocols([_ALPN_NAMES.get(server.protocol, server.protocol)])
    if pairs is not None:
        ctx.mailproxy_server = server
    elif named:
        if not static:
            raise ConfigError('"ssl_certificate" with $ssl_server_name needs one without variables too, '
                              "for clients that send no server name or one without files")
        ctx.mailproxy_by_name = by_name.CertificatesByName(
            named, lambda files: build_context(server, files))
        ctx.sni_callback = _choose_by_name
    return ctx


# The ALPN protocol IDs (IANA registry) of the protocols mailproxy serves.
_ALPN_NAMES = {"imap": "imap", "pop3": "pop3", "smtp": "smtp", "sieve": "managesieve"}


def _set_curves(ctx, curves):
    if curves == "auto":
        return  # OpenSSL's own list, as nginx leaves it
    if openssl.bridge is not None:
        try:
            openssl.bridge.groups(ctx, curves)
        except openssl.bridge.BridgeError as exc:
            raise ConfigError(str(exc))
        return
    try:
        ctx.set_ecdh_curve(curves)
    except (ValueError, ssl.SSLError) as exc:
        raise ConfigError('SSL_CTX_set1_curves_list("%s") failed (%s): without mailproxy\'s OpenSSL bridge '
                          '(%s) one named curve only can be set' % (curves, exc, openssl.bridge_off_reason))


def _set_sessions(ctx, server, pairs):
    """ssl_session_cache, ssl_session_timeout, ssl_session_ticket_key and the session id context."""
    cache = server.ssl_session_cache
    zone = None
    if cache in ("off", "none"):
        openssl.bridge.session_cache(ctx, cache, timeout=server.ssl_session_timeout)
    else:
        builtin, zone = None, None
        for entry in cache:
            if entry[0] == "builtin":
                builtin = entry[1] or 0
            else:
                zone = _shared_zone(entry[1], entry[2])
        openssl.bridge.session_cache(ctx, "cache", builtin, zone, timeout=server.ssl_session_timeout)
        ctx.mailproxy_zone = zone  # the SSL_CTX points into it: it must live as long as the context
    openssl.bridge.session_id_context(ctx, _session_id_context(server, pairs))
    keys = [_read_ticket_key(path) for path in server.ssl_session_ticket_key]
    if keys:
        openssl.bridge.ticket_keys(ctx, keys)
    elif zone is not None and server.ssl_session_tickets:
        openssl.bridge.shared_ticket_keys(ctx)


def _shared_zone(name, size):
    """The zone named ``name``: the one the master already has when its size is unchanged (nginx keeps
    a zone's contents across reloads the same way), else a new one."""
    zone = _zones.get(name)
    if zone is None or zone.size != size:
        if name in _zones_used:
            raise ConfigError('the size %d of shared memory zone "%s" conflicts with already declared size %d'
                              % (size, name, zone.size))
        zone = _zones[name] = openssl.bridge.SharedZone(size)
    _zones_used.add(name)
    return zone


def _session_id_context(server, pairs):
    """Sessions resume only on a context with the same certificates, CAs and verification, as nginx's
    ngx_ssl_session_id_context() ensures (several servers may share an address: SniGroup). Contents,
    not file names, so that nodes sharing ticket keys resume each other's sessions."""
    digest = hashlib.sha1(b"MAIL")
    digest.update(server.protocol.encode())
    digest.update(("%s:%d" % (server.ssl_verify_client, server.ssl_verify_depth)).encode())
    names = [cert for cert, _ in pairs]
    if server.ssl_verify_client != "off":
        names += [server.ssl_client_certificate, server.ssl_trusted_certificate, server.ssl_crl]
    for name in names:
        if not name:
            digest.update(b"-")
        elif name.startswith("data:"):
            digest.update(name.encode())
        else:
            try:
                with open(name, "rb") as f:
                    digest.update(f.read())
            except OSError:
                digest.update(name.encode())  # loading it failed already, with nginx's message
    return digest.digest()


def _read_ticket_key(path):
    try:
        with open(path, "rb") as f:
            data = f.read(81)
    except OSError as exc:
        raise ConfigError('open() "%s" failed (%d: %s)' % (path, exc.errno or 0, exc.strerror))
    if len(data) not in (48, 80):
        raise ConfigError('"%s" must be 80 or 48 bytes' % path)
    return data


def _refuse_unsupported(server):
    def refuse(directive, why):
        raise ConfigError('"%s" is not supported by mailproxy: %s' % (directive, why))

    if server.ssl_certificate_compression:
        if ssl.OPENSSL_VERSION_INFO < (3, 2):
            refuse("ssl_certificate_compression", "%s cannot compress certificates (3.2 or later can)"
                   % ssl.OPENSSL_VERSION)
        refuse("ssl_certificate_compression", "mailproxy does not set certificate compression yet")
    for key in server.ssl_certificate_key:
        if key.startswith(("engine:", "store:")):
            refuse("ssl_certificate_key", 'keys from "%s" need an OpenSSL engine or store' % key)
    if openssl.bridge is not None:
        return
    why = "it needs mailproxy's OpenSSL bridge, which is off: %s" % openssl.bridge_off_reason
    if server.ssl_session_ticket_key:
        refuse("ssl_session_ticket_key", why)
    if server.ssl_conf_command:
        refuse("ssl_conf_command", why)
    if server.ssl_verify_client == "optional_no_ca":
        refuse("ssl_verify_client optional_no_ca", why)
    if server.ssl_session_timeout != 300.0:
        refuse("ssl_session_timeout", why)
    if server.ssl_ecdh_curve != "auto" and ":" in server.ssl_ecdh_curve:
        refuse("ssl_ecdh_curve", why)


def _load_certificates(ctx, server, pairs):
    passwords = openssl.read_passwords(server.ssl_password_file)
    for cert, key in pairs:
        with openssl.readable(cert) as cert_path, openssl.readable(key) as key_path:
            openssl.check_certificate_file(cert, cert_path)
            openssl.load_pair(ctx, cert, cert_path, key, key_path, passwords)


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
                with openssl.readable(path) as readable:
                    ctx.load_verify_locations(cafile=readable)
            except OSError as exc:
                raise ConfigError('cannot load "%s" file "%s": %s' % (directive, path, openssl.load_failure(exc)))
    if server.ssl_crl:
        try:
            ctx.load_verify_locations(cafile=server.ssl_crl)
        except OSError as exc:
            raise ConfigError('X509_LOOKUP_load_file("%s") failed (%s)' % (server.ssl_crl, openssl.any_text(exc)))
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN
    if openssl.bridge is not None:
        try:
            with openssl.readable(server.ssl_client_certificate or "") as client_ca:
                openssl.bridge.verify_client(ctx, server.ssl_verify_depth, client_ca or None)
        except openssl.bridge.BridgeError as exc:
            raise ConfigError(str(exc))


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
    """After each handshake: the client-certificate check of spec 2.0.9, in nginx's order (the
    verification's result, then the certificate `on` requires)."""
    if openssl.bridge is not None:
        openssl.bridge.keep_session(sock)
    mode = server.ssl_verify_client
    if mode == "off":
        return Verdict(True)
    error = _verify_error(sock, server)
    if error is not None and not (mode == "optional_no_ca" and error[0] in _NO_CA_ERRORS):
        _forget_session(sock)
        return Verdict(False, "cert_error", "client SSL certificate verify error: (%d:%s)" % error)
    if mode == "on" and sock.getpeercert(binary_form=True) is None:
        _forget_session(sock)
        return Verdict(False, "no_cert", "client sent no required SSL certificate")
    return Verdict(True)


def _forget_session(sock):
    # A refused client must not resume its way past the check (nginx's ngx_ssl_remove_cached_session).
    if openssl.bridge is not None:
        openssl.bridge.remove_session(sock)


def _verify_error(sock, server):
    """(X509_V_ERR code, OpenSSL's text) of the client certificate's verification, or None."""
    if sock.getpeercert(binary_form=True) is None:
        return None
    if openssl.bridge is not None:
        code, text = openssl.bridge.verify_result(sock)
        return None if code == 0 else (code, text)
    # Without the bridge OpenSSL verified the chain with its own depth limit (a failure was an alert);
    # ssl_verify_depth 1 (the default) also demands that the certificate be issued by a trusted CA
    # itself, which the issuer name tells.
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
            error = _verify_error(sock, server)
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
