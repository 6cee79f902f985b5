"""The scriptable DNS server for the resolver tests (dnsserver.py), one per test."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dnsserver import DnsServer  # noqa: E402


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
