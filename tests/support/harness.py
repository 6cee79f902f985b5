"""What many tests share: free ports, readiness waits, pids, configurations, and a mailproxy master
run in a temporary prefix and cleaned up by pid.

    master = MasterProcess(prefix, config_text, MINI_IMAP, env=None).start()   # daemon off, waits for READY=1
    master.cli("reload"); master.reload(); master.error_log(); master.workers(); master.kill_leftovers()

The ``mailproxy_master`` fixture (tests/conftest.py) makes these and cleans them up. Readiness comes
from the master itself: it sends systemd's READY=1 to $NOTIFY_SOCKET once its workers said they serve
(and again after each reload, once the new ones are forked), so nothing here sleeps and hopes.

``mini_imap_session`` is the session handler the workers run when a test names ``MINI_IMAP``
(session_handler_master.py): a greeting, ``a LOGOUT`` answered, ``a PID`` telling which worker holds the
session and ``a ENV`` its environment (JSON).
"""

import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from tools.ports import free_port  # noqa: F401  (the tests take it from here)

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(TESTS)
MINI_IMAP = "support.harness:mini_imap_session"
STARTUP_TIMEOUT = 20.0


# -- the session the test workers run ------------------------------------------------------------


def mini_imap_session(sock, peer, listen, server, worker):
    log = worker.log_for(server)
    conn = worker.next_connection_number()
    log.log("info", "client %s connected to %s" % (peer, listen.text), conn=conn)

    def closer():
        log.log("info", "shutdown timeout", conn=conn)
        sock.shutdown(socket.SHUT_RDWR)

    token = worker.session_started(closer)
    try:
        serve_mini_imap(sock)
    finally:
        sock.close()
        worker.session_finished(token)


def serve_mini_imap(sock):
    sock.sendall(b"* OK IMAP4 ready\r\n")
    buffered = b""
    while True:
        data = sock.recv(4096)
        if not data:
            break
        buffered += data
        while b"\r\n" in buffered:
            line, buffered = buffered.split(b"\r\n", 1)
            command = line.lower()
            if command == b"a logout":
                sock.sendall(b"* BYE\r\na OK completed\r\n")
                return
            if command == b"a pid":
                sock.sendall(b"* PID %d\r\na OK\r\n" % os.getpid())
            elif command == b"a env":
                # The worker's environment as it has it: /proc/PID/environ shows only the memory the
                # program started with, which setproctitle has since written over (nginx's alike).
                sock.sendall(b"* ENV %s\r\na OK\r\n" % json.dumps(dict(os.environ)).encode())
            else:
                sock.sendall(b"* BAD\r\n")


# -- helpers -------------------------------------------------------------------------------------


def missing(what):
    """Something a test needs (a peer, a package, a kernel feature) is not here: a skip on a workstation,
    a failure under CI=true, where a green run must not hide a test that never ran."""
    if os.environ.get("CI") == "true":
        pytest.fail("%s is required under CI=true" % what)
    pytest.skip("%s is not available" % what)


def mail_config(auth_url, body, timeout="10s"):
    """The head every end-to-end configuration shares: one worker, the info log, ``auth_http`` and
    ``timeout`` (None: nginx's default) at mail level; ``body`` follows inside mail {} and closes it."""
    head = "\nworker_processes 1;\nerror_log logs/error.log info;\nevents { worker_connections 1024; }\n"
    head += "mail {\n    auth_http %s;\n" % auth_url
    if timeout:
        head += "    timeout %s;\n" % timeout
    return head + body


def imap_config(*listens, main="", events="", mail="", server=""):
    """A complete configuration: one IMAP server per `listens` entry (a listen line's arguments)."""
    servers = "".join(
        "    server {\n        listen %s;\n        protocol imap;\n%s    }\n" % (listen, server)
        for listen in listens
    )
    return (
        "%s\nevents {\n%s}\nmail {\n    auth_http http://127.0.0.1:9/auth;\n%s\n%s}\n"
        % (main, events, mail, servers)
    )


def imap_session(address, family=socket.AF_INET, timeout=10.0, hold=False):
    """Greeting, `a LOGOUT`, read to close; returns everything read (or the open socket if hold)."""
    client = socket.socket(family, socket.SOCK_STREAM)
    client.settimeout(timeout)
    client.connect(address)
    greeting = read_line(client)
    assert greeting == b"* OK IMAP4 ready\r\n", greeting
    if hold:
        return client
    with client:
        client.sendall(b"a LOGOUT\r\n")
        return greeting + read_to_close(client)


def read_line(sock):
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def read_to_close(sock):
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk


def children(pid):
    """Pids whose parent is `pid`, from /proc (the processes a master forked)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as handle:
                stat = handle.read()
        except OSError:
            continue  # exited while we looked
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return sorted(found)


def cmdline(pid):
    with open("/proc/%d/cmdline" % pid, "rb") as handle:
        return handle.read().replace(b"\0", b" ").decode().strip()


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_for(predicate, timeout=10.0, what="condition"):
    """For states no event announces (a pid gone from /proc); checks often, gives up loudly."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for %s" % what)
        time.sleep(0.01)


