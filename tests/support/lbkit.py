"""Debian's haproxy as a test peer: TCP mode, PROXY v2 to the nodes, run in the foreground by pid.

Readiness and node state come from haproxy's own stats socket ("show stat"), never from a delay.
"""

import os
import socket
import subprocess
import time

from support.harness import terminate

HAPROXY = "/usr/sbin/haproxy"

_CONFIG = """\
global
    maxconn 4096
    stats socket {admin} level admin

defaults
    mode tcp
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    # A node busy forking Dovecot logins may greet late; late is not down.
    timeout check 3s
    # A node that stops listening refuses the connect: retry it on the other node.
    retries 3
    option redispatch

frontend imap
    bind 127.0.0.1:{port}
    default_backend nodes

backend nodes
    balance roundrobin
    # The check speaks PROXY v2 (LOCAL) and IMAP, so it costs the node one greeting, no error line.
    option tcp-check
    tcp-check expect string "* OK"
    tcp-check send "c LOGOUT\\r\\n"
    tcp-check expect string "c OK"
{servers}
"""


class Haproxy:
    def __init__(self, directory, port, nodes):
        self.directory = directory
        self.port = port
        self.admin = os.path.join(directory, "admin.sock")
        self.config_path = os.path.join(directory, "haproxy.cfg")
        servers = "".join(
            "    server node%d 127.0.0.1:%d send-proxy-v2 check check-send-proxy inter 300ms fall 2 rise 1\n"
            % (index, node) for index, node in enumerate(nodes)
        )
        with open(self.config_path, "w") as handle:
            handle.write(_CONFIG.format(admin=self.admin, port=port, servers=servers))
        self.log_path = os.path.join(directory, "haproxy.out")
        self.process = None

    def start(self, timeout=15.0):
        with open(self.log_path, "w") as output:
            self.process = subprocess.Popen([HAPROXY, "-db", "-f", self.config_path],
                                            stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)
        self.wait_state(lambda states: len(states) > 0 and all(s == "UP" for s in states.values()),
                        timeout, "every node UP")
        return self

    def stop(self):
        terminate(self.process)

    def command(self, text):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(5)
            conn.connect(self.admin)
            conn.sendall(text.encode() + b"\n")
            data = b""
            while True:
                piece = conn.recv(65536)
                if not piece:
                    return data.decode()
                data += piece

    def states(self):
        """Node name -> haproxy's status ("UP", "DOWN", ...), {} while the stats socket is not up."""
        try:
            text = self.command("show stat")
        except (FileNotFoundError, ConnectionRefusedError):
            return {}
        lines = text.splitlines()
        if not lines or not lines[0].startswith("# "):
            return {}
        fields = lines[0][2:].split(",")
        found = {}
        for line in lines[1:]:
            row = dict(zip(fields, line.split(",")))
            if row.get("pxname") == "nodes" and row.get("svname", "").startswith("node"):
                found[row["svname"]] = row["status"].split(" ")[0]
        return found

    def wait_state(self, predicate, timeout, what):
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError("haproxy exited (%s): %s" % (self.process.returncode, self.output()))
            states = self.states()
            if predicate(states):
                return states
            if time.monotonic() > deadline:
                raise AssertionError("haproxy: no %s (%s): %s" % (what, states, self.output()))
            time.sleep(0.05)  # polls the balancer's own report; nothing announces a state change

    def output(self):
        with open(self.log_path, errors="replace") as handle:
            return handle.read()[-3000:]
