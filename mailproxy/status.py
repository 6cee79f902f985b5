"""What the master tells `mailproxy-master status`, and the master's side of the metrics endpoint.

Status: the master answers on a unix socket beside its pid file (`logs/mailproxy.status` for
`logs/mailproxy.pid`, mode 0600) from a daemon thread: one JSON document per connection, then close.
Workers publish their session count in a shared-memory slot the master assigned before fork (one
aligned int store per session start or end, no lock, no syscall), so the answer never waits on a worker,
and a worker stuck in a long operation still shows its last count.

The master's main loop stays single-threaded in spirit: the threads only read (a snapshot of the worker
table, the shared slots, the metric files) and never take a lock a forked worker could inherit held.
"""

import ctypes
import json
import multiprocessing
import os
import shutil
import socket
import tempfile
import threading
import time

from mailproxy import listeners as listen_mod

METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"
SLOTS = 1024  # workers alive at once, draining generations included
_slots = multiprocessing.RawArray(ctypes.c_int32, SLOTS)
# Set by the master just before fork; the worker keeps the value it inherited.
current_slot = -1


def publish(sessions):
    """Worker side: this worker's number of sessions."""
    if current_slot >= 0:
        _slots[current_slot] = sessions


def socket_path(pid_path):
    root, ext = os.path.splitext(pid_path)
    return (root if ext == ".pid" else pid_path) + ".status"


