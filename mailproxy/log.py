"""nginx's error log: `YYYY/MM/DD HH:MM:SS [level] PID#0: *N message` lines (spec 6.1).

Every line is one write(2) on an O_APPEND descriptor, so the master and all workers can share a file
without interleaving and without buffers that a crash or a fork would lose or duplicate.

Targets are kept in a per-process registry keyed by how the configuration names them: the master opens
every log named anywhere in the configuration before it forks, workers inherit the descriptors (they may
no longer have the right to open the files once they dropped privileges), and USR1 reopens each path once
however many servers name it.

A target is a file, `stderr`, `syslog:server=...` (ngx_syslog.c: one datagram per line, over UDP or a
unix socket) or `memory:SIZE` (nginx --with-debug's ring buffer, read from a core dump). Syslog sends
never block and their failures are dropped: a syslog server that is down costs log lines, not sessions.
"""

import _socket
import errno
import os
import platform
import re
import resource
import socket
import sys
import traceback
import time
from dataclasses import dataclass

LEVELS = ("debug", "info", "notice", "warn", "error", "crit", "alert", "emerg")
_RANK = {name: rank for rank, name in enumerate(LEVELS)}

# nginx formats into a 2048-byte buffer (NGX_MAX_ERROR_STR) and cuts there, keeping the line feed.
MAX_LINE = 2048

STDERR = "stderr"
SYSLOG = "syslog:"
MEMORY = "memory:"

# Log injection: nginx writes a login or a backend reply holding CR/LF raw, so a client can forge log
# lines. Every line passes format_line, so control characters (C0, DEL, C1) and bytes that were not
# UTF-8 (surrogateescape's U+DC80..U+DCFF) become \xNN there. Backslashes and quotes stay as they are:
# escape_bytes already escapes them where client text is quoted, and escaping them here too would
# double every escape it made.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\udc80-\udcff]")


def _escape_char(match):
    char = match.group()
    code = ord(char)
    if code >= 0xDC80:
        return "\\x%02X" % (code - 0xDC00)
    if code >= 0x80:
        # A C1 control sent as valid UTF-8: show its two bytes, as they were on the wire.
        return "".join("\\x%02X" % byte for byte in char.encode("utf-8"))
    return "\\x%02X" % code


# A peer's bytes inside a line (a login, an auth server's text, a backend's reply): printable ASCII as it
# is, anything else as \xNN, so a line stays one line of text whatever the peer sent. Client text sits in
# a quoted field ("..."), where the quote and the backslash are escaped too so that the field cannot be
# closed early; a backend's reply keeps them, as nginx writes it, and its tabs and line ends, which
# escape_line writes as \xNN with every line's other controls.
_NOT_PRINTABLE = re.compile(rb"[^\x20-\x7e\t\r\n]")
_NOT_QUOTABLE = re.compile(rb'[^\x20\x21\x23-\x5b\x5d-\x7e]')


def _hex(match):
    return b"\\x%02X" % match.group()[0]


def escape_bytes(data, quoted=True):
    """``data`` as log text: printable ASCII kept, other bytes as \\xNN: with ``quoted``, ``"`` and ``\\``
    too; without, tabs and line ends are left to escape_line."""
    return (_NOT_QUOTABLE if quoted else _NOT_PRINTABLE).sub(_hex, data).decode("ascii")


def escape_line(message):
    """``message`` with every control character and non-UTF-8 byte written as \\xNN."""
    if isinstance(message, bytes):
        message = message.decode("utf-8", "surrogateescape")
    return _UNSAFE.sub(_escape_char, message)


class LogOpenError(Exception):
    """A log file cannot be opened; str() is the text nginx prints after "[emerg] "."""


def errno_text(code):
    """`(<errno>: <strerror>)` as nginx appends it to a failed system call."""
    return "(%d: %s)" % (code, os.strerror(code))


def os_error_text(exc):
    """errno_text of an OSError; one without an errno says what it is instead."""
    code = exc.errno if exc.errno is not None else 0
    return errno_text(code) if code else "(0: %s)" % exc


