"""Login throttling (ours, off by default): `mail_login_limit_zone` and `mail_login_limit`.

Failed logins (the auth server's AuthFail) are counted per client address and/or per login name in a
zone: a fixed-size open-addressing hash table in shared memory that the master creates before fork, so
every worker of a node counts into the same slots. Below the limit each further attempt from a key is
delayed by `delay` x its failures (capped at MAX_DELAY) before the auth server is asked; at the limit the
key is blocked for `block` and the session answers the protocol's own failure without asking at all.

The table lives in a memfd mapped MAP_SHARED; updates take a POSIX record lock (lockf) on that memfd.
Record locks belong to a process and are released by the kernel when it dies, so a worker killed
mid-update cannot leave the zone locked for the others; a critical section never yields to gevent, so
two greenlets of one worker never interleave inside it either.

Slots are keyed by a 16-byte BLAKE2b digest of the key, never the key itself. When the PROBES slots a
key may live in are all taken by live entries, the one touched longest ago is reused: a flood of fresh
addresses can push out old counters, never make the table refuse to count.
"""

import fcntl
import hashlib
import ipaddress
import mmap
import os
import struct
import time

# digest, failures, (padding), window start, blocked until; times are CLOCK_MONOTONIC, system-wide.
SLOT = struct.Struct("=16sI4xdd")
EMPTY = bytes(16)
PROBES = 8
MAX_DELAY = 30.0
BLOCKED_TEXT = "Too many invalid logins, try later"

_zones = {}  # name -> Zone; created in the master, inherited by every worker it forks


class Zone:
    def __init__(self, name, size):
        self.name = name
        self.size = size
        self.slots = max(1, size // SLOT.size)
        self.fd = os.memfd_create("mailproxy-login-limit-" + name, os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.slots * SLOT.size)
        self.map = mmap.mmap(self.fd, self.slots * SLOT.size)

    def _lock(self):
        fcntl.lockf(self.fd, fcntl.LOCK_EX)

    def _unlock(self):
        fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def _find(self, digest, now, window):
        """(offset, entry) of digest's slot, or of the slot to take for it (entry None)."""
        start = int.from_bytes(digest[:8], "little") % self.slots
        victim, victim_age = None, None
        for i in range(min(PROBES, self.slots)):
            offset = (start + i) % self.slots * SLOT.size
            entry = SLOT.unpack_from(self.map, offset)
            if entry[0] == digest:
                return offset, entry
            if entry[0] == EMPTY or (entry[3] <= now and entry[2] + window <= now):
                age = float("-inf")  # free or expired: always the best place
            else:
                age = max(entry[2], entry[3])
            if victim is None or age < victim_age:
                victim, victim_age = offset, age
        return victim, None

    def state(self, digest, now, window):
        """(failures in the current window, blocked until) of one key."""
        self._lock()
        try:
            _, entry = self._find(digest, now, window)
        finally:
            self._unlock()
        if entry is None:
            return 0, 0.0
        failures = entry[1] if entry[2] + window > now else 0
        return failures, entry[3]

    def failed(self, digest, now, limit):
        """Count one failure; True when it reaches the limit (the key is blocked from now on)."""
        self._lock()
        try:
            offset, entry = self._find(digest, now, limit.window)
            if entry is not None and entry[3] > now:
                # A session that passed the check before the block began: the block stands as it is.
                return True
            failures, since = 0, now
            if entry is not None and entry[2] + limit.window > now:
                failures, since = entry[1], entry[2]
            failures += 1
            blocked = failures >= limit.failures
            if blocked:
                # The block replaces the window: once it ends the key starts again from zero.
                SLOT.pack_into(self.map, offset, digest, 0, now, now + limit.block)
            else:
                SLOT.pack_into(self.map, offset, digest, failures, since, 0.0)
        finally:
            self._unlock()
        return blocked


def prepare(config):
    """Master, before fork (start and reload): the zones `config` names; same name and size keep counts."""
    wanted = dict(config.main.mail_login_limit_zones)
    for name, size in wanted.items():
        zone = _zones.get(name)
        if zone is None or zone.size != size:
            # Workers of the previous generation keep their own reference to a replaced zone.
            _zones[name] = Zone(name, size)
    for name in [n for n in _zones if n not in wanted]:
        del _zones[name]


def _digest(kind, value):
    return hashlib.blake2b(kind + b"\0" + value, digest_size=16).digest()


class Limiter:
    """One server's `mail_login_limit` over its zone."""

    def __init__(self, limit, zone):
        self.limit = limit
        self.zone = zone

    def keys(self, client_ip, login):
        """Digests to count this attempt against; () for exempt clients."""
        limit = self.limit
        address = None
        if client_ip != "unix:":
            address = ipaddress.ip_address(client_ip)
            if any(address in net for net in limit.exempt):
                return ()
        keys = []
        if limit.per in ("address", "both") and address is not None:
            keys.append(_digest(b"a", address.packed))
        if limit.per in ("login", "both") and login:
            # Logins differ in case only as typed: the same mailbox, the same counter.
            keys.append(_digest(b"l", login.lower()))
        return tuple(keys)

    def check(self, keys, now=None):
        """(blocked, delay before asking the auth server) for an attempt counted against keys."""
        now = time.monotonic() if now is None else now
        worst = 0
        for key in keys:
            failures, blocked_until = self.zone.state(key, now, self.limit.window)
            if blocked_until > now:
                return True, 0.0
            worst = max(worst, failures)
        return False, min(self.limit.delay * worst, MAX_DELAY)

    def failed(self, keys, now=None):
        now = time.monotonic() if now is None else now
        blocked = False
        for key in keys:
            blocked = self.zone.failed(key, now, self.limit) or blocked
        return blocked


def for_server(server):
    """The server's Limiter, or None when `mail_login_limit` is off."""
    limit = server.mail_login_limit
    if limit is None:
        return None
    zone = _zones.get(limit.zone)
    if zone is None:
        # Only without a master (master_process off) has nobody prepared it; one process, one table.
        zone = _zones[limit.zone] = Zone(limit.zone, limit.zone_size)
    return Limiter(limit, zone)
