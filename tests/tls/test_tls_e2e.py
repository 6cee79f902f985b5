"""TLS end to end: real clients through a real mailproxy master to real Dovecot and Postfix (issue 8).

Implicit TLS and STARTTLS for the three protocols, client certificates and every Auth-SSL header
(compared with Debian's nginx when it is installed), session resumption across two workers, handshake
failures, and the STARTTLS command-injection case.
"""

import imaplib
import poplib
import re
import smtplib
import socket
import ssl
import struct
import subprocess

import pytest

from support import nginxref
from support.authserver import RecordingAuthServer
from support.backends import USERS, require
from support.harness import free_port, wait_for

SERVERS = ("imaps", "imap", "pop3s", "pop3", "smtps", "smtp", "verify", "optional")
OPENSSL = "/usr/bin/openssl"


@pytest.fixture
def edge(pki, dovecot, postfix, mailproxy_master):
    auth = RecordingAuthServer(USERS, {"imap": ("127.0.0.1", dovecot.imap_port),
                                       "pop3": ("127.0.0.1", dovecot.pop3_port),
                                       "smtp": ("127.0.0.1", postfix.smtp_port)})
    ports = {name: free_port() for name in SERVERS}
    verify = "ssl_client_certificate %s; auth_http_pass_client_cert on;" % pki["client_ca.pem"]
    config = """
worker_processes 2;
error_log logs/error.log info;
events { worker_connections 256; }
mail {
    auth_http %s;
    timeout 10s;
    xclient on;
    server_name mail.example.test;
    %s
    server { listen 127.0.0.1:%d ssl; protocol imap; }
    server { listen 127.0.0.1:%d; protocol imap; starttls on; }
    server { listen 127.0.0.1:%d ssl; protocol pop3; }
    server { listen 127.0.0.1:%d; protocol pop3; starttls only; }
    server { listen 127.0.0.1:%d ssl; protocol smtp; }
    server { listen 127.0.0.1:%d; protocol smtp; starttls on; }
    server { listen 127.0.0.1:%d ssl; protocol imap; ssl_verify_client on; %s }
    server { listen 127.0.0.1:%d; protocol pop3; starttls on; ssl_verify_client optional; %s }
}
""" % ((auth.url, pki.tls_directives()) + tuple(ports[n] for n in SERVERS[:6])
       + (ports["verify"], verify, ports["optional"], verify))
    master = mailproxy_master(config, handler=None)
    edge = type("Edge", (), {})()
    edge.ports, edge.auth, edge.master, edge.pki = ports, auth, master, pki
    yield edge
    auth.close()
    log = master.error_log()
    assert "[alert]" not in log, log


def last_auth(edge):
    return edge.auth.requests[-1][1]


def assert_ssl_headers(headers, version="TLSv1.3"):
    assert headers["auth-ssl"] == b"on"
    assert headers["auth-ssl-protocol"] == version.encode()
    assert headers["auth-ssl-cipher"]


