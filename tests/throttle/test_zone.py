"""The zone itself: windows, blocks, eviction, and sharing with a forked process; clocks passed in."""

import ipaddress
import os

import pytest

from mailproxy import throttle
from mailproxy.conf.settings import LoginLimit


def limiter(size=8192, **fields):
    limit = LoginLimit(zone="z", **fields)
    return throttle.Limiter(limit, throttle.Zone("z", size))


def test_window_expiry_forgets_failures():
    lim = limiter(failures=3, window=10.0, delay=1.0)
    keys = lim.keys("192.0.2.1", b"u")
    lim.failed(keys, now=100.0)
    lim.failed(keys, now=101.0)
    assert lim.check(keys, now=102.0) == (False, 2.0)
    assert lim.check(keys, now=111.0) == (False, 0.0)
    assert not lim.failed(keys, now=111.0)  # a new window: one failure, not three


def test_block_lasts_block_then_starts_from_zero():
    lim = limiter(failures=2, block=60.0, delay=0.0)
    keys = lim.keys("192.0.2.1", b"u")
    assert not lim.failed(keys, now=0.0)
    assert lim.failed(keys, now=1.0)
    assert lim.check(keys, now=60.9) == (True, 0.0)
    # A failure counted late (its check came before the block) leaves the block as it was.
    assert lim.failed(keys, now=30.0)
    assert lim.check(keys, now=61.5) == (False, 0.0)


def test_delay_is_capped():
    lim = limiter(failures=1000, delay=10.0)
    keys = lim.keys("192.0.2.1", b"")
    for n in range(5):
        lim.failed(keys, now=float(n))
    assert lim.check(keys, now=5.0) == (False, throttle.MAX_DELAY)


def test_keys_per_and_exempt():
    net = ipaddress.ip_network("10.0.0.0/8")
    assert limiter(exempt=(net,)).keys("10.1.2.3", b"u") == ()
    assert len(limiter(per="both").keys("192.0.2.1", b"u")) == 2
    assert limiter(per="login").keys("192.0.2.1", b"Bob") == limiter(per="login").keys("::1", b"bob")
    assert limiter(per="address").keys("unix:", b"u") == ()


def test_a_full_zone_still_counts_new_keys():
    lim = limiter(size=8192, failures=2, delay=0.0)
    for n in range(5000):  # far more keys than the 204 slots
        lim.failed(lim.keys("198.51.%d.%d" % (n // 256, n % 256), b""), now=float(n))
    fresh = lim.keys("203.0.113.1", b"")
    assert not lim.failed(fresh, now=6000.0)
    assert lim.failed(fresh, now=6000.5)


@pytest.mark.process
def test_forked_process_counts_into_the_same_zone():
    lim = limiter(failures=3, delay=1.0)
    keys = lim.keys("192.0.2.1", b"")
    pid = os.fork()
    if pid == 0:
        # The child is a worker: count twice and leave without running the parent's cleanup.
        lim.failed(keys, now=1.0)
        lim.failed(keys, now=2.0)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert lim.check(keys, now=3.0) == (False, 2.0)
    assert lim.failed(keys, now=3.0)
