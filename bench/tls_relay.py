"""TLS relay throughput and IMAPS logins, mailproxy beside Debian's nginx mail proxy (issue 18).

    python -m bench.tls_relay            # 3 rounds: 1 GiB streams, 8 x 128 MiB, 2,000 IMAPS logins at c=50
    python -m bench.tls_relay --quick    # 1 round, 128 MiB streams; prints the table, writes no file
    MAILPROXY_TLS_PUMP=off python -m bench.tls_relay --output bench/results/tls_relay_copy.md
                                         # mailproxy's TLS sessions through the Python copy loop

One worker per engine, engines alternating nginx, mailproxy in every round, each on a fresh start, with
the shared bench's `mail {}` block plus TLS servers of its own (bench/engines.py `servers=`):

* client TLS, both engines: an `listen ... ssl` IMAP server (IMAPS) in front of the plaintext bench
  backend: IMAPS logins (TLS handshake, LOGIN, LOGOUT; Python ssl clients offering no session), and
  relayed streams down and up;
* backend TLS and TLS on both sides, mailproxy only (`proxy_ssl on`; nginx's mail proxy talks plain TCP
  to its backends): servers with an `auth_http` of their own, pointing at a second auth server that
  sends every session to a second bench backend speaking implicit TLS (bench/backend.py --tls);
* the plaintext relay of the same run, as each engine's reference for what TLS costs;
* session latency at c=1 over implicit TLS for IMAPS, POP3S and SMTPS (`ssl` servers of each protocol,
  both engines): the time from connect to the server's close, handshake and protocol exchange included,
  where a reply held back by Nagle's algorithm for the client's delayed ACK shows as ~40 ms.

mailproxy relays TLS sessions through its TLS pump (mailproxy/_openssl.pyx) when the OpenSSL bridge is
active; MAILPROXY_TLS_PUMP=off in the bench's environment (inherited by the engine) runs the Python copy
loop instead, for a before/after of the same machine.

A P-256 self-signed certificate is made at start in a temporary directory (both engines' masters load
it as root before any worker starts) and removed at the end. The "ceiling" column is the same load
client straight to the bench backend (the TLS one for TLS rows), no proxy. Writes
bench/results/tls_relay.md in full mode; every process started is stopped by process group.
"""

import argparse
import datetime
import ipaddress
import os
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bench import engines, load, report
from bench.__main__ import Progress

RESULTS = os.path.join(engines.ROOT, "bench", "results", "tls_relay.md")
FULL = dict(rounds=3, logins=2000, stream=1 << 30, parallel=(8, 128 << 20), latency=300)
QUICK = dict(rounds=1, logins=200, stream=128 << 20, parallel=(8, 16 << 20), latency=50)
CONCURRENCY = 50
NGINX_CANNOT = "nginx cannot: its mail proxy talks plain TCP to backends"

# Server blocks beside the shared ones. The backend-TLS ones name their own auth server (the one that
# answers with the TLS backend's port); the client-TLS one uses the mail-level auth_http, so its
# sessions reach the same plaintext backend as the plaintext rows. ssl_protocols is spelled out because
# nginx 1.22's default stops at TLSv1.2 while mailproxy's includes TLSv1.3: both must negotiate the same.
IMAPS = ("server { listen 127.0.0.1:%%(port)d ssl; protocol imap; ssl_protocols TLSv1.2 TLSv1.3; "
         "ssl_certificate %(cert)s; ssl_certificate_key %(key)s; }")
POP3S = ("server { listen 127.0.0.1:%%(port)d ssl; protocol pop3; ssl_protocols TLSv1.2 TLSv1.3; "
         "ssl_certificate %(cert)s; ssl_certificate_key %(key)s; }")
SMTPS = ("server { listen 127.0.0.1:%%(port)d ssl; protocol smtp; smtp_auth plain; "
         "ssl_protocols TLSv1.2 TLSv1.3; ssl_certificate %(cert)s; ssl_certificate_key %(key)s; }")