class LogTarget:
    """Where error-log lines go: a file, stderr, a syslog peer, a memory ring. A target with no
    descriptor of its own has nothing to reopen after a rotation, hand to the worker user or close."""

    def emit(self, rank, line):
        raise NotImplementedError

    def reopen(self):
        pass

    def chown(self, uid, gid):
        pass

    def close(self):
        pass


class LogFile(LogTarget):
    """One open log path. Reopening swaps the descriptor so a rotated file is let go."""

    def __init__(self, path):
        self.path = path
        self.fd = self._open()

    def _open(self):
        try:
            return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise LogOpenError('open() "%s" failed %s' % (self.path, os_error_text(exc))) from None

    def write(self, data):
        try:
            os.write(self.fd, data)
        except OSError as exc:
            # A full disk must not take the proxy down; nginx drops the line the same way.
            if exc.errno not in (errno.ENOSPC, errno.EIO, errno.EPIPE, errno.EDQUOT):
                raise

    def emit(self, rank, line):
        self.write(line)

    def reopen(self):
        new_fd = self._open()
        old_fd, self.fd = self.fd, new_fd
        os.close(old_fd)

    def chown(self, uid, gid):
        os.fchown(self.fd, uid, gid)

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class StderrFile(LogTarget):
    path = STDERR

    def emit(self, rank, line):
        self.write(line)

    def write(self, data):
        try:
            os.write(2, data)
        except OSError as exc:
            # A closed terminal (EPIPE, EIO after the session ended) must not stop the proxy.
            if exc.errno not in (errno.EPIPE, errno.EIO, errno.EBADF):
                raise


# -- syslog (ngx_syslog.c) -------------------------------------------------------------------------------

FACILITIES = ("kern", "user", "mail", "daemon", "auth", "intern", "lpr", "news", "uucp", "clock", "authpriv",
              "ftp", "ntp", "audit", "alert", "cron", "local0", "local1", "local2", "local3", "local4", "local5",
              "local6", "local7")
# nginx's spelling ('error', 'warn'), not syslog's; an error_log's severity= is parsed and then ignored,
# as in nginx: each message goes out with its own level's severity.
SEVERITIES = ("emerg", "alert", "crit", "error", "warn", "notice", "info", "debug")
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
SYSLOG_PORT = 514
# NGX_SYSLOG_MAX_STR: the longest error line plus the longest header nginx builds.
SYSLOG_MAX = MAX_LINE + len("<255>Jan 01 00:00:00 ") + 255 + 32 + 2
# After a failed connect nginx tries again at the next message of a later second, not at every message.
RECONNECT_PAUSE = 1.0
DEFAULT_TAG = "nginx"  # nginx's own: syslog rules written for nginx keep matching a drop-in
_TAG = re.compile(r"[0-9A-Za-z_]*\Z")


class TargetError(ValueError):
    """An error_log target nginx would refuse; str() is nginx's reason."""


@dataclass(frozen=True)
class SyslogSpec:
    family: int
    address: object  # (host, port) or a unix socket path
    server: str  # as written after server=, for messages
    facility: int = 23  # local7
    severity: int = 6  # info; only access_log would use it
    tag: str = DEFAULT_TAG
    nohostname: bool = False


def _syslog_server(text):
    """ngx_parse_url with syslog's default port: (family, address)."""
    what = 'syslog server "%s"' % text
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise TargetError("no path in the unix domain socket in " + what)
        if len(path.encode()) >= 108:
            raise TargetError("too long path in the unix domain socket in " + what)
        return socket.AF_UNIX, path
    port_text = None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise TargetError("invalid host in " + what)
        host, rest = text[1:end], text[end + 1:]
        if rest.startswith(":"):
            port_text = rest[1:]
        elif rest:
            raise TargetError("invalid host in " + what)
        families = (socket.AF_INET6,)
    else:
        host, colon, port_text = text.partition(":")
        port_text = port_text if colon else None
        families = (socket.AF_INET, socket.AF_INET6)
    if not host:
        raise TargetError("no host in " + what)
    port = SYSLOG_PORT
    if port_text is not None:
        if not port_text.isascii() or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise TargetError("invalid port in " + what)
        port = int(port_text)
    for family in families:
        try:
            socket.inet_pton(family, host)
            return family, (host, port)
        except (OSError, ValueError):
            continue
    if text.startswith("["):
        raise TargetError("invalid IPv6 address in " + what)
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_DGRAM)
    except (OSError, UnicodeError, ValueError):
        raise TargetError("host not found in " + what) from None
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            return family, sockaddr[:2]  # nginx takes the first address
    raise TargetError("host not found in " + what)


