"""auth_http_cache (ours, off by default): a worker's memory of recent auth verdicts.

A busy edge asks the auth server once per login, and mail clients log in again and again with the same
credentials (a phone polling every minute, a client opening five IMAP connections at once). With
`auth_http_cache TIME [negative=TIME] [max=N]` a worker keeps each verdict for TIME (failures only with
`negative=`, for that long), keyed by the request the auth server was sent, so that the verdict is reused
only for a request the auth server would have seen identically: every header it may decide on is in the
key (Auth-Method, Auth-User, Auth-Pass, Auth-Protocol, Auth-Login-Attempt, Client-IP, Client-Host, the
Proxy-Protocol addresses, every Auth-SSL-* header including Auth-SSL-Verify and the client certificate's
subject, issuer, serial and fingerprint, Auth-SSL-Server-Name, Auth-IMAP-ID and the configured
auth_http_header lines). One header is left out: Proxy-Protocol-Port, the client's source port behind a
load balancer, new on every connection and naming nobody.

What is kept, and what never is:

* The request (and so the password) only as HMAC-SHA256 under a key drawn at random in each process, so a
  memory dump or a core file holds nothing that could be tried elsewhere, nor compared between workers.
* A reply carrying `Auth-Pass` is not cached: keeping it would mean keeping a backend password in clear.
* Only the `plain` method (IMAP LOGIN, POP3 USER/PASS, SASL PLAIN and LOGIN) is cached. APOP and CRAM-MD5
  answer a fresh salt each time, EXTERNAL depends on the certificate alone, SMTP `none` on the envelope.
* WAIT and errors are never cached; neither is anything the auth server did not answer.

Each worker has its own cache, so a changed password can be accepted by a worker for at most TIME after
the change; that is the bargain the operator makes by turning it on.
"""

import hashlib
import hmac
import os
import re
import time
from typing import Optional

from .response import AuthFail, AuthOk

CACHED_METHODS = frozenset(("plain",))

_secret = (None, b"")  # (pid, key): a forked child draws its own key on first use


def _key() -> bytes:
    global _secret
    pid = os.getpid()
    if _secret[0] != pid:
        _secret = (pid, os.urandom(32))
    return _secret[1]


# The client's source port behind a PROXY-protocol balancer: different on every connection.
_SOURCE_PORT = re.compile(rb"^Proxy-Protocol-Port: [0-9]*\r\n", re.M)


class AuthCache:
    def __init__(self, ttl: float, negative: Optional[float], limit: int, clock=time.monotonic):
        self.ttl = ttl
        self.negative = negative
        self.limit = limit
        self.clock = clock
        self._entries = {}  # key -> (expires, outcome); insertion order is age order

    def key(self, request: bytes, method: str):
        """The entry's key for the auth request ``request``, or None when it must always be asked."""
        if method not in CACHED_METHODS:
            return None
        # An HMAC, as the password's own: the request holds the password, the key must not.
        return hmac.new(_key(), _SOURCE_PORT.sub(b"", request), hashlib.sha256).digest()

    def get(self, key):
        if key is None:
            return None
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, outcome = entry
        if self.clock() >= expires:
            del self._entries[key]
            return None
        return outcome

    def put(self, key, outcome) -> bool:
        """Remember `outcome` if it may be; returns whether it was kept."""
        if key is None:
            return False
        if isinstance(outcome, AuthOk) and outcome.password is None:
            ttl = self.ttl
        elif isinstance(outcome, AuthFail) and self.negative:
            ttl = self.negative
        else:
            return False
        self._entries.pop(key, None)
        while len(self._entries) >= self.limit:
            # Oldest first: dicts keep insertion order, and a re-put moves an entry to the end.
            del self._entries[next(iter(self._entries))]
        self._entries[key] = (self.clock() + ttl, outcome)
        return True

    def __len__(self):
        return len(self._entries)


def cache_for(server) -> Optional[AuthCache]:
    """A new cache for the server block, None when auth_http_cache is off; the worker keeps one per block
    (login_gate.ServerRuntime)."""
    setting = server.auth_http_cache
    if not setting:
        return None
    ttl, negative, limit = setting
    return AuthCache(ttl, negative, limit)
