"""auth_http_cache and client certificates (issue 25 item 2): an OK the auth server gave a session with a
verified certificate is never reused for a session without one, whatever the password."""

import socket

import pytest

from support.authserver import RecordingAuthServer
from support.backends import USERS
from support.harness import free_port, mail_config


class CertificateAuthServer(RecordingAuthServer):
    """An auth server that lets in only clients whose certificate the proxy verified."""

    def _decide(self, headers):
        if headers.get("auth-ssl-verify") != b"SUCCESS":
            return b"HTTP/1.0 200 OK\r\nAuth-Status: Client certificate required\r\n\r\n"
        return super()._decide(headers)


@pytest.fixture
def edge(pki, dovecot, mailproxy_master):  # noqa: F811
    auth = CertificateAuthServer(USERS, {"imap": ("127.0.0.1", dovecot.imap_port)})
    port = free_port()
    config = mail_config(auth.url, """
    %s
    server { listen 127.0.0.1:%d ssl; protocol imap; ssl_verify_client optional;
             ssl_client_certificate %s; auth_http_cache 60s negative=60s; }
}
""" % (pki.tls_directives(), port, pki["client_ca.pem"]), timeout=None)
    master = mailproxy_master(config, handler=None)
    yield port, auth, pki
    auth.close()
    assert "[alert]" not in master.error_log()


def login(port, pki, cert):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        conn = pki.client_context(cert).wrap_socket(raw, server_hostname="localhost")
        reply = b""
        conn.sendall(b'a LOGIN alice "%s"\r\n' % USERS["alice"].encode())
        while b"a " not in reply:
            piece = conn.recv(4096)
            if not piece:
                break
            reply += piece
        return reply.split(b"a ", 1)[-1].split(b" ", 1)[0]


def test_ok_earned_with_certificate_not_reused_without(edge):
    port, auth, pki = edge
    assert login(port, pki, "client") == b"OK"
    assert login(port, pki, "client") == b"OK"
    assert len(auth.requests) == 1  # the cache works for the same client
    # Same login and password, no certificate: the auth server is asked, and refuses.
    assert login(port, pki, None) == b"NO"
    assert len(auth.requests) == 2
    assert auth.requests[-1][1].get("auth-ssl-verify") in (None, b"NONE")
