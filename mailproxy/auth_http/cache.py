"""auth_http_cache (ours, off by default): a worker's memory of recent auth verdicts.

A busy edge asks the auth server once per login, and mail clients log in again and again with the same
credentials (a phone polling every minute, a client opening five IMAP connections at once). With
`auth_http_cache TIME [negative=TIME] [max=N]` a worker keeps each verdict for TIME (failures only with
`negative=`, for that long), keyed by what the auth server bases it on: protocol, method, login, the
password, the client's /24 (IPv4) or /64 (IPv6) network, TLS or not and the TLS server name.

What is kept, and what never is:

* The password only as HMAC-SHA256 under a key drawn at random in each process, so a memory dump or a
  core file holds nothing that could be tried elsewhere, nor compared between workers.
* A reply carrying `Auth-Pass` is not cached: keeping it would mean keeping a backend password in clear.
* Only the `plain` method (IMAP LOGIN, POP3 USER/PASS, SASL PLAIN and LOGIN) is cached. APOP and CRAM-MD5
  answer a fresh salt each time, EXTERNAL depends on the certificate, SMTP `none` on the envelope.
* WAIT and errors are never cached; neither is anything the auth server did not answer.

Each worker has its own cache, so a changed password can be accepted by a worker for at most TIME after
the change; that is the bargain the operator makes by turning it on.
"""

import hashlib
import hmac
import ipaddress
import os
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


def password_digest(password: bytes) -> bytes:
    return hmac.new(_key(), password, hashlib.sha256).digest()


def client_network(client_ip: str) -> str:
    """The /24 or /64 the client is in: a client hopping addresses in its network keeps its entry."""
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:
        return client_ip  # "unix:"
    prefix = 24 if address.version == 4 else 64
    return str(ipaddress.ip_network("%s/%d" % (address, prefix), strict=False))


class AuthCache:
    def __init__(self, ttl: float, negative: Optional[float], limit: int, clock=time.monotonic):
        self.ttl = ttl
        self.negative = negative
        self.limit = limit
        self.clock = clock
        self._entries = {}  # key -> (expires, outcome); insertion order is age order

    def key(self, protocol, attempt, client_ip, tls, server_name=None):
        """The entry's key, or None when this attempt must always go to the auth server."""
        if attempt.method not in CACHED_METHODS:
            return None
        return (protocol, attempt.method, bytes(attempt.login), password_digest(bytes(attempt.password)),
                client_network(client_ip), bool(tls), server_name)

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


# id(server) -> (server, cache): one cache per server block and worker, as the auth clients are kept.
_caches = {}


def cache_for(server) -> Optional[AuthCache]:
    setting = getattr(server, "auth_http_cache", None)
    if not setting:
        return None
    entry = _caches.get(id(server))
    if entry is None or entry[0] is not server:
        ttl, negative, limit = setting
        entry = (server, AuthCache(ttl, negative, limit))
        _caches[id(server)] = entry
    return entry[1]
