"""Fixtures of the store tests: a real PostgreSQL and a real slapd for the session, a fresh database or
subtree per test holding the same Dovecot-style users, and mailproxy-auth as a real process on each
store (users file, SQLite, PostgreSQL, LDAP with bind and with password checks).

A missing server binary skips these tests, except under CI=true where it fails.
"""

import importlib.util
import os
import sqlite3
import subprocess
import sys
import tempfile

import pytest
import requests
import trustme

HERE = os.path.dirname(os.path.abspath(__file__))

from support import store_servers
from support.auth_stores import PORTS, ini, users
from support.harness import free_port, missing, terminate, wait_listening


def require(path):
    if not (path and os.access(path, os.X_OK)):
        missing("%s (apt-get install postgresql slapd ldap-utils)" % path)


def require_module(name):
    # Found, not imported: mailproxy-auth imports it in its own process.
    if importlib.util.find_spec(name) is None:
        missing("%s (pip install -e '.[test]')" % name)


# -- the servers -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("authstores-pki")
    ca = trustme.CA(organization_name="mailproxy authstores test CA")
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = {"ca": str(root / "ca.pem"), "cert": str(root / "cert.pem"), "key": str(root / "key.pem")}
    ca.cert_pem.write_to_path(paths["ca"])
    cert.cert_chain_pems[0].write_to_path(paths["cert"])
    cert.private_key_pem.write_to_path(paths["key"])
    return paths


@pytest.fixture(scope="session")
def postgres():
    binaries = store_servers.postgres_bin()
    require(os.path.join(binaries, "postgres") if binaries else "/usr/lib/postgresql/*/bin/postgres")
    server = store_servers.PostgreSQL(free_port())
    try:
        server.start()
        yield server
    finally:
        server.remove()


@pytest.fixture(scope="session")
def slapd(pki):
    require(store_servers.SLAPD)
    require(store_servers.LDAPSEARCH)
    server = store_servers.Slapd(free_port(), free_port(), pki["cert"], pki["key"], pki["ca"])
    try:
        server.start()
        yield server
    finally:
        server.remove()


# -- the users in each store ---------------------------------------------------------------------------

SCHEMA = """CREATE TABLE users (
    userid VARCHAR(128) NOT NULL,
    domain VARCHAR(128) NOT NULL,
    password VARCHAR(256) NOT NULL,
    home VARCHAR(255),
    host VARCHAR(64),
    imap VARCHAR(128),
    PRIMARY KEY (userid, domain)
);
"""
PASSWORD_QUERY = ("SELECT userid || '@' || domain AS user, password, host, imap, userid AS \"X-Mailbox\" "
                  "FROM users WHERE userid = %{username} AND domain = %{domain}")
USER_QUERY = "SELECT host, imap FROM users WHERE userid = %n AND domain = %d"


def _sql_rows(entries):
    rows = []
    for login, password, route in entries:
        userid, _, domain = login.partition("@")
        rows.append((userid, domain, password, "/var/mail/" + userid, "127.0.0.1", route))
    return rows


def _sql_literal(value):
    return "NULL" if value is None else "'%s'" % value.replace("'", "''")


