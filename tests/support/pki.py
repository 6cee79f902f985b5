"""Certificates for the TLS tests, made by trustme: a server CA and a client CA with one client each.

The files live in a per-module directory the workers never read: mailproxy loads every certificate
and key in the master, as root, before forking (mailproxy/tls/client.py), which these tests rely on.
"""

import os
import ssl

import trustme


class Pki:
    def __init__(self, root):
        self.root = root
        self.server_ca = trustme.CA(organization_name="mailproxy test server CA")
        self.client_ca = trustme.CA(organization_name="mailproxy test client CA")
        self.other_ca = trustme.CA(organization_name="unrelated CA")
        self.server = self.server_ca.issue_cert("localhost", "127.0.0.1", key_type=trustme.KeyType.RSA)
        self.server_ec = self.server_ca.issue_cert("localhost", "127.0.0.1", key_type=trustme.KeyType.ECDSA)
        self.client = self.client_ca.issue_cert("alice@example.test", common_name="Alice, Jr.",
                                                organization_name="Example+Co", organization_unit_name="mail")
        self.stranger = self.other_ca.issue_cert("mallory@example.test")
        self.paths = {}
        self.write("server_ca.pem", self.server_ca.cert_pem)
        self.write("client_ca.pem", self.client_ca.cert_pem)
        self.write("server.pem", *self.server.cert_chain_pems)
        self.write("server.key", self.server.private_key_pem)
        self.write("server_ec.pem", *self.server_ec.cert_chain_pems)
        self.write("server_ec.key", self.server_ec.private_key_pem)
        self.write("client.pem", *self.client.cert_chain_pems)
        self.write("client.key", self.client.private_key_pem)
        self.write("stranger.pem", *self.stranger.cert_chain_pems)
        self.write("stranger.key", self.stranger.private_key_pem)

    def write(self, name, *blobs):
        path = os.path.join(self.root, name)
        with open(path, "wb") as f:
            for blob in blobs:
                f.write(blob.bytes())
        self.paths[name] = path
        return path

    def __getitem__(self, name):
        return self.paths[name]

    def client_context(self, cert=None):
        """What a mail client would use: trust the server CA, optionally present a certificate."""
        ctx = ssl.create_default_context(cafile=self["server_ca.pem"])
        if cert:
            ctx.load_cert_chain(self[cert + ".pem"], self[cert + ".key"])
        return ctx

    def tls_directives(self):
        return "ssl_certificate %s; ssl_certificate_key %s;" % (self["server.pem"], self["server.key"])