def parse_syslog(target):
    """`syslog:server=ADDR[:PORT]|unix:PATH[,facility=][,severity=][,tag=][,nohostname]` -> SyslogSpec."""
    fields = {}
    server = None
    for param in target[len(SYSLOG):].split(","):
        name, equals, value = param.partition("=")
        if equals and name in ("server", "facility", "severity", "tag"):
            if name in fields:
                raise TargetError('duplicate syslog "%s"' % name)
            fields[name] = value
            if name == "server":
                server = _syslog_server(value)
            elif name == "facility" and value not in FACILITIES:
                raise TargetError('unknown syslog facility "%s"' % value)
            elif name == "severity" and value not in SEVERITIES:
                raise TargetError('unknown syslog severity "%s"' % value)
            elif name == "tag":
                # RFC 3164: alphanumeric, at most 32 characters.
                if len(value) > 32:
                    raise TargetError("syslog tag length exceeds 32")
                if not _TAG.match(value):
                    raise TargetError('syslog "tag" only allows alphanumeric characters and underscore')
        elif param == "nohostname":
            fields["nohostname"] = True
        else:
            raise TargetError('unknown syslog parameter "%s"' % param)
    if server is None:
        raise TargetError("no syslog server specified")
    return SyslogSpec(
        family=server[0], address=server[1], server=fields["server"],
        facility=FACILITIES.index(fields.get("facility", "local7")),
        severity=SEVERITIES.index(fields.get("severity", "info")),
        # nginx keeps an empty tag= as written (and then sends "host : message").
        tag=fields.get("tag", DEFAULT_TAG), nohostname=fields.get("nohostname", False),
    )


def syslog_time(now=None):
    """`Mon dd hh:mm:ss`, the day padded with a space (RFC 3164), months in English whatever the locale."""
    tm = time.localtime(now)
    return "%s %2d %02d:%02d:%02d" % (MONTHS[tm.tm_mon - 1], tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec)


_hostname = None


def hostname():
    global _hostname
    if _hostname is None:
        _hostname = socket.gethostname().lower()
    return _hostname


class SyslogPeer(LogTarget):
    """One syslog server: a connected, non-blocking datagram socket.

    It is the C socket module's socket, not gevent's: a send must fail at once rather than wait
    for a slow receiver. A failed send closes the socket and tries once more on a fresh one (a UDP
    socket reports the refusal of an earlier datagram, a unix one may point at a receiver that has
    since bound the path again); a failed connect is not tried again within RECONNECT_PAUSE.

    The master connects when it opens the logs, before it forks: workers inherit the socket as they
    inherit log files, so a unix socket only root may write to still takes their lines.
    """

    def __init__(self, target):
        self.path = target
        self.spec = parse_syslog(target)
        self.sock = None
        self.connect_failed_at = None
        self._connect()

    def message(self, rank, line, now=None):
        spec = self.spec
        pri = spec.facility * 8 + (len(SEVERITIES) - 1 - rank)
        if spec.nohostname:
            head = "<%d>%s %s: " % (pri, syslog_time(now), spec.tag)
        else:
            head = "<%d>%s %s %s: " % (pri, syslog_time(now), hostname(), spec.tag)
        return (head.encode("ascii", "backslashreplace") + line.rstrip(b"\n"))[:SYSLOG_MAX]

    def emit(self, rank, line):
        data = self.message(rank, line)
        for _ in range(2):
            sock = self.sock or self._connect()
            if sock is None:
                return
            try:
                sock.send(data)
                return
            except BlockingIOError:
                return  # the receiver is behind: this line is lost, the socket is fine
            except OSError:
                self._close()

    def _connect(self):
        now = time.monotonic()
        if self.connect_failed_at is not None and now - self.connect_failed_at < RECONNECT_PAUSE:
            return None
        try:
            sock = _socket.socket(self.spec.family, _socket.SOCK_DGRAM | _socket.SOCK_NONBLOCK
                                  | _socket.SOCK_CLOEXEC)
        except OSError:
            self.connect_failed_at = now
            return None
        try:
            sock.connect(self.spec.address)
        except OSError:
            sock.close()
            self.connect_failed_at = now
            return None
        self.connect_failed_at = None
        self.sock = sock
        return sock

    def _close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def close(self):
        self._close()


