"""Processes the bench starts: the shared backend and auth server, and the two engines under test.

Every process is started in its own session (so its pid is its process group) and stopped by that
group: TERM, then KILL after a grace period, so a worker whose master died first goes too. Readiness is
the port answering (or the child printing its port), polled with a wait on the child itself so that a
child that dies during start-up is reported at once.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from tools.ports import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NGINX = "/usr/sbin/nginx"
MAIL_MODULE = "/usr/lib/nginx/modules/ngx_mail_module.so"
NOFILE = 20000



def ensure_nginx():
    if os.path.exists(NGINX) and os.path.exists(MAIL_MODULE):
        return
    if os.geteuid() != 0:
        sys.exit("bench: %s with %s is needed (apt-get install nginx-light libnginx-mod-mail)"
                 % (NGINX, MAIL_MODULE))
    subprocess.run(["apt-get", "install", "-y", "nginx-light", "libnginx-mod-mail"], check=True,
                   stdout=subprocess.DEVNULL)


class Group:
    """One started process (and everything it forks), stopped by process group."""

    def __init__(self, argv, name, cwd=ROOT, stdout=subprocess.DEVNULL):
        self.name = name
        self.proc = subprocess.Popen(argv, cwd=cwd, stdout=stdout, stderr=subprocess.PIPE,
                                     start_new_session=True)
        self.pid = self.proc.pid

    def died(self, wait=0.0):
        """True when the process has exited; waits up to ``wait`` seconds for that to happen."""
        try:
            self.proc.wait(wait)
        except subprocess.TimeoutExpired:
            return False
        return True

    def failure(self):
        return "%s exited with %s: %s" % (self.name, self.proc.returncode,
                                          self.proc.stderr.read().decode(errors="replace")[-2000:])

    def stop(self):
        if self.proc.poll() is None or _group_alive(self.pid):
            _signal_group(self.pid, signal.SIGTERM)
            if not self.died(10):
                _signal_group(self.pid, signal.SIGKILL)
                self.proc.wait()
        # A master that exits before its workers leaves them in the group: finish them too.
        if _group_alive(self.pid):
            _signal_group(self.pid, signal.SIGKILL)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()


def _signal_group(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return  # the whole group is already gone, which is what the caller wants


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def start_printing_port(argv, name):
    """Start a helper that prints "listening PORT" when it accepts; return (Group, port)."""
    group = Group(argv, name, stdout=subprocess.PIPE)
    line = group.proc.stdout.readline().decode()
    if not line.startswith("listening "):
        group.stop()
        raise RuntimeError(group.failure())
    return group, int(line.split()[1])


def answers(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def wait_ready(group, port, workers, timeout=20):
    deadline = time.monotonic() + timeout
    while not (answers(port) and len(worker_pids(group.pid)) >= workers):
        if group.died(0.02):
            raise RuntimeError(group.failure())
        if time.monotonic() > deadline:
            group.stop()
            raise RuntimeError("%s did not get ready on port %d" % (group.name, port))


class Engine:
    """A proxy under test: nginx or mailproxy with the same mail{} block, in a private prefix."""

    def __init__(self, kind, workers, auth_port, keepalive=False, servers=None):
        """``servers``: extra ``server {}`` blocks after the three shared ones, as name -> text with
        ``%(port)d`` where its listen port goes; each gets a free port, kept in ``self.ports[name]``.
        Without them the configuration is the shared bench's, byte for byte."""
        self.kind, self.workers, self.keepalive = kind, workers, keepalive
        self.label = kind + (" keepalive" if keepalive else "")
        self.port = free_port()  # IMAP: logins, relay and idle sessions
        self.ports = {"imap": self.port, "pop3": free_port(), "smtp": free_port()}
        self.prefix = tempfile.mkdtemp(prefix="bench-%s-" % kind)
        os.makedirs(os.path.join(self.prefix, "logs"))
        self.conf = os.path.join(self.prefix, "%s.conf" % kind)
        head = "load_module %s;\n" % MAIL_MODULE if kind == "nginx" else ""
        extra = "    auth_http_keepalive on;\n" if keepalive else ""
        # error level, not info: both engines log each session at info, and the bench measures proxying.
        # Connections count both sides in nginx, so two per session plus listeners and auth requests.
        # SMTP: AUTH PLAIN from the client; xclient is on by default in both engines, so the backend
        # sees EHLO and XCLIENT and the engine itself answers the client 235.
        with open(self.conf, "w") as conf:
            conf.write(
                "%sworker_processes %d;\nworker_rlimit_nofile %d;\npid %s/logs/engine.pid;\n"
                "error_log %s/logs/error.log error;\nevents { worker_connections %d; }\n"
                "mail {\n    auth_http 127.0.0.1:%d/auth;\n%s"
                "    server { listen 127.0.0.1:%d; protocol imap; }\n"
                "    server { listen 127.0.0.1:%d; protocol pop3; }\n"
                "    server { listen 127.0.0.1:%d; protocol smtp; smtp_auth plain; }\n%s}\n"
                % (head, workers, NOFILE, self.prefix, self.prefix, NOFILE - 10, auth_port, extra,
                   self.port, self.ports["pop3"], self.ports["smtp"], self._extra_servers(servers)))
        self.group = None

    def _extra_servers(self, servers):
        text = ""
        for name, block in (servers or {}).items():
            self.ports[name] = free_port()
            text += "    %s\n" % (block % {"port": self.ports[name]})
        return text

    def start(self, cwd=ROOT, wrapper=(), timeout=20):
        """``cwd``: the source tree mailproxy is imported from (the bench's own by default); ``wrapper``:
        a command the master runs under (valgrind, for bench.instructions), ``timeout`` then longer."""
        if self.kind == "nginx":
            argv = [NGINX, "-p", self.prefix, "-c", self.conf, "-g", "daemon off; master_process on;"]
        else:
            argv = [sys.executable, "-m", "mailproxy.cli", "-p", self.prefix, "-c", self.conf,
                    "-g", "daemon off;", "start"]
        self.group = Group(list(wrapper) + argv, self.label, cwd=cwd)
        wait_ready(self.group, self.port, self.workers, timeout)
        return self

    def pids(self):
        return [self.group.pid] + worker_pids(self.group.pid)

    def stop(self):
        if self.group:
            self.group.stop()
        log = os.path.join(self.prefix, "logs", "error.log")
        alerts = []
        if os.path.exists(log):
            with open(log) as text:
                alerts = [line for line in text if "[alert]" in line or "[emerg]" in line]
        shutil.rmtree(self.prefix, ignore_errors=True)
        return alerts


def worker_pids(master):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # exited between listdir and open
            if int(fields[1]) == master:
                found.append(int(entry))
    return found


def cpu_seconds(pids):
    """utime + stime of the given processes, in seconds (fields 14 and 15 of /proc/pid/stat)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with open("/proc/%d/stat" % pid) as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / tick


def memory_kib(pids):
    """Sum of PSS (KiB) over the processes: shared pages are split fairly between master and workers."""
    total = 0
    for pid in pids:
        with open("/proc/%d/smaps_rollup" % pid) as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
    return total


def descriptors(pids):
    return sum(len(os.listdir("/proc/%d/fd" % pid)) for pid in pids)
