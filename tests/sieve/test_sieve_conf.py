"""The ManageSieve directives and protocol detection (ours: nginx has no sieve module)."""

import pytest

from mailproxy.conf import ConfigError, load_config
from mailproxy.conf.directives import SIEVE_EXTENSIONS
from mailproxy.protocol.sieve import SieveConfig


def load(tmp_path, server, mail=""):
    path = tmp_path / "mailproxy.conf"
    path.write_text("events {}\nmail {\n auth_http 127.0.0.1:9/auth;\n %s\n server { %s }\n}\n" % (mail, server))
    return load_config(str(path)).servers[0]


def test_port_4190_means_sieve_and_defaults(tmp_path):
    server = load(tmp_path, "listen 127.0.0.1:4190;")
    assert server.protocol == "sieve"
    assert server.sieve_auth == frozenset({"plain"}) and server.sieve_capabilities == SIEVE_EXTENSIONS
    assert server.sieve_client_buffer > 0
    greeting = SieveConfig.from_server(server).capability_plain
    assert b'"NOTIFY" "mailto"\r\n' in greeting and b'"SASL" "PLAIN"\r\n' in greeting


def test_explicit_protocol_and_inheritance(tmp_path):
    server = load(tmp_path, "listen 127.0.0.1:2000; protocol sieve; sieve_capabilities fileinto;",
                  mail="sieve_auth login oauthbearer; sieve_client_buffer 8k;")
    assert server.protocol == "sieve" and server.sieve_capabilities == ("fileinto",)
    assert server.sieve_auth == frozenset({"login", "oauthbearer"}) and server.sieve_client_buffer == 8192


def test_bad_sieve_auth(tmp_path):
    with pytest.raises(ConfigError, match='invalid value "cram-md5"'):
        load(tmp_path, "listen 127.0.0.1:4190; sieve_auth cram-md5;")
