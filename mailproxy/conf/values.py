"""Value parsers for directive arguments.

Each directive parser is called as `parser(ctx, args)` with the directive's arguments (name excluded)
and returns the typed value, or raises BadValue with nginx's reason; the loader appends ` in file:line`.
Warnings go through `ctx.warn(text)`, which also knows where the directive is; `ctx.previous` is the
value an earlier occurrence in the same block left (bitmasks OR into it and warn on repeats across lines).
"""

import grp
import ipaddress
import os
import pwd
import socket

from mailproxy import log as errorlog
from mailproxy.protocols import PROTOCOLS

from .settings import AuthHttpUrl, Listen, LoginLimit

DEBUG_LEVELS = ("debug_core", "debug_alloc", "debug_mutex", "debug_event", "debug_http", "debug_mail",
                "debug_stream")
UNIX_PATH_MAX = 108
# nginx keeps times in a signed 32-bit int of milliseconds (or seconds for *_sec slots).
INT32_MAX = 2**31 - 1
# Ports that imply a protocol when a server has none (spec 1.5), from the protocol table.
PROTOCOL_PORTS = {protocol.name: protocol.ports for protocol in PROTOCOLS.values()}
# (unit, seconds, rank): nginx wants units in decreasing size, each used once.
TIME_UNITS = {"y": (31536000, 8), "M": (2592000, 7), "w": (604800, 6), "d": (86400, 5), "h": (3600, 4),
              "m": (60, 3), "s": (1, 2), "ms": (0.001, 1)}


class BadValue(Exception):
    """A directive argument nginx would reject; str() is the reason without the location."""


# --- scalars ----------------------------------------------------------------------------------------

def parse_time(text, msec=True):
    """nginx time syntax (`1h30m`, `500ms`, bare seconds) -> float seconds, or None if invalid."""
    total = 0.0
    rank = 99
    digits = ""
    seen_digit = False
    i = 0
    while i < len(text):
        ch = text[i]
        if "0" <= ch <= "9":
            digits += ch
            seen_digit = True
            i += 1
            continue
        if ch == " ":
            i += 1
            continue
        unit = "ms" if text.startswith("ms", i) else ch
        if unit not in TIME_UNITS or not digits:
            return None
        scale, unit_rank = TIME_UNITS[unit]
        if unit_rank >= rank or (unit == "ms" and not msec):
            return None
        rank = unit_rank
        total += int(digits) * scale
        digits = ""
        i += len(unit)
    if not seen_digit:
        return None
    if digits:
        if rank <= 2:
            # A bare number after `s` or `ms` would be a second count of seconds.
            return None
        total += int(digits)
    limit = INT32_MAX / 1000 if msec else INT32_MAX
    if total > limit:
        return None
    return total


def parse_size(text):
    """nginx size syntax (`16k`, `1m`, bare bytes) -> int, or None if invalid."""
    scale = 1
    if text[-1:] in ("k", "K"):
        scale, text = 1024, text[:-1]
    elif text[-1:] in ("m", "M"):
        scale, text = 1024 * 1024, text[:-1]
    if not text or not text.isascii() or not text.isdigit():
        return None
    value = int(text) * scale
    return value if value < 2**63 else None


def parse_number(text):
    if not text or not text.isascii() or not text.isdigit():
        return None
    value = int(text)
    return value if value <= 2**63 - 1 else None


def time_msec(ctx, args):
    value = parse_time(args[0], msec=True)
    if value is None:
        raise BadValue('"%s" directive invalid value' % ctx.name)
    return value


def time_sec(ctx, args):
    value = parse_time(args[0], msec=False)
    if value is None:
        raise BadValue('"%s" directive invalid value' % ctx.name)
    return value


def size(ctx, args):
    value = parse_size(args[0])
    if value is None:
        raise BadValue('"%s" directive invalid value' % ctx.name)
    return value


def number(ctx, args):
    value = parse_number(args[0])
    if value is None:
        raise BadValue('"%s" directive invalid number' % ctx.name)
    return value


def flag(ctx, args):
    word = args[0].lower()
    if word not in ("on", "off"):
        raise BadValue('invalid value "%s" in "%s" directive, it must be "on" or "off"' % (args[0], ctx.name))
    return word == "on"


def enum(*choices):
    def parse_enum(ctx, args):
        word = args[0].lower()
        if word not in choices:
            raise BadValue('invalid value "%s"' % args[0])
        return word
    return parse_enum


