"""mailproxy-auth on each store (users file, SQLite, PostgreSQL, LDAP by bind and by stored hash), over
real HTTP against real servers: the same answers for the proxy whatever the store, injection attempts
refused, a store stopped mid-run answered with temporary failures and then recovered, the answer
cache, SIGHUP reloading, and unknown logins as slow as known ones (issue 27)."""

import hashlib
import hmac
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import time

import pytest

from support.auth_stores import INVALID, PASSWORDS, PORTS, STORES, TEMPORARY, ini

ALICE, BOB, CAROL = "alice@example.test", "bob@example.test", "carol@example.test"


def ok(port):
    return {"Auth-Status": "OK", "Auth-Server": "127.0.0.1", "Auth-Port": str(port)}


def without_extra(reply):
    return {k: v for k, v in reply.items() if not k.startswith("X-")}


@pytest.mark.parametrize("kind", STORES)
def test_same_answers_whatever_the_store(kind, stores, start_auth):
    auth = start_auth(stores.make(kind))
    for protocol in ("imap", "pop3", "smtp", "sieve"):
        assert without_extra(auth.ask(ALICE, PASSWORDS[ALICE], protocol=protocol)) == ok(PORTS[protocol])
    # carol's own IMAP backend; her other protocols go where everyone's go.
    assert without_extra(auth.ask(CAROL, PASSWORDS[CAROL])) == ok(PORTS["imap"] + 1)
    assert without_extra(auth.ask(CAROL, PASSWORDS[CAROL], protocol="sieve")) == ok(PORTS["sieve"])
    assert auth.ask(BOB, PASSWORDS[BOB], protocol="pop3")["Auth-Status"] == "OK"
    assert auth.ask(ALICE, "wrong") == {"Auth-Status": INVALID, "Auth-Wait": "2"}
    assert auth.ask("nobody@example.test", PASSWORDS[ALICE]) == {"Auth-Status": INVALID, "Auth-Wait": "2"}
    if kind != "users":
        # A mapped column or attribute is an extra reply header.
        assert auth.ask(ALICE, PASSWORDS[ALICE])["X-Mailbox"] == "alice"
    # SMTP relay without AUTH is routed by the recipient.
    reply = auth.ask("", "", method="none", protocol="smtp", **{"Auth-SMTP-To": "RCPT TO:<%s>" % CAROL})
    assert without_extra(reply) == ok(PORTS["smtp"])
    log, err = auth.log(), auth.stderr()
    for password in PASSWORDS.values():
        assert password not in log and password not in err
    # gevent patched before any driver imported ssl.
    assert "MonkeyPatchWarning" not in err and "Traceback" not in err


@pytest.mark.parametrize("kind", ["users", "sqlite", "postgresql", "ldap-password"])
def test_apop_and_cram_md5_get_the_clear_text(kind, stores, start_auth):
    auth = start_auth(stores.make(kind))
    salt = "<1896.697170952@mail.example.test>"
    digest = hashlib.md5((salt + PASSWORDS[BOB]).encode()).hexdigest()
    reply = auth.ask(BOB, digest, method="apop", protocol="pop3", **{"Auth-Salt": salt})
    assert reply["Auth-Status"] == "OK" and reply["Auth-Pass"] == PASSWORDS[BOB]
    digest = hmac.new(PASSWORDS[BOB].encode(), salt.encode(), hashlib.md5).hexdigest()
    reply = auth.ask(BOB, digest, method="cram-md5", **{"Auth-Salt": salt})
    assert reply["Auth-Pass"] == PASSWORDS[BOB]
    # A hashed password cannot answer a challenge.
    digest = hmac.new(PASSWORDS[ALICE].encode(), salt.encode(), hashlib.md5).hexdigest()
    assert auth.ask(ALICE, digest, method="cram-md5", **{"Auth-Salt": salt})["Auth-Status"] == INVALID


INJECTIONS = [
    "' OR '1'='1", "alice@example.test' OR '1'='1", "x' OR '1'='1' --@example.test", "alice@example.test' --",
    "*", "*)(uid=*", "*)(uid=*))(|(uid=*", "alice@example.test)(|(mail=*", "*@example.test", "al*@example.test",
    "alice@example.test\x00", "%{user}", "%u",
]


