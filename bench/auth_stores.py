"""mailproxy-auth's own rate per store: auth requests per second from the users file, SQLite, PostgreSQL
and LDAP, with the answer cache off and on (issue 27).

    python -m bench.auth_stores [--seconds 5] [--concurrency 16] [--users 200] [--rounds 3]

Starts a private PostgreSQL and slapd (tests/support/store_servers.py: free ports, temporary directories,
stopped by pid), fills every store with the same users, then for each (store, password scheme, cache)
starts one mailproxy-auth process and loads it from a separate process (gevent + geventhttpclient,
keep-alive, as mailproxy with `auth_http_keepalive on`), each request a right password for the next user
in turn. Passwords are SHA512-CRYPT at Dovecot's default cost (what `doveadm pw` writes), whose check
is most of a request, and PLAIN, which leaves the store's own cost. LDAP checks by bind (the directory
hashes). Figures are medians over rounds; writes bench/results/auth_stores.md.
"""

import argparse
import json
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

from tools.ports import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the test suite's servers (tests/support/store_servers.py)
RESULT_MD = os.path.join(ROOT, "bench", "results", "auth_stores.md")
STORES = ("users file", "SQLite", "PostgreSQL", "LDAP")
SCHEMES = ("SHA512-CRYPT", "PLAIN")
QUERY = "SELECT password, host FROM users WHERE userid = %{username} AND domain = %{domain}"



def crypt_sha512(password):
    from mailproxy.authserver.users import _crypt

    salt = os.urandom(12).hex()[:16]
    return _crypt(password.encode(), ("$6$" + salt).encode()).decode()


def make_users(count, scheme):
    users = []
    for n in range(count):
        login, password = "user%d@example.test" % n, "password-%d" % n
        stored = "{PLAIN}" + password if scheme == "PLAIN" else "{SHA512-CRYPT}" + crypt_sha512(password)
        users.append((login, password, stored))
    return users


class Fixtures:
    """Every store holding the same users, one table / subtree per scheme."""

    def __init__(self, work, count):
        import trustme

        from support import store_servers as servers

        self.servers = servers
        self.work = work
        self.users = {scheme: make_users(count, scheme) for scheme in SCHEMES}
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1")
        paths = [os.path.join(work, name) for name in ("cert.pem", "key.pem", "ca.pem")]
        cert.cert_chain_pems[0].write_to_path(paths[0])
        cert.private_key_pem.write_to_path(paths[1])
        ca.cert_pem.write_to_path(paths[2])
        self.postgres = servers.PostgreSQL(free_port()).start()
        self.slapd = servers.Slapd(free_port(), free_port(), *paths).start()
        self.postgres.sql("CREATE DATABASE mail;", database="postgres")
        schema = "CREATE TABLE users_%s (userid TEXT, domain TEXT, password TEXT, host TEXT, PRIMARY KEY (userid, domain));"
        self.sqlite = os.path.join(work, "users.db")
        with sqlite3.connect(self.sqlite) as db:
            for scheme in SCHEMES:
                table = scheme.replace("-", "_").lower()
                db.execute(schema % table)
                db.executemany("INSERT INTO users_%s VALUES (?, ?, ?, '127.0.0.1')" % table,
                               [login.split("@") + [stored] for login, _, stored in self.users[scheme]])
                self.postgres.sql((schema % table) + "".join(
                    "INSERT INTO users_%s VALUES ('%s', '%s', '%s', '127.0.0.1');\n" % (
                        (table,) + tuple(login.split("@")) + (stored,)) for login, _, stored in self.users[scheme]))
                ldif = ["dn: ou=%s,ou=people,%s\nobjectClass: organizationalUnit\nou: %s\n"
                        % (table, servers.SUFFIX, table)]
                for login, password, stored in self.users[scheme]:
                    uid = login.split("@")[0]
                    secret = stored.partition("}")[2]
                    ldif.append("dn: uid=%s,ou=%s,ou=people,%s\nobjectClass: inetOrgPerson\n"
                                "objectClass: inetLocalMailRecipient\nuid: %s\ncn: %s\nsn: %s\nmail: %s\n"
                                "userPassword: %s\nmailHost: 127.0.0.1\n" % (
                                    uid, table, servers.SUFFIX, uid, uid, uid, login,
                                    secret if scheme == "PLAIN" else "{CRYPT}" + secret))
                self.slapd.add("\n".join(ldif))
        db.close()

    def options(self, store, scheme):
        table = scheme.replace("-", "_").lower()
        common = {"ports": "imap=143", "timeout": "5", "pool_size": "8"}
        if store == "users file":
            path = os.path.join(self.work, "users-" + table)
            with open(path, "w") as out:
                out.write("backend imap 127.0.0.1:143\n" + "".join(
                    "user %s %s\n" % (login, stored) for login, _, stored in self.users[scheme]))
            return {"type": "users", "path": path}
        query = QUERY.replace("FROM users", "FROM users_" + table)
        if store == "SQLite":
            return dict(common, type="sql", url="sqlite://" + self.sqlite, password_query=query)
        if store == "PostgreSQL":
            return dict(common, type="sql", url=self.postgres.url, password_query=query)
        return dict(common, type="ldap", url=self.slapd.url, bind_dn=self.servers.SEARCH_DN,
                    bind_password=self.slapd.search_password, auth="bind", attributes="host=mailHost",
                    base="ou=%s,ou=people,%s" % (table, self.servers.SUFFIX),
                    filter="(&(objectClass=inetOrgPerson)(mail=%{user}))")

    def close(self):
        self.postgres.remove()
        self.slapd.remove()


