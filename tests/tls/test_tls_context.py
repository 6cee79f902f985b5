"""mailproxy/tls/client.py on its own: contexts from directives, -t messages, what a handshake tells auth_http."""

import hashlib
import io
import socket
import ssl
import threading

import pytest

from mailproxy.tls import client as tls
from mailproxy.conf import check, load_config


def write_conf(tmp_path, body, listen="listen 127.0.0.1:8993 ssl;"):
    path = tmp_path / "mailproxy.conf"
    path.write_text("events {}\nmail {\n auth_http 127.0.0.1:9000/auth;\n server {\n  protocol imap; %s\n%s\n }\n}\n"
                    % (listen, body))
    return str(path)


def server_settings(tmp_path, body, listen="listen 127.0.0.1:8993 ssl;"):
    return load_config(write_conf(tmp_path, body, listen), prefix=str(tmp_path)).servers[0]


def check_output(tmp_path, body):
    err = io.StringIO()
    status = check(write_conf(tmp_path, body), prefix=str(tmp_path), out=io.StringIO(), err=err, prepare=tls.prepare)
    return status, err.getvalue().splitlines()


def handshake(context, client_context, server_hostname="localhost"):
    """One real handshake over a socketpair; returns (server SSLSocket, client SSLSocket)."""
    a, b = socket.socketpair()
    result = {}

    def serve():
        try:
            result["server"] = context.wrap_socket(a, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            result["error"] = exc

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        client = client_context.wrap_socket(b, server_hostname=server_hostname)
    except (ssl.SSLError, OSError) as exc:
        client = exc
    thread.join(10)
    return result.get("server", result.get("error")), client


def test_rsa_and_ecdsa_pair_both_served(pki, tmp_path):
    server = server_settings(tmp_path, "ssl_certificate %s; ssl_certificate_key %s; ssl_certificate %s; "
                             "ssl_certificate_key %s; ssl_protocols TLSv1.2;"
                             % (pki["server.pem"], pki["server.key"], pki["server_ec.pem"], pki["server_ec.key"]))
    ctx = tls.build_context(server)
    for wanted, ciphers in (("RSA", "ECDHE-RSA-AES128-GCM-SHA256"), ("ECDSA", "ECDHE-ECDSA-AES128-GCM-SHA256")):
        client_ctx = pki.client_context()
        client_ctx.set_ciphers(ciphers)
        srv, cli = handshake(ctx, client_ctx)
        assert not isinstance(cli, Exception), cli
        assert wanted in cli.cipher()[0]
        cli.close()
        srv.close()


def test_protocols_ciphers_and_alpn(pki, tmp_path):
    server = server_settings(tmp_path, pki.tls_directives() + " ssl_protocols TLSv1.2;")
    ctx = tls.build_context(server)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2 == ctx.maximum_version
    assert not ctx.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    client_ctx = pki.client_context()
    client_ctx.set_alpn_protocols(["imap"])
    srv, cli = handshake(ctx, client_ctx)
    assert cli.version() == "TLSv1.2" and cli.selected_alpn_protocol() == "imap"
    cli.close()
    srv.close()
    ctx = tls.build_context(server_settings(tmp_path, pki.tls_directives() + " ssl_prefer_server_ciphers on;"
                                            " ssl_session_tickets off;"))
    assert ctx.options & ssl.OP_CIPHER_SERVER_PREFERENCE and ctx.options & ssl.OP_NO_TICKET


def test_password_file_tries_each_line(pki, tmp_path):
    key = ssl.PEM_cert_to_DER_cert  # noqa: F841 (keeps ssl imported for readers)
    from cryptography.hazmat.primitives import serialization

    plain = serialization.load_pem_private_key(open(pki["server.key"], "rb").read(), None)
    encrypted = plain.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.BestAvailableEncryption(b"right"))
    (tmp_path / "enc.key").write_bytes(encrypted)
    (tmp_path / "passwords").write_text("wrong\nright\n")
    server = server_settings(tmp_path, "ssl_certificate %s; ssl_certificate_key %s; ssl_password_file %s;"
                             % (pki["server.pem"], tmp_path / "enc.key", tmp_path / "passwords"))
    tls.build_context(server)
    (tmp_path / "passwords").write_text("wrong\n")
    status, lines = check_output(tmp_path, "ssl_certificate %s; ssl_certificate_key %s; ssl_password_file %s;"
                                 % (pki["server.pem"], tmp_path / "enc.key", tmp_path / "passwords"))
    assert status == 1
    assert lines[0].startswith('mailproxy: [emerg] cannot load certificate key "%s": ' % (tmp_path / "enc.key"))


