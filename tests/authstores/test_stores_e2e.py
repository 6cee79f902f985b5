"""Logins through a real mailproxy and a real mailproxy-auth to a real Dovecot, for users kept in each
store (users file, SQLite, PostgreSQL, LDAP): IMAP, POP3 and ManageSieve routed by the store, a wrong
password refused, and PostgreSQL stopped under a running proxy (issue 27)."""

import imaplib
import os
import poplib

import pytest

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from support.auth_stores import PASSWORDS, STORES, TEMPORARY  # noqa: E402
from support.backends import DOVECOT, MANAGESIEVE, Dovecot, require
from support.crypt_helper import sha512_crypt
from support.harness import free_port, missing

try:
    import sievelib.managesieve as sievelib
except ImportError:
    sievelib = None

ALICE, BOB, CAROL = "alice@example.test", "bob@example.test", "carol@example.test"
CONFIG = """
worker_processes 1;
error_log logs/error.log info;
events { worker_connections 64; }
mail {
    auth_http %(auth)s;
    timeout 20s;
    imap_auth plain login;
    sieve_auth plain login;
    server { listen 127.0.0.1:%(imap)d; protocol imap; }
    server { listen 127.0.0.1:%(pop3)d; protocol pop3; }
    server { listen 127.0.0.1:%(sieve)d; protocol sieve; }
}
"""


@pytest.fixture(scope="module")
def dovecot():
    require(DOVECOT)
    server = Dovecot(users=PASSWORDS).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def edge(dovecot, stores, start_auth, mailproxy_master):
    def start(kind):
        ports = {"imap": dovecot.imap_port, "pop3": dovecot.pop3_port, "smtp": free_port(),
                 "sieve": dovecot.sieve_port or free_port()}
        entries = [(ALICE, "{SHA512-CRYPT}" + sha512_crypt(PASSWORDS[ALICE]), None),
                   (BOB, "{PLAIN}" + PASSWORDS[BOB], None),
                   # carol's IMAP goes to Dovecot by her own row's route, not by the defaults.
                   (CAROL, "{SHA512-CRYPT}" + sha512_crypt(PASSWORDS[CAROL]), "127.0.0.1:%d" % dovecot.imap_port)]
        auth = start_auth(stores.make(kind, entries=entries, ports=ports))
        listen = {name: free_port() for name in ("imap", "pop3", "sieve")}
        master = mailproxy_master(CONFIG % dict(listen, auth=auth.url), handler=None)
        edge = type("Edge", (), {})()
        edge.ports, edge.auth, edge.master = listen, auth, master
        return edge

    return start


def imap_login(edge, login, password):
    imap = imaplib.IMAP4("127.0.0.1", edge.ports["imap"], timeout=20)
    try:
        typ, data = imap.login(login, password)
        assert imap.select("INBOX")[0] == "OK"
        return typ
    except imaplib.IMAP4.error as exc:
        return str(exc)
    finally:
        try:
            imap.logout()
        except (imaplib.IMAP4.error, OSError):
            pass  # already closed by the refusal


@pytest.mark.parametrize("kind", STORES)
def test_logins_through_mailproxy_to_dovecot(kind, edge, dovecot):
    edge = edge(kind)
    assert imap_login(edge, ALICE, PASSWORDS[ALICE]) == "OK"
    assert imap_login(edge, CAROL, PASSWORDS[CAROL]) == "OK"
    assert "Invalid login or password" in imap_login(edge, ALICE, "wrong")
    assert "Invalid login or password" in imap_login(edge, "*)(uid=*", PASSWORDS[ALICE])
    pop = poplib.POP3("127.0.0.1", edge.ports["pop3"], timeout=20)
    pop.user(BOB)
    assert pop.pass_(PASSWORDS[BOB]).startswith(b"+OK")
    pop.quit()
    require(MANAGESIEVE)
    if sievelib is None:
        missing("sievelib (pip install .[test])")
    client = sievelib.Client("127.0.0.1", edge.ports["sieve"])
    assert client.connect(ALICE, PASSWORDS[ALICE], authmech="PLAIN")
    assert client.listscripts() is not None
    client.logout()
    log = edge.auth.log()
    assert 'protocol=imap attempt=1 result="ok"' in log
    for password in PASSWORDS.values():
        assert password not in log and password not in edge.auth.stderr()
    assert "[alert]" not in edge.master.error_log()


def test_postgresql_stopped_under_a_running_proxy(edge, postgres):
    import time

    edge = edge("postgresql")
    assert imap_login(edge, ALICE, PASSWORDS[ALICE]) == "OK"
    postgres.stop()
    try:
        assert TEMPORARY in imap_login(edge, ALICE, PASSWORDS[ALICE])
    finally:
        postgres.start()
    deadline = time.monotonic() + 60
    while imap_login(edge, ALICE, PASSWORDS[ALICE]) != "OK":
        assert time.monotonic() < deadline, "no login after PostgreSQL came back"
        time.sleep(0.2)
