"""A worker process: post-fork setup, accept loops, worker_connections, graceful drain.

The CLI and the master import it too, but nothing here imports gevent at module level: the child patches
with gevent first thing after fork (see `boot`), before anything in the worker touches sockets, and the
master stays a plain single-threaded process.

Session API (what mailproxy.session sees as `worker`):
  worker.log_for(server) -> ErrorLog          the server's error_log (shared open files)
  worker.runtime_for(server) -> ServerRuntime what the server's sessions share (login_gate.py)
  worker.next_connection_number() -> int      nginx's *N, one counter for all workers
  worker.draining -> bool                     True once QUIT arrived: finish, accept nothing new
  worker.draining_past_timeout() -> bool      worker_shutdown_timeout has fired
  worker.session_started(closer) -> token     from the handler (its greenlet, or the loop for an
                                              `on_loop` handler); `closer()` is called when
                                              worker_shutdown_timeout fires (the session decides what
                                              closing means in its phase, spec 7)
  worker.session_finished(token)              the session is over (idempotent); may come from a
                                              relay long after the handler returned
A connection takes a worker_connections slot at accept. The slot passes to the token when the
handler calls session_started and is freed by session_finished; a handler that never calls
session_started frees it when its greenlet ends, and one that crashes finishes its tokens.
"""

import errno
import fcntl
import gc
import importlib
import os
import posix
import resource
import signal
import time
import traceback

from mailproxy import log as errorlog
from mailproxy import session_log, status
from mailproxy.events import Socket
from mailproxy.listeners import is_transient_accept_error

# The session the workers run. Only the tests run another (tests/session_handler_master.py sets this
# before the command line runs).
DEFAULT_HANDLER = "mailproxy.session:handle"

# Exit status of a worker that could not start; the master stops instead of respawning in a loop.
WORKER_BOOT_ERROR = 3

# Connections one readiness event accepts with multi_accept off (see Worker.__init__).
ACCEPT_BATCH = 64
EMFILE_FIRST_DELAY = 0.01
EMFILE_MAX_DELAY = 1.0

WORKER_TITLE = "mailproxy: worker process"
DRAINING_TITLE = "mailproxy: worker process is shutting down"


# Variables mailproxy's master sets for its own workers, kept whatever `env` says (nginx keeps NGINX for
# its binary upgrade the same way): the metrics directory of mailproxy.metrics.
OWN_ENV = ("PROMETHEUS_MULTIPROC_DIR",)


class WorkerBootError(Exception):
    """Setup failed in the child; str() is the message logged at `level`."""

    def __init__(self, message, level="emerg"):
        super().__init__(message)
        self.level = level


def resolve_handler(spec=None):
    """`module:function`; the default is the real session, a missing one is a boot failure."""
    spec = spec or DEFAULT_HANDLER
    module_name, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr or "handle")
    except (ImportError, AttributeError) as exc:
        raise WorkerBootError("cannot load the session handler %s: %s" % (spec, exc)) from None


