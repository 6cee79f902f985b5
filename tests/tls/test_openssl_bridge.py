"""The OpenSSL bridge (mailproxy/_openssl.pyx) against real peers: `openssl s_client` and Python clients
through a real mailproxy master, one directive at a time, each as nginx behaves (issue 22)."""

import _ssl
import imaplib
import itertools
import os
import re
import socket
import ssl
import subprocess
import time

import pytest

from mailproxy.tls import client as client_tls
from mailproxy.tls import openssl

from support.authserver import RecordingAuthServer
from support.backends import require
from support.harness import free_port

OPENSSL = "/usr/bin/openssl"


@pytest.fixture(autouse=True)
def bridge_active():
    if openssl.bridge is None:
        pytest.fail("the OpenSSL bridge is off here: %s" % openssl.bridge_off_reason)


def s_client(pki, port, *args, send=b"a LOGOUT\r\n"):
    """One `openssl s_client` session that sends ``send`` and reads until the server closes."""
    require(OPENSSL)
    return subprocess.run(
        [OPENSSL, "s_client", "-connect", "127.0.0.1:%d" % port, "-servername", "localhost",
         "-CAfile", pki["server_ca.pem"], "-verify_return_error", "-ign_eof", *args],
        input=send, capture_output=True, timeout=30)


def greeted(result):
    return b"* OK IMAP4 ready" in result.stdout


def resumed(pki, port, tmp_path, *args):
    """Whether a second s_client resumes the session the first one saved."""
    saved = str(tmp_path / ("session-%d" % port))
    first = s_client(pki, port, "-sess_out", saved, *args)
    assert greeted(first) and b"\nNew, " in first.stdout, first.stdout + first.stderr
    if not os.path.exists(saved):
        return False  # neither a session ID nor a ticket: s_client had nothing to save
    second = s_client(pki, port, "-sess_in", saved, *args)
    assert greeted(second), second.stdout + second.stderr
    return b"\nReused, " in second.stdout


def imap_servers(pki, ports, directives, main="", mail=""):
    servers = "".join("    server { listen 127.0.0.1:%d ssl; protocol imap; %s }\n" % (ports[name], text)
                      for name, text in directives.items())
    return """
%s
error_log logs/error.log info;
events { worker_connections 64; }
mail {
    auth_http 127.0.0.1:%d/auth;
    %s
    %s
%s}
""" % (main, free_port(), pki.tls_directives(), mail, servers)


def started(mailproxy_master, config):
    """A master running mailproxy's own sessions (the fixture's default is a mini IMAP handler)."""
    return mailproxy_master(config, handler=None)


# -- ALPN ------------------------------------------------------------------------------------------


def test_alpn(pki, mailproxy_master):
    ports = {"imaps": free_port()}
    started(mailproxy_master, imap_servers(pki, ports, {"imaps": ""}))
    offered = s_client(pki, ports["imaps"], "-alpn", "imap")
    assert greeted(offered) and b"ALPN protocol: imap" in offered.stdout
    # A client that lists both is served the protocol's name.
    both = s_client(pki, ports["imaps"], "-alpn", "h2,imap")
    assert greeted(both) and b"ALPN protocol: imap" in both.stdout
    none = s_client(pki, ports["imaps"])
    assert greeted(none) and b"No ALPN negotiated" in none.stdout
    # Only a foreign protocol: the fatal no_application_protocol alert (120), as nginx sends it.
    foreign = s_client(pki, ports["imaps"], "-alpn", "h2")
    assert not greeted(foreign)
    assert b"no application protocol" in foreign.stderr and b"alert number 120" in foreign.stderr, foreign.stderr


# -- session caches and tickets -------------------------------------------------------------------

