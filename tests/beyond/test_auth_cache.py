"""auth_http_cache: fewer auth requests, expiry that lets a changed password bite, negative caching."""

import imaplib
import time

import pytest

from mailproxy.auth_http.cache import AuthCache

from support.authserver import RecordingAuthServer
from support.backends import USERS
from support.harness import free_port, mail_config

TTL = 1.0


@pytest.fixture
def edge(dovecot, mailproxy_master):  # noqa: F811
    auth = RecordingAuthServer(USERS, {"imap": ("127.0.0.1", dovecot.imap_port)})
    port = free_port()
    config = mail_config(auth.url, """    server { listen 127.0.0.1:%d; protocol imap; auth_http_cache %gs negative=%gs; }
}
""" % (port, TTL, TTL))
    master = mailproxy_master(config, handler=None)
    yield port, auth, master
    auth.close()
    log = master.error_log()
    assert "[alert]" not in log
    for password in USERS.values():
        assert password not in log


def login(port, user, password):
    imap = imaplib.IMAP4("127.0.0.1", port, timeout=20)
    try:
        return imap.login(user, password)[0]
    except imaplib.IMAP4.error:
        return "NO"
    finally:
        try:
            imap.logout()
        except (OSError, imaplib.IMAP4.abort, imaplib.IMAP4.error):
            pass  # a refused login closes the connection: nothing left to log out of


def wait_until(instant):
    """Wait on the clock itself: the cache entry's lifetime is the event waited for."""
    deadline = instant + 5
    while time.monotonic() < instant:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_cache_cuts_requests_and_expires(edge):
    port, auth, _ = edge
    assert login(port, "alice", USERS["alice"]) == "OK"
    cached_by = time.monotonic()  # the entry was made before the login finished
    for _ in range(2):
        assert login(port, "alice", USERS["alice"]) == "OK"
    assert len(auth.requests) == 1
    # The password changes at the auth server: the cached verdict stands until it expires, then not.
    auth.users["alice"] = "changed"
    assert login(port, "alice", USERS["alice"]) == "OK"
    wait_until(cached_by + TTL + 0.05)
    assert login(port, "alice", USERS["alice"]) == "NO"
    assert len(auth.requests) == 2


def test_negative_caching(edge):
    port, auth, _ = edge
    assert login(port, "bob", "wrong") == "NO"
    assert login(port, "bob", "wrong") == "NO"
    assert len(auth.requests) == 1
    # Another password is another entry: the right one is not refused from the cache.
    assert login(port, "bob", USERS["bob"]) == "OK"
    assert len(auth.requests) == 2


def test_unit_rules():
    from mailproxy.auth_http.response import AuthFail, AuthOk

    clock = [0.0]
    cache = AuthCache(10, None, 2, clock=lambda: clock[0])
    request = (b"GET /auth HTTP/1.0\r\nHost: a\r\nAuth-Method: plain\r\nAuth-User: u\r\nAuth-Pass: secret\r\n"
               b"Auth-Protocol: imap\r\nAuth-Login-Attempt: 1\r\nClient-IP: 192.0.2.7\r\n"
               b"Proxy-Protocol-Addr: 198.51.100.1\r\nProxy-Protocol-Port: %d\r\n%s\r\n")
    key = cache.key(request % (1000, b""), "plain")
    assert b"secret" not in repr(key).encode()
    # Only the balancer's source port may change; any other header the auth server reads is another entry.
    assert key == cache.key(request % (2000, b""), "plain")
    assert key != cache.key(request.replace(b"192.0.2.7", b"192.0.2.8") % (1000, b""), "plain")
    assert key != cache.key(request % (1000, b"Auth-SSL: on\r\nAuth-SSL-Verify: SUCCESS\r\n"), "plain")
    assert not cache.put(key, AuthOk("127.0.0.1", 1, "x", None, b"backend-pass"))  # Auth-Pass: never kept
    assert not cache.put(key, AuthFail("no", 0))  # no negative= : failures not kept
    assert cache.put(key, AuthOk("127.0.0.1", 1, "x", None, None))
    assert cache.key(request % (1000, b""), "cram-md5") is None
    clock[0] = 10.0
    assert cache.get(key) is None