# (row name, server name, load op, client speaks TLS): c=1 latency, the plaintext IMAP row for reference.
LATENCY = [("IMAPS session c=1", "imaps", "imap", True), ("POP3S session c=1", "pop3s", "pop3", True),
           ("SMTPS session c=1", "smtps", "smtp", True), ("IMAP (plaintext) session c=1", "imap", "imap", False)]
BACKEND_TLS = ("server { listen 127.0.0.1:%%(port)d; protocol imap; auth_http 127.0.0.1:%(auth)d/auth; "
               "proxy_ssl on; proxy_ssl_verify off; }")
BOTH_TLS = ("server { listen 127.0.0.1:%%(port)d ssl; protocol imap; ssl_protocols TLSv1.2 TLSv1.3; "
            "ssl_certificate %(cert)s; ssl_certificate_key %(key)s; "
            "auth_http 127.0.0.1:%(auth)d/auth; proxy_ssl on; proxy_ssl_verify off; }")


def make_certificate(folder):
    """A self-signed P-256 certificate for 127.0.0.1; returns (cert path, key path)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tls_relay bench")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    with open(cert_path, "wb") as out:
        out.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as out:
        out.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return cert_path, key_path


def negotiated(port):
    """Protocol and cipher a bench client gets from the TLS listener on ``port``."""
    with load.client_context().wrap_socket(socket.create_connection(("127.0.0.1", port))) as tls:
        tls.recv(100)  # the greeting: the handshake is complete and the server is serving
        return "%s %s" % (tls.version(), tls.cipher()[0])


def relay_runs(prefix, port, tls, record, cpu, runs):
    """Streams ``runs`` ((name, count, size, direction)) through ``port``; CPU-s per GiB over them all."""
    relayed, before = 0, cpu()
    for name, count, size, direction in runs:
        record(name, "MB/s", load.streams(port, count, size, direction, tls=tls)["mbps"])
        relayed += count * size
        yield name
    record("CPU-s per GiB relayed (%s)" % prefix, "s", (cpu() - before) / (relayed / (1 << 30)))


def client_tls_runs(plan):
    count, size = plan["parallel"]
    return [("TLS relay 1 stream down", 1, plan["stream"], "down"),
            ("TLS relay %d streams down" % count, count, size, "down"),
            ("TLS relay 1 stream up", 1, plan["stream"], "up")]


def ceiling(plan, backends, record, progress):
    """The load client straight to the backends: what the bench's own parts can do without a proxy."""
    result = load.logins(backends["tls"], plan["logins"], CONCURRENCY, op="imap", tls=True)
    record("IMAPS login c=%d" % CONCURRENCY, "sessions/s", result["rate"])
    progress.step("ceiling: IMAPS login")
    for name, count, size, direction in client_tls_runs(plan):
        record(name, "MB/s", load.streams(backends["tls"], count, size, direction, tls=True)["mbps"])
        progress.step("ceiling: " + name)
    record("plaintext relay 1 stream down", "MB/s",
           load.streams(backends["plain"], 1, plan["stream"], "down")["mbps"])
    progress.step("ceiling: plaintext")