CACHES = {
    "none_tickets": ("ssl_session_cache none;", True),
    "none": ("ssl_session_cache none; ssl_session_tickets off;", False),
    "off_tickets": ("ssl_session_cache off;", True),
    "off": ("ssl_session_cache off; ssl_session_tickets off;", False),
    "builtin": ("ssl_session_cache builtin; ssl_session_tickets off;", True),
    "builtin_size": ("ssl_session_cache builtin:1000; ssl_session_tickets off;", True),
    "shared": ("ssl_session_cache shared:SSL:1m; ssl_session_tickets off;", True),
    "both": ("ssl_session_cache builtin:1000 shared:SSL:1m; ssl_session_tickets off;", True),
    "default": ("", True),  # nginx's default: cache none, tickets on
}


@pytest.mark.parametrize("version", ["-tls1_3", "-tls1_2"])
def test_session_cache_modes(pki, mailproxy_master, tmp_path, version):
    ports = {name: free_port() for name in CACHES}
    started(mailproxy_master, imap_servers(pki, ports, {name: CACHES[name][0] for name in CACHES}))
    outcome = {name: resumed(pki, ports[name], tmp_path, version) for name in CACHES}
    assert outcome == {name: CACHES[name][1] for name in CACHES}


def test_shared_cache_resumes_across_workers_and_reloads(pki, mailproxy_master, tmp_path):
    ports = {"shared": free_port(), "builtin": free_port()}
    master = started(mailproxy_master, imap_servers(pki, ports, {
        "shared": "ssl_session_cache shared:SSL:1m; ssl_session_tickets off;",
        "builtin": "ssl_session_cache builtin; ssl_session_tickets off;",
    }, main="worker_processes 2;"))
    ctx = pki.client_context()

    def connect(port, session=None):
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        conn = ctx.wrap_socket(raw, server_hostname="localhost", session=session)
        assert conn.recv(100) == b"* OK IMAP4 ready\r\n"  # the session arrives with it in TLS 1.3
        local = conn.getsockname()[1]
        master.wait_log("client 127.0.0.1:%d connected" % local)
        line = [entry for entry in master.error_log().splitlines()
                if "client 127.0.0.1:%d connected" % local in entry][0]
        pid = int(re.search(r"\] (\d+)#", line).group(1))
        session, reused = conn.session, conn.session_reused
        try:
            # close_notify: OpenSSL drops the session of a connection that ends in an unexpected EOF.
            conn.unwrap()
        except (ssl.SSLError, OSError):
            pass  # the server closed without answering it
        conn.close()
        return pid, session, reused

    # No tickets: only the shared cache knows the sessions. A TLS 1.3 session resumes once (OpenSSL
    # removes it from the cache then), so each connection offers the one the previous got.
    first_pid, session, _ = connect(ports["shared"])
    for _ in range(200):
        pid, session, reused = connect(ports["shared"], session)
        assert reused
        if pid != first_pid:
            break
    else:
        pytest.fail("every connection went to worker %d" % first_pid)
    _, builtin_session, _ = connect(ports["builtin"])
    # A reload makes new contexts and workers: the zone (same name and size) keeps its sessions, a
    # builtin cache starts empty, as with nginx.
    master.reload()
    assert connect(ports["shared"], session)[2]
    assert not connect(ports["builtin"], builtin_session)[2]


def test_session_timeout(pki, mailproxy_master, tmp_path):
    ports = {"short": free_port(), "day": free_port()}
    started(mailproxy_master, imap_servers(pki, ports, {
        "short": "ssl_session_timeout 1s;", "day": "ssl_session_timeout 1d;"}))
    for name, lifetime in (("short", b"1 (seconds)"), ("day", b"86400 (seconds)")):
        result = s_client(pki, ports[name], "-tls1_2")
        assert b"TLS session ticket lifetime hint: " + lifetime in result.stdout, result.stdout


# -- ticket keys -----------------------------------------------------------------------------------