@pytest.mark.parametrize("kind", ["sqlite", "postgresql", "ldap-bind", "ldap-password"])
def test_injection_attempts_are_refused(kind, stores, start_auth):
    auth = start_auth(stores.make(kind))
    for login in INJECTIONS:
        for password in (PASSWORDS[ALICE], PASSWORDS[BOB], "' OR '1'='1", "*"):
            reply = auth.ask(login, password)
            assert reply == {"Auth-Status": INVALID, "Auth-Wait": "2"}, (login, password, reply)
    # carol's password is itself an injection attempt: it is a password like any other.
    assert auth.ask(CAROL, PASSWORDS[CAROL])["Auth-Status"] == "OK"
    assert auth.ask(CAROL, "' OR '1'='1")["Auth-Status"] == INVALID
    # An empty password is not an anonymous LDAP bind.
    assert auth.ask(ALICE, "")["Auth-Status"] == INVALID
    assert auth.ask(ALICE, PASSWORDS[ALICE])["Auth-Status"] == "OK"


def test_host_names_in_the_store_are_resolved(stores, start_auth):
    # Auth-Server must be an address: a host name from a row is resolved by the auth server.
    entries = [(ALICE, "{PLAIN}" + PASSWORDS[ALICE], "localhost:1144")]
    reply = start_auth(stores.make("sqlite", entries=entries)).ask(ALICE, PASSWORDS[ALICE])
    assert reply["Auth-Status"] == "OK" and reply["Auth-Server"] in ("127.0.0.1", "::1")
    assert reply["Auth-Port"] == "1144"


