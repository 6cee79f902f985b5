#!/usr/bin/env python3
"""Relay throughput, CPU cost and idle footprint of mailproxy.relay (not a test; prints numbers).

    python bench/relay_throughput.py                       # 1 x 1 GiB, 8 x 128 MiB, 5,000 idle sessions
    python bench/relay_throughput.py --relay copy          # the user-space relay (TLS/EINVAL path)
    python bench/relay_throughput.py --relay floor         # blocking splice threads, no event loop
    python bench/relay_throughput.py --pipe-size 65536 --skip-idle
    python bench/relay_throughput.py --tls backend         # TLS to the backend (client, both): copy path

A relay process (this script with `_serve`) stands in for a worker: it accepts a client, connects to the
backend and calls relay.start(), exactly as the session does after a login. The backend streams the
payload and closes; the client reads to EOF. MB/s is payload over wall time; CPU-s/GiB is the relay
process's own rusage (user + system) over the run, so the load generator's cost is excluded.

`--relay floor` answers "hub-driven or a C loop of our own?": it relays with blocking os.splice() in a
thread per direction and no event loop at all, which is the cost of the kernel work alone. If the
hub-driven relay is close to the floor, a private event loop has nothing left to win.
"""

import argparse
import os
import resource
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 1 << 30
MiB = 1 << 20


# -- relay process ------------------------------------------------------------------------------

def serve(backend_port, relay_kind, pipe_size):
    if relay_kind == "copy":
        os.environ["MAILPROXY_NO_SPLICE"] = "1"
    sys.path.insert(0, ROOT)
    import gevent
    from gevent import socket as gsocket

    from mailproxy import relay

    if pipe_size:
        relay._pool.size = pipe_size
    wakeups = [0]
    if relay.SPLICE_AVAILABLE:
        # Count pump calls: with the CPU figures this bounds what a C event loop could save (it would
        # remove the Python callback around each call, not the system calls inside it).
        real_pump = relay._splice.pump

        def counting_pump(*a):
            wakeups[0] += 1
            return real_pump(*a)

        relay._splice.pump = counting_pump
    active = [0]

    def on_close(result):
        active[0] -= 1

    tls_mode = os.environ.get("BENCH_TLS", "none")
    if tls_mode != "none":
        from gevent import ssl as gssl

        server_ctx, client_ctx = tls_contexts()

    def session(client):
        backend = gsocket.create_connection(("127.0.0.1", backend_port))
        active[0] += 1
        # The handshakes happen here as in a session: the relay gets sockets with TLS already up.
        if tls_mode in ("client", "both"):
            client = gssl.SSLSocket(sock=client, server_side=True, _context=server_ctx)
        if tls_mode in ("backend", "both"):
            backend = gssl.SSLSocket(sock=backend, server_side=False, _context=client_ctx)
        relay.start(client, backend, client_pending=b"", backend_pending=b"", proxy_timeout=3600.0,
                    proxy_buffer=16384, client_buffer=16384, tls=tls_mode in ("client", "both"),
                    backend_tls=tls_mode in ("backend", "both"), on_close=on_close)

    def floor_session(client):
        # Blocking kernel-to-kernel copies, no event loop: the cost of the work itself.
        backend = socket.create_connection(("127.0.0.1", backend_port))
        client = socket.socket(fileno=client.detach())
        client.setblocking(True)
        active[0] += 1

        def one_way(src, dst):
            r, w = os.pipe()
            import fcntl
            fcntl.fcntl(w, 1031, pipe_size or 256 * 1024)  # F_SETPIPE_SZ
            while True:
                n = os.splice(src.fileno(), w, 1 << 20)
                if n == 0:
                    break
                while n:
                    n -= os.splice(r, dst.fileno(), n)
            os.close(r)
            os.close(w)
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # the other direction already shut it down
            active[0] -= 1

        threading.Thread(target=one_way, args=(backend, client), daemon=True).start()

    listener = gsocket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)

    def accept_loop():
        handler = floor_session if relay_kind == "floor" else session
        while True:
            client, _ = listener.accept()
            gevent.spawn(handler, client)

    gevent.spawn(accept_loop)
    print("ready %d" % listener.getsockname()[1], flush=True)
    from gevent.fileobject import FileObjectPosix

    for line in FileObjectPosix(sys.stdin.fileno(), "rb"):
        cmd = line.strip().decode()
        if cmd == "cpu":
            ru = resource.getrusage(resource.RUSAGE_SELF)
            print("cpu %.6f" % (ru.ru_utime + ru.ru_stime), flush=True)
        elif cmd == "rss":
            with open("/proc/self/status") as f:
                rss = next(int(x.split()[1]) for x in f if x.startswith("VmRSS:"))
            print("rss %d" % rss, flush=True)
        elif cmd == "pumps":
            print("pumps %d" % wakeups[0], flush=True)
        elif cmd == "active":
            print("active %d" % active[0], flush=True)


