"""The SQL store: the operator's own queries, as Dovecot's passdb sql / userdb sql run them.

Options ([store] with type = sql):

    url             sqlite:///ABSOLUTE/PATH (the default kind, Python's own sqlite3, opened read-only)
                    or postgresql://USER@HOST:PORT/DB (psycopg 3; a password from the URL, PGPASSWORD
                    or ~/.pgpass; any libpq connection string works too)
    password_query  one row for a login: `password` ({SCHEME}hash, or bare in default_scheme), and
                    optionally the routing and header columns below. Zero rows: unknown login. More
                    than one: refused (a query that matches several users is a broken query).
    user_query      optional, routing only (SMTP relay by recipient); else password_query serves
    backends        defaults per protocol: imap=IP:PORT[,IP:PORT] pop3=... smtp=... sieve=...
    ports           the port a bare `host` column gets per protocol (imap=143 pop3=110 smtp=25 sieve=4190)
    default_scheme  scheme of a password without {SCHEME} (Dovecot's default_pass_scheme)
    timeout         seconds: statement timeout, and the longest wait for a connection (default 3)
    pool_size       PostgreSQL connections per process (default 4)

Columns: `imap`, `pop3`, `smtp`, `sieve` ("IP:PORT[,IP:PORT]") route that protocol; `host` (with `port`,
or the `ports` default for the request's protocol) routes any; a column whose name has a dash
(`SELECT uid AS "Auth-User"`) is sent as that reply header. Placeholders (see stores.py) are bound as
parameters, so they must not be quoted: `WHERE userid = %{user}`, not `'%{user}'`.
"""

import re
import time

import gevent

from mailproxy.authserver.stores import (
    PLACEHOLDERS,
    Pool,
    Store,
    StoreConfigError,
    StoreUnavailable,
    values_for,
    warn,
)

_TOKENS = re.compile(r"%%|%\{(\w+)\}|%(\w)|'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|%")


def bind_query(text, style):
    """The query with each placeholder as a bound parameter: ":name" (sqlite3) or "%(name)s" (psycopg),
    and the names it binds. A placeholder inside quotes is an error: it would be a literal, and quoting
    it means the operator expected string formatting."""
    out, names = [], set()
    position = 0
    for match in _TOKENS.finditer(text):
        out.append(text[position:match.start()])
        position = match.end()
        token = match.group(0)
        name = match.group(1) or match.group(2)
        if name is not None:
            if name not in PLACEHOLDERS:
                raise StoreConfigError("unknown placeholder %r in %r" % (token, text))
            name = PLACEHOLDERS[name]
            names.add(name)
            out.append(":" + name if style == "sqlite" else "%%(%s)s" % name)
        elif token[0] in "'\"":
            if re.search(r"%\{\w+\}|%[a-z]", token):
                raise StoreConfigError("placeholder inside quotes in %r: placeholders are bound as "
                                       "parameters, write %%{user} without quotes" % text)
            out.append(token.replace("%", "%%") if style == "psycopg" else token)
        else:  # "%%" or a lone "%": a literal percent sign
            out.append("%%" if style == "psycopg" else "%")
    out.append(text[position:])
    return "".join(out), names


