"""What both sides of TLS build their contexts with (client.py towards clients, upstream.py towards
backends): the bridge to OpenSSL itself, protocol versions, certificate, key and passphrase files, and
OpenSSL's error texts in nginx's words.

The bridge (mailproxy/_openssl.pyx) reaches the SSL_CTX and SSL behind Python's ssl objects; it is used
only when its own checks on live objects pass (`problem()`), else `bridge` is None and
`bridge_off_reason` says why, and the directives that need it are refused at `-t`.
"""

import os
import ssl
import warnings

from mailproxy.conf.lexer import ConfigError


def _load_bridge():
    """(the _openssl module, None) when it may be used, else (None, why not)."""
    if os.environ.get("MAILPROXY_OPENSSL_BRIDGE", "").lower() == "off":
        return None, "MAILPROXY_OPENSSL_BRIDGE=off is set"
    try:
        from mailproxy import _openssl
    except ImportError as exc:
        return None, "mailproxy._openssl is not built (%s)" % exc
    reason = _openssl.problem()
    return (None, reason) if reason else (_openssl, None)


bridge, bridge_off_reason = _load_bridge()

VERSIONS = {
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

def set_ciphers(ctx, ciphers):
    try:
        ctx.set_ciphers(ciphers)
    except ssl.SSLError:
        # CPython replaces OpenSSL's reason with its own sentence; the only reason is this one.
        raise ConfigError('SSL_CTX_set_cipher_list("%s") failed (SSL: no cipher match)' % ciphers) from None


def set_protocols(ctx, names):
    usable = sorted((n for n in names if n in VERSIONS), key=_ORDER.index)
    if not usable:
        # Only SSLv2 asked for: OpenSSL has none, so every handshake fails, as with nginx.
        usable = ["TLSv1.3"]
        ctx.options |= ssl.OP_NO_TLSv1_3
    ctx.minimum_version = VERSIONS[usable[0]]
    ctx.maximum_version = VERSIONS[usable[-1]]
    gaps = [n for n in _ORDER[_ORDER.index(usable[0]):_ORDER.index(usable[-1])] if n not in usable]
    with warnings.catch_warnings():
        # Deprecated in favour of min/max versions, but the only way to leave a hole such as TLSv1.1.
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in gaps:
            if name in _NO_VERSION:
                ctx.options |= getattr(ssl, _NO_VERSION[name])


def read_passwords(path):
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


def check_certificate_file(name, path):
    # load_cert_chain reports cert and key problems alike; reading the certificates alone first lets
    # the message name the file at fault, as nginx's does.
    scratch = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        scratch.load_verify_locations(cafile=path)
    except OSError as exc:
        raise ConfigError('cannot load certificate "%s": %s' % (name, load_failure(exc)))


def load_pair(ctx, cert, cert_path, key, key_path, passwords):
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
    raise ConfigError('cannot load certificate key "%s": %s' % (key, load_failure(last)))


def load_failure(exc):
    if isinstance(exc, ssl.SSLError):
        return "PEM_read_bio() failed (SSL: %s)" % ssl_error_text(exc)
    return "BIO_new_file() failed (%d: %s)" % (exc.errno or 0, exc.strerror or exc)


class readable:
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


def ssl_error_text(exc):
    """OpenSSL's reason as nginx shows it, without Python's "[SSL: NAME]" prefix and "(_ssl.c:N)" tail."""
    text = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], str) else str(exc)
    if text.startswith("["):
        text = text.partition("] ")[2] or text
    cut = text.rfind(" (_ssl.c:")
    return text[:cut] if cut > 0 else text


def any_text(exc):
    return "SSL: " + ssl_error_text(exc) if isinstance(exc, ssl.SSLError) else "%d: %s" % (exc.errno or 0, exc.strerror)
