"""Certificates for the backend-TLS tests (trustme) and TLS-only Dovecot and Postfix instances.

Dovecot runs with `ssl = required` (implicit TLS on its imaps/pop3s ports, STARTTLS on the plain ones)
and Postfix with `smtpd_tls_security_level = encrypt`, so a login that reaches them in the clear fails:
a passing test is proof that mailproxy spoke TLS to them.
"""

import os

import pytest
import trustme

from support.backends import DOVECOT, POSTFIX, Dovecot, Postfix, require


class BackendPki:
    def __init__(self, root):
        self.root = root
        self.ca = trustme.CA(organization_name="mailproxy backend CA")
        self.wrong_ca = trustme.CA(organization_name="unrelated CA")
        self.intermediate = self.ca.create_child_ca()
        self.server = self.ca.issue_cert("mail.backend.test", "127.0.0.1", key_type=trustme.KeyType.RSA)
        self.deep = self.intermediate.issue_cert("deep.backend.test", "127.0.0.1")
        self.client = self.ca.issue_cert("proxy.example.test")
        self.paths = {}
        self.write("ca.pem", self.ca.cert_pem)
        self.write("wrong_ca.pem", self.wrong_ca.cert_pem)
        self.write("server.pem", *self.server.cert_chain_pems)
        self.write("server.key", self.server.private_key_pem)
        self.write("deep.pem", *self.deep.cert_chain_pems)
        self.write("deep.key", self.deep.private_key_pem)
        self.write("client.pem", *self.client.cert_chain_pems)
        self.write("client.key", self.client.private_key_pem)

    def write(self, name, *blobs):
        path = os.path.join(self.root, name)
        with open(path, "wb") as f:
            for blob in blobs:
                f.write(blob.bytes())
        os.chmod(path, 0o644)
        self.paths[name] = path
        return path

    def __getitem__(self, name):
        return self.paths[name]


@pytest.fixture(scope="module")
def backend_pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("backend-pki")
    os.chmod(root, 0o755)  # Dovecot's and Postfix's unprivileged processes may read below it
    return BackendPki(str(root))


@pytest.fixture(scope="module")
def dovecot_tls(backend_pki):
    require(DOVECOT)
    server = Dovecot(ssl_cert=backend_pki["server.pem"], ssl_key=backend_pki["server.key"]).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def postfix_tls(backend_pki):
    require(POSTFIX)
    server = Postfix(tls_cert=backend_pki["server.pem"], tls_key=backend_pki["server.key"]).start()
    try:
        yield server
    finally:
        server.stop()