class RelayProcess:
    def __init__(self, backend_port, relay_kind, pipe_size):
        argv = [sys.executable, os.path.abspath(__file__), "_serve", str(backend_port), relay_kind, str(pipe_size)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.port = int(self._reply("ready"))

    def _reply(self, head):
        line = self.proc.stdout.readline()
        if not line.startswith(head + " "):
            raise SystemExit("relay process said %r, expected %s" % (line, head))
        return line.split()[1]

    def ask(self, cmd):
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._reply(cmd)

    def close(self):
        self.proc.stdin.close()
        self.proc.terminate()
        self.proc.wait()


# -- load generator -----------------------------------------------------------------------------

class Backend:
    """Accepts connections; each streams `size` bytes and closes (or, with size None, just stays)."""

    def __init__(self):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4096)
        self.port = self.listener.getsockname()[1]
        self.size = None
        self.held = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            conn, _ = self.listener.accept()
            if self.size is None:
                self.held.append(conn)
            else:
                threading.Thread(target=self._stream, args=(conn, self.size), daemon=True).start()

    def _stream(self, conn, size):
        left = size
        if TLS in ("backend", "both"):
            conn = tls_contexts()[0].wrap_socket(conn, server_side=True)
        with conn:
            if GEN == "copy" or TLS in ("backend", "both"):
                block = memoryview(os.urandom(MiB))
                while left:
                    left -= conn.send(block[:min(left, MiB)])
                return
            # sendfile from a memfd: the generator costs next to no CPU, so on a small host the
            # numbers describe the relay rather than the load generator.
            while left:
                n = min(left, SOURCE_SIZE)
                off = 0
                while off < n:
                    off += os.sendfile(conn.fileno(), source_fd(), off, n - off)
                left -= n


GEN = "zero"
TLS = "none"


def tls_contexts():
    """(server, client) contexts from the certificate main() made; TLS 1.3, OpenSSL's default cipher."""
    import ssl

    folder = os.environ["BENCH_TLS_DIR"]
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem"))
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    return server, client
SOURCE_SIZE = 64 * MiB
_source = []