def proxy_smtp_auth(ctx, args):
    """nginx's flag, plus the mechanism (ours): False, "plain" (nginx's `on`) or "login"."""
    word = args[0].lower()
    if word in ("plain", "login"):
        return word
    # Anything else is worded as the flag nginx knows, so nginx configurations see nginx's errors.
    return "plain" if flag(ctx, args) else False


def auth_http_cache(ctx, args):
    """`off` or `TIME [negative=TIME] [max=N]` (ours) -> None or (ttl, negative ttl or None, max entries)."""
    if args == ["off"]:
        return None
    ttl = parse_time(args[0], msec=True)
    if not ttl:
        raise BadValue('"%s" directive invalid value' % ctx.name)
    negative, limit = None, 10000
    for arg in args[1:]:
        name, _, text = arg.partition("=")
        if name == "negative" and parse_time(text, msec=True) is not None:
            negative = parse_time(text, msec=True) or None
        elif name == "max" and parse_number(text):
            limit = parse_number(text)
        else:
            raise BadValue('invalid parameter "%s"' % arg)
    return (ttl, negative, limit)


def proxy_protocol(ctx, args):
    """`on` is the v1 text header; the setting names the version so the sender need not know nginx."""
    word = enum("on", "off", "v2")(ctx, args)
    return "v1" if word == "on" else word


def bitmask(*choices):
    """Any subset of `choices`, case-insensitive; the result keeps the spelling of `choices`."""
    by_lower = {c.lower(): c for c in choices}

    def parse_bitmask(ctx, args):
        found = set()
        for arg in args:
            value = by_lower.get(arg.lower())
            if value is None:
                raise BadValue('invalid value "%s"' % arg)
            # A repeated directive ORs into the same mask, so earlier lines count as already seen.
            if value in found or value in ctx.previous:
                ctx.warn('duplicate value "%s"' % arg)
            found.add(value)
        return frozenset(found)
    return parse_bitmask


def word(ctx, args):
    return args[0]


def words(ctx, args):
    return tuple(args)


def pair(ctx, args):
    return (args[0], args[1])


def mail_protocol(ctx, args):
    if args[0] not in PROTOCOL_PORTS:
        raise BadValue('unknown protocol "%s"' % args[0])
    return args[0]


def conf_path(ctx, args):
    """A file named in the config; relative names resolve against the config file's directory."""
    name = args[0]
    if name.startswith(("data:", "engine:", "store:")):
        return name
    return os.path.normpath(os.path.join(ctx.conf_dir, name))


def prefix_path(ctx, args):
    return os.path.normpath(os.path.join(ctx.prefix, args[0]))


# --- core ---------------------------------------------------------------------------------------------

def worker_processes(ctx, args):
    if args[0] == "auto":
        return os.cpu_count() or 1
    value = parse_number(args[0])
    if value is None:
        raise BadValue('"worker_processes" directive invalid value')
    return value


def worker_connections(ctx, args):
    value = parse_number(args[0])
    if value is None:
        raise BadValue('invalid number "%s"' % args[0])
    return value


def user(ctx, args):
    if os.geteuid() != 0:
        ctx.warn('the "user" directive makes sense only if the master process runs with super-user '
                 'privileges, ignored')
        return None
    name = args[0]
    group = args[1] if len(args) > 1 else args[0]
    try:
        pwd.getpwnam(name)
    except (KeyError, ValueError):
        raise BadValue('getpwnam("%s") failed' % name) from None
    try:
        grp.getgrnam(group)
    except (KeyError, ValueError):
        raise BadValue('getgrnam("%s") failed' % group) from None
    return (name, group)


def error_log(ctx, args):
    """One `error_log` line -> ((target, level),); the loader appends repeats."""
    target = args[0]
    if target != "stderr" and not target.startswith(("syslog:", "memory:")):
        target = os.path.normpath(os.path.join(ctx.prefix, target))
    try:
        errorlog.check_target(target)
    except errorlog.TargetError as exc:
        raise BadValue(str(exc)) from None
    level = None
    debug_modules = False
    for arg in args[1:]:
        if arg in DEBUG_LEVELS:
            # nginx's per-module debug bits: mailproxy's debug lines are not split by module, any turns all on.
            if level is not None:
                raise BadValue('invalid log level "%s"' % arg)
            debug_modules = True
            continue
        if arg not in errorlog.LEVELS:
            raise BadValue('invalid log level "%s"' % arg)
        if level is not None or debug_modules:
            raise BadValue('duplicate log level "%s"' % arg)
        level = arg
    return ((target, "debug" if debug_modules else level or "error"),)


