"""mailproxy-auth: an auth_http server for mailproxy and nginx, good enough to run in production.

It answers nginx's auth_http protocol from a store of users, the users file (users.py), an SQL database
(sql.py: SQLite or PostgreSQL) or an LDAP directory (ldap.py), see stores.py: `Auth-Status: OK` with the
backend's `Auth-Server`/`Auth-Port` (and `Auth-Pass` for APOP and CRAM-MD5, which need the clear text
at the backend), or a failure text with `Auth-Wait` so the client may try again, until a client
address, its IPv6 /64 or a login name has failed too often: then it answers without `Auth-Wait`,
which makes the proxy close the session, and keeps doing so until the lock-out expires. A successful
login clears the failures of that login only, never those of its address, so an attacker cannot reset
the count by logging in to an account of their own between guesses. The users file is re-read when it
changes on disk (checked at most once a second); SIGHUP re-reads the configuration and opens the store
anew (reconnects), and a broken one keeps the running store. A store that cannot answer (a database
or directory down) gets a temporary failure with Auth-Wait, never OK. With --cache-ttl, answers are
reused for that long, keyed by an HMAC of the request that holds no password (stores.AnswerCache).

Usage: mailproxy-auth (--users FILE | --config FILE | --store sql|ldap -o KEY=VALUE...)
                      [--cache-ttl SECONDS] [--cache-negative-ttl SECONDS]
                      [--listen 127.0.0.1:9000] [--max-failures 10] [--lockout 300]
                      [--max-tracked 100000] [--wait 3] [--access-log FILE|-] [--redis redis://HOST:PORT/DB]
                      [--jwt-key FILE [--jwt-algorithms HS256] [--jwt-audience AUD] [--jwt-issuer ISS]]
                      [--introspection-url URL [--introspection-auth USER:PASS]] [--jwt-user-claim sub]

With --jwt-key or --introspection-url, XOAUTH2 and OAUTHBEARER logins carry an OAuth 2.0 bearer token
(tokens.py): the token's user claim names a user of the users file, whose backend and (for {PLAIN}
users) clear-text password are sent back as Auth-User/Auth-Pass, because the backend knows passwords,
not tokens. A refused token gets RFC 7628's error JSON in Auth-Error-SASL.

The failure counters live in the process, or with --redis in Redis, shared by every mailproxy-auth using
it. In the process, at most --max-tracked counters below the limit are kept: past that the oldest are
forgotten, while locked-out keys are kept until their lock-out ends, so that flooding the table with
failures from fresh addresses bounds its memory without unlocking anyone.
"""

import argparse
import base64
import collections
import hashlib
import ipaddress
import json
import os
import signal
import sys
import time
import urllib.parse

# Nothing imported here may import ssl: main() patches with gevent first, and anything that took ssl
# before that keeps the unpatched one (and gevent warns). tokens (PyJWT, requests) and the store drivers
# are imported after the patch.
from mailproxy.authserver.stores import (
    AnswerCache, StoreConfigError, StoreUnavailable, open_store, read_config, resolve)
from mailproxy.log import escape_bytes
from mailproxy.protocol.common import OAUTH_METHODS

INVALID = "Invalid login or password"
LOCKED = "Too many invalid logins, try again later"
UNROUTED = "Temporary server problem, try again later"
INVALID_TOKEN = "invalid token"
# RFC 7628 3.2.2: the server's error, sent to the client as the challenge of the SASL error exchange.
BEARER_ERROR = base64.b64encode(json.dumps({"status": "401", "schemes": "bearer"}, separators=(",", ":")).encode()).decode()


