"""Scripted peers for the reliability tests: a recording fake backend per protocol and a mailproxy
edge (real master, real session, RecordingAuthServer) wired to them.

The fake backends are deliberately tiny and threaded (outside the worker under test), so a test can
make them misbehave on cue (`mode`) and read back every command they received (`commands`), with IMAP
literals folded into their command as a server would read them.
"""

import os
import re
import socket
import threading

from support.authserver import RecordingAuthServer
from support.harness import children, free_port, read_line
from support.servers import TcpServer

LITERAL = re.compile(rb"\{(\d+)\+?\}\r\n$")
GREETINGS = {"imap": b"* OK fake ready\r\n", "pop3": b"+OK fake ready\r\n", "smtp": b"220 fake ESMTP\r\n"}
BAD_GREETINGS = {"imap": b"* BYE fake busy\r\n", "pop3": b"-ERR fake busy\r\n", "smtp": b"554 5.3.2 fake busy\r\n"}
USERS = {"alice": "alice-secret", "carol": "pw\r\nDELE 1"}


class FakeBackend(TcpServer):
    """mode: "ok"; "close_mid_login" (greets, closes on the first command); "silent" (never greets);
    "bad_greeting" (greets with the protocol's refusal); "reject_login" (refuses the password)."""

    backlog = 1024

    def __init__(self, protocol, mode="ok"):
        self.protocol = protocol
        self.mode = mode
        self.commands = []  # every logical command received, across connections
        self.lock = threading.Lock()
        super().__init__()

    def _command(self, reader, writer):
        line = reader.readline()
        if not line:
            return None
        # A synchronizing literal is part of the command, as an IMAP server reads it.
        while self.protocol == "imap" and LITERAL.search(line):
            size = int(LITERAL.search(line).group(1))
            if not line.rstrip(b"\r\n").endswith(b"+}"):
                writer.sendall(b"+ go\r\n")
            line += reader.read(size)
            rest = reader.readline()
            if not rest:
                return None
            line += rest
        with self.lock:
            self.commands.append(line)
        return line

    def serve_connection(self, conn):
        # An OSError (the proxy hung up on us) is exactly what several fault tests provoke: TcpServer
        # ends the connection quietly.
        if self.mode == "silent":
            conn.recv(1)  # holds the greeting back until the proxy gives up
            return
        if self.mode == "bad_greeting":
            conn.sendall(BAD_GREETINGS[self.protocol])
            conn.recv(1)
            return
        conn.sendall(GREETINGS[self.protocol])
        reader = conn.makefile("rb")
        while True:
            line = self._command(reader, conn)
            if line is None or self.mode == "close_mid_login":
                return
            reply, last = self._reply(line)
            conn.sendall(reply)
            if last:
                return

    def _reply(self, line):
        words = line.split()
        if self.mode == "reject_login":
            if self.protocol == "imap" and b"LOGIN" in line.upper():
                return words[0] + b" NO [AUTHENTICATIONFAILED] fake says no\r\n", True
            if line.upper().startswith((b"PASS", b"AUTH")):
                return (b"-ERR fake says no\r\n" if self.protocol == "pop3"
                        else b"535 5.7.8 fake says no\r\n"), True
        verb = words[1].upper() if self.protocol == "imap" and len(words) > 1 else (words[0].upper() if words else b"")
        if self.protocol == "imap":
            tag = words[0] if words else b"*"
            if verb == b"LOGOUT":
                return b"* BYE bye\r\n" + tag + b" OK logout\r\n", True
            return tag + b" OK done\r\n", False
        if self.protocol == "pop3":
            return (b"+OK bye\r\n", True) if verb == b"QUIT" else (b"+OK\r\n", False)
        if verb == b"QUIT":
            return b"221 2.0.0 bye\r\n", True
        if verb == b"XCLIENT":
            return GREETINGS["smtp"], False
        if verb == b"AUTH":
            return b"235 2.7.0 ok\r\n", False
        if verb == b"EHLO":
            return b"250-fake\r\n250 PIPELINING\r\n", False
        return b"250 2.0.0 ok\r\n", False


CONFIG = """
worker_processes %(workers)d;
error_log logs/error.log info;
%(main)s
events { worker_connections %(connections)d; }
mail {
    auth_http %(auth)s;
    auth_http_timeout 1s;
    timeout 3s;
    server_name mx.example.test;
    imap_auth plain login;
    pop3_auth plain apop;
    smtp_auth plain login none;
    %(mail)s
    server { listen 127.0.0.1:%(imap)d; protocol imap; }
    server { listen 127.0.0.1:%(pop3)d; protocol pop3; }
    server { listen 127.0.0.1:%(smtp)d; protocol smtp; }
}
"""


