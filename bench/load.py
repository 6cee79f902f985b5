"""Load clients, each in its own process so that the harness's own timing is not what gets measured.

The harness process never imports gevent: children are forked from it and import gevent themselves, so
every child starts with a fresh hub. Each child reports through a pipe: "ready" once it is set up, then
its results after the shared start event. Times are CLOCK_MONOTONIC, comparable across processes.
"""

import base64
import multiprocessing
import socket
import ssl
import time

CTX = multiprocessing.get_context("fork")
LOGIN = b"a LOGIN bench secret\r\n"
PER_PROCESS_SOCKETS = 5000  # idle sessions per client process: far below the 20,000-descriptor limit


class Lines:
    """A line reader over a socket that also hands out exact byte counts."""

    def __init__(self, sock):
        self.sock, self.buf = sock, b""

    def line(self):
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line, self.buf = self.buf[:end], self.buf[end + 2:]
                return line
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed by the server after %r" % self.buf[:80])
            self.buf += data

    def tagged(self, tag):
        line = self.line()
        while not line.startswith(tag + b" "):
            line = self.line()
        if not line.startswith(tag + b" OK"):
            raise ConnectionError("server said %r" % line)


def login(sock):
    lines = Lines(sock)
    lines.line()  # the greeting: its wording differs between engines and the backend
    sock.sendall(LOGIN)
    lines.tagged(b"a")
    return lines


def _pop3_session(sock):
    """Greeting, USER, PASS, QUIT: every answer must be "+OK" (POP3 has no tags)."""
    lines = Lines(sock)
    for command in (None, b"USER bench\r\n", b"PASS secret\r\n", b"QUIT\r\n"):
        if command:
            sock.sendall(command)
        line = lines.line()
        if not line.startswith(b"+OK"):
            raise ConnectionError("server said %r" % line)


SMTP_AUTH = b"AUTH PLAIN " + base64.b64encode(b"\0bench\0secret") + b"\r\n"


def _smtp_reply(lines, code):
    """One (possibly multi-line, "250-...") SMTP reply, which must carry ``code``."""
    line = lines.line()
    while line[3:4] == b"-":
        line = lines.line()
    if not line.startswith(code):
        raise ConnectionError("server said %r" % line)


def _smtp_session(sock):
    """Greeting, EHLO, AUTH PLAIN (the proxy answers 235 once the backend took EHLO and XCLIENT), QUIT
    (answered by the backend, so the session did reach it)."""
    lines = Lines(sock)
    _smtp_reply(lines, b"220")
    sock.sendall(b"EHLO bench\r\n")
    _smtp_reply(lines, b"250")
    sock.sendall(SMTP_AUTH)
    _smtp_reply(lines, b"235")
    sock.sendall(b"QUIT\r\n")
    _smtp_reply(lines, b"221")


def _imap_session(sock):
    lines = login(sock)
    sock.sendall(b"b LOGOUT\r\n")
    lines.tagged(b"b")


SESSIONS = {"imap": _imap_session, "pop3": _pop3_session, "smtp": _smtp_session}


def _run_children(target, shares, args):
    """Start one child per share, wait until all are ready, release them together, collect results."""
    start = CTX.Event()
    children = []
    try:
        for share in shares:
            parent_end, child_end = CTX.Pipe()
            child = CTX.Process(target=target, args=(child_end, start, share) + args, daemon=True)
            child.start()
            child_end.close()
            children.append((child, parent_end))
        for _, pipe in children:
            if pipe.recv() != "ready":
                raise RuntimeError("load client failed to start")
        start.set()
        return [pipe.recv() for _, pipe in children]
    finally:
        for child, pipe in children:
            pipe.close()
            child.join(30)
            if child.is_alive():
                child.kill()
                child.join()