def scenarios(plan, engine, record, progress):
    ports = engine.ports

    def cpu():
        return engines.cpu_seconds(engine.pids())

    # A warm-up on both listeners, so that neither engine's first sessions pay for lazy set-up.
    load.logins(ports["imap"], 100, 10)
    load.logins(ports["imaps"], 50, 10, tls=True)
    before = cpu()
    name = "IMAPS login c=%d" % CONCURRENCY
    result = load.logins(ports["imaps"], plan["logins"], CONCURRENCY, op="imap", tls=True)
    record(name, "sessions/s", result["rate"])
    record(name + " p50", "ms", result["p50_ms"])
    record(name + " p99", "ms", result["p99_ms"])
    record("IMAPS CPU per login c=%d" % CONCURRENCY, "µs", 1e6 * (cpu() - before) / plan["logins"])
    if result["failed"]:
        record(name + " failed", "count", result["failed"])
        sys.stderr.write("\nbench: %s %s: %d failed: %s\n" % (engine.label, name, result["failed"],
                                                              result["errors"]))
    progress.step("%s: %s" % (engine.label, name))

    for row, server, op, tls in LATENCY:
        load.logins(ports[server], 10, 1, op=op, tls=tls)  # warm-up
        result = load.logins(ports[server], plan["latency"], 1, op=op, tls=tls)
        record(row + " p50", "ms", result["p50_ms"])
        record(row + " p99", "ms", result["p99_ms"])
        if result["failed"]:
            record(row + " failed", "count", result["failed"])
    progress.step("%s: latency c=1" % engine.label)

    def one_down(prefix):
        return [("%s relay 1 stream down" % prefix, 1, plan["stream"], "down")]

    # (CPU row's name, port, client speaks TLS, runs); the last two only where the engine has them.
    groups = [("client TLS", ports["imaps"], True, client_tls_runs(plan)),
              ("plaintext", ports["imap"], False, one_down("plaintext")),
              ("backend TLS", ports.get("imap_backend_tls"), False, one_down("backend TLS")),
              ("TLS both sides", ports.get("imaps_both"), True, one_down("TLS both sides"))]
    for prefix, port, tls, runs in groups:
        if port is None:
            continue
        for done in relay_runs(prefix, port, tls, record, cpu, runs):
            progress.step("%s: %s" % (engine.label, done))


def run(plan, cert, key):
    rows, warnings, ciphers = [], [], {}
    # Steps: ceiling 5; nginx 6 (logins, latency, 3 client-TLS runs, plaintext); mailproxy 8 (and
    # backend TLS, both sides); one "done" per engine.
    per_round = 5 + 6 + 8 + 2
    progress = Progress(plan["rounds"] * per_round)
    helpers = []
    try:
        backends = {}
        for kind, protocol, extra in (("plain", "imap", []), ("tls", "imap", ["--tls", cert, key]),
                                      ("pop3", "pop3", []), ("smtp", "smtp", [])):
            backend, backends[kind] = engines.start_printing_port(
                [sys.executable, "-m", "bench.backend", protocol] + extra, "bench %s backend" % kind)
            helpers.append(backend)
        auth_ports = {}
        # The plain auth server also sends POP3S and SMTPS sessions to plaintext backends of theirs.
        for kind, ports in (("plain", ("plain", "pop3", "smtp")), ("tls", ("tls",))):
            auth, auth_ports[kind] = engines.start_printing_port(
                [sys.executable, "-m", "bench.authserver"] + [str(backends[p]) for p in ports],
                "bench %s auth server" % kind)
            helpers.append(auth)
        files = dict(cert=cert, key=key, auth=auth_ports["tls"])
        implicit = {"imaps": IMAPS % files, "pop3s": POP3S % files, "smtps": SMTPS % files}
        servers = {"nginx": dict(implicit),
                   "mailproxy": dict(implicit, **{"imap_backend_tls": BACKEND_TLS % files,
                                 "imaps_both": BOTH_TLS % files})}
        for rnd in range(1, plan["rounds"] + 1):
            def record_direct(metric, unit, value, rnd=rnd):
                rows.append(dict(round=rnd, engine="ceiling", metric=metric, unit=unit, value=value))
            ceiling(plan, backends, record_direct, progress)
            for kind in ("nginx", "mailproxy"):
                engine = engines.Engine(kind, 1, auth_ports["plain"], servers=servers[kind])

                def record(metric, unit, value, rnd=rnd, engine=engine):
                    rows.append(dict(round=rnd, engine=engine.label, metric=metric, unit=unit, value=value))
                try:
                    engine.start()
                    ciphers.setdefault(kind, negotiated(engine.ports["imaps"]))
                    scenarios(plan, engine, record, progress)
                finally:
                    alerts = engine.stop()
                warnings += ["%s: %s" % (engine.label, line.strip()) for line in alerts[:5]]
                progress.step("%s: done" % kind)
    finally:
        for helper in reversed(helpers):
            helper.stop()
        progress.close()
    return rows, warnings, ciphers


