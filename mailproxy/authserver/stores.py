"""Where mailproxy-auth finds its users: the users file, an SQL database or an LDAP directory.

Every store answers the same two questions, so the proxy gets the same reply whatever the store:

- ``authenticate(login, method, password, salt, protocol, client)``: the user (users.User, whose
  password is checked by users.py whatever store it came from), or None;
- ``backend(login, protocol, client)``: (ip, port) for a login, or None (SMTP relay by recipient).

and ``find(login, protocol, client)`` for a login whose proof is not a password (OAuth). A store that
cannot answer now (database or directory down, a timeout) raises StoreUnavailable: the auth server
then answers a temporary failure, never OK and never a crash.

An unknown login is checked against a decoy hash (users.py's reasoning): the users file takes one of
its own users'; SQL and LDAP take the most common scheme and cost among the users they have found so
far, starting from a SHA512-CRYPT of Dovecot's default cost, so that an unknown login costs what a
known one does.

The options come from the command line (``--store sql -o url=...``) or from a small INI file
(``--config FILE``, section ``[store]``, and ``[cache]`` for the answer cache)::

    [store]
    type = sql
    url = postgresql://mailproxy@db.example.org/mail
    password_query = SELECT password, host FROM users WHERE username = %{username} AND domain = %{domain}

Queries and LDAP filters name their values as Dovecot does: ``%{user}`` (``%u``) the login,
``%{username}`` (``%n``) its local part, ``%{domain}`` (``%d``), ``%{service}`` (``%s``) the protocol,
``%{rip}`` (``%r``) the client address. SQL binds them as parameters (never formatted into the query);
LDAP escapes them per RFC 4515.
"""

import collections
import configparser
import hashlib
import hmac
import os
import re
import threading
import time
from contextlib import contextmanager

from mailproxy.authserver.users import (
    PROTOCOLS,
    User,
    UsersFileError,
    _crypt,
    choose,
    parse,
    parse_addresses,
    parse_password,
)

STORE_TYPES = ("users", "sql", "ldap")
DEFAULT_PORTS = {"imap": 143, "pop3": 110, "smtp": 25, "sieve": 4190}
# Reply headers the auth server itself decides: a column or attribute must not override them.
RESERVED_HEADERS = {"auth-status", "auth-server", "auth-port", "auth-wait", "auth-pass", "auth-error-sasl"}
PLACEHOLDERS = {
    "user": "login", "u": "login", "login": "login",
    "username": "username", "n": "username",
    "domain": "domain", "d": "domain",
    "service": "protocol", "s": "protocol", "protocol": "protocol",
    "rip": "client", "r": "client", "client": "client",
}


class StoreUnavailable(Exception):
    """The store cannot answer now: a temporary failure for the client, with Auth-Wait."""


class StoreConfigError(ValueError):
    pass


def values_for(login, protocol, client):
    """The placeholders' values for one request."""
    username, at, domain = login.rpartition("@")
    if not at:
        username, domain = login, ""
    return {"login": login, "username": username, "domain": domain, "protocol": protocol or "",
            "client": client or ""}


def placeholders(text):
    """The placeholder names a query or filter uses (a config error for an unknown one)."""
    names = set()
    for match in re.finditer(r"%%|%\{(\w+)\}|%(\w)", text):
        name = match.group(1) or match.group(2)
        if name is None:
            continue
        if name not in PLACEHOLDERS:
            raise StoreConfigError("unknown placeholder %r in %r" % (match.group(0), text))
        names.add(PLACEHOLDERS[name])
    return names


# -- the decoy ------------------------------------------------------------------------------------


class DecoyKeeper:
    """For stores that learn their users one at a time: a decoy hash with the most common scheme and
    cost among the users found so far, so that an unknown login costs what a known one does."""

    def __init__(self):
        salt = hashlib.sha256(os.urandom(16)).hexdigest()[:16]
        # Dovecot's default scheme and cost (doveadm pw), until real users show what this store uses.
        secret = _crypt(os.urandom(16).hex().encode(), ("$6$" + salt).encode()) or b"*"
        self.seen = collections.Counter()
        self.examples = {}
        self.decoy = User("", "SHA512-CRYPT", secret.decode())
        self.lock = threading.Lock()

    def saw(self, user):
        cost = _cost(user)
        if cost == "UNUSABLE":
            return
        with self.lock:
            self.seen[cost] += 1
            self.examples.setdefault(cost, user)
            if len(self.seen) > 64:  # a store with users of every cost under the sun: keep the commonest
                self.seen = collections.Counter(dict(self.seen.most_common(32)))
                self.examples = {key: self.examples[key] for key in self.seen}
            # A store of {PLAIN} users gets a {PLAIN} decoy: a hash there would make unknown logins the
            # slow ones.
            self.decoy = self.examples[self.seen.most_common(1)[0][0]]

    def check(self, method, password, salt):
        self.decoy.check(method, password, salt)  # for its time only: an unknown login never passes


