"""TLS to the backends (ours, off by default): proxy_ssl*, proxy_starttls and Auth-SSL-Upstream.

nginx's mail proxy talks plain TCP to its backends (spec 4.1); these directives borrow the names and
defaults of ngx_stream_proxy_module so that an operator who knows one knows the other. With all of them
off and no Auth-SSL-Upstream header, nothing here runs and the backend dialogue is nginx's byte for byte.

When TLS is used: `proxy_ssl on`, `proxy_starttls on`, or the auth server's `Auth-SSL-Upstream: on`
for one session. The header only ever turns TLS on (a backend the configuration protects is never
downgraded by an auth reply), and it follows the server's mode: STARTTLS when `proxy_starttls` is on,
implicit TLS otherwise. `proxy_starttls on` means TLS on, by STARTTLS, whatever `proxy_ssl` says.

Contexts are built in the master next to the client-side ones (client.prepare), for every server: the
header can enable TLS on any of them, and a bad certificate or CA file must fail `-t`, not a session.

Deviations from nginx's stream module, each because Python's ssl has no knob for it:

* The checked name and the SNI name are handled apart: OpenSSL's own host check is off and the name
  (`proxy_ssl_name`, default the backend address) is matched here after the handshake, so that SNI can
  stay off (`proxy_ssl_server_name off`, the default) while the name is still verified.
* `proxy_ssl_verify_depth` is checked after the handshake on the chain OpenSSL built (its own limit is
  OpenSSL's default 100), with OpenSSL's code and text for a chain that is too long.
* Sessions (`proxy_ssl_session_reuse`) are kept per worker, the last one per backend address and port;
  a worker offers it on the next connection to that backend.

`proxy_ssl_conf_command` is the stream module's: SSL_CONF_cmd() on the backend context, through the
OpenSSL bridge (mailproxy/_openssl.pyx), after every other directive; without the bridge `-t` refuses it.
"""

import ipaddress
import ssl

from gevent import ssl as gevent_ssl

from mailproxy.events import READ, WRITE
from mailproxy.tls import openssl
from mailproxy.conf.lexer import ConfigError

HANDSHAKING = "SSL handshaking to upstream"

# X509_V_ERR_CERT_CHAIN_TOO_LONG, as OpenSSL numbers and words it.
_CHAIN_TOO_LONG = (22, "certificate chain too long")

# id(server) -> (server, context): the server is kept so an id reused after a reload never matches.
_contexts = {}
# (id(context), addr, port) -> (context, session); per process, so per worker after fork.
_sessions = {}


class HandshakeFailed(Exception):
    """The backend's TLS did not come up; ``message`` is the error-log line (the client gets the
    protocol's internal-error reply)."""

    def __init__(self, level, message):
        super().__init__(message)
        self.level = level
        self.message = message


def wanted(server, ssl_upstream=False):
    """None (plain TCP, nginx's way), "ssl" (implicit TLS) or "starttls"."""
    if server.proxy_starttls:
        return "starttls"
    if server.proxy_ssl or ssl_upstream:
        return "ssl"
    return None


def prepare(config):
    fresh = {}
    for server in config.servers:
        fresh[id(server)] = (server, build_context(server))
    _contexts.clear()
    _contexts.update(fresh)


def context_for(server) -> ssl.SSLContext:
    entry = _contexts.get(id(server))
    if entry is None or entry[0] is not server:
        entry = (server, build_context(server))
        _contexts[id(server)] = entry
    return entry[1]


def build_context(server) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # the name is matched after the handshake, apart from SNI (module doc)
    openssl.set_protocols(ctx, server.proxy_ssl_protocols)
    openssl.set_ciphers(ctx, server.proxy_ssl_ciphers)
    if server.proxy_ssl_verify:
        if not server.proxy_ssl_trusted_certificate:
            raise ConfigError("no proxy_ssl_trusted_certificate for proxy_ssl_verify")
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_verify_locations(cafile=server.proxy_ssl_trusted_certificate)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError('cannot load "proxy_ssl_trusted_certificate" file "%s": %s'
                              % (server.proxy_ssl_trusted_certificate, openssl.load_failure(exc)))
    else:
        ctx.verify_mode = ssl.CERT_NONE
    cert, key = server.proxy_ssl_certificate, server.proxy_ssl_certificate_key
    if cert and not key:
        raise ConfigError('no "proxy_ssl_certificate_key" is defined for certificate "%s"' % cert)
    if cert:
        openssl.check_certificate_file(cert, cert)
        openssl.load_pair(ctx, cert, cert, key, key, [None])
    if server.proxy_ssl_conf_command:
        _conf_commands(ctx, server.proxy_ssl_conf_command)
    return ctx


