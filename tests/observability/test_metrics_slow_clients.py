"""Issue 25 item 8: slow or numerous clients of `metrics_listen` must not keep a scraper out.

A real master serves the endpoint; the clients here are raw sockets that stall mid-request, drip a byte
a second (inside the old 5 s per-recv timeout, so only a deadline for the whole request ends them), or
come in greater number than the endpoint holds at once."""

import select
import socket
import time

from mailproxy.metrics import MetricsEndpoint  # noqa: E402

from support.harness import free_port, imap_config

PARTIAL = b"GET /metrics HTTP/1.0\r\n"  # no blank line: the request never completes
DRIP = b"GET /metrics HTTP/1.0\r\nUser-Agent: one-byte-a-second\r\n"  # incomplete however far it gets
DRIP_BYTES = int(MetricsEndpoint.TIMEOUT) + 3  # one a second: the deadline must fall inside them
# A scrape alone takes milliseconds; one held up by a slow client would wait for that client's deadline.
# Half the deadline tells the two apart with room for a busy machine.
SCRAPE_BUDGET = MetricsEndpoint.TIMEOUT / 2


def start_master(mailproxy_master, metrics_port):
    return mailproxy_master(imap_config("127.0.0.1:%d" % free_port(), main="error_log logs/error.log info;",
                                        mail="metrics_listen 127.0.0.1:%d;" % metrics_port))


def connect(port, first=b"", timeout=10.0):
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    if first:
        sock.sendall(first)
    return sock


def scrape(port):
    """One raw HTTP/1.0 scrape, read to the server's close; returns (seconds, reply)."""
    began = time.monotonic()
    with connect(port, b"GET /metrics HTTP/1.0\r\nHost: test\r\n\r\n") as sock:
        sock.settimeout(SCRAPE_BUDGET * 3)
        reply = b""
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
        except socket.timeout:
            raise AssertionError("scrape not answered in %.1f s; got %r" % (SCRAPE_BUDGET * 3, reply[:200]))
    return time.monotonic() - began, reply


def assert_prompt_scrape(port):
    seconds, reply = scrape(port)
    assert reply.startswith(b"HTTP/1.0 200 OK\r\n"), reply[:200]
    assert b"mailproxy_config_last_load_successful 1.0" in reply, reply[:500]
    assert seconds < SCRAPE_BUDGET, "scrape took %.2f s" % seconds


def closed_by_server(sock, timeout):
    """Wait for the server's close (EOF or reset); False if the connection is still open after timeout."""
    if not select.select([sock], [], [], timeout)[0]:
        return False
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_slow_clients_do_not_delay_scrapes_and_meet_the_deadline(mailproxy_master):
    metrics_port = free_port()
    master = start_master(mailproxy_master, metrics_port)
    stalled = [connect(metrics_port, PARTIAL) for _ in range(8)]
    dripper = connect(metrics_port)
    connected = time.monotonic()
    scrapes = 0
    closed_after = None
    try:
        for byte in DRIP[:DRIP_BYTES]:
            tick = time.monotonic()
            try:
                dripper.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed_after = time.monotonic() - connected
                break
            assert_prompt_scrape(metrics_port)
            scrapes += 1
            # The drip interval doubles as the wait for the server's close.
            if closed_by_server(dripper, max(0.0, tick + 1.0 - time.monotonic())):
                closed_after = time.monotonic() - connected
                break
        # Every byte came within a second, far inside a per-recv timeout: only the 5 s deadline ends it,
        # within the drip's TIMEOUT + 3 bytes (seconds), and not before it.
        assert closed_after is not None, "the dripping client was still connected after %d bytes" % DRIP_BYTES
        assert closed_after >= MetricsEndpoint.TIMEOUT - 0.5, closed_after
        assert scrapes >= 1  # each one served while the slow clients were connected
        for sock in stalled:
            assert closed_by_server(sock, MetricsEndpoint.TIMEOUT * 2), "a stalled client outlived the deadline"
        assert_prompt_scrape(metrics_port)

        # A reload that moves the endpoint stops the old thread at once, held connections and all.
        held_at = time.monotonic()
        held = connect(metrics_port, PARTIAL)
        moved_port = free_port()
        master.write_config(imap_config("127.0.0.1:%d" % free_port(), main="error_log logs/error.log info;",
                                        mail="metrics_listen 127.0.0.1:%d;" % moved_port))
        master.reload()
        assert closed_by_server(held, MetricsEndpoint.TIMEOUT * 2), "the old endpoint kept a connection"
        # Closed before its own deadline could have closed it: by the reload, which did not wait for it.
        assert time.monotonic() - held_at < MetricsEndpoint.TIMEOUT, "reload waited for the slow client"
        held.close()
        assert_prompt_scrape(moved_port)
    finally:
        for sock in stalled + [dripper]:
            sock.close()
    master.stop()
    assert "[alert]" not in master.error_log()


def test_more_connections_than_the_bound(mailproxy_master):
    metrics_port = free_port()
    master = start_master(mailproxy_master, metrics_port)
    bound = MetricsEndpoint.MAX_CONNECTIONS
    extra = 40
    flood = []
    try:
        first_at = time.monotonic()  # no connection of the flood reaches its deadline before first_at + TIMEOUT
        for number in range(bound + extra):
            try:
                flood.append(connect(metrics_port, PARTIAL, timeout=3.0))
            except socket.timeout:
                # Its SYN waited for a retransmission: the endpoint's accept queue stayed full.
                raise AssertionError("connection %d of the flood was not accepted" % number) from None
        # The oldest make room for the newest, before their deadline would have closed them.
        for sock in flood[:extra]:
            assert closed_by_server(sock, 3.0), "the endpoint held more than %d connections" % bound
        assert time.monotonic() - first_at < MetricsEndpoint.TIMEOUT
        # A scraper arriving during the flood is served; then the flood leaves and scrapes go on.
        assert_prompt_scrape(metrics_port)
        assert closed_by_server(flood[extra], 3.0), "the scrape did not displace the oldest connection"
        # Only the oldest went: the rest are held until their deadline, not reached yet.
        assert time.monotonic() - first_at < MetricsEndpoint.TIMEOUT
        assert not any(closed_by_server(sock, 0.0) for sock in flood[extra + 1:])
    finally:
        for sock in flood:
            sock.close()
    for _ in range(3):
        assert_prompt_scrape(metrics_port)
    master.stop()
    assert "[alert]" not in master.error_log()
