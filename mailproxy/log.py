"""nginx's error log: `YYYY/MM/DD HH:MM:SS [level] PID#0: *N message` lines (spec 6.1).

Every line is one write(2) on an O_APPEND descriptor, so the master and all workers can share a file
without interleaving and without buffers that a crash or a fork would lose or duplicate.

Files are kept in a per-process registry keyed by path: the master opens every log named anywhere in
the configuration before it forks, workers inherit the descriptors (they may no longer have the right
to open the files once they dropped privileges), and USR1 reopens each path once however many
servers name it.
"""

import errno
import os
import re
import sys
import time

LEVELS = ("debug", "info", "notice", "warn", "error", "crit", "alert", "emerg")
_RANK = {name: rank for rank, name in enumerate(LEVELS)}

# nginx formats into a 2048-byte buffer (NGX_MAX_ERROR_STR) and cuts there, keeping the line feed.
MAX_LINE = 2048

STDERR = "stderr"

# Log injection: nginx writes a login or a backend reply holding CR/LF raw, so a client can forge log
# lines. Every line passes format_line, so control characters (C0, DEL, C1) and bytes that were not
# UTF-8 (surrogateescape's U+DC80..U+DCFF) become \xNN there. Backslashes and quotes stay as they are:
# escape_for_log already escapes them where client text is quoted, and escaping them here too would
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


def escape_line(message):
    """``message`` with every control character and non-UTF-8 byte written as \\xNN."""
    if isinstance(message, bytes):
        message = message.decode("utf-8", "surrogateescape")
    return _UNSAFE.sub(_escape_char, message)


class LogOpenError(Exception):
    """A log file cannot be opened; str() is the text nginx prints after "[emerg] "."""


def os_error_text(exc):
    """`(<errno>: <strerror>)` as nginx appends it to a failed system call."""
    code = exc.errno if exc.errno is not None else 0
    return "(%d: %s)" % (code, os.strerror(code) if code else str(exc))


def ensure_parent(path):
    """Create the folder of a log or pid file (nginx does not): a fresh prefix then just works."""
    folder = os.path.dirname(path)
    if folder and not os.path.lexists(folder):
        os.makedirs(folder, 0o755, exist_ok=True)


class LogFile:
    """One open log path. Reopening swaps the descriptor so a rotated file is let go."""

    def __init__(self, path):
        self.path = path
        self.fd = self._open()

    def _open(self):
        try:
            ensure_parent(self.path)
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


class StderrFile:
    path = STDERR

    def write(self, data):
        try:
            os.write(2, data)
        except OSError as exc:
            # A closed terminal (EPIPE, EIO after the session ended) must not stop the proxy.
            if exc.errno not in (errno.EPIPE, errno.EIO, errno.EBADF):
                raise

    def reopen(self):
        pass

    def chown(self, uid, gid):
        pass

    def close(self):
        pass


_files = {}
_stderr = StderrFile()


def log_file(target):
    """The shared LogFile for a path (opened on first use) or the stderr writer."""
    if target == STDERR:
        return _stderr
    found = _files.get(target)
    if found is None:
        found = _files[target] = LogFile(target)
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
    """After a reload: close the files the new configuration no longer names."""
    keep = set(paths)
    for path in list(_files):
        if path not in keep:
            _files.pop(path).close()


def file_descriptors():
    return [handle.fd for handle in _files.values()]


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
    """The error_log directives of one context: `((target, level), ...)`, target a path or "stderr"."""

    def __init__(self, targets):
        self.targets = tuple((log_file(target), _RANK[level]) for target, level in targets)
        self.threshold = min((rank for _, rank in self.targets), default=len(LEVELS))

    def enabled(self, level):
        return _RANK[level] >= self.threshold

    def log(self, level, message, conn=None):
        rank = _RANK[level]
        if rank < self.threshold:
            return
        line = format_line(level, message, conn)
        for handle, min_rank in self.targets:
            if rank >= min_rank:
                handle.write(line)

    def reopen(self):
        for handle, _ in self.targets:
            handle.reopen()

    @property
    def paths(self):
        return tuple(handle.path for handle, _ in self.targets)


def startup_error(message, level="emerg", program="mailproxy"):
    """Before the error log exists, and for -t/-s: `mailproxy: [emerg] message` on stderr."""
    sys.stderr.write("%s: [%s] %s\n" % (program, level, message))
    sys.stderr.flush()