# Ceiling of each engine metric: the direct measurement whose crypto and copying it adds a proxy to.
CEILING_OF = {"IMAPS login c=%d" % CONCURRENCY: "IMAPS login c=%d" % CONCURRENCY,
              "TLS relay 1 stream down": "TLS relay 1 stream down",
              "TLS relay 1 stream up": "TLS relay 1 stream up",
              "backend TLS relay 1 stream down": "TLS relay 1 stream down",
              "TLS both sides relay 1 stream down": "TLS relay 1 stream down",
              "plaintext relay 1 stream down": "plaintext relay 1 stream down"}


def table(rows, rounds):
    grouped, units = {}, {}
    for row in rows:
        grouped.setdefault((row["engine"], row["metric"]), []).append(row["value"])
        units[row["metric"]] = row["unit"]
    med = {key: statistics.median(values) for key, values in grouped.items()}
    spread = {key: (min(values), max(values)) for key, values in grouped.items()}
    engine_metrics = list(dict.fromkeys(r["metric"] for r in rows if r["engine"] != "ceiling"))
    # TLS first, then the plaintext reference it is read against.
    order = sorted(engine_metrics, key=lambda m: ("plaintext" in m, "backend TLS" in m or "both sides" in m))
    # With one round the range is the value itself: no column.
    ranged = rounds > 1
    lines = ["| metric | unit | nginx | mailproxy | ratio | ceiling (no proxy) |%s notes |"
             % (" range over rounds |" if ranged else ""), "|---|---|--:|--:|--:|--:|%s---|"
             % ("---|" if ranged else "")]
    for metric in order:
        nginx, mailproxy = med.get(("nginx", metric)), med.get(("mailproxy", metric))
        ratio = report._ratio(mailproxy, nginx)
        # The parallel run's name carries its stream count, so it is matched by prefix.
        top = CEILING_OF.get(metric, metric if metric.startswith("TLS relay ") else None)
        ranges = "; ".join("%s %s–%s" % ((engine,) + tuple(map(report._fmt, spread[(engine, metric)])))
                           for engine in ("nginx", "mailproxy") if (engine, metric) in spread)
        lines.append("| %s | %s | %s | %s | %s | %s |%s %s |" % (
            metric, units[metric], report._fmt(nginx), report._fmt(mailproxy),
            report._fmt(ratio) + ("x" if ratio else ""), report._fmt(med.get(("ceiling", top))),
            " %s |" % ranges if ranged else "", _note(metric, med)))
    return "\n".join(lines) + "\n"


def _note(metric, med):
    if nginx_cannot(metric, med):
        return NGINX_CANNOT
    # Against the same engine's plaintext figure: what TLS costs that engine.
    reference = None
    if metric.endswith("relay 1 stream down") and not metric.startswith("plaintext"):
        reference, what = "plaintext relay 1 stream down", "of its plaintext MB/s"
    elif metric.startswith("CPU-s per GiB") and "plaintext" not in metric:
        reference, what = "CPU-s per GiB relayed (plaintext)", "times its plaintext CPU"
    if reference is None:
        return ""
    parts = []
    for engine in ("nginx", "mailproxy"):
        value, base = med.get((engine, metric)), med.get((engine, reference))
        if value is not None and base:
            parts.append("%s %.2f" % (engine, value / base))
    return "%s %s" % (", ".join(parts), what) if parts else ""


def relay_engine():
    """How mailproxy relays TLS sessions in this run (the engine inherits the bench's environment)."""
    from mailproxy import relay
    from mailproxy.tls import openssl

    if relay.TLS_PUMP_AVAILABLE:
        return "the TLS pump (mailproxy/_openssl.pyx; the OpenSSL bridge is active)"
    if openssl.bridge is None:
        return "the Python copy loop (the OpenSSL bridge is off: %s)" % openssl.bridge_off_reason
    return "the Python copy loop (MAILPROXY_TLS_PUMP=off)"


def nginx_cannot(metric, med):
    return med.get(("nginx", metric)) is None and med.get(("mailproxy", metric)) is not None