class Stores:
    """Makes each kind of store hold `entries`, and the options mailproxy-auth needs to read it."""

    counter = 0

    def __init__(self, tmp_path, request):
        self.tmp_path = tmp_path
        self.request = request

    def make(self, kind, entries=None, ports=PORTS, **extra):
        Stores.counter += 1
        entries = users(ports) if entries is None else entries
        ports_option = " ".join("%s=%d" % item for item in ports.items())
        backends = " ".join("%s=127.0.0.1:%d" % item for item in ports.items())
        if kind == "users":
            path = self.tmp_path / ("users%d" % Stores.counter)
            lines = ["backend %s 127.0.0.1:%d" % item for item in ports.items()]
            for login, password, route in entries:
                lines.append("user %s %s%s" % (login, password, " imap=" + route if route else ""))
            path.write_text("\n".join(lines) + "\n")
            options = {"type": "users", "path": str(path)}
        elif kind == "sqlite":
            path = self.tmp_path / ("users%d.db" % Stores.counter)
            with sqlite3.connect(str(path)) as db:
                db.executescript(SCHEMA)
                db.executemany("INSERT INTO users VALUES (?, ?, ?, ?, ?, ?)", _sql_rows(entries))
            db.close()
            options = {"type": "sql", "url": "sqlite://" + str(path), "password_query": PASSWORD_QUERY,
                       "user_query": USER_QUERY}
            self.sqlite_path = str(path)
        elif kind == "postgresql":
            require_module("psycopg")
            require_module("psycopg_pool")
            server = self.request.getfixturevalue("postgres")
            database = "mail%d" % Stores.counter
            server.sql("CREATE DATABASE %s;" % database, database="postgres")
            server.sql(SCHEMA + "".join(
                "INSERT INTO users VALUES (%s);\n" % ", ".join(_sql_literal(v) for v in row)
                for row in _sql_rows(entries)), database=database)
            options = {"type": "sql", "url": "postgresql://postgres@127.0.0.1:%d/%s" % (server.port, database),
                       "password_query": PASSWORD_QUERY, "user_query": USER_QUERY}
        elif kind in ("ldap-bind", "ldap-password"):
            require_module("ldap3")
            server = self.request.getfixturevalue("slapd")
            base = "ou=t%d,ou=people,%s" % (Stores.counter, store_servers.SUFFIX)
            ldif = ["dn: %s\nobjectClass: organizationalUnit\nou: t%d\n" % (base, Stores.counter)]
            for login, password, route in entries:
                userid = login.partition("@")[0]
                scheme, _, secret = password[1:].partition("}")
                # slapd checks {CRYPT} itself (the bind mode); mailproxy-auth reads it (the password mode).
                stored = "{CRYPT}" + secret if scheme.endswith("CRYPT") else secret
                ldif.append("dn: uid=%s,%s\nobjectClass: inetOrgPerson\nobjectClass: inetLocalMailRecipient\n"
                            "uid: %s\ncn: %s\nsn: %s\nmail: %s\nuserPassword: %s\nmailHost: 127.0.0.1\n%s"
                            % (userid, base, userid, userid, userid, login, stored,
                               "mailRoutingAddress: %s\n" % route if route else ""))
            server.add("\n".join(ldif))
            options = {"type": "ldap", "url": server.url, "bind_dn": store_servers.SEARCH_DN,
                       "bind_password": server.search_password, "base": base,
                       "filter": "(&(objectClass=inetOrgPerson)(mail=%{user}))",
                       "auth": kind.partition("-")[2], "default_scheme": "PLAIN",
                       "attributes": "password=userPassword host=mailHost imap=mailRoutingAddress X-Mailbox=uid"}
        else:
            raise ValueError(kind)
        if kind != "users":
            options.update(ports=ports_option, backends=backends, timeout="2")
        options.update(extra)
        return options


@pytest.fixture
def stores(tmp_path, request):
    return Stores(tmp_path, request)


# -- mailproxy-auth ------------------------------------------------------------------------------------


class AuthServer:
    def __init__(self, root, config_text, options):
        self.root = root
        self.config = os.path.join(root, "auth.ini")
        self.write_config(config_text)
        self.port = free_port()
        self.access_log = os.path.join(root, "access.log")
        self.stderr_path = os.path.join(root, "stderr")
        with open(self.stderr_path, "w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mailproxy.authserver.app", "--config", self.config,
                 "--listen", "127.0.0.1:%d" % self.port, "--access-log", self.access_log, *options],
                stdin=subprocess.DEVNULL, stderr=stderr)
        self.session = requests.Session()
        try:
            wait_listening(self.port, self.process, "mailproxy-auth", 20)
        except AssertionError:
            self.stop()
            raise RuntimeError("mailproxy-auth did not start: %s" % self.stderr()) from None

    def write_config(self, text):
        with open(self.config + ".new", "w") as out:
            out.write(text)
        os.replace(self.config + ".new", self.config)

    @property
    def url(self):
        return "http://127.0.0.1:%d/auth" % self.port

    def ask(self, login, password, method="plain", protocol="imap", client="192.0.2.1", **extra):
        headers = {"Auth-Method": method, "Auth-User": login, "Auth-Pass": password, "Auth-Protocol": protocol,
                   "Auth-Login-Attempt": "1", "Client-IP": client}
        headers.update(extra)
        reply = self.session.get(self.url, headers=headers, timeout=30)
        return {k: v for k, v in reply.headers.items() if k.startswith(("Auth-", "X-"))}

    def stderr(self):
        with open(self.stderr_path, errors="replace") as err:
            return err.read()

    def log(self):
        try:
            with open(self.access_log, errors="replace") as log:
                return log.read()
        except FileNotFoundError:
            return ""

    def stop(self):
        self.session.close()
        terminate(self.process)


@pytest.fixture
def start_auth(tmp_path):
    """start_auth(store_options, *arguments, cache=None): mailproxy-auth on that store; all stopped after."""
    started = []

    def start(store, *arguments, cache=None):
        root = tempfile.mkdtemp(prefix="auth-", dir=str(tmp_path))
        server = AuthServer(root, ini(store, cache), ["--max-failures", "1000", "--wait", "2", *arguments])
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
