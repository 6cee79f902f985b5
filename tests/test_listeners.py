"""Socket layout (spec 1.2) and listen options (spec 1.4), each proven by the kernel."""

import os
import socket
import stat
import subprocess

import pytest

from mailproxy import listeners
from mailproxy.conf import load_config

from support.harness import free_port


@pytest.fixture
def servers(tmp_path):
    """servers(["listen args", ...], ...) -> the ServerSettings of a config with those servers."""
    def build(*per_server):
        blocks = "".join(
            "server { %s protocol imap; }\n" % "".join("listen %s; " % l for l in listens)
            for listens in per_server)
        path = tmp_path / "mailproxy.conf"
        path.write_text("events {}\nmail {\nauth_http http://127.0.0.1:9/a;\n%s}\n" % blocks)
        return load_config(str(path), str(tmp_path)).servers
    return build


@pytest.fixture
def listener_set():
    opened = listeners.ListenerSet()
    yield opened
    opened.close_all()


def backlog_of(port):
    """The accept queue limit the kernel applied (`ss` shows it as Send-Q of a listener)."""
    out = subprocess.run(["ss", "-ltnH", "sport = :%d" % port], capture_output=True, text=True,
                         check=True).stdout.split()
    return int(out[2])


def test_wildcard_takes_plain_addresses_of_its_port(servers):
    port = free_port()
    wild, plain = servers(["%d" % port], ["127.0.0.1:%d" % port])
    (binding,) = listeners.plan((wild, plain))
    assert binding.listen.text == "0.0.0.0:%d" % port and binding.server is wild
    assert binding.route(("127.0.0.1", port)) == (plain.listens[0], plain)
    assert binding.route(("127.0.0.2", port)) == (wild.listens[0], wild)


@pytest.mark.parametrize("param", ["bind", "backlog=10", "rcvbuf=32k", "sndbuf=32k",
                                   "so_keepalive=on"])
def test_parameters_that_force_their_own_socket(servers, param):
    port = free_port()
    wild, own = servers(["%d" % port], ["127.0.0.1:%d %s" % (port, param)])
    plan = listeners.plan((wild, own))
    assert [b.listen.text for b in plan] == ["0.0.0.0:%d" % port, "127.0.0.1:%d" % port]
    assert not plan[0].routes


def test_without_wildcard_every_address_binds(servers):
    port = free_port()
    plan = listeners.plan(servers(["127.0.0.1:%d" % port, "127.0.0.2:%d" % port],
                                  ["127.0.0.3:%d" % free_port()]))
    assert len(plan) == 3 and all(not b.routes for b in plan)


def test_dispatch_by_local_address_on_a_real_socket(servers, listener_set):
    port = free_port(host="0.0.0.0")
    wild, plain = servers(["%d" % port], ["127.0.0.2:%d" % port])
    (binding,) = listener_set.prepare(listeners.plan((wild, plain)))
    binding.sock.setblocking(True)
    for address, expected in (("127.0.0.2", plain), ("127.0.0.1", wild)):
        with socket.create_connection((address, port)):
            accepted, _ = binding.sock.accept()
            with accepted:
                assert binding.route(accepted.getsockname())[1] is expected


@pytest.mark.process
def test_every_option_read_back(servers, listener_set):
    port = free_port()
    (server,) = servers(["127.0.0.1:%d backlog=37 rcvbuf=96k sndbuf=80k so_keepalive=7m:11:5"
                         % port])
    (binding,) = listener_set.prepare(listeners.plan((server,)))
    sock = binding.sock
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
    # Linux doubles the requested buffer sizes to leave room for its bookkeeping.
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * 96 * 1024
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * 80 * 1024
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 420
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 11
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 5
    assert backlog_of(port) == 37
    assert sock.getblocking() is False
    assert sock.get_inheritable() is True


def test_keepalive_parts_may_be_omitted(servers, listener_set):
    (server,) = servers(["127.0.0.1:%d so_keepalive=:20:" % free_port()])
    (binding,) = listener_set.prepare(listeners.plan((server,)))
    default_idle = socket.socket().getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)
    assert binding.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 20
    assert binding.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == default_idle


@pytest.mark.process
def test_default_backlog_is_511(servers, listener_set):
    port = free_port()
    listener_set.prepare(listeners.plan(servers(["127.0.0.1:%d" % port])))
    assert backlog_of(port) == 511


@pytest.mark.parametrize("flag, expected", [("", 1), (" ipv6only=off", 0), (" ipv6only=on", 1)])
def test_ipv6only(servers, listener_set, flag, expected):
    # The wildcard address: Linux forces IPV6_V6ONLY on for sockets bound to one IPv6 address.
    port = free_port("::", socket.AF_INET6)
    (binding,) = listener_set.prepare(listeners.plan(servers(["[::]:%d%s" % (port, flag)])))
    assert binding.sock.family == socket.AF_INET6
    assert binding.sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == expected
    assert binding.sock.getsockname()[:2] == ("::", port)
    if not expected:
        with socket.create_connection(("127.0.0.1", port)):
            pass  # IPv4 clients reach a dual-stack socket


def test_unix_socket_mode_and_stale_file(servers, listener_set, tmp_path):
    path = str(tmp_path / "imap.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # the file stays behind, as after a crash
    (binding,) = listener_set.prepare(listeners.plan(servers(["unix:%s" % path])))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(path)
    listener_set.close_all()
    assert not os.path.exists(path)


def test_unix_socket_in_use_is_not_stolen(servers, listener_set, tmp_path):
    path = str(tmp_path / "imap.sock")
    live = socket.socket(socket.AF_UNIX)
    live.bind(path)
    live.listen()
    try:
        with pytest.raises(listeners.ListenError) as info:
            listener_set.prepare(listeners.plan(servers(["unix:%s" % path])))
        assert str(info.value) == "bind() to unix:%s failed (98: Address already in use)" % path
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)  # the other program still owns it
    finally:
        live.close()


@pytest.mark.process
def test_reload_keeps_reopens_and_closes(servers, listener_set):
    kept, dropped, added = free_port(), free_port(), free_port()
    first = listener_set.prepare(listeners.plan(servers(["127.0.0.1:%d" % kept],
                                                        ["127.0.0.1:%d" % dropped])))
    listener_set.commit(first)
    second = listener_set.prepare(listeners.plan(servers(["127.0.0.1:%d backlog=99" % kept],
                                                         ["127.0.0.1:%d" % added])))
    assert second[0].sock is first[0].sock  # same socket: its backlog queue survives
    assert backlog_of(kept) == 99  # changed options are applied to the kept socket
    assert first[1].sock.fileno() != -1  # still open until the new workers hold theirs
    listener_set.commit(second)
    assert first[1].sock.fileno() == -1
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", dropped)).close()
    socket.create_connection(("127.0.0.1", added)).close()


def test_failed_bind_undoes_the_new_sockets(servers, listener_set):
    fresh = free_port()
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    busy_port = busy.getsockname()[1]
    try:
        with pytest.raises(listeners.ListenError) as info:
            listener_set.prepare(listeners.plan(servers(["127.0.0.1:%d" % fresh],
                                                        ["127.0.0.1:%d" % busy_port])))
        assert str(info.value) == ("bind() to 127.0.0.1:%d failed (98: Address already in use)"
                                   % busy_port)
        assert listener_set.sockets == {}
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", fresh)).close()
    finally:
        busy.close()
