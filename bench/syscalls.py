"""System calls per login, nginx beside mailproxy (auth_http_keepalive off and on), by strace -c.

    python -m bench.syscalls                       # IMAP, POP3, SMTP; 2,000 logins each at c=10
    python -m bench.syscalls --ops imap --logins 500 --show 12

Each engine runs one worker; the worker alone is traced (``strace -c -f -p``) over a fixed number of
logins after a warm-up, and the counts are divided by the logins. strace slows what it traces, so only the
counts are reported, never times. Requires strace (Debian: apt-get install strace). The full bench
(python -m bench) reports the totals beside its other figures.
"""

import argparse
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

from bench import engines, load

_ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:(\d+)\s+)?(\w+)\s*$")


def parse_summary(text):
    """strace -c's table as {syscall: calls}."""
    calls = {}
    for line in text.splitlines():
        match = _ROW.match(line)
        if match and match.group(3) != "total":
            calls[match.group(3)] = int(match.group(1))
    return calls


def available():
    return shutil.which("strace") is not None


def trace(worker, port, op, logins, concurrency):
    """{syscall: calls per login} of the process ``worker`` over ``logins`` logins of ``op`` on ``port``."""
    load.logins(port, 200, 10, op=op)  # warm-up: imports, pools, first allocations
    out = "/tmp/bench-strace-%d.txt" % os.getpid()
    tracer = subprocess.Popen(["strace", "-c", "-f", "-o", out, "-p", str(worker)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)  # strace attaches asynchronously; no signal says when it has
        load.logins(port, logins, concurrency, op=op)
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(30)
    with open(out) as summary:
        calls = parse_summary(summary.read())
    os.unlink(out)
    return {name: count / logins for name, count in calls.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.syscalls")
    parser.add_argument("--ops", default="imap,pop3,smtp")
    parser.add_argument("--logins", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--show", type=int, default=0, help="also list the N most frequent calls per engine")
    args = parser.parse_args(argv)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    report = run(args.ops.split(","), args.logins, args.concurrency)
    for op, rows in report.items():
        for label, calls in rows.items():
            print("%-5s %-20s %6.1f system calls per login" % (op, label, sum(calls.values())))
            for name, count in sorted(calls.items(), key=lambda item: -item[1])[:args.show]:
                print("      %-20s %6.2f" % (name, count))
    return 0


def run(ops, logins, concurrency):
    """{op: {engine label: {syscall: calls per login}}}."""
    helpers, started = [], []
    try:
        # One backend per protocol: the auth server sends each protocol's logins to its own port.
        backend_ports = []
        for protocol in ("imap", "pop3", "smtp"):
            backend, port = engines.start_printing_port([sys.executable, "-m", "bench.backend", protocol],
                                                        "bench %s backend" % protocol)
            helpers.append(backend)
            backend_ports.append(str(port))
        auth, auth_port = engines.start_printing_port(
            [sys.executable, "-m", "bench.authserver"] + backend_ports, "bench auth server")
        helpers.append(auth)
        for kind, keepalive in (("nginx", False), ("mailproxy", False), ("mailproxy", True)):
            started.append(engines.Engine(kind, 1, auth_port, keepalive).start())
        report = {}
        for op in ops:
            report[op] = {engine.label: trace(engines.worker_pids(engine.group.pid)[0], engine.ports[op], op,
                                              logins, concurrency) for engine in started}
        return report
    finally:
        for engine in started:
            engine.stop()
        for helper in helpers:
            helper.stop()


if __name__ == "__main__":
    sys.exit(main())