def _conf_commands(ctx, commands):
    # Last, as nginx's ngx_stream_proxy_set_ssl() applies them: a command overrides the directives.
    if openssl.bridge is None:
        raise ConfigError('"proxy_ssl_conf_command" is not supported by mailproxy: it needs mailproxy\'s '
                          "OpenSSL bridge, which is off: %s" % openssl.bridge_off_reason)
    try:
        openssl.bridge.conf_commands(ctx, commands)
    except openssl.bridge.BridgeError as exc:
        raise ConfigError(str(exc))


class Handshake:
    """Client-side TLS on a connected, non-blocking backend socket, stepped from the worker's loop.

    ``sock`` is the SSL socket, which owns the descriptor from here on (the plain socket object is
    detached); the caller closes it if the handshake fails.
    """

    __slots__ = ("server", "sock", "name")

    def __init__(self, server, sock, addr, port):
        ctx = context_for(server)
        self.server = server
        self.name = name = server.proxy_ssl_name or addr
        offered = None
        if server.proxy_ssl_session_reuse:
            entry = _sessions.get((id(ctx), addr, port))
            if entry is not None and entry[0] is ctx:
                offered = entry[1]
        self.sock = gevent_ssl.SSLSocket(
            sock=sock, server_side=False, do_handshake_on_connect=False, _context=ctx, _session=offered,
            # CPython never sends an IP literal as SNI, so the default name (the address) sends none either.
            server_hostname=name if server.proxy_ssl_server_name else None,
        )

    def step(self):
        """Go on: None once the handshake is done and the peer checked, else the readiness to wait for
        (events.READ or WRITE). Raises HandshakeFailed."""
        try:
            self.sock._sslobj.do_handshake()
        except ssl.SSLWantReadError:
            return READ
        except ssl.SSLWantWriteError:
            return WRITE
        except ssl.SSLCertVerificationError as exc:
            raise HandshakeFailed("error", "upstream SSL certificate verify error: (%d:%s)"
                                  % (exc.verify_code, exc.verify_message))
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
            raise HandshakeFailed("error", "peer closed connection in SSL handshake")
        except ssl.SSLError as exc:
            raise HandshakeFailed("error", "SSL_do_handshake() failed (SSL: %s)" % openssl.ssl_error_text(exc))
        except OSError as exc:
            raise HandshakeFailed("error", "SSL_do_handshake() failed (%d: %s)" % (exc.errno or 0, exc.strerror))
        if self.server.proxy_ssl_verify:
            _check_peer(self.server, self.sock, self.name)
        return None


def _check_peer(server, tls_sock, name):
    chain = tls_sock._sslobj.get_verified_chain()
    # OpenSSL's depth counts the certificates above the leaf; its own limit was the default 100.
    if len(chain) - 1 > server.proxy_ssl_verify_depth:
        raise HandshakeFailed("error", "upstream SSL certificate verify error: (%d:%s)" % _CHAIN_TOO_LONG)
    if not name_matches(tls_sock.getpeercert(), name):
        raise HandshakeFailed("error", 'upstream SSL certificate does not match "%s"' % name)


def remember(server, tls_sock, addr, port):
    """Keep the session of a backend login that succeeded, to offer on the next connection.

    Called after the login, not after the handshake: TLS 1.3 tickets arrive with the first reads.
    """
    if not server.proxy_ssl_session_reuse:
        return
    session = tls_sock.session
    if session is not None:
        ctx = tls_sock.context
        _sessions[(id(ctx), addr, port)] = (ctx, session)


def name_matches(cert, name) -> bool:
    """RFC 6125 as X509_check_host/X509_check_ip do it: IP literals against IP SANs, host names
    against DNS SANs (a wildcard only as the whole left-most label), the CN only without DNS SANs."""
    sans = cert.get("subjectAltName", ())
    try:
        wanted_ip = ipaddress.ip_address(name)
    except ValueError:
        wanted_ip = None
    if wanted_ip is not None:
        for kind, value in sans:
            if kind == "IP Address":
                try:
                    if ipaddress.ip_address(value.strip()) == wanted_ip:
                        return True
                except ValueError:
                    continue
        return False
    dns = [value for kind, value in sans if kind == "DNS"]
    if not dns:
        dns = [value for rdn in cert.get("subject", ()) for attr, value in rdn if attr == "commonName"]
    host = name.lower().rstrip(".")
    return any(_dns_match(pattern.lower().rstrip("."), host) for pattern in dns)


def _dns_match(pattern, host):
    if pattern == host:
        return True
    if not pattern.startswith("*."):
        return False
    first, dot, rest = host.partition(".")
    return bool(first) and bool(dot) and rest == pattern[2:] and "." in rest
