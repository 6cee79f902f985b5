"""The login gate: one object decides a login attempt, and the session acts on its one verdict.

In order, as nginx and our additions want it: mail_login_limit (a blocked client is refused without
asking anyone; a client with recent failures waits its delay first), the auth cache, the auth_http
exchange with its `Auth-Status: WAIT` retries, the metrics of each, and the decision of spec 3.4. The
waits are the session's (``pause``): it watches its client while the gate waits, and a client that
leaves ends both.

``ServerRuntime`` is what the sessions of one server block share in a worker (its protocol entry, the
machines' config, the fixed part of its auth_http requests, auth client, cache, limiter, metrics), built
once per configuration generation: a worker serves one generation, and the worker keeps one runtime per
server block.
"""

import time

from mailproxy import metrics, throttle
from mailproxy.auth_http import cache as auth_cache
from mailproxy.auth_http.client import AuthHttpClient
from mailproxy.auth_http.request import RequestTemplate
from mailproxy.auth_http.response import TIMED_OUT, AuthError, AuthFail, AuthOk, AuthRetry, decide
from mailproxy.log import escape_bytes
from mailproxy.protocols import PROTOCOLS

# Verdicts.
PASS = "pass"  # the auth server said OK: log in to the backend (outcome: AuthOk)
REFUSED = "refused"  # the auth server refused the login (outcome: AuthFail)
THROTTLED = "throttled"  # mail_login_limit blocked the client or login; nobody was asked
BROKEN = "broken"  # the auth server could not be asked or answered nonsense: the internal-error reply

# What the protocol's refusal says to a THROTTLED client.
BLOCKED_TEXT = throttle.BLOCKED_TEXT


class Verdict:
    """What the gate decided, and what the session needs to act on it."""

    __slots__ = ("kind", "outcome", "log_message", "login_result", "now_blocked")

    def __init__(self, kind, outcome=None, log_message=None, login_result=None, now_blocked=False):
        self.kind = kind
        self.outcome = outcome  # PASS: AuthOk; REFUSED: AuthFail
        self.log_message = log_message  # BROKEN: the error-log line
        self.login_result = login_result  # BROKEN: the metrics' login result ("timeout" or "temporary")
        self.now_blocked = now_blocked  # REFUSED: this failure made mail_login_limit block the client


class ServerRuntime:
    """One server block's shared parts in one worker."""

    __slots__ = ("server", "protocol", "config", "auth_request", "auth", "cache", "limiter", "metrics")

    def __init__(self, server, loop):
        self.server = server
        self.protocol = PROTOCOLS[server.protocol]
        self.config = self.protocol.config_class.from_server(server)
        self.auth_request = RequestTemplate(server, server.protocol)
        self.auth = AuthHttpClient(server, loop)
        self.cache = auth_cache.cache_for(server)
        self.limiter = throttle.for_server(server)
        self.metrics = metrics.for_protocol(server.protocol)


class LoginGate:
    """Decides one attempt; ``decide`` calls ``on_verdict(Verdict)`` once: before it returns when no
    one need be asked (blocked, a cache hit), else later from the loop.

    ``pause(seconds, then)`` is the session's wait (it ends the session if the client leaves);
    ``guard(step, *args)`` runs the exchange's callbacks (the session's: a bug there ends the session);
    ``debug(text)``, given at debug level, writes the session's debug lines.
    """

    __slots__ = ("runtime", "pause", "guard", "debug", "attempt", "request", "limit_keys", "cache_key",
                 "exchange", "began", "on_verdict")

    def __init__(self, runtime, pause, guard, debug=None):
        self.runtime = runtime
        self.pause = pause
        self.guard = guard
        self.debug = debug
        self.exchange = None
        self.on_verdict = None

    def decide(self, attempt, request, client_ip, on_verdict):
        self.attempt = attempt
        self.request = request
        self.on_verdict = on_verdict
        self.cache_key = None
        runtime = self.runtime
        limiter = runtime.limiter
        self.limit_keys = limiter.keys(client_ip, attempt.login) if limiter is not None else ()
        if self.limit_keys:
            blocked, delay = limiter.check(self.limit_keys)
            if blocked:
                self._verdict(Verdict(THROTTLED))
                return
            if delay:
                self.pause(delay, self._consult)
                return
        self._consult()

    def cancel(self):
        self.on_verdict = None
        if self.exchange is not None:
            self.exchange.cancel()
            self.exchange = None

    def _consult(self):
        cache = self.runtime.cache
        if cache is not None:
            self.cache_key = cache.key(self.request, self.attempt.method)
            outcome = cache.get(self.cache_key)
            if outcome is not None:
                if self.debug:
                    self.debug("auth http cache hit")
                self._decided(outcome)
                return
        self._ask()

    def _ask(self):
        attempt = self.attempt
        if self.debug:
            self.debug('mail auth http request: method "%s", login "%s", attempt %d, %d bytes'
                       % (attempt.method, escape_bytes(attempt.login), attempt.attempt, len(self.request)))
        self.began = time.monotonic()
        self.exchange = self.runtime.auth.start(self.request, self._replied, self.debug, self.guard)

    def _replied(self, reply, error):
        self.exchange = None
        runtime = self.runtime
        runtime.metrics.auth_seconds.observe(time.monotonic() - self.began)
        if error is not None:
            runtime.metrics.auth_errors.inc()
            self._verdict(Verdict(BROKEN, log_message=error.message,
                                  login_result="timeout" if error.kind == TIMED_OUT else "temporary"))
            return
        outcome = decide(reply, runtime.server.protocol, self.attempt.method)
        if isinstance(outcome, AuthRetry):
            self.pause(outcome.wait, self._ask)
            return
        if runtime.cache is not None:
            runtime.cache.put(self.cache_key, outcome)
        self._decided(outcome)

    def _decided(self, outcome):
        if isinstance(outcome, AuthOk):
            self._verdict(Verdict(PASS, outcome))
        elif isinstance(outcome, AuthFail):
            blocked = bool(self.limit_keys) and self.runtime.limiter.failed(self.limit_keys)
            self._verdict(Verdict(REFUSED, outcome, now_blocked=blocked))
        else:
            assert isinstance(outcome, AuthError), outcome
            self._verdict(Verdict(BROKEN, log_message=outcome.log_message, login_result="temporary"))

    def _verdict(self, verdict):
        on_verdict, self.on_verdict = self.on_verdict, None
        if on_verdict is not None:
            on_verdict(verdict)