def _cost(user):
    """The part of a stored password that decides its check's time: "$6$rounds=N", "$2b$12", PLAIN."""
    if user.scheme in ("PLAIN", "UNUSABLE"):
        return user.scheme
    parts = user.secret.split("$")
    if len(parts) < 3:
        return user.scheme
    if parts[2].startswith("rounds=") or parts[1].startswith("2"):
        return "$".join(parts[:3])
    return "$".join(parts[:2])


# -- the store interface -----------------------------------------------------------------------------


class Store:
    label = "store"
    uses_client = False  # whether answers may depend on the client address (the cache's key)

    def __init__(self, options):
        self.options = options
        self.defaults = routes_option(options.get("backends", ""), "backends")
        self.ports = ports_option(options.get("ports", ""))
        self.default_scheme = options.get("default_scheme") or None
        self.timeout = float(options.get("timeout", 3))
        self.decoys = DecoyKeeper()

    def find(self, login, protocol, client, purpose="password"):
        """The user of this login (purpose "password": with its password; "route": routing only)."""
        raise NotImplementedError

    def authenticate(self, login, method, password, salt, protocol, client):
        user = self.find(login, protocol, client)
        if user is None:
            self.decoys.check(method, password, salt)
            return None
        self.decoys.saw(user)
        return user if self.verify(user, method, password, salt) else None

    def verify(self, user, method, password, salt):
        return user.check(method, password, salt)

    def backend(self, login, protocol, client, user=None):
        if user is None:
            user = self.find(login, protocol, client, purpose="route")
        choices = user.backends.get(protocol) if user is not None else None
        return choose(choices or self.defaults.get(protocol), login)

    def close(self):
        pass

    def user_from(self, login, protocol, fields, where):
        """A users.User from a row or an entry: field name -> value (str, list of str, or None)."""
        password = first(fields.get("password"))
        if password:
            try:
                scheme, secret = parse_password(password, where, self.default_scheme)
            except UsersFileError:
                # A password this server cannot check (another scheme): nobody logs in with it.
                scheme, secret = "UNUSABLE", ""
        else:
            scheme, secret = "UNUSABLE", ""
        backends = {}
        for name in PROTOCOLS:
            value = fields.get(name)
            if value:
                backends[name] = parse_addresses(",".join(as_list(value)).replace(" ", ""), where)
        host = first(fields.get("host"))
        if host and protocol in PROTOCOLS and protocol not in backends:
            port = first(fields.get("port")) or self.ports.get(protocol)
            backends[protocol] = parse_addresses("%s:%s" % (host, port), where)
        headers = tuple((name, first(value)) for name, value in fields.items()
                        if "-" in name and name.lower() not in RESERVED_HEADERS and first(value))
        return User(login, scheme, secret, backends, headers)


def first(value):
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return None if value is None else str(value)


def as_list(value):
    values = value if isinstance(value, (list, tuple)) else [value]
    return [first(v) for v in values if v is not None]


def routes_option(text, option):
    """"imap=IP:PORT[,IP:PORT] pop3=..." as protocol -> [(ip, port)]."""
    routes = {}
    for word in text.split():
        protocol, equals, addresses = word.partition("=")
        if not equals or protocol not in PROTOCOLS:
            raise StoreConfigError("invalid %s entry %r (expected imap=IP:PORT[,IP:PORT])" % (option, word))
        try:
            routes[protocol] = parse_addresses(addresses, option)
        except UsersFileError as exc:
            raise StoreConfigError(str(exc)) from None
    return routes


def ports_option(text):
    """"imap=143 sieve=4190": the port a bare host column or attribute gets, per protocol."""
    ports = dict(DEFAULT_PORTS)
    for word in text.split():
        protocol, equals, port = word.partition("=")
        if not equals or protocol not in PROTOCOLS or not port.isdigit() or not 0 < int(port) < 65536:
            raise StoreConfigError("invalid ports entry %r (expected imap=143)" % word)
        ports[protocol] = int(port)
    return ports


# -- the users file -----------------------------------------------------------------------------------


class UsersFileStore(Store):
    """Today's users file (users.py), re-read when it changes on disk (checked at most once a second);
    a broken file keeps the last good one."""

    label = "users file"

    def __init__(self, options):
        super().__init__(options)
        self.path = options.get("path") or options.get("users")
        if not self.path:
            raise StoreConfigError("the users store needs path= (or --users FILE)")
        self.mtime = None
        self.checked = 0.0
        try:
            self.directory = self.load()
        except (OSError, UsersFileError) as exc:
            raise StoreConfigError(str(exc)) from None

    def load(self):
        with open(self.path, encoding="utf-8") as source:
            self.mtime = os.fstat(source.fileno()).st_mtime
            return parse(source.read(), self.path)

    def current(self):
        now = time.monotonic()
        if now - self.checked >= 1.0:
            self.checked = now
            try:
                if os.stat(self.path).st_mtime != self.mtime:
                    self.reload()
            except OSError as exc:
                warn("cannot stat users file: %s" % exc)
        return self.directory

    def reload(self):
        try:
            self.directory = self.load()
        except (OSError, UsersFileError) as exc:
            warn("users file not reloaded, keeping the previous one: %s" % exc)

    def find(self, login, protocol, client, purpose="password"):
        return self.current().users.get(login)

    def authenticate(self, login, method, password, salt, protocol, client):
        return self.current().authenticate(login, method, password, salt)

    def backend(self, login, protocol, client, user=None):
        return self.current().backend(login, protocol)


