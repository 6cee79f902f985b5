"""Real Dovecot (IMAP, POP3) and Postfix (SMTP) backends for end-to-end tests: the pytest fixtures.

The instances themselves (private, in a temporary directory, on free ports, stopped by pid) are
tools/localmail.py's, which the quick start uses too; this module adds the fixtures and require().

tests/conftest.py registers this module as a plugin, so any test may name ``dovecot`` or ``postfix``. A missing
binary skips the test, except under ``CI=true`` where it fails: CI must not go green by skipping.
"""

import os

import pytest

from support.harness import missing
from tools.localmail import (DOVECOT, MAIL_DOMAIN, MAIL_USER,  # re-exported: the tests import them from here
                             MANAGESIEVE, POSTFIX, START_TIMEOUT, USERS, Dovecot, Postfix, free_port, read_log,
                             wait_for_log)

__all__ = [
    "DOVECOT", "MAIL_DOMAIN", "MAIL_USER", "MANAGESIEVE", "POSTFIX", "START_TIMEOUT", "USERS", "Dovecot",
    "Postfix", "free_port", "read_log", "require", "wait_for_log", "dovecot", "postfix",
]


def require(binary: str) -> None:
    if not (os.path.exists(binary) and os.access(binary, os.X_OK)):
        missing("%s (install the Debian package)" % binary)


@pytest.fixture(scope="module")
def dovecot():
    require(DOVECOT)
    server = Dovecot().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def postfix():
    require(POSTFIX)
    server = Postfix().start()
    try:
        yield server
    finally:
        server.stop()