# -- memory:SIZE (nginx --with-debug) ---------------------------------------------------------------------

_SIZE = re.compile(r"(\d+)([kKmMgG]?)\Z")
_SIZE_SCALE = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}


def parse_memory(target):
    """`memory:SIZE` -> bytes; nginx wants room for at least one whole line."""
    text = target[len(MEMORY):]
    match = _SIZE.match(text)
    size = int(match.group(1)) * _SIZE_SCALE[match.group(2).lower()] if match else 0
    if size < MAX_LINE + 64:
        raise TargetError('invalid buffer size "%s"' % text)
    return size


class MemoryLog(LogTarget):
    """A ring buffer of the latest lines, for a core dump or a debugger to show, as nginx's."""

    def __init__(self, target):
        self.path = target
        self.buffer = bytearray(b" " * parse_memory(target))
        self.written = 0

    def emit(self, rank, line):
        start = self.written % len(self.buffer)
        first = line[: len(self.buffer) - start]
        self.buffer[start:start + len(first)] = first
        rest = line[len(first):]
        self.buffer[: len(rest)] = rest
        self.written += len(line)


def check_target(target):
    """Raise TargetError as nginx's configuration check would for this error_log target."""
    if target.startswith(SYSLOG):
        parse_syslog(target)
    elif target.startswith(MEMORY):
        parse_memory(target)


def is_file(target):
    """A file or stderr: nginx's "file log" (ngx_log_get_file_log), which syslog and memory are not."""
    return not target.startswith((SYSLOG, MEMORY))


# -- the registry -----------------------------------------------------------------------------------------

_files = {}
_stderr = StderrFile()


def log_file(target):
    """The shared handle for a target (opened on first use): a file, stderr, a syslog peer or a ring."""
    if target == STDERR:
        return _stderr
    found = _files.get(target)
    if found is None:
        if target.startswith(SYSLOG):
            found = SyslogPeer(target)
        elif target.startswith(MEMORY):
            found = MemoryLog(target)
        else:
            found = LogFile(target)
        _files[target] = found
    return found


def open_files(paths):
    """Open every path now, so that a bad one is reported at startup or reload, not at first use."""
    for path in paths:
        log_file(path)


def reopen_all():
    """USR1: reopen every file of this process; returns the messages of the ones that failed."""
    failures = []
    for handle in list(_files.values()):
        try:
            handle.reopen()
        except LogOpenError as exc:
            failures.append(str(exc))
    return failures


def chown_all(uid, gid):
    """Hand the files to the worker user, so a worker that dropped root can still reopen them."""
    for handle in _files.values():
        handle.chown(uid, gid)


def retain_only(paths):
    """After a reload: close the targets the new configuration no longer names."""
    keep = set(paths)
    for path in list(_files):
        if path not in keep:
            _files.pop(path).close()


def file_descriptors():
    return [handle.fd for handle in _files.values() if isinstance(handle, LogFile)]


def redirect_stderr(main_targets, all_targets):
    """nginx's ngx_log_redirect_stderr: stray stderr output (a crash report) goes to the main error log
    file, the most verbose one first, unless an error_log anywhere writes to stderr."""
    if STDERR in all_targets:
        return
    ranked = sorted(main_targets, key=lambda entry: _RANK[entry[1]])
    for target, _ in ranked:
        if is_file(target):
            os.dup2(log_file(target).fd, 2)
            return