class FailureCounter:
    """Failed logins per client address, per IPv6 /64 and per login, each counted for `lockout`
    seconds from its first failure; a key that reaches the limit is locked out for the rest of them.

    Memory is bounded by forgetting the oldest counters below the limit past `max_tracked`, never the
    locked ones: flooding the table from fresh addresses must not unlock anyone. Locked keys cost
    `limit` failures each and go when their lock-out ends.
    """

    def __init__(self, limit, lockout, max_tracked=100000, clock=time.monotonic):
        self.limit = limit
        self.lockout = lockout
        self.max_tracked = max_tracked
        self.clock = clock
        self.counting = collections.OrderedDict()  # key -> (failures, first failure time), oldest first
        self.lockouts = collections.OrderedDict()  # key -> time the lock-out ends, in the order locked

    def locked(self, ip, login=None) -> bool:
        now = self._expire()
        return any(self.lockouts.get(key, now) > now for key in failure_keys(ip, login))

    def failed(self, ip, login=None) -> bool:
        """Counts one failure; True when it reaches the limit."""
        now = self._expire()
        reached = False
        for key in failure_keys(ip, login):
            if self.lockouts.get(key, now) > now:
                reached = True
                continue
            count, since = self.counting.get(key, (0, now))
            if count + 1 >= self.limit:
                self.counting.pop(key, None)
                self.lockouts.pop(key, None)  # an expired lock-out still waiting behind a later one
                self.lockouts[key] = since + self.lockout
                reached = True
            else:
                self.counting[key] = (count + 1, since)
        while len(self.counting) > self.max_tracked:
            self.counting.popitem(last=False)
        return reached

    def succeeded(self, ip, login=None):
        # Only the login that proved itself starts afresh: clearing the address too would let an
        # attacker reset the count by logging in to an account of their own between guesses.
        if login:
            self.counting.pop(_login_key(login), None)

    def _expire(self):
        now = self.clock()
        # Counters are in the order of their first failure, so the expired ones are at the front.
        while self.counting:
            key, (_, since) = next(iter(self.counting.items()))
            if now - since <= self.lockout:
                break
            del self.counting[key]
        # Lock-outs are in the order they were locked, which their ends follow only roughly: one that
        # ended behind one still running is ignored by the lookups and dropped when that one ends.
        while self.lockouts:
            key, end = next(iter(self.lockouts.items()))
            if end > now:
                break
            del self.lockouts[key]
        return now


def failure_keys(ip, login):
    """The counters one login attempt touches: its address, its IPv6 /64 (where one client may hold
    billions of addresses), and its login name, case-insensitively."""
    keys = ["ip:" + (ip or "-")]
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        address = None
    if address is not None and address.version == 6 and address.ipv4_mapped is None:
        keys.append("net:" + str(ipaddress.IPv6Network((address, 64), strict=False)))
    if login:
        keys.append(_login_key(login))
    return keys


def _login_key(login):
    name = login.lower()
    if len(name) > 256:
        # Any client may send a login of kilobytes; a table of them would defeat --max-tracked.
        name = "sha256:" + hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()
    return "login:" + name


class RedisFailureCounter:
    """FailureCounter's limit kept in Redis, per client address, IPv6 /64 and login, so that every
    mailproxy-auth sharing the Redis (and every proxy node behind them) enforces one limit.

    Each key counts failures from its first one for `lockout` seconds (SET NX EX, then INCR, in one
    MULTI), the in-process counter's window; Redis forgets the keys then, so --max-tracked does not
    apply. A Redis that cannot be reached locks nobody out: refusing every login because the helper
    store is down would be an outage, not a defence.
    """

    PREFIX = "mailproxy-auth:failures:"

    def __init__(self, url, limit, lockout):
        import redis

        self.errors = redis.RedisError
        self.redis = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self.limit = limit
        self.lockout = lockout

    def _keys(self, ip, login):
        return [self.PREFIX + key for key in failure_keys(ip, login)]

    def locked(self, ip, login=None) -> bool:
        try:
            counts = self.redis.mget(self._keys(ip, login))
        except self.errors as exc:
            _warn("redis: %s" % exc)
            return False
        return any(int(count) >= self.limit for count in counts if count is not None)

    def failed(self, ip, login=None) -> bool:
        """Counts one failure; True when it reaches the limit. The answer follows the count INCR gave
        this failure, not a second read, so that however many auth servers answer one address at
        once, exactly limit - 1 failures are told "invalid" and every later one "locked"."""
        try:
            with self.redis.pipeline(transaction=True) as pipe:
                for key in self._keys(ip, login):
                    pipe.set(key, 0, ex=self.lockout, nx=True)
                    pipe.incr(key)
                counts = pipe.execute()[1::2]
        except self.errors as exc:
            _warn("redis: %s" % exc)
            return False
        return any(count >= self.limit for count in counts)

    def succeeded(self, ip, login=None):
        # As FailureCounter.succeeded: the address keeps its failures.
        if not login:
            return
        try:
            self.redis.delete(self.PREFIX + _login_key(login))
        except self.errors as exc:
            _warn("redis: %s" % exc)