def test_ticket_keys_shared_across_masters_and_rotated(pki, mailproxy_master, tmp_path):
    keys = {}
    for name, size in (("a48", 48), ("b80", 80), ("c80", 80)):
        path = tmp_path / (name + ".key")
        path.write_bytes(os.urandom(size))
        keys[name] = str(path)
    nodes = {
        "one": "ssl_session_ticket_key %s;" % keys["a48"],
        "two": "ssl_session_ticket_key %s;" % keys["a48"],
        # Rotated: a new key encrypts, the old one still decrypts.
        "rotated": "ssl_session_ticket_key %s; ssl_session_ticket_key %s;" % (keys["b80"], keys["a48"]),
        "other": "ssl_session_ticket_key %s;" % keys["c80"],
    }
    ports = {name: free_port() for name in nodes}
    for name, directives in nodes.items():
        # One master per node, as a cluster runs them; no session cache, so only tickets resume.
        started(mailproxy_master, imap_servers(pki, {name: ports[name]}, {name: directives}))
    for version in ("-tls1_3", "-tls1_2"):
        saved = str(tmp_path / ("ticket" + version))
        first = s_client(pki, ports["one"], "-sess_out", saved, version)
        assert greeted(first) and b"\nNew, " in first.stdout
        for name, expected in (("two", True), ("rotated", True), ("other", False), ("one", True)):
            again = s_client(pki, ports[name], "-sess_in", saved, version)
            assert greeted(again)
            assert (b"\nReused, " in again.stdout) is expected, (version, name, again.stdout)


@pytest.mark.parametrize("version", ["-tls1_3", "-tls1_2"])
def test_tickets_without_key_files_survive_a_reload_with_a_shared_cache(pki, mailproxy_master, tmp_path, version):
    """Without ssl_session_ticket_key, a server with a shared cache keeps its ticket keys in the zone
    (nginx 1.23.2 and later): the same in every worker, kept by a reload. With a builtin cache the keys
    are the context's own, new after a reload. The caches themselves hold nothing here (`none` beside
    the shared one would not do: tickets are what resumes)."""
    ports = {"shared": free_port(), "builtin": free_port()}
    master = started(mailproxy_master, imap_servers(pki, ports, {
        "shared": "ssl_session_cache shared:TICKETS:1m;",
        "builtin": "ssl_session_cache builtin;",
    }, main="worker_processes 2;"))
    saved = {}
    for name in ports:
        saved[name] = str(tmp_path / ("ticket-%s%s" % (name, version)))
        first = s_client(pki, ports[name], "-sess_out", saved[name], version)
        assert greeted(first) and b"\nNew, " in first.stdout
        assert b"TLS session ticket:" in first.stdout  # a ticket, not only a session id
    master.reload()
    again = {name: s_client(pki, ports[name], "-sess_in", saved[name], version) for name in ports}
    assert b"\nReused, " in again["shared"].stdout, again["shared"].stdout
    assert b"\nNew, " in again["builtin"].stdout, again["builtin"].stdout


def ticket_key_name(output):
    """The key name of the ticket s_client printed: the ticket's first 16 bytes (OpenSSL's layout)."""
    dump = output.split(b"TLS session ticket:", 1)[1]
    first = re.search(rb"0000 - ([0-9a-f -]{47})", dump)
    assert first, output
    return first.group(1).replace(b"-", b" ").replace(b" ", b"")


def test_shared_ticket_keys_rotate_and_the_previous_key_still_resumes(pki, mailproxy_master, tmp_path):
    """nginx's ngx_ssl_rotate_ticket_keys, for the keys a shared cache keeps: once the previous key can
    no longer be needed (ssl_session_timeout after the current one's first use), a new key encrypts the
    tickets, and a ticket made under the one before it still resumes and is renewed under the new one."""
    port = free_port()
    started(mailproxy_master, imap_servers(pki, {"imaps": port}, {
        "imaps": "ssl_session_cache shared:ROTATE:1m; ssl_session_timeout 2s;"}))
    latest_under_first = str(tmp_path / "ticket-0")
    first = s_client(pki, port, "-tls1_2", "-sess_out", latest_under_first)
    first_key = ticket_key_name(first.stdout)
    deadline = time.monotonic() + 20  # the rotation is due 2-3 s on (time(2)'s whole seconds)
    for attempt in itertools.count(1):
        assert time.monotonic() < deadline, "the ticket key never rotated"
        saved = str(tmp_path / ("ticket-%d" % attempt))
        current_key = ticket_key_name(s_client(pki, port, "-tls1_2", "-sess_out", saved).stdout)
        if current_key != first_key:
            break
        latest_under_first = saved
    again = s_client(pki, port, "-tls1_2", "-sess_in", latest_under_first)
    assert b"\nReused, " in again.stdout, again.stdout
    assert ticket_key_name(again.stdout) == current_key


