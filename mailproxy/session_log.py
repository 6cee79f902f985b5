"""`session_log FILE [json|combined]` (ours, off by default): one line per finished session.

Fields: time (the session's end), protocol, client address, server (listen address), login, upstream,
result, bytes from and to the client (after login, by the relay), duration in seconds. Results:
  ok         logged in and relayed (however the relay ended)
  invalid    the last login was refused by the auth server
  temporary  internal error: auth server failure or the backend refused, failed or was unreachable
  timeout    the client, the auth server or the backend did not answer in time
  closed     the client went away before any login was decided
  error      broken PROXY header, failed TLS handshake, or a bug (see the error log)

The login is escaped as the error log escapes it (control bytes, quotes, backslashes, non-ASCII as
\\xNN); a password never reaches this module.

Writing: lines are buffered per file in the worker and written by a one-second timer or when 32 KiB are
pending, as nginx's `access_log ... buffer=32k flush=1s`. A session's end then costs a list append, and
a busy worker makes one write(2) a second instead of one a session. Each flush is whole lines in one
O_APPEND write, so workers sharing the file never interleave. The files are the error log's registry
(log.py): the master opens them before fork and hands them to the worker user on USR1, and the worker's
USR1 flushes, then reopens. A worker killed with TERM flushes first; only a crash loses up to a second.
"""

import json
import time

from mailproxy import log as errorlog
from mailproxy.log import escape_bytes

FLUSH_INTERVAL = 1.0
FLUSH_SIZE = 32768

_pending = {}  # path -> [bytes, ...]
_pending_size = {}
_timer = None


def _text(value):
    return "-" if value is None else value


def format_combined(rec):
    # Space-separated like nginx's combined log; the login quoted since it is the one client-chosen field.
    return "%s - \"%s\" [%s] %s %s %s %s %d %d %.3f\n" % (
        rec["client"], rec["login"], time.strftime("%d/%b/%Y:%H:%M:%S %z", time.localtime(rec["end"])),
        rec["protocol"], rec["server"], rec["result"], _text(rec["upstream"]),
        rec["bytes_from_client"], rec["bytes_to_client"], rec["duration"],
    )


def format_json(rec):
    out = dict(rec)
    out["time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(out.pop("end")))
    out["duration"] = round(out["duration"], 3)
    return json.dumps(out, separators=(",", ":")) + "\n"


FORMATS = {"combined": format_combined, "json": format_json}


def record(setting, protocol, client, server, login, upstream, result, from_client, to_client, started):
    """Queue one line for `setting` = (path, format); `login` is raw bytes from the client or auth server."""
    path, fmt = setting
    end = time.time()
    line = FORMATS[fmt]({
        "end": end,
        "protocol": protocol,
        "client": client,
        "server": server,
        "login": escape_bytes(login) if login else "",
        "upstream": upstream,
        "result": result,
        "bytes_from_client": from_client,
        "bytes_to_client": to_client,
        "duration": max(0.0, time.monotonic() - started),
    }).encode("ascii")
    lines = _pending.get(path)
    if lines is None:
        lines = _pending[path] = []
        _pending_size[path] = 0
    lines.append(line)
    _pending_size[path] += len(line)
    if _pending_size[path] >= FLUSH_SIZE:
        flush(path)
    else:
        _arm_timer()


def _arm_timer():
    global _timer
    if _timer is None:
        import gevent

        # A repeating libev timer rather than a greenlet: nothing to wake when nothing is pending.
        _timer = gevent.get_hub().loop.timer(FLUSH_INTERVAL, FLUSH_INTERVAL)
        _timer.start(flush_all)


def flush(path):
    lines = _pending.get(path)
    if not lines:
        return
    data = b"".join(lines)
    lines.clear()
    _pending_size[path] = 0
    errorlog.log_file(path).write(data)


def flush_all():
    for path in list(_pending):
        flush(path)


def paths(config):
    """The files a configuration names, for the master to open before fork (and keep across reloads)."""
    return sorted({server.session_log[0] for server in config.servers if server.session_log})
