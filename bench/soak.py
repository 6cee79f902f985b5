"""Soak: mixed IMAP/POP3/SMTP logins through mailproxy with a reload every N seconds for M minutes,
then a check that the engine (master + current workers) keeps a flat RSS and descriptor count.

    python bench/soak.py --minutes 3 --reload-every 10 --clients 12

Run by hand (not part of the test suite). Backends are the reliability tests' scripted fakes and the
auth server is tests/support/authserver.py's RecordingAuthServer, all in this process on threads. Figures are
taken once the load warmed up and again at the end, each after old workers drained; exit status 1 if
RSS grew more than 25% (+8 MiB slack) or descriptors grew at all.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the test suite's peers (tests/support/)

from support import harness as testing  # noqa: E402
from support.authserver import RecordingAuthServer  # noqa: E402
from support.peers import CONFIG, USERS, Bystander, FakeBackend, worker_fds, worker_rss_kib  # noqa: E402


class Engine:
    def __init__(self, workers):
        self.prefix = tempfile.mkdtemp(prefix="soak")
        os.makedirs(os.path.join(self.prefix, "logs"))
        self.backends = {p: FakeBackend(p) for p in ("imap", "pop3", "smtp")}
        self.auth = RecordingAuthServer(USERS, {p: ("127.0.0.1", b.port) for p, b in self.backends.items()})
        self.ports = {p: testing.free_port() for p in ("imap", "pop3", "smtp")}
        self.conf = os.path.join(self.prefix, "mailproxy.conf")
        with open(self.conf, "w") as handle:
            handle.write(CONFIG % dict(workers=workers, connections=1024, main="", mail="", auth=self.auth.url,
                                       **self.ports))
        self.notify_path = os.path.join(tempfile.mkdtemp(prefix="mpn"), "n")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(self.notify_path)
        env = dict(os.environ, NOTIFY_SOCKET=self.notify_path, PYTHONPATH=ROOT)
        self.proc = subprocess.Popen([sys.executable, "-m", "mailproxy.cli", "-p", self.prefix, "-c", self.conf,
                                      "-g", "daemon off;"], env=env, cwd=self.prefix)
        self.wait_notify("READY=1")

    def wait_notify(self, wanted, timeout=30):
        self.notify.settimeout(timeout)
        while wanted not in self.notify.recv(4096).decode().split("\n"):
            pass

    def reload(self):
        os.kill(self.proc.pid, signal.SIGHUP)
        self.wait_notify("READY=1")

    def workers(self):
        return testing.children(self.proc.pid)

    def figures(self):
        pids = [self.proc.pid] + self.workers()
        return sum(worker_rss_kib(p) for p in pids), sum(worker_fds(p) for p in pids), len(pids) - 1

    def settled(self, expected_workers, timeout=60):
        """Figures once the draining workers of earlier reloads are gone."""
        testing.wait_for(lambda: len(self.workers()) == expected_workers, timeout, "old workers to drain")
        return self.figures()

    def log(self):
        with open(os.path.join(self.prefix, "logs", "error.log"), errors="replace") as handle:
            return handle.read()

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(20)
        self.auth.close()
        for backend in self.backends.values():
            backend.close()


SOAK_MD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "soak.md")


def record(args, reloads, counts, start_ok, alerts, start, end, passed):
    """bench/results/soak.md: the last soak, which bench/RESULTS.md quotes (issue 10)."""
    lines = [
        "Last soak: `python bench/soak.py --minutes %g --reload-every %g --clients %d --workers %d`, %s UTC"
        % (args.minutes, args.reload_every, args.clients, args.workers, time.strftime("%Y-%m-%d %H:%M", time.gmtime())),
        "",
        "| | start | end |",
        "|---|--:|--:|",
        "| engine RSS, KiB (master + workers) | %d | %d |" % (start[0], end[0]),
        "| engine descriptors | %d | %d |" % (start[1], end[1]),
        "",
        "%d reloads, %d sessions (%d while measured), %d failed, %d alerts: %s."
        % (reloads, counts["ok"], counts["ok"] - start_ok, counts["failed"], alerts,
           "flat, passed" if passed else "FAILED"),
    ]
    os.makedirs(os.path.dirname(SOAK_MD), exist_ok=True)
    with open(SOAK_MD, "w") as out:
        out.write("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--reload-every", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=12, help="concurrent client threads (mixed protocols)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    engine = Engine(args.workers)
    edge = type("Edge", (), {"connect": lambda self, p, timeout=10: socket.create_connection(
        ("127.0.0.1", engine.ports[p]), timeout=timeout)})()
    stop = threading.Event()
    counts = {"ok": 0, "failed": 0}
    errors = []

    def client(protocol):
        while not stop.is_set():
            try:
                Bystander(edge, protocol).finish()
                counts["ok"] += 1
            except (OSError, AssertionError) as exc:
                counts["failed"] += 1
                errors.append("%s: %r" % (protocol, exc))

    threads = [threading.Thread(target=client, args=(("imap", "pop3", "smtp")[i % 3],), daemon=True)
               for i in range(args.clients)]
    for thread in threads:
        thread.start()
    try:
        warm_until = time.monotonic() + min(20.0, args.minutes * 60 / 6)
        while time.monotonic() < warm_until:
            time.sleep(0.5)  # warm-up: pools and pipe caches reach their working size under load
        engine.reload()
        start = engine.settled(args.workers)
        start_ok = counts["ok"]
        reloads = 1
        end_at = time.monotonic() + args.minutes * 60
        while time.monotonic() < end_at:
            time.sleep(min(args.reload_every, max(0.0, end_at - time.monotonic())))
            engine.reload()
            reloads += 1
        end = engine.settled(args.workers)
        stop.set()
        for thread in threads:
            thread.join(20)
        log = engine.log()
        alerts = [line for line in log.splitlines() if "[alert]" in line or "[emerg]" in line]
        rss_ok = end[0] <= start[0] * 1.25 + 8192
        fds_ok = end[1] <= start[1]
        print("soak: %.1f min, %d reloads, %d sessions (%d during measurement), %d failed, %d alerts"
              % (args.minutes, reloads, counts["ok"], counts["ok"] - start_ok, counts["failed"], len(alerts)))
        print("engine RSS   start %6d KiB  end %6d KiB  (%s)" % (start[0], end[0], "flat" if rss_ok else "GREW"))
        print("engine fds   start %6d      end %6d      (%s)" % (start[1], end[1], "flat" if fds_ok else "GREW"))
        for line in (errors[:5] + alerts[:5]):
            print("  " + line)
        passed = rss_ok and fds_ok and not counts["failed"] and not alerts
        record(args, reloads, counts, start_ok, len(alerts), start, end, passed)
        return 0 if passed else 1
    finally:
        stop.set()
        engine.stop()


if __name__ == "__main__":
    sys.exit(main())
