"""The scriptable DNS server for the resolver tests (support/dnsserver.py), one per test."""

import pytest

from support.dnsserver import DnsServer


@pytest.fixture
def dns_server():
    server = DnsServer()
    yield server
    server.close()


@pytest.fixture
def second_dns_server():
    server = DnsServer()
    yield server
    server.close()