def wait_listening(port, process, what, timeout=20.0):
    """Readiness of a server the test started: its port accepts; fails at once if it died instead."""
    def accepts():
        assert process.poll() is None, "%s exited with %s" % (what, process.returncode)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        except OSError:
            return False
        return True

    wait_for(accepts, timeout, "%s to listen" % what)


def terminate(process, timeout=10.0):
    """Stop a process the test started: SIGTERM, then SIGKILL if it is still there after ``timeout``."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_pid_exit(pid, timeout=10.0):
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


class MasterProcess:
    def __init__(self, prefix, config_text, handler, env):
        self.prefix = prefix
        self.conf = os.path.join(prefix, "conf", "mailproxy.conf")
        os.makedirs(os.path.dirname(self.conf), exist_ok=True)
        os.makedirs(os.path.join(prefix, "logs"), exist_ok=True)
        self.write_config(config_text)
        # The notify socket lives in a short path: unix socket names stop at 108 bytes.
        self._notify_dir = tempfile.mkdtemp(prefix="mpn")
        self.notify_path = os.path.join(self._notify_dir, "notify")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(self.notify_path)
        self.env = dict(os.environ, NOTIFY_SOCKET=self.notify_path,
                        PYTHONPATH=os.pathsep.join([ROOT, TESTS]))
        self.handler = handler
        self.env.update(env or {})
        self.proc = None
        self.pid = None
        self.known_pids = set()

    def write_config(self, text):
        with open(self.conf, "w") as handle:
            handle.write(text)

    @property
    def pid_file(self):
        return os.path.join(self.prefix, "logs", "mailproxy.pid")

    @property
    def log_path(self):
        return os.path.join(self.prefix, "logs", "error.log")

    def command(self, *args):
        # Another session handler than the product's comes through the tests' own entry point.
        launcher = ["support.session_handler_master", self.handler] if self.handler else ["mailproxy.cli"]
        return [sys.executable, "-m", *launcher, "-p", self.prefix, "-c", self.conf, *args]

    def cli(self, *args, timeout=60):
        return subprocess.run(self.command(*args), env=self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=self.prefix)

    def start(self, daemon=False, timeout=STARTUP_TIMEOUT):
        if daemon:
            result = self.cli("-g", "daemon on;", "start")
            assert result.returncode == 0, result.stderr
            self.wait_notify("READY=1", timeout)
            with open(self.pid_file) as handle:
                self.pid = int(handle.read())
        else:
            self.proc = subprocess.Popen(self.command("-g", "daemon off;", "start"), env=self.env,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         cwd=self.prefix)
            self.pid = self.proc.pid
            self.wait_notify("READY=1", timeout)
        self.known_pids.add(self.pid)
        self.known_pids.update(self.workers())
        return self

    def wait_notify(self, wanted, timeout=STARTUP_TIMEOUT):
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (self.proc is not None and self.proc.poll() is not None):
                raise AssertionError("master did not send %s; stderr: %s; log:\n%s" % (
                    wanted, self.proc.stderr.read().decode() if self.proc else "", self.error_log()))
            self.notify.settimeout(min(remaining, 0.5))
            try:
                message = self.notify.recv(4096).decode()
            except socket.timeout:
                continue
            if wanted in message.split("\n"):
                return message

    def drain_notify(self):
        self.notify.setblocking(False)
        try:
            while True:
                self.notify.recv(4096)
        except BlockingIOError:
            return

    def reload(self, timeout=STARTUP_TIMEOUT):
        """HUP, then wait until the master reports it is serving again (new workers forked)."""
        self.drain_notify()
        os.kill(self.pid, signal.SIGHUP)
        self.wait_notify("RELOADING=1", timeout)
        self.wait_notify("READY=1", timeout)
        self.known_pids.update(self.workers())

    def workers(self):
        found = children(self.pid)
        self.known_pids.update(found)
        return found

    def error_log(self):
        try:
            with open(self.log_path, errors="replace") as handle:
                return handle.read()
        except FileNotFoundError:
            return ""

    def wait_log(self, text, timeout=10.0):
        wait_for(lambda: text in self.error_log(), timeout, "%r in the error log" % text)

    def wait_exit(self, timeout=15.0):
        if self.proc is not None:
            return self.proc.wait(timeout)
        assert wait_pid_exit(self.pid, timeout), "master %d still running" % self.pid
        return None

    def stop(self):
        result = self.cli("stop")
        assert result.returncode == 0, result.stderr
        self.wait_exit()

    def kill_leftovers(self):
        # A fast stop first, so the master reaps its own workers (a daemon's orphans would stay
        # zombies under an init that does not reap); SIGKILL for whatever is left.
        if self.pid and pid_alive(self.pid):
            self.known_pids.update(children(self.pid))
            os.kill(self.pid, signal.SIGTERM)
            wait_pid_exit(self.pid, 5.0)
        for pid in sorted(self.known_pids | set(children(self.pid or -1))):
            try:
                if "mailproxy" not in cmdline(pid):
                    continue  # gone, and the number already belongs to someone else
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, FileNotFoundError):
                continue
        if self.proc is not None:
            self.proc.wait(10)
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream is not None:
                    stream.close()
        self.notify.close()
        os.unlink(self.notify_path)
        os.rmdir(self._notify_dir)
