"""A session that ends is freed at once, by reference counting: it leaves no reference cycle behind.

A cycle (a session keeping a bound method of itself, say) keeps the session, its sockets' objects, its
relay and their buffers alive until the next collection, which then has to walk them all: measured
under callgrind at c=10, one collection every 50 logins, 14,600 instructions a login. The sessions here
are mailproxy's own, run by a real worker against real peers; only a probe listener is added, a Unix
socket whose connections answer how many objects the collector found unreachable since the last probe,
with automatic collection off in between."""

import gc
import socket

from mailproxy import session

HANDLER = "reliability.test_no_cycles:session_or_probe"


def session_or_probe(sock, peer, listen, server, worker):
    if listen.family != socket.AF_UNIX:
        session.handle(sock, peer, listen, server, worker)
        return
    gc.disable()  # from the first probe on, only a probe collects
    found = gc.collect()
    sock.sendall(b"%d\n" % found)
    sock.close()


def probe(path):
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(10)
        conn.connect(path)
        data = b""
        while not data.endswith(b"\n"):
            chunk = conn.recv(64)
            assert chunk, "the probe closed without an answer"
            data += chunk
    return int(data)


def test_ended_sessions_leave_nothing_to_collect(edge, tmp_path):
    from support.harness import free_port
    from support.peers import login, read_line
    from support.pki import Pki

    pki = Pki(str(tmp_path))
    path = str(tmp_path / "probe.sock")
    imaps = free_port()
    one = edge(
        mail="""
        server { listen unix:%s; protocol imap; }
        server { listen 127.0.0.1:%d ssl; protocol imap; ssl_certificate %s; ssl_certificate_key %s; }
        """ % (path, imaps, pki["server.pem"], pki["server.key"]),
        modes={"smtp": "bad_greeting"},
        handler=HANDLER,
    )
    client_tls = pki.client_context()
    probe(path)  # the baseline: whatever boot and the first accepts left
    for _ in range(5):
        # Logged in and relayed, then the client leaves (the relay ends the session).
        assert login(one, "imap").startswith(b"f1 OK")
        assert login(one, "pop3").startswith(b"+OK")
        # Over TLS from the first byte: logged in, relayed, left.
        with client_tls.wrap_socket(socket.create_connection(("127.0.0.1", imaps), timeout=10),
                                    server_hostname="localhost") as conn:
            assert read_line(conn).startswith(b"* OK")
            conn.sendall(b"f1 LOGIN alice alice-secret\r\n")
            assert read_line(conn).startswith(b"f1 OK")
        # The backend refuses to greet after the auth server said OK: the session ends before any relay.
        assert not login(one, "smtp").startswith(b"235")
        # Refused by the auth server.
        assert b"NO" in login(one, "imap", password=b"wrong")
        # Gone before logging in: the session ends on EOF.
        with one.connect("imap") as conn:
            assert read_line(conn)
        # Gone in the middle of a command.
        with one.connect("pop3") as conn:
            assert read_line(conn)
            conn.sendall(b"USER al")
    # The sessions above have all ended once a later one is served: one worker, whose loop takes the
    # clients' closes before this session's steps.
    assert login(one, "pop3").startswith(b"+OK")
    assert probe(path) == 0
    one.assert_healthy()
