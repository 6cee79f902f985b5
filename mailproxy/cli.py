"""mailproxy-master: start the proxy, or signal the running master, as nginx's command line does.

Every failure is one line on stderr (`mailproxy: [emerg] ...`) and a non-zero exit status.
"""

import importlib.util
import os
import select
import signal
import ssl
import sys

import mailproxy
from mailproxy import listeners as listen_mod
from mailproxy import log as errorlog
from mailproxy.master import SIGNALS, Master, command_line, inherited_sockets, log_paths, write_pid_file

COMMANDS = ("start", "status") + tuple(SIGNALS)
VALUE_OPTIONS = {"-c": "conf", "-p": "prefix", "-g": "directives", "-s": "signal", "-w": "wait"}
FLAG_OPTIONS = {"-t": "test", "-T": "dump", "-v": "version", "-V": "build", "-q": "quiet",
                "-h": "help", "-?": "help"}
LONG_OPTIONS = {"--help": ("help", True), "--wait": ("wait", None)}
USAGE = """\
Usage: mailproxy-master [-?hvVtTq] [-s signal] [-p prefix] [-c filename] [-g directives] [-w seconds]
                        [--wait] [start|stop|quit|reload|reopen|status]

Commands (the default is start):
  start             start the master and its workers; with `daemon on` (the default) return once
                    the workers serve, non-zero with the reason if they cannot
  stop              fast shutdown (SIGTERM to the master named by the pid file)
  quit              graceful shutdown (SIGQUIT): sessions finish, nothing new is accepted
  reload            re-read the configuration (SIGHUP); new workers start, old ones drain
  reopen            reopen the log files (SIGUSR1), after a rotation
  status            say whether the master runs, with its workers and their sessions
                    (exit status 3 when it does not run)

Options:
  -?,-h, --help     this help
  -v                show the version and exit
  -V                show the version and how mailproxy was built, and exit
  -t                test the configuration (and open its log and pid files) and exit
  -T                test the configuration, dump it to stdout and exit
  -q                suppress non-error messages during the configuration test
  -s signal         send a signal to the master: stop, quit, reopen, reload (as the commands)
  -p prefix         set the prefix path (default: the parent of the configuration's directory)
  -c filename       set the configuration file (default: /etc/mailproxy/mailproxy.conf)
  -g directives     set global directives out of the configuration file
  --wait            after stop or quit, return only once the master has exited
  -w seconds        as --wait, but fail when the master still runs after that many seconds

stop and quit return as soon as the master has the signal, as nginx -s does. To upgrade on the fly,
send USR2 to the master, then WINCH and QUIT to the old one (pid file .oldbin): mailproxy-master(8).
"""


class CliError(Exception):
    """One line for stderr, after `mailproxy: [emerg] `."""


def parse_args(argv):
    opts = {"command": None}
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in COMMANDS and opts["command"] is None:
            opts["command"] = arg
            continue
        if arg in LONG_OPTIONS:
            key, value = LONG_OPTIONS[arg]
            opts[key] = value
            continue
        if len(arg) < 2 or arg[0] != "-":
            raise CliError('invalid option: "%s"' % arg)
        flag, rest = arg[:2], arg[2:]
        if flag in FLAG_OPTIONS and not rest:
            opts[FLAG_OPTIONS[flag]] = True
        elif flag in VALUE_OPTIONS:
            if not rest:
                if not args:
                    raise CliError('option "%s" requires %s' % (flag, VALUE_OPTIONS[flag]))
                rest = args.pop(0)
            opts[VALUE_OPTIONS[flag]] = rest
        else:
            raise CliError('invalid option: "%s"' % arg)
    if "signal" in opts:
        if opts["signal"] not in SIGNALS:
            raise CliError('invalid option: "-s %s"' % opts["signal"])
        opts["command"] = opts["signal"]
    if opts.get("wait") is not None:
        try:
            opts["wait"] = float(opts["wait"])
        except ValueError:
            raise CliError('invalid wait time "%s"' % opts["wait"]) from None
    opts.setdefault("command", None)
    opts["command"] = opts["command"] or "start"
    return opts


