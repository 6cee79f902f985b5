"""A one-purpose proxy process for the relay tests: accept, connect to the backend, relay.start().

It stands in for the worker so that descriptor counts and RSS are the proxy's own, not the test's.
Configuration comes as a JSON file named by the one argument; it prints `ready <port>` once listening and
`closed <json RelayResult>` per session, and answers commands on stdin, one per line:
`fds` (open descriptors, minus the pool's idle pipes), `rss` (VmRSS in KiB), `active` (running relays),
`shutdown` (close_now() on every relay, as worker_shutdown_timeout does).
"""

import json
import os
import sys

import gevent
from gevent import socket, ssl
from gevent.fileobject import FileObjectPosix

from mailproxy import relay


def say(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def main():
    with open(sys.argv[1]) as f:
        conf = json.load(f)
    backend_addr = tuple(conf["backend"])
    client_pending = bytes.fromhex(conf.get("client_pending", ""))
    backend_pending = bytes.fromhex(conf.get("backend_pending", ""))
    tls_ctx = None
    if conf.get("tls"):
        tls_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls_ctx.load_cert_chain(conf["tls"]["cert"], conf["tls"]["key"])
    running = set()

    def on_close(result):
        say("closed " + json.dumps([result.reason, result.client_to_backend, result.backend_to_client]))

    def session(client):
        backend = socket.create_connection(backend_addr)
        if tls_ctx is not None:
            client = tls_ctx.wrap_socket(client, server_side=True)
        box = []

        def closed(result):
            running.discard(box[0])
            on_close(result)

        r = relay.start(client, backend, client_pending=client_pending, backend_pending=backend_pending,
                        proxy_timeout=conf.get("proxy_timeout", 60.0),
                        proxy_buffer=conf.get("proxy_buffer", 16384),
                        client_buffer=conf.get("client_buffer", 4096), tls=tls_ctx is not None,
                        on_close=closed)
        box.append(r)
        running.add(r)

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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
                # Pool pipes are reusable capacity, not leaks; report them apart from the count.
                idle = len(relay._pool.idle)
                say("fds %d %d" % (len(os.listdir("/proc/self/fd")) - 2 * idle, idle))
            elif cmd == "rss":
                say("rss %d" % rss_kib())
            elif cmd == "active":
                say("active %d" % len(running))
            elif cmd == "shutdown":
                for r in list(running):
                    r.close_now()
                say("shutdown done")
        os._exit(0)

    gevent.spawn(accept_loop)
    say("ready %d" % listener.getsockname()[1])
    commands()


if __name__ == "__main__":
    main()
