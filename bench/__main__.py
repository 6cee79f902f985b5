"""mailproxy side by side with Debian's nginx mail proxy (issue 15).

    python -m bench              # full: 3 rounds, 1 and 2 workers, 1 GiB streams, 9,900 idle sessions,
                                 # mailproxy with auth_http_keepalive off and on, system calls per login
    python -m bench --quick      # one round, one worker, small sizes (tests/test_bench_quick.py)
    python -m bench --quick --keepalive  # quick, with the keep-alive engine too

Starts the bench backends (IMAP, POP3, SMTP) and auth server (shared by both engines, and measured
directly as the ceiling), then each engine in turn, A B A B, with the same mail{} block; load comes
from child processes. Writes results.md, results.json and PNG plots to --out (bench/results/), and with
--results-md (the default in full mode) bench/RESULTS.md. Every process it starts is stopped by process
group. Relay and idle sessions are IMAP; logins are measured for all three protocols.
"""

import argparse
import os
import resource
import signal
import sys
import time

from bench import engines, load, report, syscalls

PROTOCOLS = ("imap", "pop3", "smtp")
# Logins per (protocol, concurrency): three protocols at three concurrencies in every engine run, so the
# counts are what keeps a full run near 20 minutes on two cores (5,000 logins at c=500 is still ten
# sessions per client task).
FULL = dict(rounds=3, workers=(1, 2), logins={1: 1000, 50: 5000, 500: 5000},
            stream=1 << 30, parallel=(8, 128 << 20), idle=9900, syscalls=1000, keepalive=True)
# 9,900 idle sessions: two descriptors each in the worker stay below the 20,000 hard limit, with room
# for listeners, logs and auth requests; 10,000 cannot fit in one process with this limit.
QUICK = dict(rounds=1, workers=(1,), logins={1: 100, 50: 200},
             stream=256 << 20, parallel=(8, 32 << 20), idle=500, syscalls=0, keepalive=False)


class Progress:
    def __init__(self, total):
        self.total, self.done, self.began = total, 0, time.monotonic()

    def step(self, label):
        self.done += 1
        width = 30
        filled = width * self.done // self.total
        sys.stderr.write("\r[%s%s] %3d/%d %5.0fs %-44s" % (
            "#" * filled, "." * (width - filled), self.done, self.total,
            time.monotonic() - self.began, label[:44]))
        sys.stderr.flush()

    def close(self):
        sys.stderr.write("\n")


def scenarios(plan, ports, progress, record, pids=None, idle=False):
    """Run the scenario list against ``ports`` (protocol -> port; relay and idle use IMAP); ``pids``
    (the engine's processes) adds cost figures."""
    target = ports["imap"]
    def cpu():
        return engines.cpu_seconds(pids()) if pids else 0.0

    # Idle first, on a fresh engine after a short warm-up: memory freed by the busier scenarios would
    # otherwise be reused by the idle sessions and hide their cost (Python's arenas and glibc's heap
    # both keep what they have freed).
    load.logins(target, 100, 10)
    if idle and pids:
        held, per_kib, per_fd = idle_sessions(target, plan["idle"], pids)
        record("idle sessions held", "count", held)
        record("memory per idle session", "KiB", per_kib)
        record("descriptors per idle session", "fds", per_fd)
        progress.step("idle %d" % plan["idle"])

    for protocol in PROTOCOLS:
        name = protocol.upper()
        for conc, count in plan["logins"].items():
            before = cpu()
            result = load.logins(ports[protocol], count, conc, op=protocol)
            record("%s login c=%d" % (name, conc), "sessions/s", result["rate"])
            record("%s login c=%d p50" % (name, conc), "ms", result["p50_ms"])
            record("%s login c=%d p99" % (name, conc), "ms", result["p99_ms"])
            if result["failed"]:
                record("%s login c=%d failed" % (name, conc), "count", result["failed"])
                sys.stderr.write("\nbench: %s login c=%d: %d failed: %s\n" % (
                    name, conc, result["failed"], result["errors"]))
            if pids:
                record("%s CPU per login c=%d" % (name, conc), "µs",
                       1e6 * (cpu() - before) / max(1, count))
            progress.step("%s login c=%d" % (name, conc))
        if plan["syscalls"] and pids and len(pids()) == 2 and syscalls.available():
            # One worker: strace counts its calls over a fixed number of logins (counts, never times).
            calls = syscalls.trace(pids()[1], ports[protocol], protocol, plan["syscalls"], 10)
            record("%s system calls per login" % name, "calls", sum(calls.values()))
    relayed, before = 0, cpu()
    runs = [("relay 1 stream down", 1, plan["stream"], "down"),
            ("relay %d streams down" % plan["parallel"][0], plan["parallel"][0], plan["parallel"][1], "down"),
            ("relay 1 stream up", 1, plan["stream"], "up")]
    for name, count, size, direction in runs:
        record(name, "MB/s", load.streams(target, count, size, direction)["mbps"])
        relayed += count * size
        progress.step(name)
    if pids:
        record("CPU-s per GiB relayed", "s", (cpu() - before) / (relayed / (1 << 30)))


