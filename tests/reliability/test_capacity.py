"""Capacity faults (issue 10): more clients than worker_connections, and running out of descriptors."""

import errno
import resource
import selectors
import socket
import time

from support.peers import Bystander, read_line, worker_fds
from support.procstate import Watch

FULL = "worker_connections are not enough"


def raise_nofile(wanted):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


def storm(port, count, deadline):
    """`count` IMAP clients connecting at once, each sending LOGOUT as soon as it is connected (so a
    connection the kernel dropped from a full accept queue is answered by a reset rather than left
    waiting) and reading to EOF, multiplexed on one selector. Returns (completed, failed, unfinished)."""
    sel = selectors.DefaultSelector()
    completed = failed = 0
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        code = sock.connect_ex(("127.0.0.1", port))
        assert code in (0, errno.EINPROGRESS), code
        sel.register(sock, selectors.EVENT_WRITE, [b""])
    while sel.get_map() and time.monotonic() < deadline:
        for key, events in sel.select(timeout=1.0):
            sock, state = key.fileobj, key.data
            chunk = None
            try:
                if events & selectors.EVENT_WRITE:
                    sock.send(b"a LOGOUT\r\n")
                    sel.modify(sock, selectors.EVENT_READ, state)
                    continue
                chunk = sock.recv(4096)
            except (ConnectionResetError, ConnectionRefusedError, BrokenPipeError):
                chunk = None
            if chunk:
                state[0] += chunk
                continue
            if chunk == b"" and state[0].startswith(b"* OK") and b"a OK" in state[0]:
                completed += 1
            else:
                failed += 1
            sel.unregister(sock)
            sock.close()
    unfinished = len(sel.get_map())
    for key in list(sel.get_map().values()):
        key.fileobj.close()
    sel.close()
    return completed, failed, unfinished


def test_5000_connections_against_worker_connections_1000(edge):
    raise_nofile(12000)
    e = edge(connections=1000)
    held = [Bystander(e, p) for p in ("imap", "pop3", "smtp")]
    started = time.monotonic()
    completed, failed, unfinished = storm(e.ports["imap"], 5000, started + 60)
    print("5000 clients: %d served, %d refused/reset, %d unanswered, %.1fs"
          % (completed, failed, unfinished, time.monotonic() - started))
    # Beyond the limit clients wait in the backlog (or are refused by the kernel): never a crash.
    assert unfinished == 0
    assert completed + failed == 5000
    assert completed >= 1000, (completed, failed)
    for one in held:
        one.finish()
    assert FULL in e.master.error_log()  # the limit was really reached
    assert "session failed" not in e.master.error_log()
    e.assert_healthy(allowed=(FULL,))


def test_descriptor_exhaustion_backs_off_and_recovers(edge):
    e = edge(main="worker_rlimit_nofile 64;")
    worker = e.first_workers[0]
    held, ungreeted = [], []
    emfile = "accept4() failed (24: Too many open files)"
    # Fill the worker's table with idle pre-auth sessions until an accept fails.
    while emfile not in e.master.error_log():
        assert len(held) < 200, e.master.error_log()[-3000:]
        conn = e.connect("imap")
        conn.settimeout(2)
        try:
            assert read_line(conn).startswith(b"* OK")
            held.append(conn)
        except socket.timeout:
            ungreeted.append(conn)  # not accepted (yet): the log tells why
    waiting = [e.connect("imap") for _ in range(20)]
    # While out of descriptors the accept loop must back off, not spin: over 2 s the worker is asleep
    # whenever looked at, and wakes for its backoff retries (doubling from 10 ms up to 1 s), not hundreds
    # of times. (A spinning loop is runnable in every sample; one retrying every 10 ms wakes 200 times.)
    watch = Watch(worker)
    for _ in range(20):
        time.sleep(0.1)  # pacing the samples, not synchronising
        watch.sample()
    assert watch.asleep_share() >= 0.5, watch.samples
    assert watch.wakeups() < 50, "the accept loop woke %d times in 2 s" % watch.wakeups()
    for conn in held[:40]:
        conn.close()
    # Recovery: the queued clients are accepted and greeted once descriptors are free again.
    for conn in ungreeted + waiting:
        conn.settimeout(10)
        assert read_line(conn).startswith(b"* OK")
        conn.sendall(b"a LOGOUT\r\n")
        assert b"a OK" in conn.recv(4096) + conn.recv(4096)
        conn.close()
    for conn in held[40:]:
        conn.close()
    assert worker_fds(worker) <= 64
    e.assert_healthy(protocol="imap")
