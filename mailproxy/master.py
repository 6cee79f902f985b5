"""The master process: fork workers, reap them, act on signals, reload, upgrade on the fly (spec 7).

The master never runs gevent. Its signals stay blocked and the main loop takes them one at a time with
sigtimedwait(), which also says who sent them (nginx logs the sender); each is then run by name as
`handle_<name>`, outside any signal-handler context, so a reload can take as long as it needs.
"""

import ctypes
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import time

from mailproxy import listeners as listen_mod
from mailproxy import log as errorlog
from mailproxy import session_log, status, throttle

# One table for the master's handlers and for `mailproxy-master -s <name>` (nginx's signals[]).
SIGNALS = {
    "stop": signal.SIGTERM,
    "quit": signal.SIGQUIT,
    "reopen": signal.SIGUSR1,
    "reload": signal.SIGHUP,
}

HANDLERS = {
    signal.SIGHUP: ("hup", "reconfiguring"),
    signal.SIGQUIT: ("quit", "shutting down"),
    signal.SIGTERM: ("term", "exiting"),
    signal.SIGINT: ("term", "exiting"),
    signal.SIGUSR1: ("usr1", "reopening logs"),
    signal.SIGCHLD: ("chld", None),
    signal.SIGUSR2: ("usr2", "changing binary"),
    signal.SIGWINCH: ("winch", "stop accepting connections"),
}

# nginx's NGINX variable: the listen sockets a new master inherits on USR2, as "fd;fd;...;".
INHERIT_ENV = "MAILPROXY"
OLDBIN = ".oldbin"

MASTER_TITLE = "mailproxy: master process %s"

# A worker that dies sooner than this after its start counts towards the respawn back-off.
QUICK_DEATH = 5.0
RESPAWN_MAX_DELAY = 30.0
# Fast stop: TERM again after each wait, doubling, then SIGKILL (nginx: 50..800 ms, ~1.5 s in all).
TERM_WAITS = (0.05, 0.1, 0.2, 0.4, 0.8)
IDLE_WAIT = 60.0