def idle_sessions(port, total, pids):
    base_mem, base_fd = engines.memory_kib(pids()), engines.descriptors(pids())
    sessions = load.IdleSessions(port, total)
    try:
        held, errors = sessions.open()
        if held < total:
            sys.stderr.write("\nbench: %d of %d idle sessions opened: %s\n" % (held, total, errors))
        mem, fds = engines.memory_kib(pids()), engines.descriptors(pids())
    finally:
        sessions.close()
    return held, (mem - base_mem) / max(1, held), (fds - base_fd) / max(1, held)


def run(plan, keepalive=False):
    rows, warnings = [], []
    variants = [("nginx", False), ("mailproxy", False)] + ([("mailproxy", True)] if keepalive else [])
    per_engine = len(PROTOCOLS) * len(plan["logins"]) + 3
    idle_runs = 2 if 1 in plan["workers"] else 0  # nginx and mailproxy, one worker each
    total = plan["rounds"] * (per_engine + len(plan["workers"]) * len(variants) * (per_engine + 1)
                              + idle_runs)
    progress = Progress(total)
    helpers = []
    try:
        backend_ports = {}
        for protocol in PROTOCOLS:
            backend, backend_ports[protocol] = engines.start_printing_port(
                [sys.executable, "-m", "bench.backend", protocol], "bench %s backend" % protocol)
            helpers.append(backend)
        auth, auth_port = engines.start_printing_port(
            [sys.executable, "-m", "bench.authserver"] + [str(backend_ports[p]) for p in PROTOCOLS],
            "bench auth server")
        helpers.append(auth)
        for rnd in range(1, plan["rounds"] + 1):
            def record_direct(metric, unit, value, rnd=rnd):
                rows.append(dict(round=rnd, engine="ceiling", workers=0, metric=metric, unit=unit,
                                 value=value))
            scenarios(plan, backend_ports, progress, record_direct)
            record_direct("auth_http c=50 (auth server alone)", "requests/s",
                          load.logins(auth_port, plan["logins"][50], 50, op="auth")["rate"])
            for workers in plan["workers"]:
                for kind, keepalive in variants:
                    engine = engines.Engine(kind, workers, auth_port, keepalive)

                    def record(metric, unit, value, rnd=rnd, engine=engine):
                        rows.append(dict(round=rnd, engine=engine.label, workers=workers,
                                         metric=metric, unit=unit, value=value))
                    try:
                        engine.start()
                        # Idle footprint is a one-worker target, and keep-alive does not change it.
                        scenarios(plan, engine.ports, progress, record, engine.pids,
                                  idle=(workers == 1 and not keepalive))
                    finally:
                        alerts = engine.stop()
                    warnings += ["%s: %s" % (engine.label, line.strip()) for line in alerts[:5]]
                    progress.step("%s, %d worker(s): done" % (engine.label, workers))
    finally:
        for helper in reversed(helpers):
            helper.stop()
        progress.close()
    return rows, warnings


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round, small sizes (< 2 minutes)")
    parser.add_argument("--rounds", type=int, help="rounds of A B alternation")
    parser.add_argument("--keepalive", action="store_true",
                        help="also run mailproxy with auth_http_keepalive on (a third engine per round; "
                             "always in full mode)")
    parser.add_argument("--out", default=os.path.join(engines.ROOT, "bench", "results"))
    parser.add_argument("--results-md", choices=("yes", "no"),
                        help="write bench/RESULTS.md (default: yes in full mode, no in quick mode)")
    args = parser.parse_args(argv)
    plan = dict(QUICK if args.quick else FULL)
    if args.rounds:
        plan["rounds"] = args.rounds
    # SIGTERM takes the same way out as Ctrl-C, through every finally that stops a process.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench: terminated"))
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    engines.ensure_nginx()
    command = "python -m bench" + (" --quick" if args.quick else "") + (
        " --rounds %d" % args.rounds if args.rounds else "") + (" --keepalive" if args.keepalive else "")
    began = time.monotonic()
    rows, warnings = run(plan, args.keepalive or plan["keepalive"])
    os.makedirs(args.out, exist_ok=True)
    table = report.write(rows, warnings, plan, args.out, command, time.monotonic() - began,
                         results_md=(args.results_md or ("no" if args.quick else "yes")) == "yes")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