def test_ticket_key_survives_restart(pki, mailproxy_master, tmp_path):
    key = tmp_path / "ticket.key"
    key.write_bytes(os.urandom(80))
    port = free_port()
    config = imap_servers(pki, {"imaps": port}, {"imaps": "ssl_session_ticket_key %s;" % key})
    master = started(mailproxy_master, config)
    saved = str(tmp_path / "session")
    assert greeted(s_client(pki, port, "-sess_out", saved))
    master.stop()
    started(mailproxy_master, config)
    assert b"\nReused, " in s_client(pki, port, "-sess_in", saved).stdout


def test_ticket_key_file_of_wrong_size_fails_the_check(pki, mailproxy_master, tmp_path):
    key = tmp_path / "short.key"
    key.write_bytes(os.urandom(32))
    master = mailproxy_master(imap_servers(pki, {"imaps": free_port()},
                                           {"imaps": "ssl_session_ticket_key %s;" % key}), start=False)
    result = master.cli("-t")
    assert result.returncode == 1
    assert '[emerg] "%s" must be 80 or 48 bytes' % key in result.stderr


# -- client certificates ---------------------------------------------------------------------------


def test_optional_no_ca_passes_unknown_ca_to_the_auth_server(pki, mailproxy_master):
    auth = RecordingAuthServer({}, {})
    port = free_port()
    config = """
events { worker_connections 64; }
mail {
    auth_http %s;
    auth_http_pass_client_cert on;
    %s
    server { listen 127.0.0.1:%d ssl; protocol imap; ssl_verify_client optional_no_ca;
             ssl_client_certificate %s; }
}
""" % (auth.url, pki.tls_directives(), port, pki["client_ca.pem"])
    try:
        started(mailproxy_master, config)
        imap = imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=pki.client_context("stranger"), timeout=20)
        assert imap.welcome == b"* OK IMAP4 ready"
        with pytest.raises(imaplib.IMAP4.error):
            imap.login("mallory", "secret")  # the auth server knows nobody: the request is what counts
        imap.shutdown()
        headers = auth.requests[-1][1]
    finally:
        auth.close()
    # nginx's words: FAILED and X509_verify_cert_error_string() of the verification's result.
    assert headers["auth-ssl-verify"] == b"FAILED:unable to verify the first certificate"
    assert headers["auth-ssl-subject"] and headers["auth-ssl-issuer"].endswith(b",O=unrelated CA")
    assert headers["auth-ssl-cert"]


def test_optional_refuses_unknown_ca_after_the_handshake(pki, mailproxy_master):
    port = free_port()
    master = started(mailproxy_master, imap_servers(pki, {"imaps": port}, {
        "imaps": "ssl_verify_client optional; ssl_client_certificate %s;" % pki["client_ca.pem"]}))
    result = s_client(pki, port, "-cert", pki["stranger.pem"], "-key", pki["stranger.key"])
    # The handshake completes; the refusal is the protocol's, as nginx words it (spec 2.0.9).
    assert b"* BYE SSL certificate error" in result.stdout, result.stdout + result.stderr
    master.wait_log("client SSL certificate verify error: (21:unable to verify the first certificate)")