@pytest.mark.parametrize("body, message", [
    ("ssl_certificate {missing}; ssl_certificate_key {key};",
     'cannot load certificate "{missing}": BIO_new_file() failed (2: No such file or directory)'),
    ("ssl_certificate {key}; ssl_certificate_key {key};",
     'cannot load certificate "{key}": PEM_read_bio() failed (SSL: no certificate or crl found)'),
    ("ssl_certificate {cert}; ssl_certificate_key {missing};",
     'cannot load certificate key "{missing}": BIO_new_file() failed (2: No such file or directory)'),
    ("ssl_certificate {cert}; ssl_certificate_key {eckey};",
     'SSL_CTX_use_PrivateKey("{eckey}") failed (SSL: no certificate assigned)'),
    ("{tls} ssl_ciphers NOSUCHCIPHER;",
     'SSL_CTX_set_cipher_list("NOSUCHCIPHER") failed (SSL: no cipher match)'),
    # The OpenSSL bridge (mailproxy/_openssl.pyx) gives OpenSSL's own reasons, as nginx's messages do.
    ("{tls} ssl_conf_command NoSuchCommand on;",
     'SSL_CONF_cmd("NoSuchCommand", "on") failed (SSL: error:0A000182:SSL routines::unknown cmd name'
     ':cmd=NoSuchCommand)'),
    ("{tls} ssl_session_ticket_key {key};",
     '"{key}" must be 80 or 48 bytes'),
    ("{tls} ssl_ecdh_curve X25519:nosuchcurve;",
     'SSL_CTX_set1_curves_list("X25519:nosuchcurve") failed (SSL: error:0A080106:SSL routines::passed '
     'invalid argument:group \'nosuchcurve\' cannot be set)'),
    ("{tls} ssl_verify_client on; ssl_client_certificate {missing};",
     'cannot load "ssl_client_certificate" file "{missing}": BIO_new_file() failed (2: No such file or directory)'),
])
def test_check_reports_bad_tls_files(pki, tmp_path, body, message):
    names = dict(missing=str(tmp_path / "missing.pem"), key=pki["server.key"], cert=pki["server.pem"],
                 eckey=pki["server_ec.key"], tls=pki.tls_directives())
    status, lines = check_output(tmp_path, body.format(**names))
    assert status == 1
    assert lines[0] == "mailproxy: [emerg] " + message.format(**names)


def test_check_accepts_good_tls(pki, tmp_path):
    status, lines = check_output(tmp_path, pki.tls_directives() + " ssl_verify_client on; ssl_client_certificate %s;"
                                 % pki["client_ca.pem"])
    assert status == 0, lines


def test_session_info_and_verdicts(pki, tmp_path):
    server = server_settings(tmp_path, pki.tls_directives() + " ssl_verify_client optional; "
                             "ssl_client_certificate %s;" % pki["client_ca.pem"])
    ctx = tls.build_context(server)
    srv, cli = handshake(ctx, pki.client_context("client"))
    info = tls.session_info(srv, server)
    der = srv.getpeercert(binary_form=True)
    from cryptography import x509

    parsed = x509.load_der_x509_certificate(der)
    assert info.protocol == "TLSv1.3" and info.cipher == srv.cipher()[0]
    assert info.verify == "SUCCESS"
    assert info.subject == parsed.subject.rfc4514_string()
    assert info.subject.startswith("CN=Alice\\, Jr.,OU=mail,O=Example\\+Co")
    assert info.issuer == parsed.issuer.rfc4514_string()
    assert info.serial == "%X" % parsed.serial_number if len("%X" % parsed.serial_number) % 2 == 0 \
        else info.serial == "0%X" % parsed.serial_number
    assert info.fingerprint == hashlib.sha1(der).hexdigest()
    assert info.cert_pem == ssl.DER_cert_to_PEM_cert(der)
    assert tls.client_verdict(srv, server).ok
    cli.close()
    srv.close()
    # No certificate: fine for optional (Verify NONE), the no-cert reply for on.
    srv, cli = handshake(ctx, pki.client_context())
    assert tls.session_info(srv, server).verify == "NONE" and tls.client_verdict(srv, server).ok
    required = server_settings(tmp_path, pki.tls_directives() + " ssl_verify_client on; "
                               "ssl_client_certificate %s;" % pki["client_ca.pem"])
    verdict = tls.client_verdict(srv, required)
    assert (verdict.ok, verdict.reply, verdict.message) == (False, "no_cert", "client sent no required SSL certificate")
    cli.close()
    srv.close()


def test_untrusted_client_certificate_completes_the_handshake_then_is_refused(pki, tmp_path):
    # nginx lets the handshake finish and refuses in the protocol's words (spec 2.0.9).
    server = server_settings(tmp_path, pki.tls_directives() + " ssl_verify_client optional; "
                             "ssl_client_certificate %s;" % pki["client_ca.pem"])
    srv, cli = handshake(tls.build_context(server), pki.client_context("stranger"))
    assert isinstance(srv, ssl.SSLSocket), srv
    verdict = tls.client_verdict(srv, server)
    assert (verdict.ok, verdict.reply, verdict.message) == (
        False, "cert_error", "client SSL certificate verify error: (21:unable to verify the first certificate)")
    assert tls.session_info(srv, server).verify == "FAILED:unable to verify the first certificate"
    cli.close()
    srv.close()


def test_rfc2253_escaping():
    name = ((("countryName", "DE"),), (("organizationName", "A;B"),), (("commonName", " x#"),),
            (("commonName", "#é"), ("emailAddress", "a@b")))
    assert tls.rfc2253(name) == "CN=\\#\\C3\\A9+emailAddress=a@b,CN=\\ x#,O=A\\;B,C=DE"