def format_line(level, message, conn=None, pid=None, now=None):
    stamp = time.strftime("%Y/%m/%d %H:%M:%S", time.localtime(now))
    head = "%s [%s] %d#0: " % (stamp, level, os.getpid() if pid is None else pid)
    if conn is not None:
        head += "*%d " % conn
    # After escaping only ASCII and valid UTF-8 remain, so the line is one line whatever a peer sent.
    # backslashreplace: a lone surrogate from elsewhere than surrogateescape must not cost the line.
    line = head.encode("ascii") + escape_line(message).encode("utf-8", "backslashreplace")
    if len(line) > MAX_LINE - 1:
        line = line[: MAX_LINE - 1]
    return line + b"\n"


class ErrorLog:
    """The error_log directives of one context: `((target, level), ...)`, target a path, "stderr",
    "syslog:..." or "memory:..."."""

    def __init__(self, targets):
        self.targets = tuple((log_file(target), _RANK[level]) for target, level in targets)
        self.threshold = min((rank for _, rank in self.targets), default=len(LEVELS))

    def enabled(self, level):
        return _RANK[level] >= self.threshold

    def log(self, level, message, conn=None, everywhere=False):
        """``everywhere``: every target takes the line whatever its level (a debug_connection client)."""
        rank = _RANK[level]
        if rank < self.threshold and not everywhere:
            return
        line = format_line(level, message, conn)
        for handle, min_rank in self.targets:
            if rank >= min_rank or everywhere:
                handle.emit(rank, line)

    def reopen(self):
        for handle, _ in self.targets:
            handle.reopen()

    @property
    def paths(self):
        return tuple(handle.path for handle, _ in self.targets)


class ConnectionLog:
    """One debug_connection client's view of its server's ErrorLog: nginx gives such a connection every
    level, debug included, on every log of the chain whatever the log's own level."""

    def __init__(self, error_log):
        self.error_log = error_log

    def enabled(self, level):
        return True

    def log(self, level, message, conn=None):
        self.error_log.log(level, message, conn, everywhere=True)

    @property
    def paths(self):
        return self.error_log.paths


# -- start-up notices (ngx_os_status) ---------------------------------------------------------------------


def event_method():
    """The backend gevent's event loop picks in the workers (libev's first recommended one)."""
    try:
        import gevent

        loop_class = gevent.config.loop
        backends = getattr(sys.modules.get(loop_class.__module__), "recommended_backends", None)
        if backends is not None:
            return backends()[0]
        return loop_class.__module__.split(".")[1]  # gevent.libuv.loop: "libuv"
    except Exception:
        # Whatever gevent's configuration says, the workers will fail loudly; the notice is not the place.
        return "epoll"


def version_text():
    from mailproxy import NGINX_VERSION, __version__

    return "mailproxy/%s (nginx/%s)" % (__version__, NGINX_VERSION)


def startup_notices():
    """What nginx's master says as it starts (event method, version, compiler, OS, descriptor limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    uname = os.uname()
    return [
        'using the "%s" event method' % event_method(),
        version_text(),
        "built by %s %s (%s)" % (platform.python_implementation(), platform.python_version(),
                                 platform.python_compiler()),
        "OS: %s %s" % (uname.sysname, uname.release),
        # nginx prints rlim_t signed: RLIM_INFINITY shows as -1.
        "getrlimit(RLIMIT_NOFILE): %d:%d" % tuple(-1 if value == resource.RLIM_INFINITY else value
                                                  for value in (soft, hard)),
    ]


def startup_error(message, level="emerg", program="mailproxy"):
    """Before the error log exists, and for -t/-s: `mailproxy: [emerg] message` on stderr."""
    sys.stderr.write("%s: [%s] %s\n" % (program, level, message))
    sys.stderr.flush()


def traceback_lines(exc):
    """``exc``'s traceback a line at a time, for `[alert]` lines after a bug's own (a log line never
    holds a line break): the one clue to what went wrong."""
    for chunk in traceback.format_exception(exc):
        yield from chunk.rstrip("\n").split("\n")