class AuthApp:
    """The WSGI application: one auth_http request in, one header block out."""

    def __init__(self, store, failures, wait: int, access_log=None, tokens=None, cache=None):
        self.tokens = tokens  # tokens.TokenChecker, or None: then a bearer token is checked as a password
        self.store = store  # stores.Store; replaced whole on reload
        self.failures = failures
        self.wait = wait
        self.access_log = access_log
        self.cache = cache if cache is not None and cache.enabled else None
        self.generation = 0  # part of every cache key: a reload forgets the old store's answers
        self.reloader = None  # () -> a new store, for SIGHUP

    def reload(self):
        """SIGHUP: the configuration read again and the store opened anew (a new connection pool), or,
        when that fails, the running store kept."""
        try:
            store = self.reloader()
        except (OSError, StoreConfigError, StoreUnavailable) as exc:
            _warn("not reloaded, keeping the running store: %s" % exc)
            return
        old, self.store = self.store, store
        self.generation += 1
        if self.cache is not None:
            self.cache.clear()
        old.close()

    def __call__(self, environ, start_response):
        headers = self.answer(environ)
        start_response("200 OK", headers + [("Content-Length", "0")])
        return [b""]

    def answer(self, environ):
        header = lambda name: environ.get("HTTP_" + name.upper().replace("-", "_"), "")
        login = _unescape(header("Auth-User"))
        password = _unescape(header("Auth-Pass")).encode("latin-1")
        method = header("Auth-Method").lower()
        protocol = header("Auth-Protocol").lower()
        client = header("Client-IP")
        salt = header("Auth-Salt").strip().encode("latin-1")
        if method == "none":
            # An unauthenticated SMTP relay is routed by its recipient's domain.
            login = _recipient(header("Auth-SMTP-To"))
        result, reply = self.decide(login, password, method, protocol, client, salt)
        if self.access_log:
            self.access_log.write(
                '%s %s %s method=%s protocol=%s attempt=%s result="%s"\n'
                % (time.strftime("%Y-%m-%dT%H:%M:%S"), client or "-", _quote(login), method or "-",
                   protocol or "-", header("Auth-Login-Attempt") or "-", result)
            )
            self.access_log.flush()
        return reply

    def decide(self, login, password, method, protocol, client, salt):
        if self.failures.locked(client, login):
            return "locked", [("Auth-Status", LOCKED)]
        store = self.store
        try:
            if method in OAUTH_METHODS and self.tokens is not None:
                return self.decide_token(login, password, protocol, client, store)
            if method == "none":
                return self.route(store, login, protocol, client)
            return self.check(store, login, password, method, protocol, client, salt)
        except StoreUnavailable as exc:
            _warn(str(exc))
            return "unavailable", [("Auth-Status", UNROUTED), ("Auth-Wait", str(self.wait))]
        except Exception:  # a driver's surprise: the client may try again, and is never let in by it
            import traceback

            _warn("internal error:\n" + traceback.format_exc())
            return "error", [("Auth-Status", UNROUTED), ("Auth-Wait", str(self.wait))]

    def check(self, store, login, password, method, protocol, client, salt):
        key = None
        if self.cache is not None:
            key = self.cache.key(self.generation, method, protocol, client if store.uses_client else "", login,
                                 salt, password)
            cached = self.cache.get(key)
            if cached is not None:
                return self.checked(login, client, cached)
        user = store.authenticate(login, method, password, salt, protocol, client)
        if user is None:
            answer = None
        else:
            target = store.backend(login, protocol, client, user)
            answer = "unrouted" if target is None else _ok(target) + list(user.headers)
            if target is not None and method in ("apop", "cram-md5"):
                answer.append(("Auth-Pass", user.clear_text))
                key = None  # never cache a clear-text password
        if key is not None and answer != "unrouted":
            self.cache.put(key, answer or "invalid", positive=answer is not None)
        return self.checked(login, client, answer or "invalid")

    def checked(self, login, client, answer):
        if answer == "invalid":
            if self.failures.failed(client, login):
                return "locked", [("Auth-Status", LOCKED)]
            return "invalid", [("Auth-Status", INVALID), ("Auth-Wait", str(self.wait))]
        if answer == "unrouted":
            return "unrouted", [("Auth-Status", UNROUTED), ("Auth-Wait", str(self.wait))]
        self.failures.succeeded(client, login)
        return "ok", list(answer)

    def route(self, store, login, protocol, client):
        key = None
        if self.cache is not None:
            key = self.cache.key(self.generation, "none", protocol, client if store.uses_client else "", login)
            cached = self.cache.get(key)
            if cached is not None:
                return "ok", list(cached)
        target = store.backend(login, protocol, client)
        if target is None:
            return "unrouted", [("Auth-Status", UNROUTED), ("Auth-Wait", str(self.wait))]
        reply = _ok(target)
        if key is not None:
            self.cache.put(key, reply, positive=True)
        return "ok", reply

    def decide_token(self, login, token, protocol, client, store):
        from mailproxy.authserver import tokens

        try:
            subject = self.tokens.user(token.decode("latin-1"))
            reason = None
        except tokens.TokenUnavailable as exc:
            _warn(str(exc))
            return "unavailable", [("Auth-Status", UNROUTED), ("Auth-Wait", str(self.wait))]
        except tokens.TokenRefused as exc:
            subject, reason = None, str(exc)
        user = store.find(subject, protocol, client) if subject else None
        if subject and user is None:
            reason = "%r is not in the %s" % (subject, store.label)
        elif user is not None and login and login.casefold() != subject.casefold():
            # The client named someone else (authzid / user=) than the token speaks for.
            reason = "token is for %r, not %r" % (subject, login)
        if reason is not None:
            if self.failures.failed(client):
                return "locked", [("Auth-Status", LOCKED)]
            return "invalid token: %s" % reason, [
                ("Auth-Status", INVALID_TOKEN), ("Auth-Wait", str(self.wait)), ("Auth-Error-SASL", BEARER_ERROR)]
        target = store.backend(subject, protocol, client, user)
        if target is None:
            return "unrouted", [("Auth-Status", UNROUTED), ("Auth-Wait", str(self.wait))]
        self.failures.succeeded(client, subject)
        reply = _ok(target) + [("Auth-User", subject)]
        if user.clear_text is not None:
            # Without Auth-Pass the proxy hands the token itself to the backend, which then must take it
            # (Dovecot's oauth2 passdb, or a master login): hashed users cannot be logged in otherwise.
            reply.append(("Auth-Pass", user.clear_text))
        return "ok", reply


