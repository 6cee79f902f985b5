"""error_log as nginx writes it, in a real master with real sessions: syslog over UDP and over a unix
datagram socket (receivers this test binds), a syslog server that is not there, several error_logs with
their own levels, debug lines for a login, debug_connection, and `-t` on a bad syslog target.

The sessions are real: RecordingAuthServer answers auth_http and a FakeBackend (tests/reliability/
support/peers.py) takes the backend login, so every step a session logs is walked.
"""

import base64
import os
import re
import select
import socket
import subprocess
import sys
import tempfile
import time

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))

import mailproxy  # noqa: E402

from support.authserver import RecordingAuthServer
from support.harness import ROOT, free_port, read_line, wait_for
from support.peers import FakeBackend, read_reply, read_until_close

PASSWORD = "Zq9-debug-secret"
USERS = {"alice": PASSWORD}
HOSTNAME = socket.gethostname().lower().encode()
VERSION = ("mailproxy/%s (nginx/%s)" % (mailproxy.__version__, mailproxy.NGINX_VERSION)).encode()
# ngx_syslog.c: <PRI>Mmm dd hh:mm:ss [hostname ]tag: the error log line without its LF.
SYSLOG = re.compile(rb"<(\d{1,3})>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d (?:(\S+) )?(\w*): "
                    rb"(\d{4}/\d\d/\d\d \d\d:\d\d:\d\d \[(\w+)\] \d+#0: .*)\Z", re.S)
NOTICE, INFO = 5, 6  # syslog severities
LOCAL7, MAIL = 23, 2

CONFIG = """
worker_processes 1;
error_log logs/error.log info;
%(main)s
events { worker_connections 64; %(events)s }
mail {
    auth_http 127.0.0.1:%(auth)d/auth;
    timeout 5s;
    imap_auth plain login;
    pop3_auth plain;
    smtp_auth plain login;
    %(mail)s
    server { listen 127.0.0.1:%(imap)d; protocol imap; }
    server { listen 127.0.0.1:%(pop3)d; protocol pop3; }
    server { listen 127.0.0.1:%(smtp)d; protocol smtp; }
}
"""

LOGIN = {
    "imap": [(b"a1 LOGIN alice %s\r\n" % PASSWORD.encode(), b"a1 OK")],
    "pop3": [(b"USER alice\r\n", b"+OK"), (b"PASS %s\r\n" % PASSWORD.encode(), b"+OK")],
    "smtp": [(b"EHLO client\r\n", b"250 "),
             (b"AUTH PLAIN " + base64.b64encode(b"\0alice\0" + PASSWORD.encode()) + b"\r\n", b"235")],
}
LOGOUT = {"imap": (b"a2 LOGOUT\r\n", b"a2 OK"), "pop3": (b"QUIT\r\n", b"+OK bye"), "smtp": (b"QUIT\r\n", b"221")}