def conf_location(opts):
    from mailproxy.conf.settings import DEFAULT_CONF_PATH, default_prefix

    path = os.path.abspath(opts.get("conf") or DEFAULT_CONF_PATH)
    prefix = opts.get("prefix")
    prefix = os.path.join(os.path.abspath(prefix), "") if prefix else default_prefix(path)
    return path, prefix, opts.get("directives")


def load(opts, warn=False):
    from mailproxy.conf import ConfigError, load_config

    path, prefix, directives = conf_location(opts)
    try:
        config = load_config(path, prefix, directives)
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    if warn:
        for warning in getattr(config, "warnings", ()):
            sys.stderr.write("mailproxy: %s\n" % warning)
    return config


def with_tls(config):
    """TLS contexts are made in the master before fork, so workers share session ticket keys; raises
    ConfigError for a bad certificate, which a reload logs and survives."""
    from mailproxy.tls import client as client_tls

    client_tls.prepare(config)
    return config


def prepare_tls(config):
    from mailproxy.conf import ConfigError

    try:
        return with_tls(config)
    except ConfigError as exc:
        raise CliError(str(exc)) from None


def version_lines(build):
    lines = ["mailproxy version: mailproxy/%s" % mailproxy.__version__]
    if build:
        import gevent

        splice = importlib.util.find_spec("mailproxy._splice") is not None
        lines += [
            "built with Python %s, gevent %s" % (sys.version.split()[0], gevent.__version__),
            "built with %s" % ssl.OPENSSL_VERSION,
            "splice relay (mailproxy._splice): %s" % ("compiled in" if splice else "not built"),
        ]
        lines += _bridge_lines()
    return lines


def _bridge_lines():
    """Which libssl the OpenSSL bridge is linked with, and whether it is used (mailproxy/tls/openssl.py)."""
    from mailproxy.tls import openssl

    try:
        from mailproxy import _openssl
    except ImportError:
        return ["OpenSSL bridge (mailproxy._openssl): off: %s" % openssl.bridge_off_reason]
    version, path = _openssl.library()
    state = "active" if openssl.bridge is not None else "off: %s" % openssl.bridge_off_reason
    from mailproxy.relay import TLS_PUMP_AVAILABLE

    if TLS_PUMP_AVAILABLE:
        pump = "pump"
    else:
        pump = "copy loop (%s)" % ("the bridge is off" if openssl.bridge is None else "MAILPROXY_TLS_PUMP=off")
    return ["OpenSSL bridge (mailproxy._openssl): linked with %s (%s), %s" % (path or "libssl", version, state),
            "TLS relay: %s" % pump]


# -- pid file ------------------------------------------------------------------------------------


def read_pid(path):
    try:
        with open(path) as handle:
            text = handle.read()
    except OSError as exc:
        raise CliError('open() "%s" failed %s' % (path, errorlog.os_error_text(exc))) from None
    number = text.strip()
    if not number.isdigit() or int(number) <= 0:
        raise CliError('invalid PID number "%s" in "%s"' % (number, path))
    return int(number)


def running_master(path):
    """The pid of a live master named by the pid file, else None (a stale file is removed)."""
    try:
        pid = read_pid(path)
    except CliError:
        pid = None
    if pid is not None and pid != os.getpid() and _is_master(pid):
        return pid
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass  # nothing stale to clean
    return None


