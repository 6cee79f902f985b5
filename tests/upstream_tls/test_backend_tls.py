"""TLS to the backends (issue 18): real Dovecot (ssl = required) and Postfix (encrypt) behind mailproxy.

proxy_ssl (implicit TLS), proxy_starttls (IMAP STARTTLS, POP3 STLS, SMTP STARTTLS before XCLIENT),
Auth-SSL-Upstream, certificate verification with the right and the wrong CA, verify depth, and a
100 MiB transfer through a TLS backend, checksummed.
"""

import hashlib
import imaplib
import poplib
import re
import smtplib
import socket
import ssl

from support.authserver import RecordingAuthServer
from support.backends import USERS, wait_for_log
from support.harness import free_port, mail_config
from support.servers import TcpServer


def start_edge(mailproxy_master, protocol, backend_port, directives, listen_extra="", mail_extra=""):
    auth = RecordingAuthServer(USERS, {protocol: ("127.0.0.1", backend_port)})
    port = free_port()
    config = mail_config(auth.url, """
    server_name mail.example.test;
    %s
    server { listen 127.0.0.1:%d%s; protocol %s; %s }
}
""" % (mail_extra, port, listen_extra, protocol, directives), timeout="20s")
    master = mailproxy_master(config, handler=None)
    return port, master, auth


def verify_on(pki, ca="ca.pem"):
    return "proxy_ssl_verify on; proxy_ssl_trusted_certificate %s;" % pki[ca]


def imap_login_roundtrip(port):
    imap = imaplib.IMAP4("127.0.0.1", port, timeout=20)
    try:
        assert imap.login("alice", USERS["alice"])[0] == "OK"
        assert imap.select("INBOX")[0] == "OK"
    finally:
        imap.logout()


def dovecot_logged_in_over_tls(dovecot, protocol):
    # Dovecot tags a login that came over TLS with ", TLS" (implicit) or ", TLS" after STARTTLS alike.
    log = wait_for_log(dovecot.log_path, "%s-login: Info: Login: user=<alice>" % protocol)
    lines = [line for line in log.splitlines() if "%s-login: Info: Login: user=<alice>" % protocol in line]
    assert ", TLS" in lines[-1], lines[-1]


def test_imap_implicit_tls_verified(mailproxy_master, dovecot_tls, backend_pki):
    port, master, auth = start_edge(mailproxy_master, "imap", dovecot_tls.imaps_port,
                                    "proxy_ssl on; " + verify_on(backend_pki))
    imap_login_roundtrip(port)
    dovecot_logged_in_over_tls(dovecot_tls, "imap")
    auth.close()
    assert "[error]" not in master.error_log()


def test_imap_starttls_verified(mailproxy_master, dovecot_tls, backend_pki):
    port, master, auth = start_edge(mailproxy_master, "imap", dovecot_tls.imap_port,
                                    "proxy_starttls on; " + verify_on(backend_pki))
    imap_login_roundtrip(port)
    dovecot_logged_in_over_tls(dovecot_tls, "imap")
    auth.close()


def test_imap_wrong_ca_refused(mailproxy_master, dovecot_tls, backend_pki):
    port, master, auth = start_edge(mailproxy_master, "imap", dovecot_tls.imaps_port,
                                    "proxy_ssl on; " + verify_on(backend_pki, "wrong_ca.pem"))
    with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
        assert conn.recv(1024).startswith(b"* OK")
        conn.sendall(b"a LOGIN alice %s\r\n" % USERS["alice"].encode())
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = conn.recv(1024)
            if not chunk:
                break
            reply += chunk
    assert reply == b"* BAD internal server error\r\n"
    log = master.error_log()
    lines = [line for line in log.splitlines() if "upstream SSL certificate verify error" in line]
    assert len(lines) == 1, log
    assert re.search(r"\[error\] .*upstream SSL certificate verify error: \(20:unable to get local issuer "
                     r"certificate\) while SSL handshaking to upstream, client: 127\.0\.0\.1, server: "
                     r"127\.0\.0\.1:\d+, login: \"alice\", upstream: 127\.0\.0\.1:\d+", lines[0]), lines[0]
    assert USERS["alice"] not in log
    auth.close()


