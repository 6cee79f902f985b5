"""Value parsers: times, sizes, listen, the auth_http URL, networks, resolver."""

import ipaddress
import socket

import pytest

from mailproxy.conf import values as v


class Ctx:
    name = "timeout"
    file = "/etc/mailproxy/mailproxy.conf"
    line = 7
    prefix = "/prefix"
    conf_dir = "/etc/mailproxy"

    def __init__(self, previous=()):
        self.warnings = []
        self.previous = previous

    def warn(self, text):
        self.warnings.append(text)


@pytest.mark.parametrize("text, seconds", [
    ("60s", 60), ("60", 60), ("1m", 60), ("500ms", 0.5), ("1h30m", 5400), ("1h 30m", 5400), ("2d", 172800),
    ("1w", 604800), ("1m30s", 90), ("1s500ms", 1.5), ("0", 0), ("24h", 86400),
])
def test_time(text, seconds):
    assert v.parse_time(text) == seconds


@pytest.mark.parametrize("text", ["", "x", "1x", "-1", "1m1h", "1s1s", "ms", "1.5s", "30d", "1y", "s1"])
def test_time_invalid(text):
    assert v.parse_time(text) is None


def test_time_seconds_only():
    assert v.parse_time("500ms", msec=False) is None
    assert v.parse_time("30d", msec=False) == 30 * 86400


@pytest.mark.parametrize("text, size", [("16k", 16384), ("16K", 16384), ("1m", 1048576), ("1M", 1048576),
                                        ("4096", 4096), ("0", 0)])
def test_size(text, size):
    assert v.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "k", "1g", "1.5k", "-1", " 1", "1kk"])
def test_size_invalid(text):
    assert v.parse_size(text) is None


def test_flag_and_enum_are_case_insensitive():
    assert v.flag(Ctx(), ["ON"]) is True and v.flag(Ctx(), ["Off"]) is False
    assert v.enum("on", "off", "only")(Ctx(), ["ONLY"]) == "only"


def test_bitmask_duplicates_warn():
    ctx = Ctx()
    assert v.bitmask("plain", "login")(ctx, ["PLAIN", "login", "plain"]) == frozenset({"plain", "login"})
    assert ctx.warnings == ['duplicate value "plain"']
    ctx = Ctx(previous=frozenset({"none"}))
    assert v.bitmask("none")(ctx, ["none"]) == frozenset({"none"})
    assert ctx.warnings == ['duplicate value "none"']


def test_proxy_protocol_names_the_version():
    assert [v.proxy_protocol(Ctx(), [w]) for w in ("on", "off", "v2", "ON")] == ["v1", "off", "v2", "v1"]


def listen(*args):
    return v.listen(Ctx(), list(args))


def test_listen_forms():
    (one,) = listen("143")
    assert (one.text, one.family, one.sockaddr, one.wildcard) == ("0.0.0.0:143", socket.AF_INET, ("0.0.0.0", 143), True)
    assert listen("*:143")[0].text == "0.0.0.0:143"
    (six,) = listen("[::1]:143")
    assert (six.text, six.family, six.sockaddr, six.wildcard) == ("[::1]:143", socket.AF_INET6, ("::1", 143), False)
    assert listen("[::]:143")[0].wildcard
    (unix,) = listen("unix:/run/mail.sock")
    assert (unix.text, unix.family, unix.sockaddr) == ("unix:/run/mail.sock", socket.AF_UNIX, "/run/mail.sock")
    assert [l.text for l in listen("127.0.0.1:6000-6002")] == ["127.0.0.1:6000", "127.0.0.1:6001", "127.0.0.1:6002"]
    assert [l.text for l in listen("6000-6001")] == ["0.0.0.0:6000", "0.0.0.0:6001"]
    assert listen("localhost:143")[0].text == "127.0.0.1:143"
    assert (one.file, one.line) == (Ctx.file, Ctx.line)


def test_listen_parameters():
    (plain,) = listen("127.0.0.1:143")
    assert (plain.ssl, plain.proxy_protocol, plain.backlog) == (False, False, 511)
    assert (plain.bind, plain.ipv6only, plain.multipath) == (False, True, False)
    assert (plain.rcvbuf, plain.sndbuf, plain.so_keepalive) == (None, None, None)
    (l,) = listen("[::]:993", "ssl", "proxy_protocol", "backlog=64", "rcvbuf=8k", "sndbuf=1m", "ipv6only=off",
                  "so_keepalive=30m::10")
    assert (l.ssl, l.proxy_protocol, l.backlog) == (True, True, 64)
    assert (l.rcvbuf, l.sndbuf, l.ipv6only) == (8192, 1048576, False)
    assert l.so_keepalive == (1800, None, 10) and l.bind
    assert listen("127.0.0.1:1", "so_keepalive=on")[0].so_keepalive is True
    assert listen("127.0.0.1:1", "so_keepalive=off")[0].so_keepalive is False
    assert listen("127.0.0.1:1", "bind")[0].bind
    assert listen("127.0.0.1:1", "multipath")[0].multipath
    # Each of these asks for a socket of its own (spec 1.2).
    for param in ("backlog=5", "rcvbuf=1k", "sndbuf=1k", "ipv6only=on", "so_keepalive=on"):
        assert listen("127.0.0.1:1", param)[0].bind, param