def start_auth(work, options, cache_ttl):
    config = os.path.join(work, "auth.ini")
    with open(config, "w") as out:
        out.write("[store]\n" + "".join("%s = %s\n" % item for item in options.items()))
        out.write("[cache]\nttl = %d\n" % cache_ttl)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "mailproxy.authserver.app", "--config", config, "--listen", "127.0.0.1:%d" % port,
         "--access-log", os.devnull, "--max-failures", "1000000"],
        cwd=ROOT, stdin=subprocess.DEVNULL, stderr=open(os.path.join(work, "auth.stderr"), "a"))
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return process, port
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("mailproxy-auth did not start")
            time.sleep(0.02)


def load(port, seconds, concurrency, users):
    """In a child process: keep-alive requests from `concurrency` greenlets for `seconds`."""
    child = subprocess.run(
        [sys.executable, "-m", "bench.auth_stores", "--client", str(port), str(seconds), str(concurrency)],
        cwd=ROOT, input=json.dumps(users), capture_output=True, text=True, timeout=seconds + 120)
    if child.returncode != 0:
        raise RuntimeError(child.stderr)
    return json.loads(child.stdout)


def client(port, seconds, concurrency):
    from gevent import monkey

    monkey.patch_all()
    import gevent
    from geventhttpclient import HTTPClient

    users = json.loads(sys.stdin.read())
    http = HTTPClient("127.0.0.1", port, concurrency=concurrency, connection_timeout=10, network_timeout=30)
    counts = {"ok": 0, "other": 0}
    stop_at = time.monotonic() + seconds

    def worker(offset):
        n = offset
        while time.monotonic() < stop_at:
            login, password = users[n % len(users)]
            n += concurrency
            response = http.get("/auth", headers={
                "Auth-Method": "plain", "Auth-User": login, "Auth-Pass": password, "Auth-Protocol": "imap",
                "Auth-Login-Attempt": "1", "Client-IP": "127.0.0.1"})
            response.read()
            status = response.get("Auth-Status")
            response.release()
            counts["ok" if status == "OK" else "other"] += 1

    began = time.monotonic()
    gevent.joinall([gevent.spawn(worker, n) for n in range(concurrency)], raise_error=True)
    elapsed = time.monotonic() - began
    print(json.dumps({"rate": counts["ok"] / elapsed, "failed": counts["other"]}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--client", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        return client(int(args.client[0]), float(args.client[1]), int(args.client[2]))
    work = tempfile.mkdtemp(prefix="bench-auth-stores-")
    fixtures = Fixtures(work, args.users)
    results = {}
    began = time.monotonic()
    try:
        for round_ in range(args.rounds):
            for scheme in SCHEMES:
                credentials = [(login, password) for login, password, _ in fixtures.users[scheme]]
                for store in STORES:
                    for cache in (0, 300):
                        process, port = start_auth(work, fixtures.options(store, scheme), cache)
                        try:
                            load(port, 1.0, args.concurrency, credentials)  # warm-up: pools, libcrypt
                            result = load(port, args.seconds, args.concurrency, credentials)
                        finally:
                            process.terminate()
                            process.wait(10)
                        results.setdefault((store, scheme, cache), []).append(result)
                        sys.stderr.write("round %d %-10s %-12s cache %-3s %8.0f req/s, %d not OK\n" % (
                            round_ + 1, store, scheme, "on" if cache else "off", result["rate"],
                            result["failed"]))
    finally:
        fixtures.close()
        shutil.rmtree(work, ignore_errors=True)
    text = report(results, args, time.monotonic() - began)
    os.makedirs(os.path.dirname(RESULT_MD), exist_ok=True)
    with open(RESULT_MD, "w") as out:
        out.write(text)
    print(text)


def report(results, args, seconds):
    def median(key, field):
        return statistics.median(r[field] for r in results[key])

    lines = ["Made by `python -m bench.auth_stores --seconds %g --concurrency %d --users %d --rounds %d` (%.0f s): "
             "one mailproxy-auth process (one core at most) per row, loaded over keep-alive HTTP by a separate "
             "process, every request a right password for the next of %d users; medians of %d rounds. "
             "Cache on: `[cache] ttl = 300`, so after the first pass over the users every answer comes from it. "
             "The stores' servers (PostgreSQL, slapd) share the machine's two cores with the auth server and the "
             "load, so figures are relative." % (args.seconds, args.concurrency, args.users, args.rounds, seconds,
                                                  args.users, args.rounds),
             "",
             "| store | passwords | cache off, req/s | cache on, req/s | on / off |",
             "|---|---|--:|--:|--:|"]
    for scheme in SCHEMES:
        for store in STORES:
            off, on = median((store, scheme, 0), "rate"), median((store, scheme, 300), "rate")
            failed = sum(r["failed"] for cache in (0, 300) for r in results[(store, scheme, cache)])
            lines.append("| %s | %s | %.0f | %.0f | %.1fx |%s" % (
                store, scheme, off, on, on / off if off else 0, " (%d not OK)" % failed if failed else ""))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