def source_fd():
    if not _source:
        fd = os.memfd_create("relay-bench-source")
        block = os.urandom(MiB)
        for _ in range(SOURCE_SIZE // MiB):
            os.write(fd, block)
        _source.append(fd)
    return _source[0]


def sink(port, expect, out):
    got = 0
    with socket.create_connection(("127.0.0.1", port)) as s:
        if TLS in ("client", "both"):
            s = tls_contexts()[1].wrap_socket(s)
        if GEN == "copy" or TLS in ("client", "both"):
            buf = bytearray(MiB)
            while True:
                n = s.recv_into(buf)
                if not n:
                    break
                got += n
        else:
            r, w = os.pipe()
            null = os.open(os.devnull, os.O_WRONLY)
            try:
                while True:
                    n = os.splice(s.fileno(), w, MiB)
                    if not n:
                        break
                    got += n
                    while n:
                        n -= os.splice(r, null, n)
            finally:
                for fd in (r, w, null):
                    os.close(fd)
    out.append(got == expect)


def stream(relay, backend, sessions, size):
    backend.size = size
    pumps0 = int(relay.ask("pumps"))
    cpu0 = float(relay.ask("cpu"))
    t0 = time.perf_counter()
    results = []
    threads = [threading.Thread(target=sink, args=(relay.port, size, results)) for _ in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    cpu = float(relay.ask("cpu")) - cpu0
    total = sessions * size
    stream.pumps_per_gib = (int(relay.ask("pumps")) - pumps0) / (total / GiB)
    if not all(results) or len(results) != sessions:
        raise SystemExit("short transfer: %r" % results)
    return total / wall / 1e6, cpu / (total / GiB), wall


def idle_footprint(relay, backend, count):
    backend.size = None
    clients = []
    warm = socket.create_connection(("127.0.0.1", relay.port))
    wait_active(relay, 1)
    base = int(relay.ask("rss"))
    # Batches of 100, so that the login-phase greenlets of a burst (freed, but not handed back to the
    # OS) do not pass for the cost of sessions that are already relaying.
    while len(clients) < count:
        for _ in range(min(100, count - len(clients))):
            clients.append(socket.create_connection(("127.0.0.1", relay.port)))
        wait_active(relay, len(clients) + 1)
    rss = int(relay.ask("rss"))
    for c in clients + [warm]:
        c.close()
    for c in backend.held:
        c.close()
    backend.held.clear()
    return (rss - base) * 1024 / count


def wait_active(relay, n):
    deadline = time.monotonic() + 60
    while int(relay.ask("active")) < n:  # each ask is a round trip through the relay's own loop
        if time.monotonic() > deadline:
            raise SystemExit("relay never reached %d active sessions" % n)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "_serve":
        serve(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--relay", choices=["splice", "copy", "floor"], default="splice")
    ap.add_argument("--pipe-size", type=int, default=0, help="pool pipe size (default: relay.PIPE_SIZE)")
    ap.add_argument("--big", type=int, default=GiB, help="bytes for the single session")
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--each", type=int, default=128 * MiB, help="bytes per parallel session")
    ap.add_argument("--idle", type=int, default=5000)
    ap.add_argument("--skip-idle", action="store_true")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--gen", choices=["zero", "copy"], default="zero",
                    help="load generator: sendfile/splice (default) or send/recv_into from memory")
    ap.add_argument("--tls", choices=["none", "client", "backend", "both"], default="none",
                    help="which relay sides speak TLS (the load generator terminates the other end)")
    args = ap.parse_args()
    global GEN, TLS
    GEN = args.gen
    TLS = args.tls
    if TLS != "none":
        import tempfile

        import trustme

        folder = tempfile.mkdtemp(prefix="relay-bench-tls")
        cert = trustme.CA().issue_cert("127.0.0.1")
        cert.cert_chain_pems[0].write_to_path(os.path.join(folder, "cert.pem"))
        cert.private_key_pem.write_to_path(os.path.join(folder, "key.pem"))
        os.environ["BENCH_TLS_DIR"] = folder
        os.environ["BENCH_TLS"] = TLS
        args.skip_idle = True
    source_fd()

    backend = Backend()
    relay = RelayProcess(backend.port, args.relay, args.pipe_size)
    try:
        label = "%s pipe=%s gen=%s tls=%s" % (args.relay, args.pipe_size or "default", args.gen, args.tls)
        for _ in range(args.repeat):
            mbs, cpu, wall = stream(relay, backend, 1, args.big)
            print("%-32s 1 x %4d MiB: %8.0f MB/s  %.3f CPU-s/GiB  (%.2f s, %d pump calls/GiB)"
                  % (label, args.big >> 20, mbs, cpu, wall, stream.pumps_per_gib))
            mbs, cpu, wall = stream(relay, backend, args.parallel, args.each)
            print("%-32s %d x %4d MiB: %8.0f MB/s  %.3f CPU-s/GiB  (%.2f s, %d pump calls/GiB)"
                  % (label, args.parallel, args.each >> 20, mbs, cpu, wall, stream.pumps_per_gib))
        if not args.skip_idle and args.relay != "floor":
            per = idle_footprint(relay, backend, args.idle)
            print("%-32s idle: %.0f bytes RSS per relayed session (%d sessions)" % (label, per, args.idle))
    finally:
        relay.close()


if __name__ == "__main__":
    main()