def test_sql_placeholders_must_not_be_quoted(stores, tmp_path):
    options = stores.make("sqlite", password_query="SELECT password FROM users WHERE userid = '%n'")
    config = tmp_path / "bad.ini"
    config.write_text(ini(options))
    done = subprocess.run([sys.executable, "-m", "mailproxy.authserver.app", "--config", str(config),
                           "--listen", "127.0.0.1:1"], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "placeholder inside quotes" in done.stderr


def _until(predicate, what, timeout=60.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out waiting for " + what
        time.sleep(0.1)


@pytest.mark.parametrize("kind", ["postgresql", "ldap-bind"])
def test_store_stopped_mid_run_then_back(kind, stores, start_auth, request):
    server = request.getfixturevalue("postgres" if kind == "postgresql" else "slapd")
    auth = start_auth(stores.make(kind))
    assert auth.ask(ALICE, PASSWORDS[ALICE])["Auth-Status"] == "OK"
    server.stop()
    try:
        for login, password in ((ALICE, PASSWORDS[ALICE]), (ALICE, "wrong"), ("nobody@example.test", "x")):
            started = time.monotonic()
            reply = auth.ask(login, password)
            assert reply == {"Auth-Status": TEMPORARY, "Auth-Wait": "2"}, reply
            assert time.monotonic() - started < 20  # it gave up at all: 10x the store's timeout (2 s here)
        assert auth.process.poll() is None
    finally:
        server.start()
    _until(lambda: auth.ask(ALICE, PASSWORDS[ALICE])["Auth-Status"] == "OK", "the store to come back")
    assert auth.ask(ALICE, "wrong")["Auth-Status"] == INVALID
    assert "database" in auth.stderr() or "directory" in auth.stderr()
    assert PASSWORDS[ALICE] not in auth.stderr()


def test_directory_frozen_then_thawed(stores, start_auth, slapd):
    # SIGSTOP: the directory accepts connections (the kernel does) but never answers; the receive
    # timeout, not the proxy's auth_http_timeout, must end the wait.
    auth = start_auth(stores.make("ldap-bind"))
    assert auth.ask(ALICE, PASSWORDS[ALICE])["Auth-Status"] == "OK"
    slapd.process.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        assert auth.ask(ALICE, PASSWORDS[ALICE]) == {"Auth-Status": TEMPORARY, "Auth-Wait": "2"}
        assert time.monotonic() - started < 20  # it gave up at all: 10x the store's timeout (2 s here)
    finally:
        slapd.process.send_signal(signal.SIGCONT)
    _until(lambda: auth.ask(ALICE, PASSWORDS[ALICE])["Auth-Status"] == "OK", "the directory to answer again")


def test_sqlite_file_gone_is_a_temporary_failure(stores, start_auth):
    auth = start_auth(stores.make("sqlite"))
    assert auth.ask(ALICE, PASSWORDS[ALICE])["Auth-Status"] == "OK"
    os.rename(stores.sqlite_path, stores.sqlite_path + ".away")
    os.kill(auth.process.pid, signal.SIGHUP)  # reconnect: the open connection would still see the file
    _until(lambda: auth.ask(ALICE, PASSWORDS[ALICE])["Auth-Status"] == TEMPORARY or
           "not reloaded" in auth.stderr(), "the reload")
    os.rename(stores.sqlite_path + ".away", stores.sqlite_path)
    assert auth.ask(ALICE, PASSWORDS[ALICE])["Auth-Status"] == "OK"


def test_cache_keeps_answers_for_the_ttl(stores, start_auth):
    options = stores.make("sqlite")
    # Long enough for the two asks below on a busy machine; their answers say whether they were cached.
    auth = start_auth(options, "--cache-ttl", "5", "--cache-negative-ttl", "5")
    assert auth.ask(ALICE, PASSWORDS[ALICE])["Auth-Status"] == "OK"
    assert auth.ask(ALICE, "new-password")["Auth-Status"] == INVALID
    with sqlite3.connect(stores.sqlite_path) as db:
        db.execute("UPDATE users SET password = '{PLAIN}new-password' WHERE userid = 'alice'")
    db.close()
    # Both answers come from the cache until they expire; then the new password is the one taken.
    assert auth.ask(ALICE, PASSWORDS[ALICE])["Auth-Status"] == "OK"
    assert auth.ask(ALICE, "new-password")["Auth-Status"] == INVALID
    _until(lambda: auth.ask(ALICE, "new-password")["Auth-Status"] == "OK", "the cache to expire", 20)
    assert auth.ask(ALICE, PASSWORDS[ALICE])["Auth-Status"] == INVALID
    # Failures served from the cache still count toward the lock-out.
    assert auth.log().count('result="invalid"') >= 2


def test_cache_serves_during_an_outage_but_never_a_new_password(stores, start_auth, postgres):
    auth = start_auth(stores.make("postgresql"), cache={"ttl": "60", "negative_ttl": "60"})
    assert auth.ask(ALICE, PASSWORDS[ALICE])["Auth-Status"] == "OK"
    postgres.stop()
    try:
        assert auth.ask(ALICE, PASSWORDS[ALICE])["Auth-Status"] == "OK"
        assert auth.ask(ALICE, "other")["Auth-Status"] == TEMPORARY
    finally:
        postgres.start()


def test_sighup_reloads_the_config(stores, start_auth, tmp_path):
    first = stores.make("sqlite")
    auth = start_auth(first)
    second = stores.make("sqlite", entries=[(ALICE, "{PLAIN}second-store", None)])
    auth.write_config(ini(second))
    assert auth.ask(ALICE, PASSWORDS[ALICE])["Auth-Status"] == "OK"
    os.kill(auth.process.pid, signal.SIGHUP)
    _until(lambda: auth.ask(ALICE, "second-store")["Auth-Status"] == "OK", "the reload")
    # A broken file keeps the running store.
    auth.write_config("[store]\ntype = sql\nurl = sqlite:///nonexistent\n")
    os.kill(auth.process.pid, signal.SIGHUP)
    _until(lambda: "not reloaded" in auth.stderr(), "the refused reload")
    assert auth.ask(ALICE, "second-store")["Auth-Status"] == "OK"


@pytest.mark.parametrize("kind", ["sqlite", "postgresql", "ldap-password", "ldap-bind", "ldap-bind-nodecoy"])
def test_unknown_logins_take_as_long_as_known_ones(kind, stores, start_auth):
    # The decoy learns the store's scheme and cost from the users it finds: after one lookup of alice,
    # unknown logins are checked against a hash of her cost (many rounds, so the hash dominates). In
    # bind mode the directory checks the hash: unknown logins bind to the decoy entry instead, or
    # without one wait out the known binds' average time.
    from support import crypt_helper

    def slow(password):
        setting = "$6$rounds=40000$" + crypt_helper._salt(16)
        return "{SHA512-CRYPT}" + crypt_helper._crypt(password, setting.encode()).decode()

    entries = [(ALICE, slow(b"builder"), None), ("decoy@example.test", slow(os.urandom(16).hex().encode()), None)]
    extra = {"decoy_dn": "uid=decoy,ou=t%d,ou=people,dc=example,dc=test" % (stores.counter + 1)} \
        if kind == "ldap-bind" else {}
    auth = start_auth(stores.make(kind.replace("-nodecoy", ""), entries=entries, **extra))
    for n in range(3):
        auth.ask(ALICE, "warm-up")
        auth.ask("warm-up%d@example.test" % n, "warm-up")

    def timed(login):
        started = time.perf_counter()
        assert auth.ask(login, "wrong")["Auth-Status"] == INVALID
        return time.perf_counter() - started

    known, unknown = [], []
    for n in range(25):
        known.append(timed(ALICE))
        unknown.append(timed("nobody%d@example.test" % n))
    known_median, unknown_median = statistics.median(known), statistics.median(unknown)
    print("%s: median known %.2f ms, unknown %.2f ms" % (kind, known_median * 1000, unknown_median * 1000))
    assert unknown_median >= 0.6 * known_median, (known_median, unknown_median)
    assert auth.ask(ALICE, "builder")["Auth-Status"] == "OK"


def test_ldap_over_starttls_and_ldaps(stores, start_auth, slapd, pki):
    options = stores.make("ldap-bind", starttls="yes", ca_file=pki["ca"])
    assert start_auth(options).ask(ALICE, PASSWORDS[ALICE])["Auth-Status"] == "OK"
    options.update(starttls="no", url="ldaps://127.0.0.1:%d" % slapd.ldaps_port)
    auth = start_auth(options)
    assert auth.ask(ALICE, PASSWORDS[ALICE])["Auth-Status"] == "OK"
    assert auth.ask(ALICE, "wrong")["Auth-Status"] == INVALID
    # A directory whose certificate does not verify is not a directory to trust: temporary failure.
    other = stores.make("ldap-bind", starttls="yes", ca_file="/etc/ssl/certs/ca-certificates.crt")
    assert start_auth(other).ask(ALICE, PASSWORDS[ALICE])["Auth-Status"] == TEMPORARY


def test_users_file_routes_sieve_and_starts_without_monkeypatch_warning(stores, start_auth):
    auth = start_auth(stores.make("users"))
    assert without_extra(auth.ask(ALICE, PASSWORDS[ALICE], protocol="sieve")) == ok(PORTS["sieve"])
    assert "MonkeyPatchWarning" not in auth.stderr() and "Traceback" not in auth.stderr()


SLOW_QUERIES = {
    "postgresql": "SELECT password, host FROM users, pg_sleep(5) WHERE userid = %n AND domain = %d",
    # SQLite has no sleep: a query that counts to a billion.
    "sqlite": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 1000000000) "
              "SELECT password, host, (SELECT max(x) FROM c) AS n FROM users WHERE userid = %n AND domain = %d",
}


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_statement_timeout_is_a_temporary_failure(kind, stores, start_auth):
    auth = start_auth(stores.make(kind, password_query=SLOW_QUERIES[kind], timeout="1"))
    for _ in range(2):  # and the connection is usable again after the cancelled query
        started = time.monotonic()
        assert auth.ask(ALICE, PASSWORDS[ALICE]) == {"Auth-Status": TEMPORARY, "Auth-Wait": "2"}
        assert time.monotonic() - started < 10  # it gave up at all: 10x the statement timeout (1 s here)
    assert auth.process.poll() is None


def test_sighup_reconnects_to_postgresql(stores, start_auth, postgres):
    options = stores.make("postgresql")
    database = options["url"].rsplit("/", 1)[1]
    auth = start_auth(options)
    assert auth.ask(ALICE, PASSWORDS[ALICE])["Auth-Status"] == "OK"

    def backends():
        return set(postgres.sql("SELECT pid FROM pg_stat_activity WHERE application_name = 'mailproxy-auth' "
                                "AND datname = '%s';" % database, database="postgres").split()[2:-2])

    before = backends()
    assert before
    os.kill(auth.process.pid, signal.SIGHUP)
    after = _until(lambda: (lambda now: now if now and not now & before else None)(backends()),
                   "new connections in place of the old ones")
    assert auth.ask(ALICE, PASSWORDS[ALICE])["Auth-Status"] == "OK"
    assert after


@pytest.mark.parametrize("kind", ["sqlite", "ldap-bind"])
def test_oauth_users_from_the_store(kind, stores, start_auth, tmp_path):
    import jwt

    secret = tmp_path / "jwt.secret"
    secret.write_bytes(b"k" * 48)
    auth = start_auth(stores.make(kind), "--jwt-key", str(secret))

    def token(sub):
        now = int(time.time())
        return jwt.encode({"sub": sub, "iat": now, "exp": now + 300}, b"k" * 48, algorithm="HS256")

    reply = auth.ask(BOB, token(BOB), method="xoauth2")
    assert reply["Auth-Status"] == "OK" and reply["Auth-User"] == BOB and reply["Auth-Pass"] == PASSWORDS[BOB]
    reply = auth.ask(ALICE, token(ALICE), method="oauthbearer")
    assert reply["Auth-Status"] == "OK" and "Auth-Pass" not in reply  # hashed: the backend takes the token
    reply = auth.ask("", token("nobody@example.test"), method="xoauth2")
    assert reply["Auth-Status"] == "invalid token"
    assert "'nobody@example.test' is not in the " in auth.log()


def test_store_chosen_on_the_command_line(stores, start_auth):
    options = stores.make("sqlite")
    arguments = ["--store", "sql"]
    for key in ("url", "password_query", "ports", "backends"):
        arguments += ["-o", "%s=%s" % (key, options[key])]
    auth = start_auth({}, *arguments)
    assert without_extra(auth.ask(ALICE, PASSWORDS[ALICE], protocol="sieve")) == ok(PORTS["sieve"])
    assert auth.ask(ALICE, "wrong")["Auth-Status"] == INVALID
