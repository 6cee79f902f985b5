"""Login cost, measured and profiled, without the whole bench.

    python -m bench.profile_login                      # mailproxy and nginx, c=50, 3 repeats
    python -m bench.profile_login --engines mailproxy --keepalive --logins 3000
    python -m bench.profile_login --engines mailproxy --py-spy profile.json   # needs py-spy
    python -m bench.profile_login --base /tmp/old-tree     # also mailproxy from another source tree (A/B)

Each repeat prints sessions/s and the engine's CPU per login (master and workers, utime + stime), the
figure that matters on a shared machine where rates move with the neighbours' load. With --py-spy the
worker is sampled during the last repeat (speedscope format; ``--format raw`` gives collapsed stacks).
"""

import argparse
import resource
import signal
import subprocess
import sys

from bench import engines, load


def measure(engine, logins, concurrency, repeats, spy=None, spy_format="speedscope"):
    load.logins(engine.port, 300, 10)  # warm-up: imports, first allocations, pools
    rows = []
    for rep in range(repeats):
        recorder = None
        if spy and rep == repeats - 1:
            worker = engines.worker_pids(engine.group.pid)[0]
            recorder = subprocess.Popen(["py-spy", "record", "-p", str(worker), "-o", spy, "--format",
                                         spy_format, "--rate", "1000", "--nonblocking"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        before = engines.cpu_seconds(engine.pids())
        result = load.logins(engine.port, logins, concurrency)
        cpu = engines.cpu_seconds(engine.pids()) - before
        if recorder is not None:
            recorder.send_signal(signal.SIGINT)
            recorder.wait(30)
        rows.append((result["rate"], 1e6 * cpu / logins, result["failed"]))
        print("%-20s rate %7.0f/s  cpu %6.0f us/login  failed %d" % ((engine.label,) + rows[-1]), flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.profile_login")
    parser.add_argument("--engines", default="nginx,mailproxy")
    parser.add_argument("--keepalive", action="store_true", help="also mailproxy with auth_http_keepalive")
    parser.add_argument("--logins", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--py-spy", dest="spy", help="write a py-spy profile of the mailproxy worker")
    parser.add_argument("--format", default="speedscope")
    parser.add_argument("--base", help="a source tree (holding mailproxy/) to run beside this one, as 'base'")
    args = parser.parse_args(argv)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    variants = [(kind, False) for kind in args.engines.split(",")]
    if args.keepalive:
        variants.append(("mailproxy", True))
    helpers, started = [], []
    try:
        backend, backend_port = engines.start_printing_port(
            [sys.executable, "-m", "bench.backend"], "bench backend")
        helpers.append(backend)
        auth, auth_port = engines.start_printing_port(
            [sys.executable, "-m", "bench.authserver", str(backend_port)], "bench auth server")
        helpers.append(auth)
        summary = {}
        # Alternate engines each repeat so that neighbours' load spreads over all of them.
        for kind, keepalive in variants:
            engine = engines.Engine(kind, 1, auth_port, keepalive)
            started.append(engine)
            engine.start()
            if args.base and kind == "mailproxy":
                base = engines.Engine(kind, 1, auth_port, keepalive)
                base.label = "base " + engine.label
                started.append(base)
                base.start(cwd=args.base)
        for rep in range(args.repeats):
            for engine in started:
                spy = args.spy if engine.label == "mailproxy" else None
                rows = measure(engine, args.logins, args.concurrency, 1,
                               spy if rep == args.repeats - 1 else None, args.format)
                summary.setdefault(engine.label, []).extend(rows)
    finally:
        for engine in started:
            engine.stop()
        for helper in reversed(helpers):
            helper.stop()
    print()
    base = summary.get("nginx")
    for label, rows in summary.items():
        rates = sorted(r[0] for r in rows)
        cpus = sorted(r[1] for r in rows)
        rate, cpu = rates[len(rates) // 2], cpus[len(cpus) // 2]
        ratio = " (%.2fx nginx)" % (rate / sorted(r[0] for r in base)[len(base) // 2]) if base else ""
        print("%-20s median rate %7.0f/s%s  cpu %6.0f us/login" % (label, rate, ratio, cpu))
    return 0


if __name__ == "__main__":
    sys.exit(main())