@pytest.mark.parametrize("param", ["deferred", "fastopen=3", "default_server", "http2", "setfib=1"])
def test_listen_http_only_parameters(param):
    with pytest.raises(v.BadValue, match='^invalid parameter "%s"$' % param):
        listen("127.0.0.1:1", param)


@pytest.mark.parametrize("url, host, uri, sockaddr, peer", [
    ("127.0.0.1:9000/auth", "127.0.0.1", "/auth", ("127.0.0.1", 9000), "127.0.0.1:9000"),
    ("http://127.0.0.1/auth", "127.0.0.1", "/auth", ("127.0.0.1", 80), "127.0.0.1:80"),
    ("localhost:9000", "localhost", "/", ("127.0.0.1", 9000), "127.0.0.1:9000"),
    ("[::1]:9000/a/b?c", "[::1]", "/a/b?c", ("::1", 9000), "[::1]:9000"),
    ("unix:/run/auth.sock:/auth", "localhost", "/auth", "/run/auth.sock", "unix:/run/auth.sock"),
    ("http://unix:/run/auth.sock", "localhost", "/", "/run/auth.sock", "unix:/run/auth.sock"),
])
def test_auth_http_url(url, host, uri, sockaddr, peer):
    parsed = v.auth_http(Ctx(), [url])
    assert (parsed.host_header, parsed.uri, parsed.sockaddr, parsed.peer) == (host, uri, sockaddr, peer)


@pytest.mark.parametrize("url, message", [
    ("http://127.0.0.1:x/", 'invalid port in auth_http "127.0.0.1:x/"'),
    ("[::1:80", 'invalid host in auth_http "[::1:80"'),
    ("/auth", 'no host in auth_http "/auth"'),
    ("unix:" + "x" * 120, 'too long path in the unix domain socket in auth_http "unix:%s"' % ("x" * 120)),
])
def test_auth_http_url_errors(url, message):
    with pytest.raises(v.BadValue) as info:
        v.auth_http(Ctx(), [url])
    assert str(info.value) == message


def test_networks():
    ctx = Ctx()
    assert v.network(ctx, ["192.168.1.0/24"]) == (ipaddress.ip_network("192.168.1.0/24"),)
    assert v.network(ctx, ["10.1.2.3"]) == (ipaddress.ip_network("10.1.2.3/32"),)
    assert v.network(ctx, ["::1"]) == (ipaddress.ip_network("::1/128"),)
    assert v.network(ctx, ["unix:"]) == ("unix:",)
    assert v.network(ctx, ["localhost"]) == (ipaddress.ip_network("127.0.0.1/32"),)
    assert ctx.warnings == []
    assert v.network(ctx, ["fe80::1/64"]) == (ipaddress.ip_network("fe80::/64"),)
    assert ctx.warnings == ["low address bits of fe80::1/64 are meaningless"]


def test_resolver():
    assert v.resolver(Ctx(), ["off"]) is None
    parsed = v.resolver(Ctx(), ["127.0.0.1", "[::1]:5353", "valid=30s", "ipv6=off", "status_zone=z"])
    assert parsed == {"addresses": ("127.0.0.1:53", "[::1]:5353"), "valid": 30, "ipv4": True, "ipv6": False}
    with pytest.raises(v.BadValue, match='"ipv4" and "ipv6" cannot both be "off"'):
        v.resolver(Ctx(), ["127.0.0.1", "ipv4=off", "ipv6=off"])


def test_session_cache():
    assert v.ssl_session_cache(Ctx(), ["off"]) == "off"
    assert v.ssl_session_cache(Ctx(), ["builtin:1000", "shared:MAIL:10m"]) == (
        ("builtin", 1000), ("shared", "MAIL", 10485760))


def test_error_log_paths():
    ctx = Ctx()
    assert v.error_log(ctx, ["logs/e.log", "info"]) == (("/prefix/logs/e.log", "info"),)
    assert v.error_log(ctx, ["stderr"]) == (("stderr", "error"),)
    assert v.error_log(ctx, ["syslog:server=unix:/dev/log"]) == (("syslog:server=unix:/dev/log", "error"),)