def notify(message):
    """systemd's sd_notify: READY=1 / RELOADING=1 / STOPPING=1 when run with NOTIFY_SOCKET."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(message.encode(), address)
        except OSError:
            # Nobody listening any more (the supervisor went away): the master carries on.
            return


class WorkerProcess:
    def __init__(self, pid, generation, slot):
        self.pid = pid
        self.generation = generation
        self.slot = slot  # the worker's number, 0 .. worker_processes - 1 (worker_cpu_affinity)
        self.started = time.monotonic()
        self.retiring = False


class Master:
    """`load` re-reads the configuration for a reload: () -> Config, raising ConfigError.

    `inherited`: this master was started by an old one's USR2 and took its sockets; `daemonized`: it
    runs away from a terminal (only then does WINCH mean "stop the workers", as in nginx).
    """

    def __init__(self, config, listener_set, bindings, load, command_line="", inherited=False,
                 daemonized=False):
        self.config = config
        self.listeners = listener_set
        self.bindings = bindings
        self.load = load
        self.command_line = command_line
        self.log = errorlog.ErrorLog(config.main.error_log)
        self.workers = {}
        self.generation = 0
        self.state = "running"  # running | quitting | stopping
        self.counter = multiprocessing.Value(ctypes.c_uint64, 0)
        self.private_fds = []  # closed in every worker (e.g. the daemon's readiness pipe)
        self.ready_hooks = []
        self.failure_hooks = []  # called with the reason when the master gives up before it was ready
        self.boot_pipe = None  # at start-up: the write end each new worker reports its boot on
        # The accept_mutex: workers take a POSIX record lock on this unnamed file, which the kernel
        # releases when its holder dies (nginx's master unlocks its shared-memory mutex by hand).
        self.accept_lock = tempfile.TemporaryFile()
        self.failures = 0
        self.respawn_at = 0.0
        self.term_deadlines = []
        self.fatal = False
        self.inherited = inherited
        self.daemonized = daemonized or inherited
        self.parent = os.getppid()
        self.new_binary = 0  # pid of the master a USR2 started, while it runs
        self.noaccepting = False  # WINCH: the workers were let go and are not replaced
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLERS)
        # Created after the mask: its threads (status, metrics) inherit it and never take a signal.
        self.observer = status.Observer(self)

    # -- lifecycle ---------------------------------------------------------------------------

    def run(self):
        """Serve until stopped; returns the exit status of the master."""
        from setproctitle import setproctitle

        setproctitle(MASTER_TITLE % self.command_line)
        for notice in errorlog.startup_notices():
            self.log.log("notice", notice)
        try:
            self.observer.prepare(self.config)
        except listen_mod.ListenError as exc:
            self.log.log("emerg", str(exc))
            self.finish()
            self.fail_start(str(exc))
            return 1
        self.observer.commit(self.config)
        self.observer.started_with(self.config)
        throttle.prepare(self.config)  # before fork: every worker must map the same zones
        failure = self.spawn_first_workers()
        if failure is None:
            self._ready()
        while self.state == "running" or self.workers:
            info = signal.sigtimedwait(HANDLERS, self._wait_time())
            if info is not None:
                self.dispatch(info)
            self.tick()
        self.finish()
        if failure is not None:
            self.fail_start(failure)
        return 1 if self.fatal or failure is not None else 0

    def spawn_first_workers(self):
        """Fork the workers and wait until each has said how its start went; returns None when at
        least one serves, else the reason the last one gave (so `start` can fail with it)."""
        read_end, self.boot_pipe = os.pipe()
        self.private_fds.append(read_end)
        try:
            self.spawn_workers()
        finally:
            self.private_fds.remove(read_end)
            os.close(self.boot_pipe)
            self.boot_pipe = None
        with os.fdopen(read_end, "rb") as reports:
            # EOF once every worker reported or died: each one closes its copy of the write end.
            records = reports.read()
        lines = records.split(b"\n")
        if b"+" in lines or not self.config.main.worker_processes:
            return None
        failures = [line[1:].decode("utf-8", "replace") for line in lines if line.startswith(b"-")]
        reason = failures[-1] if failures else "worker process exited during start-up"
        self.log.log("emerg", "no worker process started: %s" % reason)
        return reason

    def fail_start(self, reason):
        """The master gives up before it was ready: whoever waits for the start hears why."""
        for hook in self.failure_hooks:
            hook(reason)
        self.failure_hooks = []

    def dispatch(self, info):
        name, reason = HANDLERS[info.si_signo]
        if name == "usr2" and (self.new_binary or self._old_master_alive()):
            # One upgrade at a time: not while a new master runs, nor in a new one whose old one is
            # still there.
            name, reason = "ignored", "ignoring"
        elif name == "winch" and not self.daemonized:
            name, reason = "ignored", None  # a terminal's window changed size
        text = "signal %d (%s) received from %d" % (
            info.si_signo, signal.Signals(info.si_signo).name, info.si_pid)
        self.log.log("notice", text + (", " + reason if reason else ""))
        getattr(self, "handle_" + name)()

    def _old_master_alive(self):
        return self.inherited and os.getppid() == self.parent

    def _wait_time(self):
        now = time.monotonic()
        deadlines = list(self.term_deadlines[:1])
        if self.state == "running" and self._missing_workers():
            deadlines.append(self.respawn_at)
        if not deadlines:
            return IDLE_WAIT
        return max(0.0, min(deadlines) - now)

    def tick(self):
        """Work that is due by the clock rather than by a signal."""
        now = time.monotonic()
        if self.state == "running" and self._missing_workers() and now >= self.respawn_at:
            self.spawn_workers()
        if self.state == "stopping" and self.term_deadlines and now >= self.term_deadlines[0]:
            self.term_deadlines.pop(0)
            self.kill_workers(signal.SIGTERM if self.term_deadlines else signal.SIGKILL)

    def finish(self):
        self.observer.close()
        self.listeners.close_all(unlink=self._owns_unix_sockets())
        pid = self.config.main.pid
        self._remove_pid_file(pid + OLDBIN if self.new_binary else pid)
        self.log.log("notice", "exit")

    def _owns_unix_sockets(self):
        """Unix socket files stay while another master (new or old) serves on them."""
        return not self.new_binary and not self._old_master_alive()

    def _ready(self):
        notify("READY=1\nMAINPID=%d" % os.getpid())
        for hook in self.ready_hooks:
            hook()
        self.ready_hooks = []

    # -- workers -----------------------------------------------------------------------------

    def _current(self):
        return [w for w in self.workers.values() if not w.retiring]

    def _missing_workers(self):
        if self.noaccepting:
            return 0
        return max(0, self.config.main.worker_processes - len(self._current()))

    def spawn_workers(self):
        if self._missing_workers() and not self._current():
            self.log.log("notice", "start worker processes")
        taken = {record.slot for record in self._current()}
        for slot in range(self.config.main.worker_processes):
            if slot not in taken:
                self.spawn_worker(slot)

    def spawn_worker(self, slot):
        self.observer.before_fork()
        pid = os.fork()
        if pid:
            self.observer.after_fork(pid)
            self.workers[pid] = WorkerProcess(pid, self.generation, slot)
            self.log.log("notice", "start worker process %d" % pid)
            return pid
        status = 1
        try:
            from mailproxy import worker

            status = worker.boot(self.config, self.bindings, self._foreign_fds(), self.counter, slot=slot,
                                 accept_lock=self.accept_lock.fileno(), booted=self.boot_pipe)
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else 1
        except BaseException as exc:
            self.log.log("alert", "worker process failed: %s: %s" % (type(exc).__name__, exc))
        finally:
            os._exit(status)

    def _foreign_fds(self):
        """Descriptors a new worker must not keep: sockets of other generations, master-only fds."""
        mine = {binding.sock.fileno() for binding in self.bindings}
        fds = [s.fileno() for s in self.listeners.all_sockets() if s.fileno() not in mine]
        return fds + list(self.private_fds)

    def handle_chld(self):
        self.reap_workers()

    def reap_workers(self):
        from mailproxy.worker import WORKER_BOOT_ERROR

        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            record = self.workers.pop(pid, None)
            if record is None:
                if pid == self.new_binary:
                    self._new_binary_exited(pid, status)
                continue
            boot_error = os.WIFEXITED(status) and os.WEXITSTATUS(status) == WORKER_BOOT_ERROR
            self.observer.worker_reaped(pid, not record.retiring and self.state == "running" and not boot_error)
            if os.WIFSIGNALED(status):
                self.log.log("alert", "worker process %d exited on signal %d%s" % (
                    pid, os.WTERMSIG(status), " (core dumped)" if os.WCOREDUMP(status) else ""))
            elif os.WEXITSTATUS(status) == WORKER_BOOT_ERROR:
                self.log.log("alert", "worker process %d exited with fatal code %d and cannot be "
                                      "respawned" % (pid, WORKER_BOOT_ERROR))
                self.fatal = True
                self.handle_term()
                continue
            else:
                self.log.log("notice", "worker process %d exited with code %d" % (
                    pid, os.WEXITSTATUS(status)))
            if not record.retiring and self.state == "running":
                self._schedule_respawn(record)

    def _schedule_respawn(self, record):
        """The first death is answered at once; workers that keep dying are spaced out."""
        if time.monotonic() - record.started < QUICK_DEATH:
            self.failures += 1
        else:
            self.failures = 0
        delay = 0.0 if self.failures <= 1 else min(0.1 * 2 ** (self.failures - 2), RESPAWN_MAX_DELAY)
        self.respawn_at = time.monotonic() + delay

    def kill_workers(self, signum, only=None):
        for record in list(only if only is not None else self.workers.values()):
            try:
                os.kill(record.pid, signum)
            except ProcessLookupError:
                continue  # exited already; its SIGCHLD is on the way

    # -- signals -----------------------------------------------------------------------------

    def handle_hup(self):
        if self.state != "running":
            return
        if self.new_binary:
            # nginx: with a new master running, HUP brings this one's workers back (the roll-back of an
            # upgrade), with the configuration they had.
            self.noaccepting = False
            self.spawn_workers()
            return
        self.log.log("notice", "reconfiguring")
        notify("RELOADING=1")
        try:
            self.reload()
        finally:
            notify("READY=1")

    def reload(self):
        """Parse first, bind second: any failure leaves the running configuration untouched."""
        from mailproxy.conf import ConfigError

        began = time.monotonic()
        try:
            config = self.load()
            errorlog.open_files(log_paths(config))
            bindings = self.listeners.prepare(listen_mod.plan(config.servers))
            self.observer.prepare(config)
        except (ConfigError, errorlog.LogOpenError, listen_mod.ListenError) as exc:
            self.log.log("emerg", str(exc))
            self.observer.config_loaded(False, time.monotonic() - began)
            return
        except Exception as exc:
            # A bug in the loader must not take down a master that is serving fine.
            self.log.log("alert", "reload failed: %s: %s" % (type(exc).__name__, exc))
            self.observer.config_loaded(False, time.monotonic() - began)
            return
        old_workers = list(self.workers.values())
        for record in old_workers:
            record.retiring = True
        old_pid = self.config.main.pid
        self.config, self.bindings = config, bindings
        self.generation += 1
        self.log = errorlog.ErrorLog(config.main.error_log)
        self.log.log("notice", 'using the "%s" event method' % errorlog.event_method())
        self.failures, self.respawn_at = 0, 0.0
        self.noaccepting = False  # a reload after WINCH starts workers again, as nginx's
        throttle.prepare(config)
        self.spawn_workers()
        self.kill_workers(signal.SIGQUIT, old_workers)
        self.listeners.commit(bindings)
        self.observer.commit(config)
        self.observer.config_loaded(True, time.monotonic() - began)
        errorlog.retain_only(log_paths(config))
        if config.main.pid != old_pid:
            write_pid_file(config.main.pid)
            self._remove_pid_file(old_pid)

    def handle_quit(self):
        if self.state == "stopping":
            return
        self.state = "quitting"
        notify("STOPPING=1")
        self.log.log("notice", "gracefully shutting down")
        self.kill_workers(signal.SIGQUIT)
        self.listeners.close_all(unlink=self._owns_unix_sockets())

    def handle_term(self):
        if self.state == "stopping":
            return
        self.state = "stopping"
        notify("STOPPING=1")
        self.kill_workers(signal.SIGTERM)
        now = time.monotonic()
        elapsed = 0.0
        self.term_deadlines = []
        for wait in TERM_WAITS:
            elapsed += wait
            self.term_deadlines.append(now + elapsed)

    def handle_usr1(self):
        self.log.log("notice", "reopening logs")
        for failure in errorlog.reopen_all():
            self.log.log("alert", failure)
        user = self.config.main.user
        if user is not None and os.geteuid() == 0:
            import pwd

            try:
                entry = pwd.getpwnam(user[0])
            except KeyError:
                self.log.log("alert", 'getpwnam("%s") failed' % user[0])
            else:
                errorlog.chown_all(entry.pw_uid, -1)
        self.kill_workers(signal.SIGUSR1)

    def handle_ignored(self):
        """A USR2 during an upgrade, or a WINCH in the foreground."""

    # -- upgrade on the fly (nginx's USR2 and WINCH) -----------------------------------------------

    def handle_usr2(self):
        """Start the installed program as a new master on these listen sockets; both then serve.

        The pid file becomes `<pid>.oldbin`; the new master writes its own. QUIT to this master ends
        the upgrade; QUIT to the new one (after HUP here, if WINCH let the workers go) rolls it back.
        """
        self.log.log("notice", "changing binary")
        pid_path = self.config.main.pid
        try:
            os.rename(pid_path, pid_path + OLDBIN)
        except OSError as exc:
            self.log.log("alert", 'rename() "%s" to "%s" failed %s, binary is not changed'
                         % (pid_path, pid_path + OLDBIN, errorlog.os_error_text(exc)))
            return
        self.observer.follow_pid_file(pid_path + OLDBIN)
        fds = [sock.fileno() for sock in self.listeners.all_sockets()]
        env = dict(os.environ)
        env[INHERIT_ENV] = "".join("%d;" % fd for fd in fds)
        argv = new_binary_argv()
        pid = os.fork()
        if pid == 0:
            try:
                # The blocked-signal mask survives execve: the program starts with nothing blocked.
                signal.pthread_sigmask(signal.SIG_SETMASK, ())
                for fd in fds:
                    os.set_inheritable(fd, True)
                os.execve(argv[0], argv, env)
            except BaseException as exc:
                self.log.log("alert", 'execve() failed while executing new binary process "%s" %s'
                             % (argv[0], errorlog.os_error_text(exc) if isinstance(exc, OSError) else exc))
            finally:
                os._exit(1)
        self.new_binary = pid
        self.log.log("notice", "start new binary process %d" % pid)

    def _new_binary_exited(self, pid, status):
        if os.WIFSIGNALED(status):
            self.log.log("alert", "new binary process %d exited on signal %d" % (pid, os.WTERMSIG(status)))
        else:
            self.log.log("notice", "new binary process %d exited with code %d" % (pid, os.WEXITSTATUS(status)))
        pid_path = self.config.main.pid
        try:
            os.rename(pid_path + OLDBIN, pid_path)
        except OSError as exc:
            self.log.log("alert", 'rename() "%s" back to "%s" failed %s'
                         % (pid_path + OLDBIN, pid_path, errorlog.os_error_text(exc)))
        else:
            self.observer.follow_pid_file(pid_path)
        self.new_binary = 0
        if self.noaccepting and self.state == "running":
            # The upgrade failed or was rolled back while this master's workers were gone: serve again.
            self.noaccepting = False
            self.spawn_workers()

    def handle_winch(self):
        """The old master of an upgrade lets its workers finish their sessions and replaces none."""
        if self.state != "running":
            return
        self.noaccepting = True
        current = self._current()
        for record in current:
            record.retiring = True
        self.kill_workers(signal.SIGQUIT, current)

    # -- pid file ----------------------------------------------------------------------------

    def _remove_pid_file(self, path):
        try:
            with open(path) as handle:
                if handle.read().strip() != str(os.getpid()):
                    return
            os.unlink(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            self.log.log("alert", 'unlink() "%s" failed %s' % (path, errorlog.os_error_text(exc)))


def log_paths(config):
    """Every log file the configuration names, at any level, session logs included."""
    paths = []
    for targets in [config.main.error_log] + [server.error_log for server in config.servers]:
        paths.extend(target for target, _ in targets if target != errorlog.STDERR)
    return paths + session_log.paths(config)


def write_pid_file(path):
    """`<pid>\\n`, replaced whole so that a reader never sees a half-written number."""
    tmp = "%s.%d.tmp" % (path, os.getpid())
    try:
        with open(tmp, "w") as handle:
            handle.write("%d\n" % os.getpid())
        os.replace(tmp, path)
    except OSError as exc:
        raise errorlog.LogOpenError('open() "%s" failed %s' % (path, errorlog.os_error_text(exc)))


def command_line():
    return " ".join(sys.argv)


def new_binary_argv():
    """The command this master was started with, run afresh: whatever mailproxy is installed now.
    `python -m <module> ...` is replayed as it was typed (interpreter options and all), a program
    (mailproxy-master) by its own path."""
    # What came before the program's own arguments: the interpreter's options and `-m module` (and
    # whatever a launcher module took off sys.argv for itself).
    launcher = sys.orig_argv[1:len(sys.orig_argv) - len(sys.argv) + 1]
    if "-m" in launcher:
        return [sys.executable] + sys.orig_argv[1:]
    return [os.path.abspath(sys.argv[0])] + sys.argv[1:]


def inherited_sockets():
    """The listen sockets an old master passed on USR2, keyed as listeners.socket_key does; {} when
    this master was started by hand."""
    import ipaddress

    text = os.environ.pop(INHERIT_ENV, "")
    found = {}
    for part in text.split(";"):
        if not part.isdigit():
            continue
        fd = int(part)
        try:
            sock = socket.socket(fileno=fd)
            name = sock.getsockname()
        except OSError:
            continue  # not a socket any more: nginx skips it as well
        sock.setblocking(False)
        sock.set_inheritable(True)
        if sock.family == socket.AF_UNIX:
            key = (socket.AF_UNIX, name)
        else:
            ipv6only = None
            if sock.family == socket.AF_INET6:
                ipv6only = bool(sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
            key = (sock.family, ipaddress.ip_address(name[0].split("%", 1)[0]), name[1], ipv6only)
        found[key] = sock
    return found
