"""Listening sockets: which addresses get their own socket (spec 1.2), their options (spec 1.4).

Only the master creates sockets; workers inherit them through fork. A socket outlives reloads for as
long as some configuration still listens on its address, so connections waiting in its backlog are
never refused while workers are replaced.
"""

import errno
import ipaddress
import os
import socket
import stat
from dataclasses import dataclass, field

from mailproxy.log import os_error_text

DEFAULT_BACKLOG = 511

# nginx makes unix sockets writable by everyone and leaves access control to the directory.
UNIX_SOCKET_MODE = 0o666


class ListenError(Exception):
    """A socket cannot be set up; str() is the text nginx logs at emerg."""


def forces_own_bind(listen):
    """Parameters that nginx cannot apply to a shared wildcard socket, so they need their own."""
    return (
        listen.bind
        or listen.backlog != DEFAULT_BACKLOG
        or listen.rcvbuf is not None
        or listen.sndbuf is not None
        or listen.so_keepalive is not None
        or (listen.family == socket.AF_INET6 and not listen.ipv6only)
        or getattr(listen, "multipath", False)
    )


def _ip(sockaddr):
    """The address part of an inet sockaddr, comparable whatever form getsockname() returned."""
    return ipaddress.ip_address(sockaddr[0].split("%", 1)[0])


def socket_key(listen):
    """What bind() fixes for good: family, address and, for IPv6, IPV6_V6ONLY."""
    if listen.family == socket.AF_UNIX:
        return (socket.AF_UNIX, listen.sockaddr)
    ipv6only = listen.ipv6only if listen.family == socket.AF_INET6 else None
    return (listen.family, _ip(listen.sockaddr), listen.sockaddr[1], ipv6only)


@dataclass
class Binding:
    """One listening socket and the servers reached through it.

    `routes` holds the addresses of the same port that share this wildcard socket; a connection is
    handed to the one whose IP equals the local address it arrived on, else to the wildcard's own.
    """

    listen: object
    server: object
    routes: dict = field(default_factory=dict)
    sock: socket.socket = None

    @property
    def key(self):
        return socket_key(self.listen)

    def route(self, local_sockaddr):
        if self.routes:
            found = self.routes.get(_ip(local_sockaddr))
            if found is not None:
                return found
        return self.listen, self.server


def plan(servers):
    """The sockets a configuration needs, in configuration order."""
    bindings = []
    ports = {}
    seen = set()
    for server in servers:
        for listen in server.listens:
            if (listen.family, listen.sockaddr) in seen:
                continue  # a later server sharing an address by SNI (ours): the first one owns the socket
            seen.add((listen.family, listen.sockaddr))
            if listen.family == socket.AF_UNIX:
                bindings.append(Binding(listen, server))
            else:
                ports.setdefault((listen.family, listen.sockaddr[1]), []).append((listen, server))

    for entries in ports.values():
        wildcard = next(((l, s) for l, s in entries if l.wildcard), None)
        if wildcard is None:
            bindings.extend(Binding(l, s) for l, s in entries)
            continue
        shared = Binding(*wildcard)
        bindings.append(shared)
        for listen, server in entries:
            if listen is wildcard[0]:
                continue
            if forces_own_bind(listen):
                bindings.append(Binding(listen, server))
            else:
                shared.routes[_ip(listen.sockaddr)] = (listen, server)
    return bindings


def _keepalive(sock, value):
    if value is None:
        return
    if value is False:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0)
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if value is True:
        return
    idle, interval, count = value
    for option, part in ((socket.TCP_KEEPIDLE, idle), (socket.TCP_KEEPINTVL, interval),
                         (socket.TCP_KEEPCNT, count)):
        if part is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, int(part))


def apply_options(sock, listen):
    """Options that may change on a socket already bound (used again when a reload keeps it)."""
    what = "setsockopt()"
    try:
        if listen.rcvbuf is not None:
            what = "setsockopt(SO_RCVBUF, %d)" % listen.rcvbuf
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, listen.rcvbuf)
        if listen.sndbuf is not None:
            what = "setsockopt(SO_SNDBUF, %d)" % listen.sndbuf
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, listen.sndbuf)
        if listen.family != socket.AF_UNIX:
            what = "setsockopt(SO_KEEPALIVE)"
            _keepalive(sock, listen.so_keepalive)
            # Accepted sockets inherit it on Linux: no reply waits for the client's delayed ACK (41 ms
            # for the greeting after a TLS handshake); nginx's tcp_nodelay, at no cost per connection.
            what = "setsockopt(TCP_NODELAY)"
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        what = "listen() to %s, backlog %d" % (listen.text, listen.backlog)
        sock.listen(listen.backlog)
    except OSError as exc:
        raise ListenError("%s failed %s" % (what, os_error_text(exc))) from None


def _remove_stale_unix_socket(path):
    """A socket file left by a crashed master blocks bind(); one that still answers is not ours to take."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
    except OSError:
        pass  # leave it: bind() reports the real problem with nginx's wording
    finally:
        probe.close()


def open_socket(listen):
    """Create, configure, bind and listen; the socket is non-blocking and inheritable."""
    sock = socket.socket(listen.family, socket.SOCK_STREAM)
    try:
        if listen.family == socket.AF_UNIX:
            _remove_stale_unix_socket(listen.sockaddr)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if listen.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if listen.ipv6only else 0)
        try:
            sock.bind(listen.sockaddr)
        except OSError as exc:
            raise ListenError("bind() to %s failed %s" % (listen.text, os_error_text(exc))) from None
        if listen.family == socket.AF_UNIX:
            os.chmod(listen.sockaddr, UNIX_SOCKET_MODE)
        apply_options(sock, listen)
        sock.setblocking(False)
        sock.set_inheritable(True)
    except BaseException:
        sock.close()
        raise
    return sock


def _unlink_unix(key):
    if key[0] == socket.AF_UNIX:
        try:
            os.unlink(key[1])
        except FileNotFoundError:
            pass


class ListenerSet:
    """The master's sockets by key, across reloads.

    A reload is two steps so that it cannot make things worse: `prepare` opens what the new plan
    lacks (closing its own work again if any bind fails), and `commit` closes what the new plan no
    longer uses, once the new workers hold their copies.
    """

    def __init__(self):
        self.sockets = {}

    def prepare(self, bindings):
        created = {}
        try:
            for binding in bindings:
                key = binding.key
                sock = self.sockets.get(key) or created.get(key)
                if sock is None:
                    sock = created[key] = open_socket(binding.listen)
                elif key not in created:
                    apply_options(sock, binding.listen)
                binding.sock = sock
        except BaseException:
            for key, sock in created.items():
                sock.close()
                _unlink_unix(key)
            raise
        self.sockets.update(created)
        return bindings

    def commit(self, bindings):
        """Close and forget every socket the bindings do not use."""
        wanted = {binding.key for binding in bindings}
        for key in [key for key in self.sockets if key not in wanted]:
            self.sockets.pop(key).close()
            _unlink_unix(key)

    def close_all(self, unlink=True):
        for key, sock in self.sockets.items():
            sock.close()
            if unlink:
                _unlink_unix(key)
        self.sockets = {}

    def all_sockets(self):
        return list(self.sockets.values())


def is_transient_accept_error(exc):
    """accept() errors about one connection that went away before we took it."""
    return exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN,
                         errno.ENOPROTOOPT, errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH,
                         errno.EOPNOTSUPP, errno.ENETUNREACH, errno.EINTR, errno.EAGAIN)
