"""Issue 18 item 5: a client's control bytes never break an error-log line (nginx writes them raw)."""

import re
import socket

import pytest

from support.authserver import RecordingAuthServer
from support.harness import free_port, mail_config

LINE = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d \[\w+\] \d+#0: ")


@pytest.fixture
def edge(mailproxy_master):
    auth = RecordingAuthServer({"alice": "secret"}, {})
    ports = {"imap": free_port(), "pop3": free_port()}
    config = mail_config(auth.url, """    server { listen 127.0.0.1:%d; protocol imap; }
    server { listen 127.0.0.1:%d; protocol pop3; }
}
""" % (ports["imap"], ports["pop3"]))
    master = mailproxy_master(config, handler=None)
    yield ports, master
    auth.close()


def converse(port, steps):
    """Send each chunk once the reply ending in its `until` bytes arrived; returns all replies."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        got = b""
        for data, until in steps:
            if data:
                sock.sendall(data)
            while until not in got:
                piece = sock.recv(4096)
                assert piece, got
                got += piece
        return got


def every_line_is_a_log_line(log):
    for line in log.splitlines():
        assert LINE.match(line), "forged or broken log line: %r" % line


def test_imap_login_with_newline_in_literal(edge):
    ports, master = edge
    replies = converse(ports["imap"], [
        (b"", b"* OK"),
        (b"a LOGIN {9}\r\n", b"+ OK\r\n"),
        # The 9-byte literal holds a line break; the password follows as an atom.
        (b"ali\r\nce x pw\r\n", b"a NO"),
    ])
    assert b"a NO Invalid login or password" in replies
    master.wait_log("client login failed")
    log = master.error_log()
    every_line_is_a_log_line(log)
    (line,) = [l for l in log.splitlines() if "client login failed" in l]
    assert 'login: "ali\\x0D\\x0Ace x"' in line


def test_pop3_user_with_control_byte(edge):
    ports, master = edge
    converse(ports["pop3"], [
        (b"", b"+OK"),
        (b"USER bo\x1b[2Jb\x00\x7f\xff\r\n", b"+OK"),
        (b"PASS nope\r\n", b"-ERR"),
    ])
    master.wait_log("client login failed")
    log = master.error_log()
    every_line_is_a_log_line(log)
    (line,) = [l for l in log.splitlines() if "client login failed" in l]
    assert 'login: "bo\\x1B[2Jb\\x00\\x7F\\xFF"' in line