def test_crl_revokes_a_client_certificate(pki, mailproxy_master, tmp_path):
    require(OPENSSL)
    # A CA of our own with a CRL listing the client's serial, made with the openssl command line.
    ca_dir = tmp_path / "ca"
    ca_dir.mkdir()
    (ca_dir / "index.txt").write_text("")
    (ca_dir / "crlnumber").write_text("01\n")
    (ca_dir / "ca.cnf").write_text(
        "[ca]\ndefault_ca = d\n[d]\ndatabase = %s/index.txt\ncrlnumber = %s/crlnumber\n"
        "default_md = sha256\ndefault_crl_days = 2\n" % (ca_dir, ca_dir))

    def run(*args):
        subprocess.run([OPENSSL, *args], check=True, capture_output=True, cwd=str(ca_dir), timeout=30)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=crl test CA", "-keyout", "ca.key",
        "-out", "ca.pem", "-days", "2")
    for name in ("good", "bad"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=%s" % name, "-keyout", name + ".key",
            "-out", name + ".csr")
        run("x509", "-req", "-in", name + ".csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", name + ".pem", "-days", "2")
    run("ca", "-config", "ca.cnf", "-keyfile", "ca.key", "-cert", "ca.pem", "-revoke", "bad.pem")
    run("ca", "-config", "ca.cnf", "-keyfile", "ca.key", "-cert", "ca.pem", "-gencrl", "-out", "crl.pem")
    port = free_port()
    master = started(mailproxy_master, imap_servers(pki, {"imaps": port}, {
        "imaps": "ssl_verify_client on; ssl_client_certificate %s/ca.pem; ssl_crl %s/crl.pem;" % (ca_dir, ca_dir)}))
    good = s_client(pki, port, "-cert", str(ca_dir / "good.pem"), "-key", str(ca_dir / "good.key"))
    assert greeted(good), good.stdout + good.stderr
    bad = s_client(pki, port, "-cert", str(ca_dir / "bad.pem"), "-key", str(ca_dir / "bad.key"))
    assert b"* BYE SSL certificate error" in bad.stdout, bad.stdout + bad.stderr
    master.wait_log("client SSL certificate verify error: (23:certificate revoked)")


# -- curves and SSL_CONF_cmd -----------------------------------------------------------------------


def test_curve_list(pki, mailproxy_master):
    port = free_port()
    started(mailproxy_master, imap_servers(pki, {"imaps": port}, {"imaps": "ssl_ecdh_curve secp384r1:prime256v1;"}))
    # TLS 1.2 clients offer ECDHE only: with no common curve they would fall back to RSA key exchange.
    for version in (("-tls1_3",), ("-tls1_2", "-cipher", "ECDHE")):
        listed = s_client(pki, port, *version, "-groups", "prime256v1")
        assert greeted(listed) and b"prime256v1" in listed.stdout, listed.stdout
        preferred = s_client(pki, port, *version, "-groups", "X25519:secp384r1")
        assert greeted(preferred) and b"secp384r1" in preferred.stdout, preferred.stdout
        unlisted = s_client(pki, port, *version, "-groups", "X25519")
        assert not greeted(unlisted) and b"handshake failure" in unlisted.stderr, unlisted.stderr


def test_conf_command_applies_and_bad_one_fails_the_check(pki, mailproxy_master, tmp_path):
    port = free_port()
    # nginx's example: prefer ChaCha20 for clients that rank it first.
    started(mailproxy_master, imap_servers(pki, {"imaps": port}, {
        "imaps": "ssl_protocols TLSv1.2; ssl_prefer_server_ciphers on; "
                 "ssl_ciphers ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-CHACHA20-POLY1305; "
                 "ssl_conf_command Options PrioritizeChaCha;"}))
    # -tls1_2: the client's list must start with ChaCha20, not with TLS 1.3's suites.
    chacha_first = s_client(pki, port, "-tls1_2", "-cipher", "ECDHE-RSA-CHACHA20-POLY1305:ECDHE-RSA-AES256-GCM-SHA384")
    assert b"Cipher is ECDHE-RSA-CHACHA20-POLY1305" in chacha_first.stdout, chacha_first.stdout
    aes_first = s_client(pki, port, "-tls1_2", "-cipher", "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-CHACHA20-POLY1305")
    assert b"Cipher is ECDHE-RSA-AES256-GCM-SHA384" in aes_first.stdout, aes_first.stdout
    master = mailproxy_master(imap_servers(pki, {"imaps": free_port()}, {
        "imaps": "ssl_conf_command Options NoSuchOption;"}), start=False)
    result = master.cli("-t")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert ('[emerg] SSL_CONF_cmd("Options", "NoSuchOption") failed (SSL: error:0A000180:SSL routines::'
            'bad value:cmd=Options, value=NoSuchOption)') in result.stderr, result.stderr