class Edge:
    """A running mailproxy with three servers, its auth server and one fake backend per protocol."""

    def __init__(self, mailproxy_master, workers=1, connections=512, main="", mail="", modes=None,
                 imap_auth_http=None, handler=None):
        modes = modes or {}
        self.backends = {p: FakeBackend(p, modes.get(p, "ok")) for p in ("imap", "pop3", "smtp")}
        self.auth = RecordingAuthServer(USERS, {p: ("127.0.0.1", b.port) for p, b in self.backends.items()})
        self.ports = {p: free_port() for p in ("imap", "pop3", "smtp")}
        self.config = CONFIG % dict(
            workers=workers, connections=connections, main=main, mail=mail, auth=self.auth.url, **self.ports
        )
        if imap_auth_http:
            # Only the IMAP server meets the faulty auth server: POP3 and SMTP bystanders log in meanwhile.
            self.config = self.config.replace(
                "protocol imap; }", "protocol imap; auth_http %s; }" % imap_auth_http)
        self.master = mailproxy_master(self.config, handler=handler)
        self.first_workers = self.master.workers()

    def set_backend(self, protocol, backend):
        self.backends[protocol].stop_listening()  # the sessions it serves (the bystanders') go on
        self.backends[protocol] = backend
        self.auth.backends[protocol] = ("127.0.0.1", backend.port)

    def connect(self, protocol, timeout=10):
        return socket.create_connection(("127.0.0.1", self.ports[protocol]), timeout=timeout)

    def close(self):
        self.auth.close()
        for backend in self.backends.values():
            backend.close()

    def alerts(self, allowed=()):
        return [
            line for line in self.master.error_log().splitlines()
            if ("[alert]" in line or "[emerg]" in line or "Traceback" in line)
            and not any(text in line for text in allowed)
        ]

    def assert_healthy(self, allowed=(), protocol="pop3"):
        """The worker lives on: no alert, the same worker pids as at start, and it still serves."""
        assert self.alerts(allowed) == [], "\n".join(self.alerts(allowed))
        assert self.master.workers() == self.first_workers
        Bystander(self, protocol).finish()


def login(edge, protocol, password=b"alice-secret"):
    """Runs the protocol's login and returns the reply to its last step (b"" if the proxy hung up)."""
    import base64

    conn = edge.connect(protocol)
    with conn:
        assert read_line(conn)
        steps = {
            "imap": [(b"f1 LOGIN alice " + password + b"\r\n", b"")],
            "pop3": [(b"USER alice\r\n", b"+OK"), (b"PASS " + password + b"\r\n", b"")],
            "smtp": [(b"EHLO f\r\n", b"250 "),
                     (b"AUTH PLAIN " + base64.b64encode(b"\0alice\0" + password) + b"\r\n", b"")],
        }[protocol]
        reply = b""
        for command, expected in steps:
            conn.sendall(command)
            reply = read_reply(conn, expected)
        return reply


def worker_fds(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def worker_rss_kib(pid):
    with open("/proc/%d/status" % pid) as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_ticks(pid):
    with open("/proc/%d/stat" % pid) as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


class Bystander:
    """A session logged in and relaying before a fault, finished after it: unaffected sessions complete."""

    LOGIN = {
        "imap": [(b"b1 LOGIN alice alice-secret\r\n", b"b1 OK")],
        "pop3": [(b"USER alice\r\n", b"+OK"), (b"PASS alice-secret\r\n", b"+OK")],
        "smtp": [(b"EHLO bystander\r\n", b"250 "), (b"AUTH PLAIN AGFsaWNlAGFsaWNlLXNlY3JldA==\r\n", b"235")],
    }
    DONE = {
        "imap": (b"b2 NOOP\r\n", b"b2 OK", b"b3 LOGOUT\r\n", b"b3 OK"),
        "pop3": (b"NOOP\r\n", b"+OK", b"QUIT\r\n", b"+OK bye"),
        "smtp": (b"NOOP\r\n", b"250", b"QUIT\r\n", b"221"),
    }

    def __init__(self, edge, protocol):
        self.protocol = protocol
        self.conn = edge.connect(protocol)
        assert read_line(self.conn)
        for command, expected in self.LOGIN[protocol]:
            self.conn.sendall(command)
            assert read_reply(self.conn, expected).startswith(expected)

    def finish(self):
        noop, noop_ok, bye, bye_ok = self.DONE[self.protocol]
        with self.conn:
            self.conn.sendall(noop)
            assert read_reply(self.conn, noop_ok).startswith(noop_ok)
            self.conn.sendall(bye)
            assert bye_ok in read_until_close(self.conn)


def read_reply(conn, expected):
    """Reads lines up to the first one starting with `expected` and returns it; b"" on EOF."""
    while True:
        line = read_line(conn)
        if not line or line.startswith(expected):
            return line


def read_until_close(conn):
    data = b""
    try:
        while True:
            chunk = conn.recv(4096)
            if not chunk:
                return data
            data += chunk
    except ConnectionResetError:
        return data


__all__ = ["Edge", "FakeBackend", "Bystander", "children", "worker_fds", "worker_rss_kib", "cpu_ticks",
           "read_reply", "read_until_close"]