class Proxy:
    """A running mailproxy with IMAP, POP3 and SMTP servers, its auth server and one backend each."""

    def __init__(self, mailproxy_master, main="", events="", mail=""):
        self.backends = {p: FakeBackend(p) for p in LOGIN}
        self.auth = RecordingAuthServer(USERS, {p: ("127.0.0.1", b.port) for p, b in self.backends.items()})
        self.ports = {p: free_port() for p in LOGIN}
        self.master = mailproxy_master(CONFIG % dict(main=main, events=events, mail=mail, auth=self.auth.port,
                                                     **self.ports), handler=None)

    def path(self, name):
        return os.path.join(self.master.prefix, "logs", name)

    def read(self, name):
        try:
            with open(self.path(name), "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            return b""

    def wait_in(self, name, text, timeout=10.0):
        wait_for(lambda: text in self.read(name), timeout, "%r in %s" % (text, name))

    def session(self, protocol, source=None):
        """Log in and out; returns once the proxy closed the client, i.e. the relay has ended."""
        conn = socket.create_connection(("127.0.0.1", self.ports[protocol]), timeout=10,
                                        source_address=(source, 0) if source else None)
        with conn:
            assert read_line(conn)
            for command, expected in LOGIN[protocol]:
                conn.sendall(command)
                assert read_reply(conn, expected).startswith(expected)
            command, expected = LOGOUT[protocol]
            conn.sendall(command)
            assert expected in read_until_close(conn)

    def close(self):
        self.auth.close()
        for backend in self.backends.values():
            backend.close()


@pytest.fixture
def proxy(mailproxy_master):
    made = []

    def make(**kw):
        made.append(Proxy(mailproxy_master, **kw))
        return made[-1]

    yield make
    for one in made:
        one.close()


class Receiver:
    """A syslog server: one datagram socket this test binds, and everything it received."""

    def __init__(self, family, address):
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind(address)
        if family == socket.AF_UNIX:
            os.chmod(address, 0o666)  # as /dev/log: workers that dropped root must reach it too
        self.address = self.sock.getsockname()
        self.messages = []

    def until(self, text, timeout=10.0):
        """Receive until a message holds ``text``; returns that message."""
        deadline = time.monotonic() + timeout
        for message in self.messages:
            if text in message:
                return message
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError("no syslog message with %r; got %r" % (text, self.messages))
            if not select.select([self.sock], [], [], remaining)[0]:
                continue
            message = self.sock.recv(65536)
            self.messages.append(message)
            if text in message:
                return message

    def close(self):
        self.sock.close()


@pytest.fixture
def receivers():
    made = []
    short = tempfile.mkdtemp(prefix="mps")  # unix socket paths stop at 108 bytes; tmp_path can be longer
    os.chmod(short, 0o755)

    def make(kind="udp", path=None):
        if kind == "udp":
            made.append(Receiver(socket.AF_INET, ("127.0.0.1", 0)))
        else:
            made.append(Receiver(socket.AF_UNIX, path or os.path.join(short, "log%d" % len(made))))
        return made[-1]

    make.folder = short
    yield make
    for one in made:
        one.close()
    for name in os.listdir(short):
        os.unlink(os.path.join(short, name))
    os.rmdir(short)


def parse(message):
    match = SYSLOG.match(message)
    assert match, message
    pri, host, tag, line, level = match.groups()
    return int(pri) >> 3, int(pri) & 7, host, tag, line, level


def test_udp_syslog_gets_nginx_lines(proxy, receivers):
    main, mail = receivers(), receivers()
    p = proxy(main="error_log syslog:server=127.0.0.1:%d info;" % main.address[1],
              mail="error_log syslog:server=127.0.0.1:%d,facility=mail,tag=edge info; error_log logs/mail.log info;"
              % mail.address[1])
    main.until(b"start worker process ")
    # The start-up notices, version and OS included, as nginx's master writes them.
    notices = [parse(m)[4] for m in main.messages]
    for wanted in (b'using the "epoll" event method', VERSION, b"built by ", b"OS: " + os.uname().sysname.encode(),
                   b"getrlimit(RLIMIT_NOFILE): ", b"start worker processes"):
        assert any(wanted in line for line in notices), wanted
    for message in main.messages:
        facility, severity, host, tag, line, level = parse(message)
        assert (facility, severity, host, tag, level) == (LOCAL7, NOTICE, HOSTNAME, b"nginx", b"notice")
        assert line + b"\n" in p.read("error.log")  # the same line as the file's
    p.session("imap")
    logged_in = mail.until(b"client logged in")
    facility, severity, host, tag, line, level = parse(logged_in)
    assert (facility, severity, host, tag, level) == (MAIL, INFO, HOSTNAME, b"edge", b"info")
    assert line + b"\n" in p.read("mail.log")
    # Sessions log to their server's error_log (here the mail level's), not to the main one.
    assert not any(b"client logged in" in m for m in main.messages)
    assert b"client logged in" not in p.read("error.log")


def test_unix_socket_syslog_gets_nginx_lines(proxy, receivers):
    receiver = receivers("unix")
    p = proxy(main="error_log syslog:server=unix:%s,nohostname,tag=mp notice;" % receiver.address)
    message = receiver.until(VERSION)
    facility, severity, host, tag, line, level = parse(message)
    assert (facility, severity, host, tag) == (LOCAL7, NOTICE, None, b"mp")
    assert message.startswith(b"<189>") and b" mp: " in message
    p.session("pop3")
    p.master.stop()
    receiver.until(b"[notice] %d#0: exit" % p.master.pid)
    # notice: the sessions' info lines went to the file only.
    assert not any(b"[info]" in m for m in receiver.messages)
    assert b"client logged in" in p.read("error.log")


def test_absent_syslog_server_costs_lines_not_logins(proxy, receivers):
    port = free_port()
    path = os.path.join(receivers.folder, "later")
    p = proxy(main="error_log syslog:server=127.0.0.1:%d debug;" % port,
              mail="error_log syslog:server=unix:%s debug; error_log syslog:server=127.0.0.1:%d debug; "
                   "error_log logs/mail.log info;" % (path, port))
    for _ in range(5):
        for protocol in LOGIN:
            p.session(protocol)
    assert p.read("mail.log").count(b"client logged in") == 15
    assert b"[alert]" not in p.read("error.log") + p.read("mail.log")
    # The servers come up: lines reach them again without a reload (nginx opens a new socket after an error).
    udp, unix = receivers(), receivers("unix", path)
    udp.sock.close()
    udp.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.sock.bind(("127.0.0.1", port))
    deadline = time.monotonic() + 20
    for receiver in (udp, unix):
        # Any line will do: a unix socket queues ten datagrams, and a debug session sends more than that
        # before the reader here gets to them (the rest are dropped, never waited for).
        while not receiver.messages:
            assert time.monotonic() < deadline, "syslog never resumed"
            p.session("imap")
            try:
                receiver.until(b" nginx: ", timeout=0.5)
            except AssertionError:
                continue  # a failed connect is retried a second later, as nginx does


def test_several_error_logs_each_with_its_level(proxy):
    p = proxy(main="error_log logs/notice.log notice; error_log logs/warn.log warn;",
              mail="error_log logs/s_debug.log debug; error_log logs/s_info.log info; "
                   "error_log logs/s_error.log error; error_log stderr info;")
    p.session("imap")
    p.wait_in("s_info.log", b"proxied session done")
    notice, warn = p.read("notice.log"), p.read("warn.log")
    assert VERSION in notice and b"start worker process" in notice
    assert b"[info]" not in notice and b"[notice]" not in warn
    assert set(notice.splitlines()) <= set(p.read("error.log").splitlines())
    s_debug, s_info, s_error = p.read("s_debug.log"), p.read("s_info.log"), p.read("s_error.log")
    assert b"[debug]" in s_debug and b"client logged in" in s_debug
    assert b"[debug]" not in s_info and b"client logged in" in s_info
    assert b"[info]" not in s_error and b"[debug]" not in s_error
    assert b"client logged in" not in p.read("error.log")
    # error_log stderr at server level: the master's stderr is left alone (not sent to the main log file)
    # and takes the info lines, as nginx's log_use_stderr.
    stderr = p.master.proc.stderr
    got = b""
    deadline = time.monotonic() + 10
    while b"client logged in" not in got:
        assert time.monotonic() < deadline, got
        if select.select([stderr], [], [], 0.5)[0]:
            got += os.read(stderr.fileno(), 65536)
    assert b"[debug]" not in got


def test_debug_lines_for_one_login(proxy):
    p = proxy(mail="error_log logs/debug.log debug;")
    p.session("imap")
    p.wait_in("debug.log", b"proxied session done")
    lines = p.read("debug.log").splitlines()
    debug = [line.split(b"#0: ", 1)[1] for line in lines if b"[debug]" in line]
    steps = [b"accept: 127.0.0.1:", b"recv: fd:", b"mail auth http request", b"mail auth http connect to",
             b"mail auth http send:", b"mail auth http recv:", b"mail auth http reply", b"*1 connect to 127.0.0.1:",
             b"mail proxy recv:", b"mail proxy logged in to", b"mail proxy relay start",
             b"close mail proxy connection"]
    found = [next((n for n, line in enumerate(debug) if step in line), None) for step in steps]
    assert None not in found, list(zip(steps, found))
    assert found == sorted(found), list(zip(steps, found))
    # nginx's debug lines carry the connection number but no "while ..., client: ..." context.
    assert all(line.startswith(b"*1 ") and b", client: " not in line for line in debug[1:])
    assert b"[debug]" not in p.read("error.log")


def test_no_password_in_debug_lines(proxy, mailproxy_master):
    p = proxy(mail="error_log logs/debug.log debug;", main="error_log logs/main_debug.log debug;")
    for protocol in LOGIN:
        p.session(protocol)
    wait_for(lambda: p.read("debug.log").count(b"proxied session done") == 3, 10, "three sessions done")
    logs = p.read("debug.log") + p.read("main_debug.log") + p.read("error.log")
    raw = PASSWORD.encode()
    for form in (raw, base64.b64encode(b"\0alice\0" + raw)[:20], base64.b64encode(raw)[:12]):
        assert form not in logs, form
    assert any(raw in request for request, _ in p.auth.requests)  # it did travel to the auth server
    # test_secrets.py's every login method, failure and too-long line, now with the sessions at debug.
    from test_secrets import test_no_password_in_any_log_line

    from support.peers import Edge

    def debug_edge(**kw):
        kw["mail"] = kw.get("mail", "") + " error_log logs/error.log debug;"
        edge = Edge(mailproxy_master, **kw)
        debug_edge.made.append(edge)
        return edge

    debug_edge.made = []
    try:
        test_no_password_in_any_log_line(debug_edge)
        assert debug_edge.made[0].master.error_log().count("[debug]") > 100
    finally:
        for edge in debug_edge.made:
            edge.close()


def test_debug_connection_logs_listed_clients_at_debug(proxy):
    p = proxy(events="debug_connection 127.0.0.2;", mail="error_log logs/mail.log info;")
    p.session("imap", source="127.0.0.1")
    p.session("imap", source="127.0.0.2")
    wait_for(lambda: p.read("mail.log").count(b"proxied session done") == 2, 10, "two sessions done")
    text = p.read("mail.log")
    first = [line for line in text.splitlines() if b"] " in line and b"*1 " in line]
    second = [line for line in text.splitlines() if b"*2 " in line]
    assert first and not any(b"[debug]" in line for line in first)
    assert any(b"[debug]" in line and b"accept: 127.0.0.2:" in line for line in second)


def test_check_refuses_a_bad_syslog_target_in_nginx_words(tmp_path):
    conf = tmp_path / "mailproxy.conf"
    conf.write_text("events {}\nerror_log syslog:server=127.0.0.1:5514,tag=mail-proxy info;\n")
    result = subprocess.run([sys.executable, "-m", "mailproxy.cli", "-t", "-c", str(conf), "-p", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 1
    assert ('mailproxy: [emerg] syslog "tag" only allows alphanumeric characters and underscore in %s:2'
            % conf) in result.stderr