def split(total, parts):
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def client_context(module=ssl):
    """A TLS client context for the bench's self-signed certificates: no verification, and no session
    offered (nothing passes ``session=``), so every connection pays a full handshake. ``module``:
    gevent.ssl in gevent children, so that the handshake yields to the hub."""
    context = module.SSLContext(module.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = module.CERT_NONE
    return context


# -- login rate --------------------------------------------------------------------------------------

AUTH_REQUEST = (b"GET /auth HTTP/1.0\r\nHost: localhost\r\nAuth-Method: plain\r\nAuth-User: bench\r\n"
                b"Auth-Pass: secret\r\nAuth-Protocol: imap\r\nAuth-Login-Attempt: 1\r\n"
                b"Client-IP: 127.0.0.1\r\n\r\n")


def _ask_auth(sock):
    """One auth_http request as nginx makes it: HTTP/1.0, read to the close."""
    sock.sendall(AUTH_REQUEST)
    reply = b""
    while True:
        data = sock.recv(4096)
        if not data:
            break
        reply += data
    if b"Auth-Status: OK" not in reply:
        raise ConnectionError("auth server said %r" % reply[:80])


def _login_child(pipe, start, share, port, op, tls):
    count, concurrency = share
    import gevent
    from gevent import socket as gsocket

    latencies, errors = [], []
    if tls:
        from gevent import ssl as gssl

        context = client_context(gssl)

    def one():
        began = time.monotonic()
        sock = gsocket.create_connection(("127.0.0.1", port))
        try:
            if tls:
                sock = context.wrap_socket(sock)
            if op == "auth":
                _ask_auth(sock)
            else:
                SESSIONS[op](sock)
        finally:
            sock.close()
        latencies.append(time.monotonic() - began)

    def loop(n):
        for _ in range(n):
            try:
                one()
            except OSError as exc:
                errors.append(str(exc))

    pipe.send("ready")
    start.wait()
    began = time.monotonic()
    gevent.joinall([gevent.spawn(loop, n) for n in split(count, concurrency) if n])
    pipe.send((began, time.monotonic(), latencies, errors[:5], len(errors)))


def logins(port, total, concurrency, processes=2, op="imap", tls=False):
    """Sessions a second of protocol ``op`` ("imap", "pop3", "smtp"; or auth_http requests a second
    with op="auth") and their latency; ``tls``: each session starts with a full TLS handshake."""
    processes = min(processes, concurrency)
    shares = split(total, processes)
    conc = split(concurrency, processes)
    results = _run_children(_login_child, list(zip(shares, conc)), (port, op, tls))
    began = min(r[0] for r in results)
    ended = max(r[1] for r in results)
    latencies = sorted(x for r in results for x in r[2])
    failed = sum(r[4] for r in results)
    if not latencies:
        raise RuntimeError("no login succeeded: %s" % [r[3] for r in results])
    return {
        "rate": len(latencies) / (ended - began),
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "failed": failed,
        "errors": [e for r in results for e in r[3]][:3],
    }


# -- relay throughput --------------------------------------------------------------------------------

def _stream_child(pipe, start, nbytes, port, direction, tls):
    sock = socket.create_connection(("127.0.0.1", port))
    try:
        if tls:
            sock = client_context().wrap_socket(sock)
        lines = login(sock)
        pipe.send("ready")
        start.wait()
        began = time.monotonic()
        if direction == "down":
            sock.sendall(b"x STREAM %d\r\n" % nbytes)
            tail = b"x OK\r\n"
            want = nbytes + len(tail) - len(lines.buf)
            scratch = memoryview(bytearray(1 << 20))
            while want > 0:
                got = sock.recv_into(scratch)
                if not got:
                    raise ConnectionError("stream cut with %d bytes to go" % want)
                want -= got
        else:
            sock.sendall(b"x SINK %d\r\n" % nbytes)
            if lines.line() != b"+ go":
                raise ConnectionError("no continuation for SINK")
            chunk = memoryview(b"y" * (1 << 20))
            left = nbytes
            while left:
                left -= sock.send(chunk[: min(left, len(chunk))])
            lines.tagged(b"x")
        pipe.send((began, time.monotonic()))
    finally:
        sock.close()


def streams(port, count, nbytes, direction, tls=False):
    """MB/s (10^6 bytes a second) of ``count`` parallel streams of ``nbytes`` each; ``tls``: the client
    speaks TLS from the first byte."""
    results = _run_children(_stream_child, [nbytes] * count, (port, direction, tls))
    wall = max(r[1] for r in results) - min(r[0] for r in results)
    return {"mbps": count * nbytes / wall / 1e6}


# -- idle sessions -----------------------------------------------------------------------------------

def _idle_child(pipe, start, count, port):
    import gevent
    from gevent import socket as gsocket

    held, errors = [], []

    def opener(n):
        for _ in range(n):
            try:
                sock = gsocket.create_connection(("127.0.0.1", port))
                login(sock)
                held.append(sock)
            except OSError as exc:
                errors.append(str(exc))

    pipe.send("ready")
    start.wait()
    gevent.joinall([gevent.spawn(opener, n) for n in split(count, 50) if n])
    pipe.send((len(held), errors[:3]))
    pipe.recv()  # held until the harness has measured the engine
    for sock in held:
        sock.close()


class IdleSessions:
    """Hold ``total`` authenticated sessions open across processes until closed."""

    def __init__(self, port, total):
        parts = max(1, -(-total // PER_PROCESS_SOCKETS))
        self.start = CTX.Event()
        self.children = []
        for share in split(total, parts):
            parent_end, child_end = CTX.Pipe()
            child = CTX.Process(target=_idle_child, args=(child_end, self.start, share, port),
                                daemon=True)
            child.start()
            child_end.close()
            self.children.append((child, parent_end))

    def open(self):
        for _, pipe in self.children:
            pipe.recv()
        self.start.set()
        results = [pipe.recv() for _, pipe in self.children]
        return sum(r[0] for r in results), [e for r in results for e in r[1]]

    def close(self):
        for child, pipe in self.children:
            try:
                pipe.send("release")
            except OSError:
                pass  # the child already died; join/kill below still reaps it
            pipe.close()
        for child, _ in self.children:
            child.join(60)
            if child.is_alive():
                child.kill()
                child.join()