# -- deployments' settings -------------------------------------------------------------------------

INTERMEDIATE_CIPHERS = ("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
                        "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
                        "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384")


@pytest.fixture
def dhparam(tmp_path):
    require(OPENSSL)
    path = tmp_path / "dhparam.pem"
    # RFC 7919's ffdhe2048, what Mozilla's generator tells operators to fetch.
    subprocess.run([OPENSSL, "genpkey", "-genparam", "-algorithm", "DH", "-pkeyopt", "group:ffdhe2048",
                    "-out", str(path)], check=True, capture_output=True, timeout=30)
    return str(path)


def deployment(pki, ports, tls_conf):
    """A mail block shaped like the deployment's: its TLS settings at mail level, IMAPS and STARTTLS."""
    return """
error_log logs/error.log info;
events { worker_connections 64; }
mail {
    auth_http 127.0.0.1:%d/auth;
    %s
    server { listen 127.0.0.1:%d ssl; protocol imap; }
    server { listen 127.0.0.1:%d; protocol imap; starttls only; }
}
""" % (free_port(), tls_conf, ports["imaps"], ports["imap"])


def test_mailu_tls_settings(pki, mailproxy_master, dhparam, tmp_path):
    # Mailu's core/nginx/conf/tls.conf, with both of its certificate pairs.
    tls_conf = """
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_ciphers %s;
    ssl_prefer_server_ciphers off;
    ssl_session_timeout 1d;
    ssl_session_tickets off;
    ssl_dhparam %s;
    ssl_certificate %s;
    ssl_certificate_key %s;
    ssl_certificate %s;
    ssl_certificate_key %s;
""" % (INTERMEDIATE_CIPHERS, dhparam, pki["server.pem"], pki["server.key"], pki["server_ec.pem"],
       pki["server_ec.key"])
    ports = {"imaps": free_port(), "imap": free_port()}
    started(mailproxy_master, deployment(pki, ports, tls_conf))
    for cipher, key in (("ECDHE-ECDSA-AES128-GCM-SHA256", b"id-ecPublicKey"),
                        ("ECDHE-RSA-AES128-GCM-SHA256", b"rsaEncryption"),
                        ("DHE-RSA-AES128-GCM-SHA256", b"rsaEncryption")):
        result = s_client(pki, ports["imaps"], "-tls1_2", "-cipher", cipher)
        assert greeted(result) and b"Cipher is " + cipher.encode() in result.stdout, result.stdout
        assert b"Server public key is" in result.stdout
    ecdsa = s_client(pki, ports["imaps"], "-tls1_3", "-sigalgs", "ECDSA+SHA256")
    assert greeted(ecdsa) and b"Peer signature type: ECDSA" in ecdsa.stdout, ecdsa.stdout
    rsa = s_client(pki, ports["imaps"], "-tls1_3", "-sigalgs", "RSA-PSS+SHA256")
    assert greeted(rsa) and b"Peer signature type: RSA-PSS" in rsa.stdout, rsa.stdout
    starttls = s_client(pki, ports["imap"], "-starttls", "imap")
    assert b"* BYE" in starttls.stdout and b"Verify return code: 0 (ok)" in starttls.stdout, starttls.stdout
    assert b"TLS session ticket lifetime hint" not in s_client(pki, ports["imaps"], "-tls1_2").stdout
    assert resumed(pki, ports["imaps"], tmp_path, "-tls1_2") is False  # no cache, no tickets: Mailu's choice


