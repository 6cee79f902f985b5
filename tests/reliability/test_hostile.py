"""Hostile client input (issue 10): what reaches the auth server and the backend, and what it costs.

The STARTTLS command-injection case (buffered commands after STARTTLS never run) lives with the TLS
tests: tests/tls/test_tls_e2e.py::test_starttls_injection_never_runs_buffered_command.
"""

import base64
import re

import pytest

from support.peers import login, read_line, read_reply, read_until_close, worker_rss_kib

HEADER = re.compile(rb"^[A-Za-z][A-Za-z-]*: [^\r\n]*$")
OK_REPLY = "HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: %d\r\n\r\n"


def b64(data):
    return base64.b64encode(data)


def assert_clean_request(raw):
    """One request line, then only well-formed headers: no value spilled into a header of its own."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0].startswith(b"GET /auth HTTP/1.0")
    for line in lines[1:]:
        assert HEADER.match(line), line
        assert not line.lower().startswith((b"x-evil", b"dele", b"rset")), line
    assert body == b""


def exchange(conn, *steps):
    reply = b""
    for data, expected in steps:
        conn.sendall(data)
        reply = read_reply(conn, expected)
    return reply


def test_cr_lf_nul_never_become_headers_or_commands(edge):
    e = edge(mail="xclient on;")
    evil_user = b"alice\r\nX-Evil: 1\x00"
    evil_pass = b"pw\r\nDELE 1\r\nX-Evil: 2\x00"
    # IMAP: literals may carry any byte; force them through to the backend with a scripted OK.
    e.auth.script.append((OK_REPLY % e.backends["imap"].port).encode())
    with e.connect("imap") as conn:
        read_line(conn)
        assert exchange(
            conn,
            (b"a LOGIN {%d}\r\n" % len(evil_user), b"+"),
            (evil_user + b" {%d}\r\n" % len(evil_pass), b"+"),
            (evil_pass + b"\r\n", b"a "),
        ).startswith(b"a OK")
        conn.sendall(b"z LOGOUT\r\n")
        read_until_close(conn)
    login_cmds = [c for c in e.backends["imap"].commands if b"LOGIN" in c]
    assert login_cmds == [b"a LOGIN {%d}\r\n%s {%d}\r\n%s\r\n" % (len(evil_user), evil_user, len(evil_pass), evil_pass)]
    # POP3 and SMTP: the same bytes inside SASL PLAIN; the auth server accepts carol, whose password
    # has CRLF in it, so the login really goes on to the backend.
    for protocol in ("pop3", "smtp"):
        for user, password in ((evil_user, evil_pass), (b"carol", b"pw\r\nDELE 1")):
            with e.connect(protocol) as conn:
                read_line(conn)
                if protocol == "smtp":
                    exchange(conn, (b"EHLO c\r\n", b"250 "))
                exchange(conn, (b"AUTH PLAIN " + b64(b"\0" + user + b"\0" + password) + b"\r\n", b""))
    # SMTP HELO, MAIL FROM and RCPT TO with CR and NUL (method none sends MAIL and RCPT on).
    with e.connect("smtp") as conn:
        read_line(conn)
        replies = [exchange(conn, (line, b"")) for line in (
            b"EHLO a\x00b\r\n", b"EHLO a\rRSET\r\n", b"EHLO good\r\n",
            b"MAIL FROM:<a\x00b@x>\r\n", b"MAIL FROM:<a\rRSET@x>\r\n", b"MAIL FROM:<a@x>\r\n",
            b"RCPT TO:<b\x00c@x>\r\n")]
        assert replies[0].startswith(b"501") and replies[1].startswith(b"500")
    for raw, _ in e.auth.requests:
        assert_clean_request(raw)
    for protocol, backend in e.backends.items():
        for command in backend.commands:
            assert command.endswith(b"\r\n") and not command.upper().startswith((b"DELE", b"X-EVIL", b"RSET")), \
                (protocol, command)
            if protocol != "imap":
                assert command.count(b"\n") == 1 and b"\x00" not in command, (protocol, command)
    e.assert_healthy()


def test_xclient_values_escaped(edge):
    e = edge(mail="xclient on; proxy_smtp_auth off;")
    e.auth.script.append((OK_REPLY % e.backends["smtp"].port).encode())
    with e.connect("smtp") as conn:
        read_line(conn)
        exchange(conn, (b"EHLO c\r\n", b"250 "))
        assert exchange(conn, (b"AUTH PLAIN " + b64(b"\0al+ice=\x01 \xff\0pw") + b"\r\n", b"")).startswith(b"235")
    xclient = [c for c in e.backends["smtp"].commands if c.startswith(b"XCLIENT")]
    assert xclient == [b"XCLIENT ADDR=127.0.0.1 LOGIN=al+2Bice+3D+01+20+FF NAME=[UNAVAILABLE]\r\n"]
    e.assert_healthy()


def test_huge_imap_literal_allocates_nothing(edge):
    e = edge()
    worker = e.first_workers[0]
    login(e, "imap")  # warm the worker up before measuring
    before = worker_rss_kib(worker)
    for _ in range(20):
        with e.connect("imap") as conn:
            read_line(conn)
            conn.sendall(b"a LOGIN {4294967295}\r\n")
            assert read_line(conn) == b"+ OK\r\n"
            try:
                conn.sendall(b"x" * 65536)
            except ConnectionResetError:
                pass  # the proxy may hang up before our bytes are all in: that is the point
            reply = read_until_close(conn)
            assert reply in (b"", b"a BAD invalid command\r\n"), reply
    assert worker_rss_kib(worker) - before < 8 * 1024
    assert 'client sent too long command "a LOGIN ..."' in e.master.error_log()
    e.assert_healthy()


@pytest.mark.parametrize("protocol", ["imap", "pop3", "smtp"])
def test_sasl_plain_authzid_ignored(edge, protocol):
    e = edge()
    payload = b64(b"admin\0alice\0alice-secret") + b"\r\n"
    with e.connect(protocol) as conn:
        read_line(conn)
        if protocol == "imap":
            reply = exchange(conn, (b"a AUTHENTICATE PLAIN\r\n", b"+"), (payload, b"a "))
        elif protocol == "pop3":
            reply = exchange(conn, (b"AUTH PLAIN\r\n", b"+"), (payload, b""))
        else:
            reply = exchange(conn, (b"EHLO c\r\n", b"250 "), (b"AUTH PLAIN\r\n", b"334"), (payload, b""))
        assert reply.startswith((b"a OK", b"+OK", b"235")), reply
    raw, headers = e.auth.requests[-1]
    assert headers["auth-user"] == b"alice" and b"admin" not in raw
    e.assert_healthy()


INVALID = {"imap": b"x BAD invalid command\r\n", "pop3": b"-ERR invalid command\r\n", "smtp": b"500 5.5.1 Invalid command\r\n"}


@pytest.mark.parametrize("protocol", ["imap", "pop3", "smtp"])
def test_max_errors(edge, protocol):
    e = edge(mail="max_errors 3;")
    bad = b"x \x01\r\n" if protocol == "imap" else b"\x01\r\n"
    with e.connect(protocol) as conn:
        read_line(conn)
        conn.sendall(bad * 4)
        # The 3rd error still gets its reply, then the close; the 4th line is never answered.
        assert read_until_close(conn) == INVALID[protocol] * 3
    e.master.wait_log("client sent too many invalid commands")
    e.assert_healthy()
