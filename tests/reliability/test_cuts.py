"""A client hanging up after every byte of each protocol's login transcript (issue 10).

Each transcript is replayed once per cut position: the lines before the cut are sent and answered, the
bytes up to the cut are sent, and the client leaves (FIN on even cuts, RST on odd ones). Cuts right after
the login line leave while the proxy is talking to the auth server or logging in to the backend. The
worker must end every one of these sessions without an alert and without keeping a descriptor.
"""

import base64
import socket
import struct

import pytest

from support.harness import wait_for
from support.peers import read_line, read_reply, worker_fds


def b64(data):
    return base64.b64encode(data)


TRANSCRIPTS = {
    "imap": [
        (b"a1 CAPABILITY\r\n", b"a1 "),
        (b"a2 AUTHENTICATE PLAIN\r\n", b"+"),
        (b64(b"\0alice\0alice-secret") + b"\r\n", b"a2 OK"),
        (b"a3 LOGOUT\r\n", b"a3 OK"),
    ],
    "pop3": [
        (b"CAPA\r\n", b".\r\n"),
        (b"USER alice\r\n", b"+OK"),
        (b"PASS alice-secret\r\n", b"+OK"),
        (b"QUIT\r\n", b"+OK"),
    ],
    "smtp": [
        (b"EHLO client.example\r\n", b"250 "),
        (b"AUTH LOGIN\r\n", b"334"),
        (b64(b"alice") + b"\r\n", b"334"),
        (b64(b"alice-secret") + b"\r\n", b"235"),
        (b"QUIT\r\n", b"221"),
    ],
}


def replay_cut(edge, protocol, cut):
    conn = edge.connect(protocol)
    if cut % 2:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with conn:
        assert read_line(conn)
        left = cut
        for line, expected in TRANSCRIPTS[protocol]:
            if left < len(line):
                conn.sendall(line[:left])
                return
            conn.sendall(line)
            left -= len(line)
            assert read_reply(conn, expected).startswith(expected), (protocol, cut, line)


@pytest.mark.parametrize("protocol", ["imap", "pop3", "smtp"])
def test_hang_up_after_every_byte(edge, protocol):
    e = edge()
    worker = e.first_workers[0]
    # One full session first: the hub's poller and the relay's pipe pool open lazily and stay.
    replay_cut(e, protocol, 10 ** 6)
    baseline = worker_fds(worker)
    total = sum(len(line) for line, _ in TRANSCRIPTS[protocol])
    for cut in range(total + 1):
        replay_cut(e, protocol, cut)
    # Sessions cut during the auth request or the backend login end on their own; nothing may stay open.
    wait_for(lambda: worker_fds(worker) <= baseline, timeout=10, what="the worker's descriptors back to baseline")
    log = e.master.error_log()
    assert "session failed" not in log
    assert e.master.error_log().count("client logged in") >= 1
    e.assert_healthy(protocol=protocol)