def _is_master(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as handle:
            cmdline = handle.read()
    except FileNotFoundError:
        return False
    except PermissionError:
        return True
    # A recycled pid belongs to some other program; only our title or our command counts.
    return b"mailproxy" in cmdline


def signal_master(opts, name):
    """Send the signal and return, as nginx -s does; `--wait` / `-w` then wait for the master's exit."""
    config = load(opts)
    pid = read_pid(config.main.pid)
    signum = SIGNALS[name]
    watch = None
    if name in ("stop", "quit") and "wait" in opts:
        try:
            # Opened before the signal so that the wait below cannot follow a recycled pid.
            watch = os.pidfd_open(pid)
        except ProcessLookupError:
            watch = None
    try:
        os.kill(pid, signum)
    except OSError as exc:
        raise CliError("kill(%d, %d) failed %s" % (pid, signum, errorlog.os_error_text(exc))) from None
    if watch is None:
        return 0
    try:
        timeout = opts["wait"]
        ready, _, _ = select.select([watch], [], [], timeout)
    finally:
        os.close(watch)
    if not ready:
        raise CliError("master process %d did not exit within %g seconds" % (pid, timeout))
    return 0


def status(opts):
    config = load(opts)
    pid = running_master(config.main.pid) if os.path.exists(config.main.pid) else None
    if pid is None:
        print("mailproxy: master process is not running")
        return 3
    from mailproxy import status as master_status

    path = master_status.socket_path(config.main.pid)
    try:
        info = master_status.ask(path)
    except (OSError, ValueError) as exc:
        # An older master, master_process off, or a socket removed by hand: the pid file still speaks.
        print("mailproxy: master process %d is running (no status from %s: %s)" % (pid, path, exc))
        return 0
    print(master_status.format_status(info))
    return 0


# -- start ---------------------------------------------------------------------------------------


def check_session_module():
    from mailproxy import worker

    module = worker.DEFAULT_HANDLER.partition(":")[0]
    try:
        found = importlib.util.find_spec(module)
    except ImportError:
        found = None
    if found is None:
        raise CliError('session handler module "%s" not found' % module)


def start(opts):
    config = load(opts, warn=True)
    prepare_tls(config)
    check_session_module()
    pid = running_master(config.main.pid)
    if pid is not None:
        raise CliError("a master process is already running with pid %d" % pid)
    try:
        errorlog.open_files(log_paths(config))
    except errorlog.LogOpenError as exc:
        raise CliError(str(exc)) from None
    inherited = inherited_sockets()
    if inherited:
        text = "".join("%d;" % sock.fileno() for sock in inherited.values())
        errorlog.ErrorLog(config.main.error_log).log("notice", 'using inherited sockets from "%s"' % text)
    try:
        listener_set = listen_mod.ListenerSet()
        # A new master of an upgrade serves on the old one's sockets: bind() would find them taken.
        listener_set.sockets.update(inherited)
        bindings = listener_set.prepare(listen_mod.plan(config.servers))
    except listen_mod.ListenError as exc:
        log_startup_error(config, str(exc))
        raise CliError(str(exc)) from None
    if inherited:
        listener_set.commit(bindings)  # the inherited sockets this configuration no longer listens on

    if not config.main.master_process:
        return run_single(config, listener_set, bindings)

    from mailproxy.conf import load_config

    path, prefix, directives = conf_location(opts)
    master = Master(config, listener_set, bindings, lambda: with_tls(load_config(path, prefix, directives)),
                    command_line(), inherited=bool(inherited), daemonized=config.main.daemon)
    # A new master of an upgrade stays the old one's child, as nginx's: the old one sees it exit.
    if config.main.daemon and not inherited:
        daemonize(master)
    try:
        write_pid_file(config.main.pid)
    except errorlog.LogOpenError as exc:
        log_startup_error(config, str(exc))
        master.fail_start(str(exc))
        raise CliError(str(exc)) from None
    redirect_stderr(config)
    return master.run()


def log_startup_error(config, message):
    """nginx writes a failed start to its error log as well as to the terminal (stderr has it already)."""
    targets = tuple((target, level) for target, level in config.main.error_log if target != errorlog.STDERR)
    try:
        errorlog.ErrorLog(targets).log("emerg", message)
    except (errorlog.LogOpenError, OSError):
        pass  # the terminal still has the message, and a log that cannot be written cannot say more


def probe_files(config):
    """What nginx -t opens: the pid file (created if missing, as nginx does; removed again here, so that
    a test leaves no empty pid file behind) and every log file."""
    from mailproxy.conf import ConfigError

    path = config.main.pid
    created = False
    try:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            created = True
        except FileExistsError:
            fd = os.open(path, os.O_RDWR)
    except OSError as exc:
        raise ConfigError('open() "%s" failed %s' % (path, errorlog.os_error_text(exc))) from None
    os.close(fd)
    if created:
        os.unlink(path)
    try:
        errorlog.open_files(log_paths(config))
    except errorlog.LogOpenError as exc:
        raise ConfigError(str(exc)) from None


def run_single(config, listener_set, bindings):
    """master_process off: one process accepts and serves; no reload (as nginx, for debugging)."""
    import ctypes
    import multiprocessing

    from mailproxy import worker

    if config.main.daemon:
        daemonize(None)
    try:
        write_pid_file(config.main.pid)
    except errorlog.LogOpenError as exc:
        raise CliError(str(exc)) from None
    try:
        counter = multiprocessing.Value(ctypes.c_uint64, 0)
        return worker.boot(config, bindings, [], counter, single=True)
    finally:
        listener_set.close_all()
        try:
            os.unlink(config.main.pid)
        except FileNotFoundError:
            pass  # removed by hand meanwhile


def daemonize(master):
    """Double fork and setsid. The command the user ran waits until the master says it is serving,
    so its exit status tells whether the start worked."""
    read_end, write_end = os.pipe()
    if os.fork():
        os.close(write_end)
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        # "1" when serving; "-" and the reason when the master gave up; nothing if it died.
        with os.fdopen(read_end, "rb") as pipe:
            answer = pipe.read()
        if answer.startswith(b"-"):
            errorlog.startup_error(answer[1:].decode("utf-8", "replace"))
        elif answer != b"1":
            errorlog.startup_error("master process failed to start, see the error log")
        os._exit(0 if answer == b"1" else 1)
    os.close(read_end)
    os.setsid()
    if os.fork():
        os._exit(0)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    if master is None:
        os.write(write_end, b"1")
        os.close(write_end)
        return

    def answer(data):
        if write_end in master.private_fds:
            master.private_fds.remove(write_end)
            os.write(write_end, data)
            os.close(write_end)

    master.private_fds.append(write_end)
    master.ready_hooks.append(lambda: answer(b"1"))
    master.failure_hooks.append(lambda reason: answer(b"-" + reason.encode("utf-8", "replace")))


def redirect_stderr(config):
    """Like nginx, send stray stderr output (a crash report) to the main error log file."""
    everywhere = [target for targets in [config.main.error_log] + [s.error_log for s in config.servers]
                  for target, _ in targets]
    errorlog.redirect_stderr(config.main.error_log, everywhere)


# -- entry point ---------------------------------------------------------------------------------


def run(argv):
    opts = parse_args(argv)
    if opts.get("help"):
        # nginx writes its help to stderr, after the version.
        sys.stderr.write(version_lines(False)[0] + "\n" + USAGE)
        return 0
    if opts.get("version") or opts.get("build"):
        sys.stderr.write("\n".join(version_lines(opts.get("build"))) + "\n")
        return 0
    if opts.get("test") or opts.get("dump"):
        from mailproxy.conf.load import check
        from mailproxy.tls import client as client_tls

        path, prefix, directives = conf_location(opts)
        return check(path, prefix, directives, bool(opts.get("dump")), sys.stdout, sys.stderr,
                     probe=probe_files, quiet=bool(opts.get("quiet")), prepare=client_tls.prepare)
    command = opts["command"]
    if command == "start":
        return start(opts)
    if command == "status":
        return status(opts)
    return signal_master(opts, command)


def main(argv=None):
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except CliError as exc:
        errorlog.startup_error(str(exc))
    except KeyboardInterrupt:
        errorlog.startup_error("interrupted", level="notice")
    except OSError as exc:
        # A system call with no better wording above: still one line, in nginx's errno form.
        what = exc.filename and '"%s" ' % exc.filename or ""
        errorlog.startup_error("%sfailed %s" % (what, errorlog.os_error_text(exc)), level="alert")
    except ImportError as exc:
        errorlog.startup_error("cannot import %s" % (exc.name or exc), level="alert")
    except Exception as exc:
        # The promise is one line and a status, whatever broke; the type names the bug to report.
        errorlog.startup_error("%s: %s" % (type(exc).__name__, exc), level="alert")
    return 1


if __name__ == "__main__":
    sys.exit(main())