class SqlStore(Store):
    label = "database"

    def __init__(self, options):
        super().__init__(options)
        url = options.get("url", "")
        if not url:
            raise StoreConfigError("the sql store needs url= (sqlite:///PATH or postgresql://...)")
        if not options.get("password_query"):
            raise StoreConfigError("the sql store needs password_query=")
        self.postgresql = url.startswith(("postgresql:", "postgres:")) or "=" in url.split("/", 1)[0]
        style = "psycopg" if self.postgresql else "sqlite"
        self.password_query, used = bind_query(options["password_query"], style)
        self.user_query = None
        if options.get("user_query"):
            self.user_query, more = bind_query(options["user_query"], style)
            used |= more
        self.uses_client = "client" in used
        self.pool_size = int(options.get("pool_size", 4))
        if self.postgresql:
            self._open_postgresql(url)
        else:
            self._open_sqlite(url)

    # -- SQLite: the standard library's, one read-only connection per process --------------------------

    def _open_sqlite(self, url):
        import sqlite3

        self.errors = (sqlite3.Error,)
        path = url[len("sqlite://"):] if url.startswith("sqlite://") else url
        if not path.startswith("/"):
            raise StoreConfigError("sqlite url needs an absolute path: sqlite:////var/lib/mail/users.db")

        def connect():
            # mode=ro: the auth server never writes, and a missing file is an error, not a new database.
            conn = sqlite3.connect("file:%s?mode=ro" % path, uri=True, timeout=self.timeout,
                                   check_same_thread=False, isolation_level=None)
            conn.row_factory = sqlite3.Row
            return conn

        # sqlite3 runs in this thread and never yields to gevent, so one connection serves the process.
        self.pool = Pool(connect, lambda conn: conn.close(), 1, self.timeout)

    def _run_sqlite(self, conn, query, params):
        # SQLite has no statement timeout: the progress handler interrupts a query past its deadline.
        deadline = time.monotonic() + self.timeout
        conn.set_progress_handler(lambda: time.monotonic() > deadline, 10000)
        try:
            cursor = conn.execute(query, params)
            rows = cursor.fetchmany(2)
            cursor.close()
        finally:
            conn.set_progress_handler(None, 0)
        return [{key: row[key] for key in row.keys()} for row in rows]

    # -- PostgreSQL: psycopg 3 with psycopg-pool ------------------------------------------------------------

    def _open_postgresql(self, url):
        import psycopg
        import psycopg_pool
        from psycopg.rows import dict_row

        self.errors = (psycopg.Error, psycopg_pool.PoolTimeout, gevent.Timeout)
        milliseconds = max(1, int(self.timeout * 1000))
        kwargs = {
            "autocommit": True,  # a read never leaves the connection idle in a transaction
            "row_factory": dict_row,
            "connect_timeout": max(1, int(round(self.timeout))),
            "application_name": "mailproxy-auth",
            # The server cancels a slow query itself; the gevent timeout below covers a server that
            # does not answer at all.
            "options": "-c statement_timeout=%d" % milliseconds,
        }
        self.pg_pool = psycopg_pool.ConnectionPool(
            url, min_size=1, max_size=self.pool_size, kwargs=kwargs, timeout=self.timeout,
            open=False, name="mailproxy-auth", reconnect_timeout=3600,
            # Never hand out a connection the server dropped while it sat idle (a restarted database).
            check=psycopg_pool.ConnectionPool.check_connection)
        self.pg_pool.open(wait=False)

    def _run_postgresql(self, query, params):
        with gevent.Timeout(self.timeout + 1):
            with self.pg_pool.connection() as conn:
                cursor = conn.execute(query, params)
                return cursor.fetchmany(2)

    # -- the store --------------------------------------------------------------------------------------

    def rows(self, query, login, protocol, client):
        params = values_for(login, protocol, client)
        try:
            if self.postgresql:
                return self._run_postgresql(query, params)
            with self.pool.connection() as (conn, _):
                return self._run_sqlite(conn, query, params)
        except self.errors as exc:
            raise StoreUnavailable("database: %s" % (str(exc).strip() or type(exc).__name__)) from None

    def find(self, login, protocol, client, purpose="password"):
        if "\0" in login:
            return None  # no SQL text holds a NUL (PostgreSQL refuses it outright): nobody's login
        query = self.user_query if purpose == "route" and self.user_query else self.password_query
        rows = self.rows(query, login, protocol, client)
        if not rows:
            return None
        if len(rows) > 1:
            warn("database: the query returned several rows for one login; refused")
            return None
        fields = {(key if "-" in key else key.lower()): value for key, value in rows[0].items()}
        try:
            return self.user_from(login, protocol, fields, "the database's row")
        except ValueError as exc:
            raise StoreUnavailable("database: %s" % exc) from None

    def close(self):
        if self.postgresql:
            self.pg_pool.close(timeout=5)
        else:
            self.pool.close()