# -- a small connection pool -----------------------------------------------------------------------------


class Pool:
    """At most `size` connections per process, made on demand; a connection that failed is closed,
    never handed out again, so the next request reconnects (a restarted database or directory)."""

    def __init__(self, make, close, size, timeout):
        self.make, self.close_one = make, close
        self.idle = []
        self.slots = threading.BoundedSemaphore(size)
        self.timeout = timeout
        self.closed = False

    @contextmanager
    def connection(self):
        """Yields (connection, reused): reused tells a stale connection's failure from a fresh one's."""
        if not self.slots.acquire(timeout=self.timeout):
            raise StoreUnavailable("no connection free within %gs" % self.timeout)
        conn = None
        try:
            reused = bool(self.idle)
            conn = self.idle.pop() if reused else self.make()
            yield conn, reused
            if not self.closed:
                self.idle.append(conn)
                conn = None
        finally:
            if conn is not None:
                self._close(conn)
            self.slots.release()

    def _close(self, conn):
        try:
            self.close_one(conn)
        except Exception:  # closing a broken connection may fail in as many ways as it broke
            pass

    def close(self):
        self.closed = True
        while self.idle:
            self._close(self.idle.pop())


# -- opening a store from options ----------------------------------------------------------------------


def read_config(path):
    """The [store] and [cache] sections of an INI file, as two dicts."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as source:
            parser.read_file(source)
    except (OSError, configparser.Error) as exc:
        raise StoreConfigError("cannot read %s: %s" % (path, exc)) from None
    unknown = set(parser.sections()) - {"store", "cache"}
    if unknown:
        raise StoreConfigError("unknown section(s) in %s: %s" % (path, ", ".join(sorted(unknown))))
    store = dict(parser["store"]) if parser.has_section("store") else {}
    cache = dict(parser["cache"]) if parser.has_section("cache") else {}
    for key in ("bind_password_file", "password_file"):
        if key in store:
            with open(store.pop(key), encoding="utf-8") as secret:
                store[key.replace("_file", "")] = secret.read().rstrip("\n")
    return store, cache


def open_store(options):
    kind = options.get("type", "users")
    if kind == "users":
        return UsersFileStore(options)
    if kind == "sql":
        from mailproxy.authserver.sql import SqlStore

        return SqlStore(options)
    if kind == "ldap":
        from mailproxy.authserver.ldap import LdapStore

        return LdapStore(options)
    raise StoreConfigError("unknown store type %r (expected one of %s)" % (kind, ", ".join(STORE_TYPES)))


# -- the answer cache ------------------------------------------------------------------------------------


class AnswerCache:
    """Answers of the store (OK with its backend, or invalid) for `ttl` and `negative_ttl` seconds.

    The key is an HMAC, under a key drawn at start and never written anywhere, of everything the
    answer depends on, the password included: the cache holds no password, and a changed password
    misses it at once while the old one is still taken until its answer expires. Temporary failures are
    never cached. At most `size` answers are kept, the oldest going first.
    """

    def __init__(self, ttl, negative_ttl=None, size=100000, clock=time.monotonic):
        self.ttl = float(ttl)
        self.negative_ttl = self.ttl if negative_ttl is None else float(negative_ttl)
        self.size = int(size)
        self.clock = clock
        self.secret = os.urandom(32)
        self.entries = collections.OrderedDict()

    @property
    def enabled(self):
        return self.ttl > 0 or self.negative_ttl > 0

    def key(self, *parts):
        mac = hmac.new(self.secret, digestmod=hashlib.sha256)
        for part in parts:
            data = part if isinstance(part, bytes) else str(part).encode("utf-8", "surrogatepass")
            mac.update(b"%d:" % len(data) + data)  # length-prefixed: no two tuples share a key
        return mac.digest()

    def get(self, key):
        entry = self.entries.get(key)
        if entry is None:
            return None
        expires, answer = entry
        if expires <= self.clock():
            del self.entries[key]
            return None
        return answer

    def put(self, key, answer, positive):
        ttl = self.ttl if positive else self.negative_ttl
        if ttl <= 0:
            return
        self.entries.pop(key, None)
        self.entries[key] = (self.clock() + ttl, answer)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)

    def clear(self):
        self.entries.clear()


def resolve(target):
    """(ip, port): the proxy takes an address in Auth-Server, and a store may well hold host names."""
    import ipaddress
    import socket

    host, port = target
    try:
        ipaddress.ip_address(host)
        return target
    except ValueError:
        pass
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][0], port
    except OSError as exc:
        raise StoreUnavailable("cannot resolve backend %s: %s" % (host, exc)) from None


def warn(message):
    import sys

    sys.stderr.write("mailproxy-auth: %s\n" % message)
