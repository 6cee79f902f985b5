"""User-space instructions per login, nginx beside mailproxy, counted by callgrind.

    python -m bench.instructions                          # IMAP, POP3, SMTP, nginx and mailproxy
    python -m bench.instructions --ops imap --base ../before --keepalive

CPU time on this shared two-core machine moves by a tenth from one run to the next; the instructions a
worker executes do not. Each engine's master runs under ``valgrind --tool=callgrind`` (its forked worker
writes a file of its own), and what one login costs the worker in user space is its count after
``--logins`` logins less its count after ``--warmup``, over the difference: start-up, imports and
warm-up cancel out. The kernel's share is bench.syscalls'. callgrind runs an engine some fifty times
slower, so only counts are reported, never rates or times. Requires valgrind (Debian: apt-get install
valgrind).
"""

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time

from bench import engines, load

PROTOCOLS = ("imap", "pop3", "smtp")


def available():
    return shutil.which("valgrind") is not None


def _total(path):
    """The instruction count (Ir) a callgrind output file ends with, or None while it is being written."""
    with open(path) as text:
        for line in text:
            if line.startswith(("totals:", "summary:")):
                return int(line.split()[1])
    return None


def worker_instructions(kind, tree, auth_port, keepalive, op, logins):
    """Instructions the one worker of a fresh engine executed by the end of ``logins`` logins of ``op``."""
    engine = engines.Engine(kind, 1, auth_port, keepalive)
    folder = tempfile.mkdtemp(prefix="bench-callgrind-")
    os.chmod(folder, 0o777)  # the worker writes its file after it has become the unprivileged user
    wrapper = ["valgrind", "-q", "--tool=callgrind", "--callgrind-out-file=%s/%%p.out" % folder]
    try:
        engine.start(cwd=tree, wrapper=wrapper, timeout=600)
        worker = engines.worker_pids(engine.group.pid)[0]
        result = load.logins(engine.ports[op], logins, 10, op=op)
        if result["failed"]:
            raise RuntimeError("%s: %d of %d %s logins failed: %s" % (
                engine.label, result["failed"], logins, op, result["errors"]))
    finally:
        engine.stop()
    path = "%s/%d.out" % (folder, worker)
    deadline = time.monotonic() + 120
    count = None
    while count is None and time.monotonic() < deadline:
        count = _total(path) if os.path.exists(path) else None
        if count is None:
            time.sleep(0.2)
    shutil.rmtree(folder, ignore_errors=True)
    if count is None:
        raise RuntimeError("%s: no callgrind count from worker %d" % (engine.label, worker))
    return count


def run(ops, engines_wanted, warmup, logins):
    """{op: {label: instructions per login}} for each (label, kind, tree, keepalive) in engines_wanted."""
    helpers = []
    try:
        ports = []
        for protocol in PROTOCOLS:
            backend, port = engines.start_printing_port([sys.executable, "-m", "bench.backend", protocol],
                                                        "bench %s backend" % protocol)
            helpers.append(backend)
            ports.append(str(port))
        auth, auth_port = engines.start_printing_port([sys.executable, "-m", "bench.authserver"] + ports,
                                                      "bench auth server")
        helpers.append(auth)
        report = {}
        for op in ops:
            for label, kind, tree, keepalive in engines_wanted:
                before = worker_instructions(kind, tree, auth_port, keepalive, op, warmup)
                after = worker_instructions(kind, tree, auth_port, keepalive, op, logins)
                report.setdefault(op, {})[label] = (after - before) / (logins - warmup)
        return report
    finally:
        for helper in helpers:
            helper.stop()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.instructions")
    parser.add_argument("--ops", default=",".join(PROTOCOLS))
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--logins", type=int, default=1200)
    parser.add_argument("--base", help="another source tree of mailproxy to count beside this one")
    parser.add_argument("--keepalive", action="store_true", help="also mailproxy with auth_http_keepalive on")
    args = parser.parse_args(argv)
    if not available():
        sys.exit("bench.instructions needs valgrind (Debian: apt-get install valgrind)")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    wanted = [("nginx", "nginx", engines.ROOT, False)]
    if args.base:
        wanted.append(("mailproxy (base)", "mailproxy", os.path.abspath(args.base), False))
    wanted.append(("mailproxy", "mailproxy", engines.ROOT, False))
    if args.keepalive:
        wanted.append(("mailproxy keepalive", "mailproxy", engines.ROOT, True))
    report = run(args.ops.split(","), wanted, args.warmup, args.logins)
    for op, rows in report.items():
        nginx = rows.get("nginx")
        for label, count in rows.items():
            ratio = " %6.1fx nginx's" % (count / nginx) if nginx and label != "nginx" else ""
            print("%-5s %-20s %9.0f instructions per login%s" % (op, label, count, ratio))
    return 0


if __name__ == "__main__":
    sys.exit(main())