def test_wrong_name_refused(mailproxy_master, dovecot_tls, backend_pki):
    port, master, auth = start_edge(mailproxy_master, "pop3", dovecot_tls.pop3s_port,
                                    "proxy_ssl on; proxy_ssl_name other.backend.test; " + verify_on(backend_pki))
    pop = poplib.POP3("127.0.0.1", port, timeout=20)
    pop.user("alice")
    try:
        pop.pass_(USERS["alice"])
        raise AssertionError("a backend with the wrong name was accepted")
    except poplib.error_proto as exc:
        assert exc.args[0] == b"-ERR internal server error"
    assert 'upstream SSL certificate does not match "other.backend.test"' in master.error_log()
    auth.close()


def test_pop3_implicit_and_stls(mailproxy_master, dovecot_tls, backend_pki):
    for directive, backend in (("proxy_ssl on;", dovecot_tls.pop3s_port),
                               ("proxy_starttls on;", dovecot_tls.pop3_port)):
        port, master, auth = start_edge(mailproxy_master, "pop3", backend, directive + verify_on(backend_pki))
        pop = poplib.POP3("127.0.0.1", port, timeout=20)
        pop.user("alice")
        assert pop.pass_(USERS["alice"]).startswith(b"+OK")
        pop.stat()
        pop.quit()
        dovecot_logged_in_over_tls(dovecot_tls, "pop3")
        auth.close()


def test_auth_ssl_upstream_header(mailproxy_master, dovecot_tls, backend_pki):
    """proxy_ssl off; the auth server asks for TLS to this backend for this session."""
    port, master, auth = start_edge(mailproxy_master, "imap", dovecot_tls.imaps_port, verify_on(backend_pki))
    auth.script.append(b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: %d\r\n"
                       b"Auth-SSL-Upstream: on\r\n\r\n" % dovecot_tls.imaps_port)
    imap_login_roundtrip(port)
    dovecot_logged_in_over_tls(dovecot_tls, "imap")
    auth.close()


class FakePop3TlsBackend(TcpServer):
    """A tiny implicit-TLS POP3 backend with one SSLContext, hence stable ticket keys (Dovecot's login
    processes each make their own, so it never resumes) and any certificate chain the test wants."""

    def __init__(self, cert, key):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.resumed = []
        super().__init__()

    def serve_connection(self, conn):
        # A refused handshake (the depth test's) ends in an SSLError, which TcpServer takes quietly.
        with self.ctx.wrap_socket(conn, server_side=True) as tls_conn:
            self.resumed.append(tls_conn.session_reused)
            tls_conn.sendall(b"+OK ready\r\n")
            for reply in (b"+OK\r\n", b"+OK logged in\r\n", b"+OK bye\r\n"):
                if not tls_conn.recv(1024):
                    break
                tls_conn.sendall(reply)


def test_verify_depth(mailproxy_master, backend_pki):
    """A certificate from an intermediate CA: refused at depth 1 (nginx's default), accepted at 2."""
    backend = FakePop3TlsBackend(backend_pki["deep.pem"], backend_pki["deep.key"])
    try:
        for depth, ok in ((1, False), (2, True)):
            port, master, auth = start_edge(mailproxy_master, "pop3", backend.port,
                                            "proxy_ssl on; proxy_ssl_verify_depth %d; " % depth
                                            + verify_on(backend_pki))
            pop = poplib.POP3("127.0.0.1", port, timeout=20)
            pop.user("alice")
            if ok:
                assert pop.pass_(USERS["alice"]) == b"+OK logged in"
            else:
                try:
                    pop.pass_(USERS["alice"])
                    raise AssertionError("a chain deeper than proxy_ssl_verify_depth was accepted")
                except poplib.error_proto:
                    pass
                assert "upstream SSL certificate verify error: (22:certificate chain too long)" in master.error_log()
            pop.close()
            auth.close()
    finally:
        backend.close()


