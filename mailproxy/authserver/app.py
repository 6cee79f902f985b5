"""mailproxy-auth: an auth_http server for mailproxy and nginx, good enough to run in production.

It answers nginx's auth_http protocol from a users file (see users.py): `Auth-Status: OK` with the
backend's `Auth-Server`/`Auth-Port` (and `Auth-Pass` for APOP and CRAM-MD5, which need the clear text
at the backend), or a failure text with `Auth-Wait` so the client may try again, until one client
address has failed too often: then it answers without `Auth-Wait`, which makes the proxy close the
session, and keeps doing so until the lock-out expires. The users file is re-read when it changes on
disk (checked at most once a second) or on SIGHUP; a broken file keeps the last good one in force.

Usage: mailproxy-auth --users FILE [--listen 127.0.0.1:9000] [--max-failures 10] [--lockout 300]
                      [--wait 3] [--access-log FILE|-] [--redis redis://HOST:PORT/DB]
                      [--jwt-key FILE [--jwt-algorithms HS256] [--jwt-audience AUD] [--jwt-issuer ISS]]
                      [--introspection-url URL [--introspection-auth USER:PASS]] [--jwt-user-claim sub]

With --jwt-key or --introspection-url, XOAUTH2 and OAUTHBEARER logins carry an OAuth 2.0 bearer token
(tokens.py): the token's user claim names a user of the users file, whose backend and (for {PLAIN}
users) clear-text password are sent back as Auth-User/Auth-Pass, because the backend knows passwords,
not tokens. A refused token gets RFC 7628's error JSON in Auth-Error-SASL.
"""

import argparse
import base64
import json
import os
import signal
import sys
import time
import urllib.parse

from mailproxy.authserver import tokens
from mailproxy.authserver.users import Directory, UsersFileError, parse

INVALID = "Invalid login or password"
LOCKED = "Too many invalid logins, try again later"
UNROUTED = "Temporary server problem, try again later"
INVALID_TOKEN = "invalid token"
OAUTH_METHODS = ("xoauth2", "oauthbearer")
# RFC 7628 3.2.2: the server's error, sent to the client as the challenge of the SASL error exchange.
BEARER_ERROR = base64.b64encode(json.dumps({"status": "401", "schemes": "bearer"}, separators=(",", ":")).encode()).decode()


class FailureCounter:
    """Failed logins per client address within a sliding window, and lock-outs past the limit."""

    def __init__(self, limit, lockout, clock=time.monotonic):
        self.limit = limit
        self.lockout = lockout
        self.clock = clock
        self.failures = {}  # ip -> (count, first failure time)

    def locked(self, ip, login=None) -> bool:
        entry = self.failures.get(ip)
        if entry is None:
            return False
        count, since = entry
        if self.clock() - since > self.lockout:
            del self.failures[ip]
            return False
        return count >= self.limit

    def failed(self, ip, login=None) -> bool:
        """Counts one failure; True when it reaches the limit."""
        count, since = self.failures.get(ip, (0, self.clock()))
        self.failures[ip] = (count + 1, since)
        if len(self.failures) > 100000:  # a scan from many addresses must not grow memory for ever
            self.failures.clear()
        return count + 1 >= self.limit

    def succeeded(self, ip, login=None):
        self.failures.pop(ip, None)


class RedisFailureCounter:
    """FailureCounter's limit kept in Redis, per client address and per login, so that every
    mailproxy-auth sharing the Redis (and every proxy node behind them) enforces one limit.

    Each key counts failures from its first one for `lockout` seconds (SET NX EX, then INCR, in one
    MULTI), the in-process counter's window. A Redis that cannot be reached locks nobody out: refusing
    every login because the helper store is down would be an outage, not a defence.
    """

    PREFIX = "mailproxy-auth:failures:"

    def __init__(self, url, limit, lockout):
        import redis

        self.errors = redis.RedisError
        self.redis = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self.limit = limit
        self.lockout = lockout

    def _keys(self, ip, login):
        keys = [self.PREFIX + "ip:" + (ip or "-")]
        if login:
            keys.append(self.PREFIX + "login:" + login.lower())
        return keys

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
        try:
            self.redis.delete(*self._keys(ip, login))
        except self.errors as exc:
            _warn("redis: %s" % exc)


class UsersFile:
    def __init__(self, path):
        self.path = path
        self.mtime = None
        self.checked = 0.0
        self.directory = self.load()

    def load(self) -> Directory:
        with open(self.path, encoding="utf-8") as source:
            self.mtime = os.fstat(source.fileno()).st_mtime
            return parse(source.read(), self.path)

    def current(self) -> Directory:
        now = time.monotonic()
        if now - self.checked >= 1.0:
            self.checked = now
            try:
                if os.stat(self.path).st_mtime != self.mtime:
                    self.reload()
            except OSError as exc:
                _warn("cannot stat users file: %s" % exc)
        return self.directory

    def reload(self):
        try:
            self.directory = self.load()
        except (OSError, UsersFileError) as exc:
            _warn("users file not reloaded, keeping the previous one: %s" % exc)