def machine(ciphers):
    nginx_ssl = subprocess.run([engines.NGINX, "-V"], capture_output=True, text=True).stderr
    built = [line.replace("built with ", "") for line in nginx_ssl.splitlines() if line.startswith("built with")]
    return report.machine() + [
        ("OpenSSL", "Python's ssl: %s; nginx built with %s" % (ssl.OPENSSL_VERSION, ", ".join(built) or "?")),
        ("client TLS negotiated", "; ".join("%s: %s" % (kind, ciphers[kind]) for kind in ciphers))]


def document(rows, warnings, ciphers, plan, command, seconds, loads):
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    count, size = plan["parallel"]
    lines = [
        "# TLS relay beside nginx: client TLS (both engines), backend TLS (mailproxy only)", "",
        "Made by `%s` (%.0f s, %s, %d round%s, one worker per engine, engines alternating nginx, mailproxy)."
        % (command, seconds, when, plan["rounds"], "s" if plan["rounds"] > 1 else ""),
        "Figures are medians over rounds; ratio is mailproxy / nginx. IMAPS login: TCP connect, full TLS "
        "handshake (Python ssl client, no session offered, no verification), LOGIN, LOGOUT; %s logins at "
        "c=%d. Relay: %d MiB in one stream down and up, %d x %d MiB down in parallel; MB/s = 10^6 bytes/s. "
        "CPU: utime+stime of the engine's master and worker over the runs of that group (the client-TLS "
        "row covers its three runs). Backend TLS: the backend is bench/backend.py --tls (Python's ssl "
        "under gevent), the engine's client side `proxy_ssl on; proxy_ssl_verify off;`. Certificate: "
        "self-signed P-256; `ssl_protocols TLSv1.2 TLSv1.3` on both engines (what each negotiated is "
        "listed below), their default ciphers. Session c=1: %d sessions one after another per protocol "
        "and engine over implicit TLS (full handshake each), p50/p99 from connect to the server's close. "
        "mailproxy's TLS relay: %s."
        % (format(plan["logins"], ","), CONCURRENCY, plan["stream"] >> 20, count, size >> 20,
           plan["latency"], relay_engine()), "",
        table(rows, plan["rounds"]).rstrip(), "",
        "Load clients, backends and engines share the machine's cores (and other people's test runs: "
        "one-minute load average %.1f at the start, %.1f at the end), so rates are noisy and relative, not "
        "absolute; the ratios and CPU per GiB are the steadier figures. A ceiling below an engine's figure means that the bench's own parts (Python TLS "
        "clients and backend) were the limit there, not the engine." % loads, ""]
    if warnings:
        lines += ["Alerts in the engines' error logs:", ""] + ["- `%s`" % w for w in warnings] + [""]
    lines += ["| machine | |", "|---|---|"] + ["| %s | %s |" % fact for fact in machine(ciphers)]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.tls_relay", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round, small sizes, no file written")
    parser.add_argument("--rounds", type=int, help="rounds of nginx, mailproxy alternation")
    parser.add_argument("--output", help="Markdown file (default: %s in full mode, none in quick mode)"
                        % os.path.relpath(RESULTS, engines.ROOT))
    args = parser.parse_args(argv)
    plan = dict(QUICK if args.quick else FULL)
    if args.rounds:
        plan["rounds"] = args.rounds
    output = args.output or (None if args.quick else RESULTS)
    # SIGTERM takes the same way out as Ctrl-C, through every finally that stops a process.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench: terminated"))
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    engines.ensure_nginx()
    command = "python -m bench.tls_relay" + (" --quick" if args.quick else "") + (
        " --rounds %d" % args.rounds if args.rounds else "")
    began, load_before = time.monotonic(), os.getloadavg()[0]
    folder = tempfile.mkdtemp(prefix="bench-tls-")
    try:
        rows, warnings, ciphers = run(plan, *make_certificate(folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    text = document(rows, warnings, ciphers, plan, command, time.monotonic() - began,
                    (load_before, os.getloadavg()[0]))
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w") as out:
            out.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