def test_mozilla_modern(pki, mailproxy_master, tmp_path):
    tls_conf = """
    %s
    ssl_session_timeout 1d;
    ssl_session_cache shared:MozSSL:10m;
    ssl_session_tickets off;
    ssl_protocols TLSv1.3;
    ssl_ecdh_curve X25519:prime256v1:secp384r1;
    ssl_prefer_server_ciphers off;
""" % pki.tls_directives()
    ports = {"imaps": free_port(), "imap": free_port()}
    started(mailproxy_master, deployment(pki, ports, tls_conf))
    modern = s_client(pki, ports["imaps"])
    assert greeted(modern) and b"New, TLSv1.3" in modern.stdout and b"X25519" in modern.stdout
    assert not greeted(s_client(pki, ports["imaps"], "-tls1_2"))
    assert b"* BYE" in s_client(pki, ports["imap"], "-starttls", "imap").stdout
    assert resumed(pki, ports["imaps"], tmp_path)


def test_mozilla_intermediate(pki, mailproxy_master, dhparam, tmp_path):
    tls_conf = """
    %s
    ssl_session_timeout 1d;
    ssl_session_cache shared:MozSSL:10m;
    ssl_session_tickets off;
    ssl_dhparam %s;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_ecdh_curve X25519:prime256v1:secp384r1;
    ssl_ciphers %s;
    ssl_prefer_server_ciphers off;
""" % (pki.tls_directives(), dhparam, INTERMEDIATE_CIPHERS)
    ports = {"imaps": free_port(), "imap": free_port()}
    started(mailproxy_master, deployment(pki, ports, tls_conf))
    assert greeted(s_client(pki, ports["imaps"], "-tls1_3"))
    dhe = s_client(pki, ports["imaps"], "-tls1_2", "-cipher", "DHE-RSA-AES256-GCM-SHA384")
    assert greeted(dhe) and b"Cipher is DHE-RSA-AES256-GCM-SHA384" in dhe.stdout, dhe.stdout
    assert not greeted(s_client(pki, ports["imaps"], "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"))
    assert b"* BYE" in s_client(pki, ports["imap"], "-starttls", "imap").stdout
    assert resumed(pki, ports["imaps"], tmp_path, "-tls1_2") and resumed(pki, ports["imaps"], tmp_path, "-tls1_3")


# -- the bridge's guard ----------------------------------------------------------------------------


def test_version_guard_refuses_another_library():
    from mailproxy import _openssl

    assert _openssl.problem() is None
    reason = _openssl.problem(_ssl.OPENSSL_VERSION_NUMBER + 1)
    assert reason == "Python's ssl module runs OpenSSL 0x%08x and mailproxy._openssl 0x%08x" % (
        _ssl.OPENSSL_VERSION_NUMBER + 1, _ssl.OPENSSL_VERSION_NUMBER)


def test_bridge_rejects_foreign_objects():
    from mailproxy import _openssl

    with pytest.raises(TypeError):
        _openssl.groups(object(), "X25519")
    with pytest.raises(TypeError):
        _openssl.verify_result(socket.socket())


def test_bridge_off_refuses_only_what_needs_it(pki, mailproxy_master, tmp_path):
    key = tmp_path / "ticket.key"
    key.write_bytes(os.urandom(48))
    env = {"MAILPROXY_OPENSSL_BRIDGE": "off"}
    plain = mailproxy_master(imap_servers(pki, {"imaps": free_port()}, {"imaps": ""}), start=False, env=env)
    assert plain.cli("-t").returncode == 0
    version = plain.cli("-V")
    assert "OpenSSL bridge (mailproxy._openssl): linked with " in version.stderr
    assert "off: MAILPROXY_OPENSSL_BRIDGE=off is set\n" in version.stderr, version.stderr
    assert version.stderr.rstrip().endswith("TLS relay: copy loop (the bridge is off)"), version.stderr
    for directive, text in (("ssl_session_ticket_key %s;" % key, "ssl_session_ticket_key"),
                            ("ssl_verify_client optional_no_ca;", "ssl_verify_client optional_no_ca"),
                            ("ssl_conf_command Options PrioritizeChaCha;", "ssl_conf_command"),
                            ("ssl_session_timeout 1d;", "ssl_session_timeout"),
                            ("ssl_ecdh_curve X25519:prime256v1;", "ssl_ecdh_curve")):
        master = mailproxy_master(imap_servers(pki, {"imaps": free_port()}, {"imaps": directive}),
                                  start=False, env=env)
        result = master.cli("-t")
        assert result.returncode == 1
        assert ('[emerg] "%s" is not supported by mailproxy: it needs mailproxy\'s OpenSSL bridge, which is '
                'off: MAILPROXY_OPENSSL_BRIDGE=off is set' % text) in result.stderr, result.stderr
    active = mailproxy_master(imap_servers(pki, {"imaps": free_port()}, {"imaps": ""}), start=False)
    assert active.cli("-V").stderr.rstrip().endswith("), active\nTLS relay: pump")