def test_session_reuse(mailproxy_master, backend_pki):
    backend = FakePop3TlsBackend(backend_pki["server.pem"], backend_pki["server.key"])
    try:
        for reuse, expected in (("on", [False, True, True]), ("off", [False, False, False])):
            backend.resumed.clear()
            port, master, auth = start_edge(mailproxy_master, "pop3", backend.port,
                                            "proxy_ssl on; proxy_ssl_session_reuse %s; "
                                            "error_log logs/error.log debug;" % reuse)
            for _ in range(3):
                pop = poplib.POP3("127.0.0.1", port, timeout=20)
                pop.user("alice")
                assert pop.pass_(USERS["alice"]) == b"+OK logged in"
                pop.quit()
            assert backend.resumed == expected
            assert master.error_log().count("upstream SSL session reused") == expected.count(True)
            auth.close()
    finally:
        backend.close()


def test_smtp_starttls_then_xclient(mailproxy_master, postfix_tls, backend_pki):
    port, master, auth = start_edge(mailproxy_master, "smtp", postfix_tls.smtp_port,
                                    "proxy_starttls on; xclient on; smtp_auth login plain; "
                                    + verify_on(backend_pki))
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        client.ehlo("client.example.test")
        client.login("alice", USERS["alice"])
        client.sendmail("alice@%s" % postfix_tls.domain, ["bob@%s" % postfix_tls.domain],
                        b"Subject: over TLS\r\n\r\nbackend-tls-marker\r\n")
    message = postfix_tls.wait_for_message("bob", b"backend-tls-marker")
    # XCLIENT LOGIN= reached Postfix after STARTTLS: the Received line says so (ESMTPSA = TLS + auth).
    assert b"with ESMTPSA" in message, message[:600]
    auth.close()


def test_100_mib_through_tls_backend(mailproxy_master, dovecot_tls, backend_pki):
    """RETR of a 100 MiB message over a TLS backend (copy relay, backend side TLS), checksummed."""
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-mailproxy-tls\r\n"
    body = line * ((100 << 20) // len(line))
    message = b"From: a@example.test\r\nSubject: big\r\n\r\n" + body
    dovecot_tls.deliver("bob", message)
    port, master, auth = start_edge(mailproxy_master, "pop3", dovecot_tls.pop3s_port,
                                    "proxy_ssl on; " + verify_on(backend_pki))
    with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
        reader = conn.makefile("rb")
        assert reader.readline().startswith(b"+OK")
        for command in (b"USER bob\r\n", b"PASS %s\r\n" % USERS["bob"].encode()):
            conn.sendall(command)
            assert reader.readline().startswith(b"+OK")
        conn.sendall(b"RETR 1\r\n")
        assert reader.readline().startswith(b"+OK")
        digest = hashlib.sha256()
        size = 0
        while True:
            got = reader.readline()
            if got == b".\r\n":
                break
            assert got, "connection closed in the middle of the message"
            digest.update(got)
            size += len(got)
        conn.sendall(b"QUIT\r\n")
    assert size == len(message)
    assert digest.hexdigest() == hashlib.sha256(message).hexdigest()
    auth.close()


def test_tls_on_both_sides_and_session_reuse(mailproxy_master, dovecot_tls, backend_pki):
    """Client TLS (listen ... ssl) and backend TLS in one session: the relay's copy path with two SSL
    ends; the second login offers the first one's session (proxy_ssl_session_reuse, on by default)."""
    port, master, auth = start_edge(
        mailproxy_master, "imap", dovecot_tls.imaps_port,
        "proxy_ssl on; ssl_certificate %s; ssl_certificate_key %s; %s"
        % (backend_pki["server.pem"], backend_pki["server.key"], verify_on(backend_pki)),
        listen_extra=" ssl")
    client_ctx = ssl.create_default_context(cafile=backend_pki["ca.pem"])
    client_ctx.check_hostname = False
    for _ in range(2):
        imap = imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=client_ctx, timeout=20)
        assert imap.login("alice", USERS["alice"])[0] == "OK"
        assert imap.select("INBOX")[0] == "OK"
        payload = b"x" * 300000
        assert imap.append("INBOX", None, None, b"Subject: both\r\n\r\n" + payload + b"\r\n")[0] == "OK"
        imap.logout()
    dovecot_logged_in_over_tls(dovecot_tls, "imap")
    auth.close()
