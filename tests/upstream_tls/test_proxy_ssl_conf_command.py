"""proxy_ssl_conf_command (the stream module's directive): SSL_CONF_cmd() on the backend context through
the OpenSSL bridge, seen from a real TLS backend; a bad command fails `-t` with OpenSSL's reason, and
without the bridge `-t` refuses the directive and says why."""

import imaplib
import re
import ssl

import pytest

from mailproxy.tls import openssl

from support.authserver import RecordingAuthServer
from support.backends import USERS
from support.harness import free_port, mail_config, missing
from support.servers import TcpServer

WAIT = 20.0


class TlsImapBackend(TcpServer):
    """Implicit-TLS IMAP backend in a thread: records the protocol version each connection negotiated,
    takes any LOGIN (literals included, as mailproxy sends them), answers NOOP and LOGOUT."""

    def __init__(self, cert, key):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.versions = []
        super().__init__()

    def serve_connection(self, conn):
        # The proxy closing its side ends in an OSError, which TcpServer takes quietly: the test reads
        # what was recorded.
        conn.settimeout(WAIT)
        with self.ctx.wrap_socket(conn, server_side=True) as sock:
            self.versions.append(sock.version())
            sock.sendall(b"* OK ready\r\n")
            reader = sock.makefile("rb")
            while True:
                line = reader.readline()
                if not line:
                    return
                while True:  # a literal {n} gets a continuation, then its n bytes and the rest
                    literal = re.search(rb"\{(\d+)\+?\}\r\n$", line)
                    if not literal:
                        break
                    sock.sendall(b"+ go\r\n")
                    line += reader.read(int(literal.group(1))) + reader.readline()
                tag, _, rest = line.partition(b" ")
                if rest.upper().startswith(b"LOGOUT"):
                    sock.sendall(b"* BYE\r\n%s OK bye\r\n" % tag)
                    return
                sock.sendall(b"%s OK done\r\n" % tag)


@pytest.fixture
def bridge():
    if openssl.bridge is None:
        missing("the OpenSSL bridge (%s)" % openssl.bridge_off_reason)


@pytest.fixture
def tls_backend(backend_pki):
    backend = TlsImapBackend(backend_pki["server.pem"], backend_pki["server.key"])
    try:
        yield backend
    finally:
        backend.close()


def edge_config(auth, port, commands):
    return mail_config(auth.url, """
    server { listen 127.0.0.1:%d; protocol imap; proxy_ssl on; %s }
}
""" % (port, " ".join("proxy_ssl_conf_command %s %s;" % pair for pair in commands)), timeout="20s")


def login_logout(port):
    imap = imaplib.IMAP4("127.0.0.1", port, timeout=WAIT)
    assert imap.login("alice", USERS["alice"])[0] == "OK"
    assert imap.logout()[0] == "BYE"


def test_commands_reach_the_backend_context(mailproxy_master, tls_backend, bridge):
    auth = RecordingAuthServer(USERS, {"imap": ("127.0.0.1", tls_backend.port)})
    try:
        port = free_port()
        mailproxy_master(edge_config(auth, port, []), handler=None)
        login_logout(port)
        port = free_port()
        # Two commands, in order: the second narrows what the first allows.
        mailproxy_master(edge_config(auth, port, [("MinProtocol", "TLSv1.2"), ("MaxProtocol", "TLSv1.2")]),
                         handler=None)
        login_logout(port)
    finally:
        auth.close()
    assert tls_backend.versions == ["TLSv1.3", "TLSv1.2"]


def test_a_bad_command_fails_the_test_with_openssl_reason(mailproxy_master, bridge):
    master = mailproxy_master(edge_config(type("Auth", (), {"url": "127.0.0.1:9/auth"}), free_port(),
                                          [("NoSuchCommand", "x")]), handler=None, start=False)
    result = master.cli("-t")
    assert result.returncode != 0
    assert ('SSL_CONF_cmd("NoSuchCommand", "x") failed (SSL: error:0A000182:SSL routines::unknown cmd '
            'name:cmd=NoSuchCommand)') in result.stderr, result.stderr


def test_refused_without_the_bridge(mailproxy_master):
    master = mailproxy_master(edge_config(type("Auth", (), {"url": "127.0.0.1:9/auth"}), free_port(),
                                          [("MaxProtocol", "TLSv1.2")]), handler=None, start=False,
                              env={"MAILPROXY_OPENSSL_BRIDGE": "off"})
    result = master.cli("-t")
    assert result.returncode != 0
    assert ('"proxy_ssl_conf_command" is not supported by mailproxy: it needs mailproxy\'s OpenSSL bridge, '
            'which is off: MAILPROXY_OPENSSL_BRIDGE=off is set') in result.stderr, result.stderr