def _ok(target):
    host, port = resolve(target)
    return [("Auth-Status", "OK"), ("Auth-Server", host), ("Auth-Port", str(port))]


def _recipient(rcpt_command: str) -> str:
    start, end = rcpt_command.find("<"), rcpt_command.find(">")
    return rcpt_command[start + 1 : end] if 0 <= start < end else ""


def _unescape(value: str) -> str:
    # nginx %-escapes only controls, space and %, and sends other bytes raw (read here as latin-1).
    return urllib.parse.unquote(value, encoding="latin-1")


def _quote(text: str) -> str:
    return '"%s"' % escape_bytes(text.encode("latin-1", "replace"))


def _warn(message):
    sys.stderr.write("mailproxy-auth: %s\n" % message)


def main(argv=None):
    # Before anything imports ssl (tokens: PyJWT and requests; psycopg; ldap3): patched late, ssl stays
    # blocking in the modules that took it, and gevent warns.
    from gevent import monkey

    monkey.patch_all()
    import gevent
    from gevent.pywsgi import WSGIServer

    from mailproxy.authserver import tokens

    parser = argparse.ArgumentParser(prog="mailproxy-auth", description=__doc__.split("\n\n")[0])
    stores = parser.add_argument_group("where the users are (see mailproxy/authserver/stores.py)")
    stores.add_argument("--users", help="users file (see etc/users.example): the users store")
    stores.add_argument("--config", metavar="FILE",
                        help="INI file: [store] type = users|sql|ldap and its options, [cache] ttl, "
                             "negative_ttl, size; re-read on SIGHUP")
    stores.add_argument("--store", choices=("users", "sql", "ldap"), help="store type (overrides the file's)")
    stores.add_argument("-o", "--store-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a store option, e.g. -o url=sqlite:////var/lib/mail/users.db "
                             "-o password_query=...; overrides the file's")
    stores.add_argument("--cache-ttl", type=float, metavar="SECONDS",
                        help="seconds an OK answer is reused (default 0: no cache)")
    stores.add_argument("--cache-negative-ttl", type=float, metavar="SECONDS",
                        help="seconds an invalid-password answer is reused (default: --cache-ttl)")
    parser.add_argument("--listen", default="127.0.0.1:9000", help="address:port or unix:/path")
    parser.add_argument("--max-failures", type=int, default=10,
                        help="failures per client IP, per IPv6 /64 and per login before lock-out")
    parser.add_argument("--lockout", type=int, default=300, help="seconds a lock-out lasts")
    parser.add_argument("--max-tracked", type=int, default=100000, metavar="N",
                        help="failure counters below the limit kept in memory (without --redis); past N "
                             "the oldest are forgotten, locked-out ones are kept until their lock-out ends")
    parser.add_argument("--redis", metavar="URL",
                        help="keep the failure counters (per IP, per IPv6 /64 and per login) in Redis, shared "
                             "by every mailproxy-auth using it, e.g. redis://127.0.0.1:6379/0")
    parser.add_argument("--wait", type=int, default=3, help="Auth-Wait seconds after a failure")
    parser.add_argument("--access-log", default="-", help="file for one line a request, - for stdout")
    oauth = parser.add_argument_group("OAuth 2.0 bearer tokens (XOAUTH2, OAUTHBEARER)")
    oauth.add_argument("--jwt-key", help="HS* shared secret file, or the issuer's PEM public key (RS*/ES*)")
    oauth.add_argument("--jwt-algorithms", default="HS256", help="accepted algorithms, comma-separated")
    oauth.add_argument("--jwt-audience", help="required aud claim")
    oauth.add_argument("--jwt-issuer", help="required iss claim")
    oauth.add_argument("--jwt-leeway", type=int, default=0, help="seconds of clock skew allowed on exp/nbf")
    oauth.add_argument("--jwt-user-claim", "--user-claim", default="sub",
                       help="claim naming the user in the users file (JWT and introspection), e.g. email")
    oauth.add_argument("--introspection-url", help="RFC 7662 introspection endpoint")
    oauth.add_argument("--introspection-auth", help="USER:PASS for the introspection endpoint (HTTP Basic)")
    oauth.add_argument("--introspection-cache", type=float, default=60.0, help="seconds an answer is reused")
    args = parser.parse_args(argv)
    if not (args.users or args.config or args.store):
        parser.error("where are the users? --users FILE, --config FILE or --store TYPE -o ...")

    def options():
        store, cache = read_config(args.config) if args.config else ({}, {})
        if args.users:
            store.update(type="users", path=args.users)
        if args.store:
            store["type"] = args.store
        for option in args.store_option:
            key, equals, value = option.partition("=")
            if not equals:
                raise StoreConfigError("-o %r: expected KEY=VALUE" % option)
            store[key.strip()] = value
        if args.cache_ttl is not None:
            cache["ttl"] = args.cache_ttl
        if args.cache_negative_ttl is not None:
            cache["negative_ttl"] = args.cache_negative_ttl
        return store, cache

    try:
        store_options, cache_options = options()
        store = open_store(store_options)
        cache = AnswerCache(cache_options.get("ttl", 0), cache_options.get("negative_ttl"),
                            cache_options.get("size", 100000))
    except (OSError, ValueError) as exc:
        sys.exit("mailproxy-auth: %s" % exc)
    access_log = sys.stdout if args.access_log == "-" else open(args.access_log, "a")
    try:
        checker = tokens.from_arguments(args)
    except (OSError, ValueError) as exc:
        sys.exit("mailproxy-auth: %s" % exc)
    if args.redis:
        failures = RedisFailureCounter(args.redis, args.max_failures, args.lockout)
    else:
        failures = FailureCounter(args.max_failures, args.lockout, args.max_tracked)
    app = AuthApp(store, failures, args.wait, access_log, checker, cache)
    # The cache's TTLs are read at start only; SIGHUP re-reads the store's options and reconnects.
    app.reloader = lambda: open_store(options()[0])
    # In the loop, not in a Python signal handler: a reload does I/O (connects), which must not run
    # in the middle of whatever greenlet the signal interrupted.
    gevent.signal_handler(signal.SIGHUP, lambda: gevent.spawn(app.reload))
    if args.listen.startswith("unix:"):
        import gevent.socket

        path = args.listen[5:]
        if os.path.exists(path):
            os.unlink(path)
        listener = gevent.socket.socket(gevent.socket.AF_UNIX)
        listener.bind(path)
        listener.listen(1024)
    else:
        host, _, port = args.listen.rpartition(":")
        listener = (host.strip("[]") or "127.0.0.1", int(port))
    server = WSGIServer(listener, app, log=None, error_log=sys.stderr)
    _warn("listening on %s (%s)" % (args.listen, store.label))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