class Worker:
    def __init__(self, config, bindings, counter, log, handler, accept_lock=None):
        import gevent.socket

        self._gsocket = gevent.socket.socket
        self.config = config
        self.bindings = bindings
        self.counter = counter
        self._counter_lock = counter.get_lock()
        self._counter_cell = counter.get_obj()
        self.log = log
        self.handler = handler
        # The session's own handler runs on the loop, from the accept callback; a handler without the
        # mark (the tests' stand-ins) gets a greenlet and a gevent socket.
        self.handler_on_loop = bool(getattr(handler, "on_loop", False))
        self._runtimes = {}
        self.max_sessions = config.main.worker_connections
        # nginx's multi_accept: `on` accepts until EAGAIN. `off` (the default) is nginx's one connection per
        # readiness event only in spirit: a turn of this event loop costs Python, and one accept per turn
        # cost a quarter of the logins per second at c=50 (IMAP 2,082 -> 1,424/s, bench --quick), so `off`
        # takes a bounded batch, leaving the rest of the queue to the other workers' turns.
        self.accept_batch = None if config.main.multi_accept else ACCEPT_BATCH
        # nginx's accept_mutex: a lock shared by the workers (a POSIX record lock on a file the master
        # opened: the kernel drops it when its holder dies); only the holder watches the listen sockets.
        self.accept_lock = accept_lock
        self._lock_held = False
        self._lock_turn = None
        self._lock_timer = None
        self._watching = False
        self.draining = False
        self.active = 0  # connections holding a worker_connections slot
        self.sessions = {}  # token -> (server, closer)
        self._unclaimed = {}  # handler greenlet -> [server, tokens it started]
        self._next_token = 0
        self._shutdown_fired = False
        self._logs = {}
        self._watchers = []
        self._accepting = False
        self._emfile_delay = EMFILE_FIRST_DELAY
        self._emfile_timer = None
        self._fd_pause = False
        self._full_logged = False
        self._done = None

    # -- what sessions call --------------------------------------------------------------------

    def log_for(self, server):
        targets = server.error_log or self.config.main.error_log
        found = self._logs.get(targets)
        if found is None:
            found = self._logs[targets] = errorlog.ErrorLog(targets)
        return found

    def runtime_for(self, server):
        """The server block's shared session parts (login_gate.ServerRuntime), built on first use: a worker
        serves one configuration generation, whose server blocks live as long as it does."""
        found = self._runtimes.get(id(server))
        if found is None:
            import gevent

            from mailproxy.login_gate import ServerRuntime

            found = self._runtimes[id(server)] = ServerRuntime(server, gevent.get_hub().loop)
        return found

    def next_connection_number(self):
        # The shared value's lock and ctypes cell, used directly: the Synchronized wrapper's context
        # manager and value property are four Python calls a connection.
        lock, cell = self._counter_lock, self._counter_cell
        lock.acquire()
        try:
            cell.value += 1
            return cell.value
        finally:
            lock.release()

    def session_started(self, closer):
        import gevent

        self._next_token += 1
        token = self._next_token
        entry = self._unclaimed.get(gevent.getcurrent())
        if entry is not None and not entry[1]:
            entry[1].append(token)  # the accept's slot now belongs to this token
        else:
            self.active += 1
            if entry is not None:
                entry[1].append(token)
        self.sessions[token] = (entry[0] if entry else None, closer)
        status.publish(len(self.sessions))
        return token

    def session_finished(self, token):
        if self.sessions.pop(token, None) is not None:
            status.publish(len(self.sessions))
            self.active -= 1
            self._slot_freed()

    def draining_past_timeout(self):
        return self._shutdown_fired

    # -- accepting -------------------------------------------------------------------------------

    def run(self):
        import gevent
        from gevent.event import Event

        self._done = Event()
        loop = gevent.get_hub().loop
        for binding in self.bindings:
            watcher = loop.io(binding.sock.fileno(), 1)
            self._watchers.append((watcher, binding))
        gevent.signal_handler(signal.SIGQUIT, self.handle_quit)
        gevent.signal_handler(signal.SIGTERM, self.handle_term)
        gevent.signal_handler(signal.SIGINT, self.handle_term)
        gevent.signal_handler(signal.SIGUSR1, self.handle_usr1)
        if self.accept_lock is not None:
            # Before each wait for events the worker tries for the mutex (nginx: once per event-loop
            # turn); the timer wakes a worker without it every accept_mutex_delay to try again.
            self._lock_turn = loop.prepare()
            self._lock_turn.start(self._accept_mutex_turn)
            delay = self.config.main.accept_mutex_delay or 0.001
            self._lock_timer = loop.timer(delay, delay, ref=False)
            self._lock_timer.start(lambda: None)
        # Only now may queued signals arrive: every handler above is in place.
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        self._start_accepting()
        self._done.wait()
        session_log.flush_all()
        self.log.log("notice", "exiting")

    def _start_accepting(self):
        if self._accepting or self.draining:
            return
        self._accepting = True
        self._full_logged = False
        if self.accept_lock is None:
            self._watch(True)

    def _stop_accepting(self):
        self._accepting = False
        self._watch(False)
        self._release_accept_mutex()

    def _watch(self, on):
        if on == self._watching:
            return
        self._watching = on
        for watcher, binding in self._watchers:
            if on:
                watcher.start(self._on_readable, binding)
            else:
                watcher.stop()

    def _accept_mutex_turn(self):
        if not self._accepting or self._lock_held:
            return
        # nginx's ngx_accept_disabled: a worker with under 1/8 of its connections free leaves the
        # new ones to the others.
        if self.max_sessions - self.active < self.max_sessions // 8:
            self._watch(False)
            return
        try:
            fcntl.lockf(self.accept_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._watch(False)
            return
        self._lock_held = True
        self._watch(True)

    def _release_accept_mutex(self):
        if self._lock_held:
            self._lock_held = False
            fcntl.lockf(self.accept_lock, fcntl.LOCK_UN)

    def _on_readable(self, binding):
        # The holder lets the mutex go once it took what was ready; the next turn decides again.
        try:
            self._accept_ready(binding)
        finally:
            self._release_accept_mutex()

    def _accept_ready(self, binding):
        accepted = 0
        while self.accept_batch is None or accepted < self.accept_batch:
            if self.active >= self.max_sessions:
                if not self._full_logged:
                    self.log.log("alert", "%d worker_connections are not enough" % self.max_sessions)
                    self._full_logged = True
                self._stop_accepting()
                return
            try:
                fd, peer = binding.sock._accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._back_off(exc)
                    return
                if is_transient_accept_error(exc):
                    continue
                self.log.log("alert", "accept4() failed %s" % errorlog.os_error_text(exc))
                return
            self._emfile_delay = EMFILE_FIRST_DELAY
            accepted += 1
            self._spawn(binding, fd, peer)

    def _back_off(self, exc):
        """Out of descriptors: wait before trying again; each failed try doubles the wait."""
        import gevent

        self.log.log("crit", "accept4() failed %s" % errorlog.os_error_text(exc))
        self._stop_accepting()
        delay = self._emfile_delay
        self._emfile_delay = min(delay * 2, EMFILE_MAX_DELAY)
        self._fd_pause = True
        self._emfile_timer = gevent.get_hub().loop.timer(delay)
        self._emfile_timer.start(self._retry_accept)

    def _retry_accept(self):
        self._fd_pause = False
        self._start_accepting()

    def _spawn(self, binding, fd, peer):
        import _socket

        import gevent

        on_loop = self.handler_on_loop
        if on_loop:
            # Family, type and protocol given: from a descriptor alone the socket module would ask the
            # kernel for each (and the listener's own .family converts to an enum on every read).
            sock = Socket(binding.listen.family, _socket.SOCK_STREAM, 0, fd)
            sock.setblocking(False)
        else:
            sock = self._gsocket(binding.sock.family, binding.sock.type, 0, fileno=fd)
        if binding.routes:
            # Only a wildcard socket shared with address-specific servers needs the local address
            # (a getsockname(2) per connection), as nginx looks it up only for wildcard listens.
            try:
                listen, server = binding.route(sock.getsockname())
            except OSError:
                sock.close()  # reset before we looked at it
                return
        else:
            listen, server = binding.listen, binding.server
        if on_loop:
            # The session takes its slot with session_started, as its last step of setting up; a handler
            # that failed before that leaves the socket to us.
            tokens = self._next_token
            try:
                self.handler(sock, peer, listen, server, self)
            except Exception as exc:
                self._log_crash(server, exc)
                if self._next_token == tokens:
                    sock.close()
            return
        greenlet = gevent.Greenlet(self._serve, sock, peer, listen, server)
        self._unclaimed[greenlet] = [server, []]
        self.active += 1
        greenlet.start()

    def _serve(self, sock, peer, listen, server):
        import gevent

        crashed = False
        try:
            self.handler(sock, peer, listen, server, self)
        except gevent.GreenletExit:
            crashed = True
            raise
        except Exception as exc:
            # A bug in one session must not take the others down: log it and drop this client.
            crashed = True
            self._log_crash(server, exc)
        finally:
            _, tokens = self._unclaimed.pop(gevent.getcurrent())
            if crashed or not tokens:
                sock.close()  # nobody else owns it: no session took it over, or it crashed
            if crashed:
                for token in tokens:
                    self.session_finished(token)
            if not tokens:
                self.active -= 1
                self._slot_freed()

    def _log_crash(self, server, exc):
        detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
        log = self.log_for(server)
        log.log("alert", "session failed: %s" % detail)
        for line in errorlog.traceback_lines(exc):
            log.log("alert", line)

    def _slot_freed(self):
        if self.draining:
            self._maybe_exit()
        elif not self._accepting and not self._fd_pause:
            self._start_accepting()

    # -- signals -----------------------------------------------------------------------------------

    def handle_quit(self):
        if self.draining:
            return
        import gevent
        from setproctitle import setproctitle

        self.draining = True
        self.log.log("notice", "gracefully shutting down")
        setproctitle(DRAINING_TITLE)
        self._stop_accepting()
        if self._emfile_timer is not None:
            self._emfile_timer.stop()
        for binding in self.bindings:
            binding.sock.close()
        timeout = self.config.main.worker_shutdown_timeout
        if timeout is not None and self.active:
            gevent.spawn_later(timeout, self._shutdown_timeout)
        self._maybe_exit()

    def _shutdown_timeout(self):
        """worker_shutdown_timeout: each session decides how to end in its phase (spec 7)."""
        self._shutdown_fired = True
        for server, closer in list(self.sessions.values()):
            try:
                closer()
            except Exception as exc:
                # One faulty closer must not keep the others open.
                log = self.log_for(server) if server is not None else self.log
                log.log("alert", "session closer failed: %s: %s" % (type(exc).__name__, exc))

    def _maybe_exit(self):
        if not self.active:
            self._done.set()

    def handle_term(self):
        session_log.flush_all()
        self.log.log("notice", "exiting")
        os._exit(0)

    def handle_usr1(self):
        self.log.log("notice", "reopening logs")
        session_log.flush_all()  # the buffered lines belong to the file being rotated away
        for failure in errorlog.reopen_all():
            self.log.log("alert", failure)


def _drop_privileges(user):
    import grp
    import pwd

    name, group = user
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise WorkerBootError('getpwnam("%s") failed' % name) from None
    gid = entry.pw_gid
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise WorkerBootError('getgrnam("%s") failed' % group) from None
    try:
        os.setgid(gid)
        os.initgroups(name, gid)
        os.setuid(entry.pw_uid)
    except OSError as exc:
        raise WorkerBootError("setuid(%d) failed %s" % (entry.pw_uid, errorlog.os_error_text(exc)))


def _set_rlimit(log, which, name, limit):
    """nginx sets both limits and, when that is refused, says so and serves with what it has."""
    try:
        resource.setrlimit(which, (limit, limit))
    except ValueError:
        # Python's resource module reports setrlimit(2)'s EPERM (raising the hard limit without the
        # privilege) and EINVAL as ValueError; which one it was follows from the hard limit.
        code = errno.EPERM if limit > resource.getrlimit(which)[1] else errno.EINVAL
        log.log("alert", "setrlimit(%s, %d) failed %s" % (name, limit, errorlog.errno_text(code)))
    except OSError as exc:
        log.log("alert", "setrlimit(%s, %d) failed %s" % (name, limit, errorlog.os_error_text(exc)))


def cpus_for_worker(affinity, slot):
    """nginx's ngx_get_cpu_affinity: the CPUs of worker number `slot`, or None for no affinity."""
    if affinity is None:
        return None
    auto, masks = affinity
    if auto:
        cpus = masks[-1]
        # `auto` gives each worker one CPU of the mask, in turn.
        return (cpus[slot % len(cpus)],) if cpus else None
    return masks[slot] if slot < len(masks) else masks[-1]


def worker_environment(entries, original):
    """nginx's ngx_set_environment: the variables `env` names, with the master's value or the one given;
    TZ unless `env` names it; nothing else."""
    entries = list(entries)
    if not any(name == "TZ" for name, _ in entries):
        entries.append(("TZ", None))
    env = {}
    for name, value in entries:
        if value is not None:
            env.setdefault(name, value)
        elif name in original:
            env.setdefault(name, original[name])
    for name in OWN_ENV:
        if name in original:
            env.setdefault(name, original[name])
    return env


def _set_environment(entries):
    env = worker_environment(entries, dict(os.environ))
    os.environ.clear()
    os.environ.update(env)
    time.tzset()


def _set_affinity(log, cpus):
    for cpu in cpus:
        log.log("notice", "sched_setaffinity(): using cpu #%d" % cpu)
    try:
        os.sched_setaffinity(0, cpus)
    except (OSError, ValueError) as exc:
        code = exc.errno if isinstance(exc, OSError) else errno.EINVAL
        log.log("alert", "sched_setaffinity() failed %s" % errorlog.errno_text(code))


def _report_boot(fd, failure=None):
    """Tell the master at start-up whether this worker serves (`+`) or why it cannot (`-reason`)."""
    if fd is None:
        return
    record = b"+\n" if failure is None else b"-" + failure.encode("utf-8", "replace")[:1000] + b"\n"
    try:
        os.write(fd, record)
        # Not os.close: gevent's defers the close to a later turn of the event loop, and the master
        # waits for the end of the pipe.
        posix.close(fd)
    except OSError:
        pass  # the master stopped waiting (it died): this worker's exit will tell the rest


def _preload(hub):
    """Load while still root what sessions would otherwise import on first use.

    After `user` takes effect the worker may not be able to read the Python installation (a
    virtualenv under /root, say), and a lazy import would then fail in the middle of a login.
    """
    import encodings.idna  # noqa: F401  (gevent encodes host names with it)
    import ssl  # noqa: F401

    hub.resolver  # the resolver and its thread pool are imported on first use
    hub.threadpool


def boot(config, bindings, foreign_fds, counter, handler=None, single=False, slot=0, accept_lock=None,
         booted=None):
    """Run in the child right after fork (or in place with `master_process off`, `single`);
    returns the exit status.

    `slot` is the worker's number (0 .. worker_processes - 1, for worker_cpu_affinity); `booted`, at
    start-up, a pipe on which the worker tells the master how its start went.

    The order is nginx's (ngx_worker_process_init): environment, priority and limits while still
    root, then the user, then the CPU and the working directory. A single process keeps its user, as
    nginx's does: it must still remove its pid file and sockets.
    """
    log = errorlog.ErrorLog(config.main.error_log)
    main = config.main
    try:
        for fd in foreign_fds:
            os.close(fd)
        for signum in (signal.SIGHUP, signal.SIGUSR2, signal.SIGWINCH):
            signal.signal(signum, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)

        from gevent import monkey

        monkey.patch_all()
        import gevent
        from setproctitle import getproctitle, setproctitle

        gevent.reinit()
        # The hub loads its event loop module lazily: load it, and the session code, while still
        # root, since `user` may not be able to read the Python installation. Both read their
        # settings from the environment, so they come before `env` replaces it.
        _preload(gevent.get_hub())
        handler = handler if callable(handler) else resolve_handler(handler)
        # setproctitle finds the memory it may write the title over through the environment, once,
        # on first use: in a single process that must happen before `env` replaces the environment.
        getproctitle()
        _set_environment(main.env)
        use_mutex = main.accept_mutex and main.worker_processes > 1 and not single
        worker = Worker(config, bindings, counter, log, handler, accept_lock if use_mutex else None)
        if main.worker_priority and not single:
            try:
                os.setpriority(os.PRIO_PROCESS, 0, main.worker_priority)
            except OSError as exc:
                text = errorlog.os_error_text(exc)
                log.log("alert", "setpriority(%d) failed %s" % (main.worker_priority, text))
        if main.worker_rlimit_nofile is not None:
            _set_rlimit(log, resource.RLIMIT_NOFILE, "RLIMIT_NOFILE", main.worker_rlimit_nofile)
        if main.worker_rlimit_core is not None:
            _set_rlimit(log, resource.RLIMIT_CORE, "RLIMIT_CORE", main.worker_rlimit_core)
        if main.user is not None and os.geteuid() == 0 and not single:
            _drop_privileges(main.user)
        cpus = None if single else cpus_for_worker(main.worker_cpu_affinity, slot)
        if cpus is not None:
            _set_affinity(log, cpus)
        if main.working_directory and not single:
            try:
                os.chdir(main.working_directory)
            except OSError as exc:
                raise WorkerBootError('chdir("%s") failed %s' % (
                    main.working_directory, errorlog.os_error_text(exc)), "alert") from None
        # Set last, so the title also tells that the worker finished booting.
        setproctitle(WORKER_TITLE)
    except WorkerBootError as exc:
        log.log(exc.level, str(exc))
        _report_boot(booted, str(exc))
        return WORKER_BOOT_ERROR
    except Exception as exc:
        # Anything else before serving is as fatal: respawning would fail the same way.
        text = "worker process failed to start: %s: %s" % (type(exc).__name__, exc)
        log.log("emerg", text)
        _report_boot(booted, text)
        return WORKER_BOOT_ERROR
    _report_boot(booted)
    # What boot loaded (modules, the configuration, contexts) lives as long as the worker: out of the
    # collector's way, its full collections walk only what sessions allocate.
    gc.freeze()
    worker.run()
    return 0