def ask(path, timeout=5.0):
    """CLI side: the master's answer as a dict; OSError when nobody answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return json.loads(b"".join(chunks))


def format_status(info, now=None):
    now = time.time() if now is None else now
    lines = [
        "mailproxy: master process %d is running" % info["pid"],
        "uptime: %s" % _duration(now - info["started"]),
        "configuration: %s" % info["config"],
        "state: %s" % info["state"],
        "workers:",
    ]
    for w in info["workers"]:
        sessions = "?" if w["sessions"] is None else str(w["sessions"])
        lines.append("  worker %d  generation %d  %s  sessions %s" % (w["pid"], w["generation"], w["state"],
                                                                     sessions))
    return "\n".join(lines)


def _duration(seconds):
    seconds = int(max(0, seconds))
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    return ("%dd " % days if days else "") + "%02d:%02d:%02d" % (hours, minutes, seconds)


def _bind_error(text, exc):
    return listen_mod.ListenError("bind() to %s failed (%d: %s)" % (text, exc.errno or 0,
                                                                   os.strerror(exc.errno or 0)))


class Observer:
    """The master's status socket, worker slots and (with metrics_listen) metrics endpoint."""

    def __init__(self, master):
        self.master = master
        self.started = time.time()
        self.slots = {}  # pid -> slot
        self.free = list(range(SLOTS - 1, -1, -1))
        self.status_sock = None
        self.status_path = None
        self.metrics_dir = None
        self.endpoint = None
        self.endpoint_key = None
        self._pending = None
        self.metrics = None
        # Only metrics_listen turns multiprocess metrics on; a variable left in the shell must not.
        os.environ.pop(METRICS_ENV, None)

    # -- configuration: bind first (errors fail the start or the reload), switch second ----------

    def prepare(self, config):
        """Bind what `config` needs that is not bound yet; raises ListenError."""
        key = config.main.metrics_listen
        if key is None or key == self.endpoint_key:
            self._pending = (key, self.endpoint)
            return
        self._metrics_module(config)
        try:
            endpoint = self.metrics.MetricsEndpoint(key[0], key[1])
        except OSError as exc:
            raise _bind_error(key[2], exc) from None
        self._pending = (key, endpoint)

    def commit(self, config):
        key, endpoint = self._pending
        self._pending = None
        if endpoint is not self.endpoint:
            if self.endpoint is not None:
                self._private_fd(self.endpoint.fileno(), remove=True)
                self.endpoint.close()
            self.endpoint, self.endpoint_key = endpoint, key
            if endpoint is not None:
                self._private_fd(endpoint.fileno())
                endpoint.start()
        self._bind_status(socket_path(config.main.pid))

    def _metrics_module(self, config):
        if self.metrics is not None:
            return
        # prometheus_client picks its storage when first imported, so the directory must be in the
        # environment before that; nothing in the master imports mailproxy.metrics before this point.
        self.metrics_dir = tempfile.mkdtemp(prefix="mailproxy-metrics-")
        uid = _worker_uid(config)
        if uid is not None:
            # Workers write their own files after dropping root; nobody else may read or plant files.
            os.chown(self.metrics_dir, uid, -1)
        os.environ[METRICS_ENV] = self.metrics_dir
        from mailproxy import metrics

        if not metrics.ENABLED:
            raise RuntimeError("mailproxy.metrics was imported before its directory existed")
        self.metrics = metrics

    def _private_fd(self, fd, remove=False):
        fds = self.master.private_fds
        if remove:
            if fd in fds:
                fds.remove(fd)
        else:
            fds.append(fd)

    def follow_pid_file(self, pid_path):
        """The status socket sits beside the pid file: an upgrade renames that to `.oldbin` (and back on
        a roll-back), and the socket follows, so that each master answers at its own pid file's name
        and `status` asks the one the pid file names."""
        self._bind_status(socket_path(pid_path))

    def _bind_status(self, path):
        if path == self.status_path:
            return
        self._close_status()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if os.path.exists(path) and not _answers(path):
                os.unlink(path)  # left by a master that died without cleaning up
            old_umask = os.umask(0o177)
            try:
                sock.bind(path)
            finally:
                os.umask(old_umask)
            sock.listen(8)
        except OSError as exc:
            sock.close()
            # Status is a convenience: the proxy serves without it, and `status` says why it cannot ask.
            self.master.log.log("warn", "status socket %s: %s" % (path, os.strerror(exc.errno or 0)))
            return
        self.status_sock, self.status_path = sock, path
        self._private_fd(sock.fileno())
        threading.Thread(target=self._serve_status, args=(sock,), name="status", daemon=True).start()

    def _close_status(self):
        if self.status_sock is None:
            return
        self._private_fd(self.status_sock.fileno(), remove=True)
        try:
            os.unlink(self.status_path)
        except FileNotFoundError:
            pass  # removed by hand: nothing to clean
        # shutdown() wakes the thread blocked in accept(); it exits on the error that follows.
        try:
            self.status_sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # not connected is the normal case for a listening socket on some kernels
        self.status_sock.close()
        self.status_sock = self.status_path = None

    def _serve_status(self, sock):
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return  # the socket was closed: a reload moved it, or the master is exiting
            with conn:
                conn.settimeout(2.0)
                try:
                    conn.sendall(json.dumps(self.snapshot()).encode())
                except OSError:
                    continue  # the CLI went away; the next one is served as usual

    def snapshot(self):
        master = self.master
        workers = []
        for record in list(master.workers.values()):
            slot = self.slots.get(record.pid)
            workers.append({
                "pid": record.pid,
                "generation": record.generation,
                "state": "shutting down" if record.retiring or master.state != "running" else "running",
                "sessions": _slots[slot] if slot is not None else None,
            })
        return {"pid": os.getpid(), "started": self.started, "config": master.config.path,
                "state": master.state, "workers": sorted(workers, key=lambda w: (w["generation"], w["pid"]))}

    # -- workers -----------------------------------------------------------------------------------

    def before_fork(self):
        global current_slot
        current_slot = self.free.pop() if self.free else -1
        if current_slot >= 0:
            _slots[current_slot] = 0

    def after_fork(self, pid):
        if current_slot >= 0:
            self.slots[pid] = current_slot

    def worker_reaped(self, pid, respawned):
        slot = self.slots.pop(pid, None)
        if slot is not None:
            self.free.append(slot)
        if self.metrics is not None:
            self.metrics.process_dead(pid)
            if respawned:
                self.metrics.WORKER_RESTARTS.inc()

    # -- reloads -----------------------------------------------------------------------------------

    def config_loaded(self, ok, seconds):
        if self.metrics is None:
            return
        self.metrics.RELOADS.labels("ok" if ok else "failed").inc()
        self.metrics.CONFIG_OK.set(1 if ok else 0)
        self.metrics.CONFIG_LOAD_SECONDS.set(seconds)
        if ok:
            self.metrics.CONFIG_LOADED_AT.set(time.time())

    def started_with(self, config):
        if self.metrics is not None:
            self.metrics.CONFIG_OK.set(1)
            self.metrics.CONFIG_LOADED_AT.set(self.started)

    def close(self):
        self._close_status()
        if self.endpoint is not None:
            self.endpoint.close()
            self.endpoint = None
        if self.metrics_dir is not None:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)


def _worker_uid(config):
    user = config.main.user
    if user is None or os.geteuid() != 0:
        return None
    import pwd

    return pwd.getpwnam(user[0]).pw_uid


def _answers(path):
    try:
        ask(path, timeout=1.0)
    except (OSError, ValueError):
        return False
    return True
