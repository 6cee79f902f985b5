"""A proxy process for the TLS relay tests: TLS towards the client, the backend, or both.

Like proxyproc.py (which it mirrors: JSON configuration file as the one argument, `closed <json>` per
session, `fds`/`rss`/`active` on stdin) but the backend side can speak TLS too, as `proxy_ssl on`
makes a worker's: the handshake with the backend is done before relay.start(), as session.py does.
It prints `ready <port> <engine>`, engine "pump" when relay.py relays TLS through the TLS pump of the
OpenSSL bridge, "copy" when through the Python copy loop (MAILPROXY_TLS_PUMP=off).
"""

import json
import os
import sys

import gevent
from gevent import socket, ssl
from gevent.fileobject import FileObjectPosix

from mailproxy import relay

from support.proxyproc import rss_kib, say

WAIT = 60.0


def main():
    with open(sys.argv[1]) as f:
        conf = json.load(f)
    backend_addr = tuple(conf["backend"])
    client_ctx = backend_ctx = None
    if conf.get("client_tls"):
        client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        client_ctx.load_cert_chain(conf["client_tls"]["cert"], conf["client_tls"]["key"])
        if conf["client_tls"].get("max_version") == "TLSv1.2":
            client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if conf.get("backend_tls"):
        # gevent's SSLContext: ssl.create_default_context() is the standard library's, whose sockets
        # would block the hub.
        backend_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        backend_ctx.load_verify_locations(conf["backend_tls"]["ca"])
    running = set()

    def session(client):
        try:
            # Wrapped as session.py and tls/upstream.py wrap: with a timeout set, handshake, no timeout.
            backend = socket.create_connection(backend_addr, timeout=WAIT)
            if backend_ctx is not None:
                backend = ssl.SSLSocket(sock=backend, server_side=False, do_handshake_on_connect=False,
                                        _context=backend_ctx, server_hostname="localhost")
                backend.do_handshake()
            if client_ctx is not None:
                client.settimeout(WAIT)
                client = ssl.SSLSocket(sock=client, server_side=True, do_handshake_on_connect=False,
                                       _context=client_ctx)
                client.do_handshake()
            client.settimeout(None)
            backend.settimeout(None)
        except OSError as exc:
            # A test peer that fails its handshake on purpose; the test reads this line.
            say("handshake " + json.dumps(str(exc)))
            client.close()
            return
        box = []

        def closed(result):
            running.discard(box[0])
            say("closed " + json.dumps([result.reason, result.client_to_backend, result.backend_to_client]))

        r = relay.start(client, backend, client_pending=bytes.fromhex(conf.get("client_pending", "")),
                        backend_pending=bytes.fromhex(conf.get("backend_pending", "")),
                        proxy_timeout=conf.get("proxy_timeout", 60.0),
                        proxy_buffer=conf.get("proxy_buffer", 16384),
                        client_buffer=conf.get("client_buffer", 4096), tls=client_ctx is not None,
                        backend_tls=backend_ctx is not None, on_close=closed)
        box.append(r)
        running.add(r)

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)

    def accept_loop():
        while True:
            client, _ = listener.accept()
            gevent.spawn(session, client)

    def commands():
        stdin = FileObjectPosix(sys.stdin.fileno(), "rb")
        for line in stdin:
            cmd = line.strip().decode()
            if cmd == "fds":
                say("fds %d" % len(os.listdir("/proc/self/fd")))
            elif cmd == "rss":
                say("rss %d" % rss_kib())
            elif cmd == "active":
                say("active %d" % len(running))
        os._exit(0)

    gevent.spawn(accept_loop)
    say("ready %d %s" % (listener.getsockname()[1], "pump" if relay.TLS_PUMP_AVAILABLE else "copy"))
    commands()


if __name__ == "__main__":
    main()