class AuthApp:
    """The WSGI application: one auth_http request in, one header block out."""

    def __init__(self, users: UsersFile, failures: FailureCounter, wait: int, access_log=None, tokens=None):
        self.tokens = tokens  # tokens.TokenChecker, or None: then a bearer token is checked as a password
        self.users = users
        self.failures = failures
        self.wait = wait
        self.access_log = access_log

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
        directory = self.users.current()
        if method in OAUTH_METHODS and self.tokens is not None:
            return self.decide_token(login, password, protocol, client, directory)
        if method == "none":
            target = directory.backend(login, protocol)
            if target is None:
                return "unrouted", [("Auth-Status", UNROUTED), ("Auth-Wait", str(self.wait))]
            return "ok", _ok(target)
        user = directory.users.get(login)
        if user is None or not user.check(method, password, salt):
            if self.failures.failed(client, login):
                return "locked", [("Auth-Status", LOCKED)]
            return "invalid", [("Auth-Status", INVALID), ("Auth-Wait", str(self.wait))]
        target = directory.backend(login, protocol)
        if target is None:
            return "unrouted", [("Auth-Status", UNROUTED), ("Auth-Wait", str(self.wait))]
        self.failures.succeeded(client, login)
        reply = _ok(target)
        if method in ("apop", "cram-md5"):
            reply.append(("Auth-Pass", user.clear_text))
        return "ok", reply


    def decide_token(self, login, token, protocol, client, directory):
        try:
            subject = self.tokens.user(token.decode("latin-1"))
            reason = None
        except tokens.TokenUnavailable as exc:
            _warn(str(exc))
            return "unavailable", [("Auth-Status", UNROUTED), ("Auth-Wait", str(self.wait))]
        except tokens.TokenRefused as exc:
            subject, reason = None, str(exc)
        user = directory.users.get(subject) if subject else None
        if subject and user is None:
            reason = "%r is not in the users file" % subject
        elif user is not None and login and login.casefold() != subject.casefold():
            # The client named someone else (authzid / user=) than the token speaks for.
            reason = "token is for %r, not %r" % (subject, login)
        if reason is not None:
            if self.failures.failed(client):
                return "locked", [("Auth-Status", LOCKED)]
            return "invalid token: %s" % reason, [
                ("Auth-Status", INVALID_TOKEN), ("Auth-Wait", str(self.wait)), ("Auth-Error-SASL", BEARER_ERROR)]
        target = directory.backend(subject, protocol)
        if target is None:
            return "unrouted", [("Auth-Status", UNROUTED), ("Auth-Wait", str(self.wait))]
        self.failures.succeeded(client)
        reply = _ok(target) + [("Auth-User", subject)]
        if user.clear_text is not None:
            # Without Auth-Pass the proxy hands the token itself to the backend, which then must take it
            # (Dovecot's oauth2 passdb, or a master login): hashed users cannot be logged in otherwise.
            reply.append(("Auth-Pass", user.clear_text))
        return "ok", reply


def _ok(target):
    host, port = target
    return [("Auth-Status", "OK"), ("Auth-Server", host), ("Auth-Port", str(port))]


def _recipient(rcpt_command: str) -> str:
    start, end = rcpt_command.find("<"), rcpt_command.find(">")
    return rcpt_command[start + 1 : end] if 0 <= start < end else ""


def _unescape(value: str) -> str:
    # nginx %-escapes only controls, space and %, and sends other bytes raw (read here as latin-1).
    return urllib.parse.unquote(value, encoding="latin-1")


def _quote(text: str) -> str:
    return '"%s"' % "".join(c if 0x20 < ord(c) < 0x7F and c != '"' else "\\x%02X" % (ord(c) & 0xFF) for c in text)


def _warn(message):
    sys.stderr.write("mailproxy-auth: %s\n" % message)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="mailproxy-auth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", required=True, help="users file (see etc/users.example)")
    parser.add_argument("--listen", default="127.0.0.1:9000", help="address:port or unix:/path")
    parser.add_argument("--max-failures", type=int, default=10, help="failures per client IP before lock-out")
    parser.add_argument("--lockout", type=int, default=300, help="seconds a lock-out lasts")
    parser.add_argument("--redis", metavar="URL",
                        help="keep the failure counters (per IP and per login) in Redis, shared by every "
                             "mailproxy-auth using it, e.g. redis://127.0.0.1:6379/0")
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
    from gevent import monkey

    monkey.patch_all()
    from gevent.pywsgi import WSGIServer

    try:
        users = UsersFile(args.users)
    except (OSError, UsersFileError) as exc:
        sys.exit("mailproxy-auth: %s" % exc)
    access_log = sys.stdout if args.access_log == "-" else open(args.access_log, "a")
    try:
        checker = tokens.from_arguments(args)
    except (OSError, ValueError) as exc:
        sys.exit("mailproxy-auth: %s" % exc)
    if args.redis:
        failures = RedisFailureCounter(args.redis, args.max_failures, args.lockout)
    else:
        failures = FailureCounter(args.max_failures, args.lockout)
    app = AuthApp(users, failures, args.wait, access_log, checker)
    signal.signal(signal.SIGHUP, lambda *_: users.reload())
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
    _warn("listening on %s" % args.listen)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