# CPU_SETSIZE of glibc: nginx refuses longer masks.
CPU_SETSIZE = 1024
# nginx's NGX_MAX_OFF_T_VALUE: an off_t is signed 64 bits.
MAX_OFF_T = 2**63 - 1
# Linux builds of nginx have the epoll module only (select and poll are left out when epoll exists).
EVENT_TYPES = ("epoll",)


def parse_offset(text):
    """nginx's ngx_parse_offset: bytes with an optional k, m or g (any case), or None if invalid."""
    scale = {"k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}.get(text[-1:].lower())
    digits = text[:-1] if scale else text
    value = parse_number(digits)
    if value is None or value * (scale or 1) > MAX_OFF_T:
        return None
    return value * (scale or 1)


def offset(ctx, args):
    value = parse_offset(args[0])
    if value is None:
        raise BadValue('"%s" directive invalid value' % ctx.name)
    return value


def worker_priority(ctx, args):
    """`[-+]N` -> int; nginx calls a second one duplicate only when the first was not 0."""
    if ctx.previous:
        raise BadValue('"worker_priority" directive is duplicate')
    text = args[0]
    sign = -1 if text[:1] == "-" else 1
    value = parse_number(text[1:] if text[:1] in "-+" else text)
    if value is None or value > INT32_MAX:
        raise BadValue('"worker_priority" directive invalid number')
    return sign * value


def worker_cpu_affinity(ctx, args):
    """`auto [mask]` or `mask ...` -> (auto, masks): each mask a tuple of CPU numbers.

    Masks read right to left, the rightmost digit being CPU 0; spaces inside a mask are skipped.
    """
    auto = args[0] == "auto"
    texts = args[1:] if auto else args
    if auto and len(texts) > 1:
        raise BadValue('invalid number of arguments in "worker_cpu_affinity" directive')
    masks = []
    for text in texts:
        if len(text) > CPU_SETSIZE:
            raise BadValue('"worker_cpu_affinity" supports up to %d CPUs only' % CPU_SETSIZE)
        cpus = []
        for cpu, ch in enumerate(ch for ch in reversed(text) if ch != " "):
            if ch == "1":
                cpus.append(cpu)
            elif ch != "0":
                raise BadValue('invalid character "%s" in "worker_cpu_affinity"' % ch)
        masks.append(tuple(cpus))
    if auto and not masks:
        masks.append(tuple(range(min(online_cpus(), CPU_SETSIZE))))
    return (auto, tuple(masks))


def online_cpus():
    """nginx's ngx_ncpu: the CPUs online now, which `auto` spreads workers over."""
    try:
        return max(1, os.sysconf("SC_NPROCESSORS_ONLN"))
    except (ValueError, OSError):
        return os.cpu_count() or 1


def env(ctx, args):
    """`NAME` keeps the variable for the workers, `NAME=value` sets it -> ((name, value or None),)."""
    name, eq, value = args[0].partition("=")
    return ((name, value if eq else None),)


def thread_pool(ctx, args):
    """`name threads=N [max_queue=N]` -> ((name, threads, max_queue),); unknown parameters pass, as
    nginx lets them."""
    name = args[0]
    if any(previous[0] == name for previous in ctx.previous):
        raise BadValue('duplicate thread pool "%s"' % name)
    threads, max_queue = 0, 65536
    for arg in args[1:]:
        if arg.startswith("threads="):
            threads = parse_number(arg[8:])
            if not threads or threads > INT32_MAX:
                raise BadValue('invalid threads value "%s"' % arg)
        elif arg.startswith("max_queue="):
            max_queue = parse_number(arg[10:])
            if max_queue is None or max_queue > INT32_MAX:
                raise BadValue('invalid max_queue value "%s"' % arg)
    if not threads:
        raise BadValue('"thread_pool" must have "threads" parameter')
    return ((name, threads, max_queue),)


def event_type(ctx, args):
    if args[0] not in EVENT_TYPES:
        raise BadValue('invalid event type "%s"' % args[0])
    return args[0]


def debug_connection(ctx, args):
    """An address, a CIDR network, `unix:` or a host name -> tuple of ip networks and/or "unix:"."""
    text = args[0]
    if text == "unix:":
        return ("unix:",)
    address, slash, bits = text.partition("/")
    # nginx's ngx_ptocidr takes a prefix length only (no netmask); anything else is a host name.
    if not slash or (bits.isascii() and bits.isdigit()):
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            net = None
        if net is not None:
            if slash and net.network_address != ipaddress.ip_address(address):
                ctx.warn("low address bits of %s are meaningless" % text)
            return (net,)
    found = _resolve(text, 'debug_connection "%s"' % text)
    return tuple(ipaddress.ip_network(ip) for _, ip in found)


# --- addresses ------------------------------------------------------------------------------------------

def _split_host_port(text, what, port_only_ok):
    """Split `text` into (host, port_text); host "" means "any address" (port given alone)."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise BadValue("invalid host in %s" % what)
        host = text[1:end]
        rest = text[end + 1:]
        try:
            socket.inet_pton(socket.AF_INET6, host)
        except (OSError, ValueError):
            raise BadValue("invalid host in %s" % what) from None
        if rest.startswith(":"):
            return "[" + host + "]", rest[1:]
        if rest:
            raise BadValue("invalid host in %s" % what)
        return "[" + host + "]", None
    colon = text.find(":")
    if colon >= 0:
        host = text[:colon]
        if not host:
            raise BadValue("no host in %s" % what)
        return host, text[colon + 1:]
    if port_only_ok and text and (text.replace("-", "", 1).isdigit()):
        return "", text
    if not text:
        raise BadValue("no host in %s" % what)
    return text, None


def _port(text, what):
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 65535:
        raise BadValue("invalid port in %s" % what)
    return int(text)


def _resolve(host, what, first_only=False):
    """Addresses for `host` as (family, ip text); IP literals are not looked up."""
    bare = host[1:-1] if host.startswith("[") else host
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, bare)
            return [(family, bare)]
        except (OSError, ValueError):
            continue
    if host.startswith("["):
        raise BadValue("invalid host in %s" % what)
    try:
        infos = socket.getaddrinfo(bare, None, socket.AF_UNSPEC, socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError):
        raise BadValue("host not found in %s" % what) from None
    found = []
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6) and (family, sockaddr[0]) not in found:
            found.append((family, sockaddr[0]))
    if not found:
        raise BadValue("host not found in %s" % what)
    return found[:1] if first_only else found


def addr_text(family, ip, port):
    return ("[%s]:%d" if family == socket.AF_INET6 else "%s:%d") % (ip, port)


def _unix_path(path, what):
    if not path:
        raise BadValue("no path in the unix domain socket in %s" % what)
    if len(path.encode()) >= UNIX_PATH_MAX:
        raise BadValue("too long path in the unix domain socket in %s" % what)
    return path


def _listen_addresses(text):
    """`listen` address -> list of (family, sockaddr, text, wildcard)."""
    what = '"%s" of the "listen" directive' % text
    if text.startswith("unix:"):
        path = _unix_path(text[5:], what)
        return [(socket.AF_UNIX, path, "unix:" + path, False)]
    host, port_text = _split_host_port(text, what, port_only_ok=True)
    if port_text is None:
        # nginx's URL parser leaves the port at the mail module's default, 0.
        ports = [0]
    elif "-" in port_text:
        low, _, high = port_text.partition("-")
        first, last = _port(low, what), _port(high, what)
        if first > last:
            raise BadValue("invalid port range in %s" % what)
        ports = list(range(first, last + 1))
    else:
        ports = [_port(port_text, what)]
    if host in ("", "*"):
        addrs, wildcard = [(socket.AF_INET, "0.0.0.0")], True
    else:
        addrs = _resolve(host, what)
        wildcard = False
    out = []
    for family, ip in addrs:
        any_ip = wildcard or ipaddress.ip_address(ip).is_unspecified
        for port in ports:
            out.append((family, (ip, port), addr_text(family, ip, port), any_ip))
    return out


def _keepalive(value):
    if value == "on":
        return True
    if value == "off":
        return False
    parts = value.split(":")
    if len(parts) != 3 or not any(parts):
        raise BadValue('invalid so_keepalive value: "%s"' % value)
    out = []
    for i, part in enumerate(parts):
        if not part:
            out.append(None)
            continue
        parsed = parse_number(part) if i == 2 else parse_time(part, msec=False)
        if not parsed:
            raise BadValue('invalid so_keepalive value: "%s"' % value)
        out.append(int(parsed))
    return tuple(out)


def listen(ctx, args):
    """`listen` -> tuple of Listen, one per resolved address and port."""
    opts = {}
    for param in args[1:]:
        if param in ("ssl", "proxy_protocol", "bind", "multipath"):
            opts[param] = True
        elif param.startswith("backlog="):
            value = parse_number(param[8:])
            if not value:
                raise BadValue('invalid backlog "%s"' % param)
            opts["backlog"], opts["bind"] = value, True
        elif param.startswith(("rcvbuf=", "sndbuf=")):
            key = param[:6]
            value = parse_size(param[7:])
            if value is None:
                raise BadValue('invalid %s "%s"' % (key, param))
            opts[key], opts["bind"] = value, True
        elif param.startswith("ipv6only=o"):
            if param[10:] == "n":
                opts["ipv6only"] = True
            elif param[10:] == "ff":
                opts["ipv6only"] = False
            else:
                raise BadValue('invalid ipv6only flags "%s"' % param[9:])
            opts["bind"] = True
        elif param.startswith("so_keepalive="):
            opts["so_keepalive"], opts["bind"] = _keepalive(param[13:]), True
        else:
            raise BadValue('invalid parameter "%s"' % param)
    if opts.get("multipath"):
        opts["bind"] = True
    return tuple(
        Listen(text=text, family=family, sockaddr=sockaddr, wildcard=wildcard, file=ctx.file, line=ctx.line,
               **opts)
        for family, sockaddr, text, wildcard in _listen_addresses(args[0])
    )


def auth_http(ctx, args):
    """The auth server URL: `[http://]host[:port][/uri]` or `unix:/path[:/uri]`."""
    url = args[0][7:] if args[0].startswith("http://") else args[0]
    what = 'auth_http "%s"' % url
    if url.startswith("unix:"):
        path, colon, uri = url[5:].partition(":")
        path = _unix_path(path, what)
        return AuthHttpUrl(host_header="localhost", uri=uri or "/", sockaddr=path, family=socket.AF_UNIX,
                           peer="unix:" + path)
    slash = url.find("/")
    hostport, uri = (url, "/") if slash < 0 else (url[:slash], url[slash:])
    if not hostport:
        raise BadValue("no host in %s" % what)
    host, port_text = _split_host_port(hostport, what, port_only_ok=False)
    port = 80 if port_text is None else _port(port_text, what)
    ((family, ip),) = _resolve(host, what, first_only=True)
    return AuthHttpUrl(host_header=host, uri=uri, sockaddr=(ip, port), family=family,
                       peer=addr_text(family, ip, port))


def network(ctx, args):
    """`set_real_ip_from` -> tuple of ip networks and/or "unix:" (the loader appends repeats)."""
    text = args[0]
    if text == "unix:":
        return ("unix:",)
    try:
        if "/" in text:
            net = ipaddress.ip_network(text, strict=False)
            if net.network_address != ipaddress.ip_interface(text).ip:
                ctx.warn("low address bits of %s are meaningless" % text)
            return (net,)
        return (ipaddress.ip_network(text),)
    except ValueError:
        pass
    found = _resolve(text, 'set_real_ip_from "%s"' % text)
    return tuple(ipaddress.ip_network(ip) for _, ip in found)


def resolver(ctx, args):
    """`resolver` -> None for `off`, else {"addresses", "valid", "ipv4", "ipv6"}."""
    if len(args) == 1 and args[0] == "off":
        return None
    addresses, valid, ipv4, ipv6 = [], None, True, True
    for arg in args:
        key, eq, value = arg.partition("=")
        if eq and key in ("valid", "ipv4", "ipv6", "status_zone"):
            if key == "valid":
                valid = parse_time(value, msec=False)
                if valid is None:
                    raise BadValue("invalid parameter: %s" % arg)
            elif key == "status_zone":
                continue
            elif value not in ("on", "off"):
                raise BadValue("invalid parameter: %s" % arg)
            elif key == "ipv4":
                ipv4 = value == "on"
            else:
                ipv6 = value == "on"
            continue
        what = 'resolver "%s"' % arg
        host, port_text = _split_host_port(arg, what, port_only_ok=False)
        port = 53 if port_text is None else _port(port_text, what)
        for family, ip in _resolve(host, what):
            addresses.append(addr_text(family, ip, port))
    if not ipv4 and not ipv6:
        raise BadValue('"ipv4" and "ipv6" cannot both be "off"')
    return {"addresses": tuple(addresses), "valid": valid, "ipv4": ipv4, "ipv6": ipv6}


def ssl_session_cache(ctx, args):
    """`off`, `none`, or a tuple of ("builtin", sessions|None) and ("shared", name, bytes)."""
    if len(args) == 1 and args[0] in ("off", "none"):
        return args[0]
    caches = []
    for arg in args:
        if arg == "builtin":
            caches.append(("builtin", None))
        elif arg.startswith("builtin:"):
            sessions = parse_number(arg[8:])
            if not sessions:
                raise BadValue('invalid session cache "%s"' % arg)
            caches.append(("builtin", sessions))
        elif arg.startswith("shared:") and arg.count(":") >= 2:
            name, _, size_text = arg[7:].rpartition(":")
            bytes_ = parse_size(size_text)
            if not name or bytes_ is None:
                raise BadValue('invalid session cache "%s"' % arg)
            if bytes_ < 8 * 4096:
                raise BadValue('session cache "%s" is too small' % arg)
            caches.append(("shared", name, bytes_))
        else:
            raise BadValue('invalid session cache "%s"' % arg)
    return tuple(caches)


# --- observability (ours, off by default) ----------------------------------------------------------------

def metrics_listen(ctx, args):
    """`metrics_listen [host:]port` -> (family, (ip, port), text); one address, not a listen socket set."""
    host, port_text = _split_host_port(args[0], "metrics_listen", port_only_ok=True)
    if port_text is None:
        raise BadValue("no port in metrics_listen")
    port = _port(port_text, "metrics_listen")
    family, ip = _resolve(host or "127.0.0.1", "metrics_listen", first_only=True)[0]
    return (family, (ip, port), addr_text(family, ip, port))


SESSION_LOG_FORMATS = ("json", "combined")


def session_log(ctx, args):
    """`session_log off | FILE [json|combined]` -> None or (absolute path, format)."""
    if args[0] == "off":
        if len(args) > 1:
            raise BadValue('invalid parameter "%s"' % args[1])
        return None
    fmt = args[1] if len(args) > 1 else "combined"
    if fmt not in SESSION_LOG_FORMATS:
        raise BadValue('invalid session log format "%s"' % fmt)
    return (os.path.normpath(os.path.join(ctx.prefix, args[0])), fmt)


# Below this a zone holds too few slots to be worth having (a slot is 40 bytes: about 200 keys).
LOGIN_LIMIT_ZONE_MIN = 8192


def login_limit_zone(ctx, args):
    """`mail_login_limit_zone name size` (ours) -> ((name, size),); the loader appends repeats."""
    name, size_text = args
    size = parse_size(size_text)
    if size is None:
        raise BadValue('invalid zone size "%s"' % size_text)
    if size < LOGIN_LIMIT_ZONE_MIN:
        raise BadValue('zone "%s" is too small' % name)
    if any(previous == name for previous, _ in ctx.previous):
        raise BadValue('duplicate zone "%s"' % name)
    return ((name, size),)


def login_limit(ctx, args):
    """`mail_login_limit off | zone=name [per=] [failures=] [window=] [delay=] [block=] [exempt=CIDR ...]`."""
    if args == ["off"]:
        return None
    fields, exempt = {}, []
    for arg in args:
        key, sep, text = arg.partition("=")
        if not sep or not text:
            raise BadValue('invalid parameter "%s"' % arg)
        if key == "zone":
            fields["zone"] = text
        elif key == "per" and text in ("address", "login", "both"):
            fields["per"] = text
        elif key == "failures" and parse_number(text):
            fields["failures"] = parse_number(text)
        elif key in ("window", "block") and parse_time(text, msec=True):
            fields[key] = parse_time(text, msec=True)
        elif key == "delay" and parse_time(text, msec=True) is not None:
            fields["delay"] = parse_time(text, msec=True)
        elif key == "exempt":
            try:
                exempt.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                raise BadValue('invalid network "%s"' % text) from None
        else:
            raise BadValue('invalid parameter "%s"' % arg)
    if "zone" not in fields:
        raise BadValue('"%s" must have "zone" parameter' % ctx.name)
    return LoginLimit(exempt=tuple(exempt), **fields)
