"""Hostile TLS clients (issue 25 items 6, 7 and 10), each against a real mailproxy master and a real
Dovecot: what a client said in clear before STARTTLS, resets in the middle of STARTTLS, and records
that fail to decrypt, before the login and in the relay."""

import os
import socket
import struct

import pytest

from support.authserver import RecordingAuthServer
from support.backends import USERS, wait_for_log
from support.harness import free_port, mail_config

SERVERS = ("imap", "imaps", "pop3", "smtp")


@pytest.fixture
def edge(pki, dovecot, mailproxy_master):  # noqa: F811
    auth = RecordingAuthServer(USERS, {"imap": ("127.0.0.1", dovecot.imap_port),
                                       "pop3": ("127.0.0.1", dovecot.pop3_port)})
    ports = {name: free_port() for name in SERVERS}
    config = mail_config(auth.url, """
    %s
    server { listen 127.0.0.1:%d; protocol imap; starttls on; imap_client_id on; }
    server { listen 127.0.0.1:%d ssl; protocol imap; }
    server { listen 127.0.0.1:%d; protocol pop3; starttls on; }
    server { listen 127.0.0.1:%d; protocol smtp; starttls on; }
}
""" % ((pki.tls_directives(),) + tuple(ports[name] for name in SERVERS)), timeout="10s")
    master = mailproxy_master(config, handler=None)
    edge = type("Edge", (), {})()
    edge.ports, edge.auth, edge.master, edge.pki, edge.dovecot = ports, auth, master, pki, dovecot
    yield edge
    auth.close()
    assert "[alert]" not in master.error_log()


def read_until(sock, end):
    data = b""
    while end not in data:
        piece = sock.recv(4096)
        assert piece, data
        data += piece
    return data


def test_id_sent_in_clear_is_forgotten_at_starttls(edge):
    """A man in the middle adds an ID before STARTTLS: neither the auth server nor Dovecot hears it."""
    with socket.create_connection(("127.0.0.1", edge.ports["imap"]), timeout=10) as raw:
        read_until(raw, b"\r\n")
        raw.sendall(b'a ID ("name" "injected-in-clear" "version" "6.6.6")\r\n')
        read_until(raw, b"a OK ID completed\r\n")
        raw.sendall(b"b STARTTLS\r\n")
        read_until(raw, b"b OK")
        conn = edge.pki.client_context().wrap_socket(raw, server_hostname="localhost")
        conn.sendall(b'c LOGIN alice "%s"\r\n' % USERS["alice"].encode())
        assert b"c OK" in read_until(conn, b"c ")
        conn.sendall(b"d LOGOUT\r\n")
        read_until(conn, b"d OK")
        conn.close()
    headers = edge.auth.requests[-1][1]
    assert "auth-imap-id" not in headers, headers
    log = wait_for_log(edge.dovecot.log_path, "Login: user=<alice>")
    assert "injected-in-clear" not in log


def reset(sock):
    # SO_LINGER with a zero timeout: close() sends RST instead of FIN.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


CLIENT_HELLO_START = bytes.fromhex("16030100f4010000f00303") + os.urandom(32)

STARTTLS = {"imap": (b"a STARTTLS\r\n", b"a OK"), "pop3": (b"STLS\r\n", b"+OK"),
            "smtp": (b"EHLO x\r\nSTARTTLS\r\n", b"220 2.0.0")}


@pytest.mark.parametrize("protocol", sorted(STARTTLS))
def test_reset_during_starttls_is_not_an_alert(edge, protocol):
    """Resets at every point around STARTTLS, with and without bytes of a handshake queued: the
    session ends as a failed handshake does (info), never as `[alert] session failed`."""
    command, answer = STARTTLS[protocol]
    for attempt in range(200):
        raw = socket.create_connection(("127.0.0.1", edge.ports[protocol]), timeout=10)
        read_until(raw, b"\r\n")
        if attempt % 4 == 0:
            raw.sendall(command + CLIENT_HELLO_START)
        elif attempt % 4 == 1:
            raw.sendall(command)
        else:
            raw.sendall(command)
            read_until(raw, answer)
            if attempt % 4 == 3:
                raw.sendall(CLIENT_HELLO_START)
        reset(raw)
    # A last session proves the worker serves; the log is read once it has been written.
    with socket.create_connection(("127.0.0.1", edge.ports[protocol]), timeout=10) as raw:
        read_until(raw, b"\r\n")
    log = edge.master.error_log()
    assert "[alert]" not in log and "session failed" not in log, [
        line for line in log.splitlines() if "[alert]" in line][:5]


def bad_record(conn):
    """An application-data record of random bytes on the raw socket under the TLS connection."""
    os.write(conn.fileno(), b"\x17\x03\x03\x00\x40" + os.urandom(64))


def drain(conn):
    try:
        while conn.recv(4096):
            pass
    except OSError:
        pass  # the proxy's alert or reset: the connection is over either way


def logged(master, text):
    master.wait_log(text)
    return [line for line in master.error_log().splitlines() if text in line][-1]


def test_bad_record_before_login_logs_openssl_reason(edge):
    with socket.create_connection(("127.0.0.1", edge.ports["imaps"]), timeout=10) as raw:
        conn = edge.pki.client_context().wrap_socket(raw, server_hostname="localhost")
        read_until(conn, b"\r\n")
        bad_record(conn)
        drain(conn)
    line = logged(edge.master, "SSL_read() failed (SSL: ")
    assert "Operation not permitted" not in edge.master.error_log()
    assert "bad record mac" in line or "decryption failed" in line, line


def test_bad_record_in_the_relay_logs_openssl_reason(edge):
    with socket.create_connection(("127.0.0.1", edge.ports["imaps"]), timeout=10) as raw:
        conn = edge.pki.client_context().wrap_socket(raw, server_hostname="localhost")
        read_until(conn, b"\r\n")
        conn.sendall(b'a LOGIN bob "%s"\r\n' % USERS["bob"].encode())
        assert b"a OK" in read_until(conn, b"a ")
        bad_record(conn)
        drain(conn)
    line = logged(edge.master, "SSL_read() failed (SSL: ")
    assert "bad record mac" in line or "decryption failed" in line, line
    assert "Operation not permitted" not in edge.master.error_log()