def test_a_command_sent_with_the_handshakes_last_flight_is_answered(edge):
    """The client's Finished and its first command leave in one segment: the proxy reads both in one
    read (read-ahead, as nginx's contexts), and the command, left inside OpenSSL where no socket event
    announces it, is answered all the same."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = edge.pki.client_context().wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with socket.create_connection(("127.0.0.1", edge.ports["imaps"]), timeout=8) as sock:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                data = sock.recv(65536)
                assert data, "the proxy closed during the handshake"
                incoming.write(data)
        tls.write(b"a1 CAPABILITY\r\n")
        sock.sendall(outgoing.read())  # the Finished (TLS 1.3) and the command together
        received = b""
        while b"a1 OK" not in received:
            try:
                received += tls.read(65536)
            except ssl.SSLWantReadError:
                data = sock.recv(65536)  # the socket's timeout fails a proxy that never answers
                assert data, "closed by the proxy after %r" % received
                incoming.write(data)
    assert received.startswith(b"* OK IMAP4 ready\r\n* CAPABILITY IMAP4")


def test_a_client_gone_before_the_handshake_is_logged_as_nginx_logs_it(edge):
    """nginx's ngx_ssl_handshake: a system call that fails with OpenSSL's queue empty is the peer closing,
    with the errno when there is one; an EOF without one."""
    with socket.create_connection(("127.0.0.1", edge.ports["imaps"])) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends RST
    edge.master.wait_log("peer closed connection in SSL handshake (104: Connection reset by peer) while SSL "
                         "handshaking, client: 127.0.0.1")
    socket.create_connection(("127.0.0.1", edge.ports["imaps"])).close()
    wait_for(lambda: edge.master.error_log().count("peer closed connection in SSL handshake while") == 1,
             10, "the EOF's line")


def test_imaps_login(edge):
    imap = imaplib.IMAP4_SSL("127.0.0.1", edge.ports["imaps"], ssl_context=edge.pki.client_context(), timeout=20)
    assert imap.welcome == b"* OK IMAP4 ready"
    assert imap.login("alice", USERS["alice"])[0] == "OK"
    assert imap.select("INBOX")[0] == "OK"
    assert imap.logout()[0] == "BYE"
    headers = last_auth(edge)
    assert_ssl_headers(headers)
    assert "auth-ssl-verify" not in headers and "auth-ssl-subject" not in headers
    edge.master.wait_log("proxied session done")


def test_imap_starttls_login_and_capabilities(edge):
    imap = imaplib.IMAP4("127.0.0.1", edge.ports["imap"], timeout=20)
    assert "STARTTLS" in imap.capabilities
    imap.starttls(ssl_context=edge.pki.client_context())
    assert "STARTTLS" not in imap.capabilities  # imaplib asks again after the handshake
    assert imap.login("bob", USERS["bob"])[0] == "OK"
    imap.logout()
    assert_ssl_headers(last_auth(edge))
    edge.master.wait_log("client logged in, client: 127.0.0.1 using starttls, server: 127.0.0.1:%d"
                         % edge.ports["imap"])


def test_pop3s_and_stls(edge):
    pop = poplib.POP3_SSL("127.0.0.1", edge.ports["pop3s"], context=edge.pki.client_context(), timeout=20)
    pop.user("alice")
    assert pop.pass_(USERS["alice"]).startswith(b"+OK")
    pop.stat()
    pop.quit()
    assert_ssl_headers(last_auth(edge))
    pop = poplib.POP3("127.0.0.1", edge.ports["pop3"], timeout=20)
    with pytest.raises(poplib.error_proto):  # starttls only: no login in the clear
        pop.user("alice")
    pop.stls(context=edge.pki.client_context())
    pop.user("alice")
    assert pop.pass_(USERS["alice"]).startswith(b"+OK")
    pop.quit()
    assert_ssl_headers(last_auth(edge))


def test_smtps_and_starttls(edge):
    with smtplib.SMTP_SSL("127.0.0.1", edge.ports["smtps"], context=edge.pki.client_context(), timeout=20) as smtp:
        smtp.ehlo("client.test")
        assert not smtp.has_extn("starttls")
        smtp.login("alice", USERS["alice"])
        smtp.noop()
    assert_ssl_headers(last_auth(edge))
    with smtplib.SMTP("127.0.0.1", edge.ports["smtp"], timeout=20) as smtp:
        smtp.ehlo("client.test")
        assert smtp.has_extn("starttls")
        smtp.starttls(context=edge.pki.client_context())
        smtp.ehlo("client.test")
        assert not smtp.has_extn("starttls")
        smtp.login("bob", USERS["bob"])
        assert smtp.noop()[0] == 250
    assert_ssl_headers(last_auth(edge))


def test_client_certificate_headers(edge):
    imap = imaplib.IMAP4_SSL("127.0.0.1", edge.ports["verify"], ssl_context=edge.pki.client_context("client"),
                             timeout=20)
    assert imap.login("alice", USERS["alice"])[0] == "OK"
    imap.logout()
    headers = last_auth(edge)
    assert headers["auth-ssl-verify"] == b"SUCCESS"
    assert headers["auth-ssl-subject"].startswith(b"CN=Alice\\, Jr.,OU=mail,O=Example\\+Co")
    # trustme puts a random OU before the O it was given: RFC 2253 lists the most specific first.
    assert headers["auth-ssl-issuer"].endswith(b",O=mailproxy test client CA")
    assert re.fullmatch(rb"[0-9A-F]+", headers["auth-ssl-serial"])
    assert re.fullmatch(rb"[0-9a-f]{40}", headers["auth-ssl-fingerprint"])
    assert headers["auth-ssl-cert"].startswith(b"-----BEGIN%20CERTIFICATE-----%0A")


def test_verify_on_without_certificate_gets_no_cert_line(edge):
    with socket.create_connection(("127.0.0.1", edge.ports["verify"]), timeout=10) as raw:
        conn = edge.pki.client_context().wrap_socket(raw, server_hostname="localhost")
        assert conn.recv(100) == b"* BYE No required SSL certificate\r\n"
        assert conn.recv(100) == b""
    edge.master.wait_log("client sent no required SSL certificate while SSL handshaking")


def test_optional_starttls_without_certificate(edge):
    pop = poplib.POP3("127.0.0.1", edge.ports["optional"], timeout=20)
    pop.stls(context=edge.pki.client_context())
    pop.user("alice")
    pop.pass_(USERS["alice"])
    pop.quit()
    assert last_auth(edge)["auth-ssl-verify"] == b"NONE"


def test_handshake_failure_logged_and_worker_alive(edge):
    workers = sorted(edge.master.workers())
    with socket.create_connection(("127.0.0.1", edge.ports["imaps"]), timeout=10) as conn:
        conn.sendall(b"a LOGIN alice secret\r\n")  # plain text where a ClientHello belongs
        try:
            assert conn.recv(100) == b""
        except ConnectionResetError:
            pass  # closed with our line unread: the kernel answers with a reset
    edge.master.wait_log("SSL_do_handshake() failed (SSL: ")
    assert "while SSL handshaking, client: 127.0.0.1, server: 127.0.0.1:%d" % edge.ports["imaps"] \
        in edge.master.error_log()
    assert sorted(edge.master.workers()) == workers
    imap = imaplib.IMAP4_SSL("127.0.0.1", edge.ports["imaps"], ssl_context=edge.pki.client_context(), timeout=20)
    imap.logout()


def test_starttls_injection_never_runs_buffered_command(edge):
    with socket.create_connection(("127.0.0.1", edge.ports["imap"]), timeout=10) as raw:
        reader = raw.makefile("rb")
        assert reader.readline() == b"* OK IMAP4 ready\r\n"
        raw.sendall(b"a STARTTLS\r\nb LOGIN alice " + USERS["alice"].encode() + b"\r\n")
        assert reader.readline() == b"a OK completed\r\n"
        conn = edge.pki.client_context().wrap_socket(raw, server_hostname="localhost")
        conn.sendall(b"c NOOP\r\n")
        assert conn.recv(100) == b"c OK completed\r\n"
        conn.close()
    assert edge.auth.requests == []


def test_resumption_across_two_workers(edge):
    """Tickets from one worker are accepted by the other: the context (and its ticket keys) came from
    the master before fork."""
    ctx = edge.pki.client_context()
    port = edge.ports["imaps"]

    def connect(session=None):
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        conn = ctx.wrap_socket(raw, server_hostname="localhost", session=session)
        assert conn.recv(100) == b"* OK IMAP4 ready\r\n"  # the TLS 1.3 ticket arrives with it
        local = conn.getsockname()[1]
        edge.master.wait_log("client 127.0.0.1:%d connected" % local)
        line = [l for l in edge.master.error_log().splitlines() if "client 127.0.0.1:%d connected" % local in l][0]
        pid = int(re.search(r"\] (\d+)#", line).group(1))
        session, reused = conn.session, conn.session_reused
        conn.close()
        return pid, session, reused

    first_pid, session, _ = connect()
    seen = set()
    for _ in range(200):
        pid, _, reused = connect(session)
        seen.add(pid)
        if pid != first_pid:
            assert reused
            return
    pytest.fail("every connection went to worker %d" % first_pid)


def test_openssl_s_client(edge):
    require(OPENSSL)
    pki = edge.pki
    cases = [
        (["-connect", "127.0.0.1:%d" % edge.ports["imap"], "-starttls", "imap"], b"a LOGOUT\r\n", b"* BYE"),
        (["-connect", "127.0.0.1:%d" % edge.ports["pop3"], "-starttls", "pop3"], b"QUIT\r\n", b"+OK"),
        (["-connect", "127.0.0.1:%d" % edge.ports["smtp"], "-starttls", "smtp"], b"QUIT\r\n", b"221 2.0.0"),
        (["-connect", "127.0.0.1:%d" % edge.ports["verify"], "-cert", pki["client.pem"], "-key", pki["client.key"]],
         b"a LOGOUT\r\n", b"* OK IMAP4 ready"),
    ]
    for args, command, expected in cases:
        result = subprocess.run([OPENSSL, "s_client", "-quiet", "-verify_return_error", "-CAfile",
                                 pki["server_ca.pem"], "-servername", "localhost", *args],
                                input=command, capture_output=True, timeout=20)
        assert expected in result.stdout, (args, result.stdout, result.stderr)


def test_auth_ssl_headers_match_nginx(edge):
    """The same client certificate through Debian's nginx and through mailproxy: same Auth-SSL lines."""
    if not nginxref.available():
        require(nginxref.NGINX)
    pki = edge.pki
    client_ctx = pki.client_context("client")
    client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2  # Debian's nginx 1.22 defaults to TLS <= 1.2
    port = free_port()
    auth = RecordingAuthServer(USERS, {"imap": ("127.0.0.1", 9)})
    block = """
    auth_http %s;
    %s
    ssl_verify_client on; ssl_client_certificate %s; auth_http_pass_client_cert on;
    server { listen 127.0.0.1:%d ssl; protocol imap; }
""" % (auth.url, pki.tls_directives(), pki["client_ca.pem"], port)
    try:
        with nginxref.NginxMail(block, [port]):
            imap = imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=client_ctx, timeout=20)
            with pytest.raises(imaplib.IMAP4.error):
                imap.login("nobody", "wrong")
            imap.shutdown()
    finally:
        auth.close()
    imap = imaplib.IMAP4_SSL("127.0.0.1", edge.ports["verify"], ssl_context=client_ctx, timeout=20)
    with pytest.raises(imaplib.IMAP4.error):
        imap.login("nobody", "wrong")
    imap.shutdown()
    theirs = {k: v for k, v in auth.requests[-1][1].items() if k.startswith("auth-ssl")}
    ours = {k: v for k, v in last_auth(edge).items() if k.startswith("auth-ssl")}
    assert set(ours) == set(theirs) == {"auth-ssl", "auth-ssl-protocol", "auth-ssl-cipher", "auth-ssl-verify",
                                        "auth-ssl-subject", "auth-ssl-issuer", "auth-ssl-serial",
                                        "auth-ssl-fingerprint", "auth-ssl-cert"}
    assert ours == theirs
