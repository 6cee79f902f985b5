"""auth_http_cache (ours, README "features beyond nginx"): a worker's memory of auth verdicts, alone.

A verdict is reused only for a request the auth server would have seen identically (every header it may
decide on), never for a method whose request changes each time, never when it carried a backend
password, failures only with ``negative=``; entries expire after their TTL and the oldest go first past
``max``. The key is an HMAC, so the cache holds no password. The clock is the cache's own, injected.
"""

import socket
from types import SimpleNamespace

import pytest

from mailproxy.auth_http import cache as auth_cache
from mailproxy.auth_http import request
from mailproxy.auth_http.cache import AuthCache, cache_for
from mailproxy.auth_http.response import AuthFail, AuthOk
from mailproxy.conf import load_config

from support.authhttp import attempt, settings

URL = SimpleNamespace(host_header="127.0.0.1", uri="/auth", sockaddr=("127.0.0.1", 9), family=socket.AF_INET,
                      peer="127.0.0.1:9")
OK = AuthOk("10.0.0.5", 143, "10.0.0.5:143", None, None)
REFUSED = AuthFail("Invalid login or password", 3)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def build(login=b"alice", password=b"secret", method="plain", proxy_port=None, client_ip="192.0.2.1", **kw):
    proxy = None
    if proxy_port is not None:
        proxy = SimpleNamespace(src_addr="198.51.100.9", src_port=proxy_port, dst_addr="10.0.0.1", dst_port=993)
    return request.build(settings(URL, **kw), attempt(method, login, password), "imap", client_ip,
                         proxy_protocol=proxy)


def make(ttl=60.0, negative=None, limit=100):
    clock = Clock()
    return AuthCache(ttl, negative, limit, clock=clock), clock


def test_a_verdict_is_kept_for_its_ttl():
    cache, clock = make(ttl=60.0)
    key = cache.key(build(), "plain")
    assert cache.get(key) is None
    assert cache.put(key, OK) is True
    clock.now += 59.9
    assert cache.get(key) == OK
    clock.now += 0.1
    assert cache.get(key) is None
    assert len(cache) == 0  # an expired entry is dropped when met, not kept around


def test_failures_only_with_negative_and_for_their_own_ttl():
    cache, clock = make(ttl=60.0)
    key = cache.key(build(password=b"wrong"), "plain")
    assert cache.put(key, REFUSED) is False and cache.get(key) is None
    cache, clock = make(ttl=60.0, negative=5.0)
    key = cache.key(build(password=b"wrong"), "plain")
    assert cache.put(key, REFUSED) is True
    clock.now += 4.9
    assert cache.get(key) == REFUSED
    clock.now += 0.1
    assert cache.get(key) is None


def test_a_reply_carrying_a_backend_password_is_never_kept():
    cache, _ = make()
    key = cache.key(build(), "plain")
    assert cache.put(key, AuthOk("10.0.0.5", 143, "10.0.0.5:143", b"alice", b"backend-secret")) is False
    assert cache.get(key) is None and len(cache) == 0


@pytest.mark.parametrize("other", ["none", "cram-md5", "apop", "external", "xoauth2", "oauthbearer"])
def test_only_plain_logins_are_cached(other):
    """APOP and CRAM-MD5 answer a fresh salt, EXTERNAL is the certificate's, SMTP none the envelope's."""
    cache, _ = make()
    key = cache.key(build(method=other), other)
    assert key is None
    assert cache.put(key, OK) is False and cache.get(key) is None


def test_waits_and_errors_are_not_kept():
    cache, _ = make(negative=60.0)
    key = cache.key(build(), "plain")
    for outcome in (None, object(), "error"):
        assert cache.put(key, outcome) is False
    assert cache.get(key) is None


def test_the_key_covers_what_the_auth_server_decides_on():
    cache, _ = make()
    base = cache.key(build(), "plain")
    assert cache.key(build(), "plain") == base  # the same request, the same entry
    different = [
        build(login=b"bob"), build(password=b"other"), build(client_ip="192.0.2.2"),
        build(headers=[("X-Tenant", "a")]),
        request.build(settings(URL), attempt("plain", b"alice", b"secret", attempt=2), "imap", "192.0.2.1"),
        request.build(settings(URL), attempt("plain", b"alice", b"secret"), "pop3", "192.0.2.1"),
        build(proxy_port=1234),  # the balancer's client address is part of it ...
    ]
    keys = [cache.key(data, "plain") for data in different]
    assert base not in keys and len(set(keys)) == len(keys)
    # ... its source port is not: new on every connection, it names nobody.
    assert cache.key(build(proxy_port=1234), "plain") == cache.key(build(proxy_port=4321), "plain")


def test_the_key_holds_no_password_and_differs_between_processes(monkeypatch):
    cache, _ = make()
    data = build(password=b"correct horse battery staple")
    key = cache.key(data, "plain")
    assert b"correct horse" not in key and b"secret" not in key and len(key) == 32  # an HMAC-SHA256
    cache.put(key, OK)
    # A forked worker draws its own key on first use: a dump of one process helps with no other.
    monkeypatch.setattr(auth_cache.os, "getpid", lambda: -1)
    other = cache.key(data, "plain")
    assert other != key and cache.get(other) is None


def test_max_entries_drops_the_oldest_first():
    cache, clock = make(limit=3)
    keys = [cache.key(build(login=b"user%d" % n), "plain") for n in range(4)]
    for key in keys[:3]:
        cache.put(key, OK)
        clock.now += 1
    cache.put(keys[0], OK)  # put again: now the youngest
    cache.put(keys[3], OK)
    assert len(cache) == 3
    assert cache.get(keys[1]) is None
    assert [cache.get(k) for k in (keys[0], keys[2], keys[3])] == [OK] * 3


def test_cache_for_follows_the_directive(tmp_path):
    def server(directive):
        conf = tmp_path / "mailproxy.conf"
        conf.write_text("events {}\nmail {\n auth_http 127.0.0.1:9/auth;\n %s\n server { listen 127.0.0.1:1143;"
                        " protocol imap; }\n}\n" % directive)
        return load_config(str(conf)).servers[0]

    assert cache_for(server("")) is None
    assert cache_for(server("auth_http_cache off;")) is None
    cache = cache_for(server("auth_http_cache 30s negative=5s max=2;"))
    assert (cache.ttl, cache.negative, cache.limit) == (30.0, 5.0, 2)
    cache = cache_for(server("auth_http_cache 1m;"))
    assert cache.negative is None and cache.put(cache.key(build(), "plain"), REFUSED) is False