def test_close_without_close_notify_keeps_the_session(pki, tmp_path):
    """nginx marks every connection shut down before SSL_free(), whichever way it ends; OpenSSL drops
    a session whose connection was not from its cache. client_tls.client_verdict(), after each handshake,
    marks it here; a connection it did not see shows what the mark prevents."""
    import threading

    from mailproxy.conf import load_config

    conf = tmp_path / "mailproxy.conf"
    conf.write_text("events {}\nmail {\n auth_http 127.0.0.1:9/auth;\n server { protocol imap; "
                    "listen 127.0.0.1:%d ssl; %s ssl_session_cache builtin; ssl_session_tickets off; }\n}\n"
                    % (free_port(), pki.tls_directives()))
    server = load_config(str(conf), prefix=str(tmp_path)).servers[0]
    ctx = client_tls.build_context(server)
    client_ctx = pki.client_context()

    def connect(session, mark):
        a, b = socket.socketpair()
        done = {}

        def serve():
            srv = ctx.wrap_socket(a, server_side=True)
            if mark:
                client_tls.client_verdict(srv, server)
            srv.sendall(b"* OK\r\n")
            srv.close()  # no close_notify, as when a session ends by a timeout or an error
            done["ok"] = True

        thread = threading.Thread(target=serve)
        thread.start()
        cli = client_ctx.wrap_socket(b, server_hostname="localhost", session=session)
        assert cli.recv(10) == b"* OK\r\n"
        thread.join(10)
        assert done
        reused, session = cli.session_reused, cli.session
        cli.close()
        return reused, session

    _, session = connect(None, mark=True)
    reused, session = connect(session, mark=False)
    assert reused
    # That connection was not marked: its session left the cache when its SSL was freed.
    assert not connect(session, mark=True)[0]


def test_ticket_key_with_password_file(pki, mailproxy_master, tmp_path):
    require(OPENSSL)
    encrypted = tmp_path / "server-encrypted.key"
    subprocess.run([OPENSSL, "pkey", "-in", pki["server.key"], "-aes256", "-passout", "pass:second",
                    "-out", str(encrypted)], check=True, capture_output=True, timeout=30)
    (tmp_path / "passwords").write_text("first\nsecond\n")
    key = tmp_path / "ticket.key"
    key.write_bytes(os.urandom(80))
    port = free_port()
    config = imap_servers(pki, {"imaps": port}, {"imaps": (
        "ssl_certificate %s; ssl_certificate_key %s; ssl_password_file %s; ssl_session_ticket_key %s;"
        % (pki["server.pem"], encrypted, tmp_path / "passwords", key))})
    started(mailproxy_master, config.replace(pki.tls_directives(), ""))
    assert resumed(pki, port, tmp_path)
    starttls_port = free_port()
    starttls = config.replace("listen 127.0.0.1:%d ssl; protocol imap;" % port,
                              "listen 127.0.0.1:%d; protocol imap; starttls on;" % starttls_port)
    started(mailproxy_master, starttls.replace(pki.tls_directives(), ""))
    result = s_client(pki, starttls_port, "-starttls", "imap")
    assert b"* BYE" in result.stdout and b"Verify return code: 0 (ok)" in result.stdout, result.stdout
