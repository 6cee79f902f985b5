"""Medians, ratios and the targets; the Markdown table, the PNG plots and bench/RESULTS.md.

Every figure is the median over rounds of one (engine, workers, metric); each row puts mailproxy's
beside nginx's with the ratio, so no absolute figure stands alone. "ceiling" is the load client against
the bench backend with no proxy at all: when a proxy's figure is close to it, the bench's own parts are
what limits it and the ratio says little.
"""

import json
import os
import platform
import statistics
import subprocess
from importlib import metadata

from bench import engines

ENGINES = ("nginx", "mailproxy", "mailproxy keepalive")
# One-worker targets from issue 15: metric -> (comparison, ratio mailproxy/nginx).
TARGETS = {
    "relay 1 stream down": (">=", 1.5),
    "CPU-s per GiB relayed": ("<=", 0.3),
    "IMAP login c=50": (">=", 0.7),
    "POP3 login c=50": (">=", 0.7),
    "SMTP login c=50": (">=", 0.7),
    "memory per idle session": ("<=", 1.5),
}


def _is_login_rate(metric):
    """"IMAP login c=50", not its p50/p99/failed rows."""
    return " login c=" in metric and metric.count(" ") == 2


def medians(rows):
    grouped = {}
    for row in rows:
        grouped.setdefault((row["engine"], row["workers"], row["metric"]), []).append(row["value"])
    units = {row["metric"]: row["unit"] for row in rows}
    return {key: statistics.median(values) for key, values in grouped.items()}, units


def _fmt(value):
    if value is None:
        return "–"
    if abs(value) >= 100:
        return "{:,.0f}".format(value)
    return "%.2f" % value if abs(value) < 10 else "%.1f" % value


def _ratio(a, b):
    return a / b if a is not None and b else None


def _verdict(metric, workers, ratios, plan):
    if workers != 1:
        return ""
    if metric == "idle sessions held":
        held = ratios.get("mailproxy value")
        return "%s %d held" % ("met:" if held is not None and held >= plan["idle"] else "missed:",
                               held or 0)
    if metric not in TARGETS:
        return ""
    op, bound = TARGETS[metric]
    best = [r for r in (ratios.get("mailproxy"), ratios.get("mailproxy keepalive")) if r is not None]
    if not best:
        return ""
    value = max(best) if op == ">=" else min(best)
    ok = value >= bound if op == ">=" else value <= bound
    return "%s %s %.1fx" % ("met" if ok else "**missed**", op.replace(">=", "≥").replace("<=", "≤"),
                            bound)


def _engines(rows):
    """The engines of this run, in ENGINES order (the keep-alive variant only with --keepalive)."""
    present = {row["engine"] for row in rows}
    return [e for e in ENGINES if e in present]


def table(rows, plan):
    med, units = medians(rows)
    metrics = list(dict.fromkeys(row["metric"] for row in rows))
    shown = _engines(rows)
    lines = []
    for workers in plan["workers"]:
        head = "| metric | unit | nginx |" + "".join(" %s | ratio |" % e for e in shown[1:])
        lines += ["", "### %d worker%s (medians of %d round%s)" % (
            workers, "s" if workers > 1 else "", plan["rounds"], "s" if plan["rounds"] > 1 else ""), "",
            head + " ceiling (no proxy) | target (1 worker) |",
            "|---|---|--:|" + "--:|--:|" * len(shown[1:]) + "--:|---|"]
        for metric in metrics:
            values = {e: med.get((e, workers, metric)) for e in ENGINES}
            if all(v is None for v in values.values()) and not med.get(("ceiling", 0, metric)):
                continue
            ratios = {e: _ratio(values[e], values["nginx"]) for e in ENGINES[1:]}
            ratios["mailproxy value"] = values["mailproxy"]
            cells = "".join(" %s | %s |" % (_fmt(values[e]), _fmt(ratios[e]) + ("x" if ratios[e] else ""))
                            for e in shown[1:])
            lines.append("| %s | %s | %s |%s %s | %s |" % (
                metric, units[metric], _fmt(values["nginx"]), cells,
                _fmt(med.get(("ceiling", 0, metric))), _verdict(metric, workers, ratios, plan)))
    return "\n".join(lines).strip() + "\n"


def plots(rows, plan, out):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    med, _ = medians(rows)
    made = []
    groups = [("login_rate.png", "Logins per second (IMAP, POP3, SMTP)",
               [m for m in dict.fromkeys(r["metric"] for r in rows) if _is_login_rate(m)]),
              ("relay_throughput.png", "Relay throughput, MB/s",
               [m for m in dict.fromkeys(r["metric"] for r in rows) if m.startswith("relay ")])]
    for name, title, metrics in groups:
        # One row per worker count: nine login metrics side by side need the width.
        figure, axes = pyplot.subplots(len(plan["workers"]), 1, squeeze=False,
                                       figsize=(max(6, 1.1 * len(metrics)), 4 * len(plan["workers"])))
        for axis, workers in zip(axes[:, 0], plan["workers"]):
            series = _engines(rows) + ["ceiling"]
            width = 0.8 / len(series)
            for i, engine in enumerate(series):
                key_workers = 0 if engine == "ceiling" else workers
                values = [med.get((engine, key_workers, m), 0) for m in metrics]
                axis.bar([x + i * width for x in range(len(metrics))], values, width, label=engine)
            # "IMAP login c=50" on two lines: nine labels on one line run into each other.
            axis.set_xticks([x + 0.4 - width / 2 for x in range(len(metrics))],
                            [m.replace(" login ", "\n") for m in metrics], fontsize=8)
            axis.set_title("%s, %d worker(s)" % (title, workers), fontsize=9)
            axis.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(os.path.join(out, name), dpi=100)
        pyplot.close(figure)
        made.append(name)
    names = ["%s login c=%d" % (p, c) for p in ("IMAP", "POP3", "SMTP") for c in plan["logins"]] + [
        "relay 1 stream down", "relay 1 stream up", "CPU-s per GiB relayed",
        "IMAP CPU per login c=50", "memory per idle session", "descriptors per idle session"]
    names = [n for n in names if med.get(("nginx", 1, n)) and med.get(("mailproxy", 1, n)) is not None]
    figure, axis = pyplot.subplots(figsize=(7, 0.45 * len(names) + 1))
    axis.barh(names, [med[("mailproxy", 1, n)] / med[("nginx", 1, n)] for n in names])
    axis.axvline(1.0, color="black", linewidth=0.8)
    axis.set_xlabel("mailproxy / nginx (one worker; >1 is more, which is better for rates, worse for costs)")
    axis.invert_yaxis()
    figure.tight_layout()
    figure.savefig(os.path.join(out, "ratios.png"), dpi=100)
    pyplot.close(figure)
    return made + ["ratios.png"]


def machine():
    with open("/proc/meminfo") as meminfo:
        mem_kib = int(meminfo.readline().split()[1])
    model = "unknown"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    nginx = subprocess.run([engines.NGINX, "-v"], capture_output=True, text=True).stderr.strip()
    commit = subprocess.run(["git", "-C", engines.ROOT, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    return [("CPUs (nproc)", str(os.cpu_count())), ("CPU model", model),
            ("memory", "%.1f GiB" % (mem_kib / (1 << 20))), ("kernel", platform.release()),
            ("Python", platform.python_version()), ("gevent", metadata.version("gevent")),
            ("nginx", nginx.replace("nginx version: ", "")),
            ("mailproxy", "%s (git HEAD %s, plus the working tree)" % (metadata.version("mailproxy")
                                                                     if _installed() else "source",
                                                                     commit or "?"))]


def _installed():
    try:
        metadata.version("mailproxy")
    except metadata.PackageNotFoundError:
        return False
    return True


def write(rows, warnings, plan, out, command, seconds, results_md):
    text = table(rows, plan)
    with open(os.path.join(out, "results.json"), "w") as raw:
        json.dump({"plan": {k: v if not isinstance(v, dict) else {str(a): b for a, b in v.items()}
                            for k, v in plan.items()}, "rows": rows, "warnings": warnings}, raw, indent=1)
    pictures = plots(rows, plan, out)
    body = [text]
    if warnings:
        body += ["", "Alerts in the engines' error logs:", ""] + ["- `%s`" % w for w in warnings]
    with open(os.path.join(out, "results.md"), "w") as md:
        md.write("# `%s` (%.0f s)\n\n%s" % (command, seconds, "\n".join(body)))
    if results_md:
        with open(os.path.join(engines.ROOT, "bench", "RESULTS.md"), "w") as md:
            md.write(_results_md(body, plan, command, seconds, pictures, _engines(rows)))
    return text


# Benchmarks that run apart from the harness keep their last result beside its table.
_SEPARATE = (("Soak", "soak.md"), ("Certificates for 10,000 domains", "cert_domains.md"),
             ("TLS relay beside nginx", "tls_relay.md"), ("mailproxy-auth per store", "auth_stores.md"))


def _separate_sections():
    sections = []
    for title, name in _SEPARATE:
        path = os.path.join(engines.ROOT, "bench", "results", name)
        if os.path.exists(path):
            with open(path) as result:
                sections.append("\n## %s\n\n%s" % (title, result.read()))
    return "".join(sections)


def _results_md(body, plan, command, seconds, pictures, shown):
    facts = "\n".join("| %s | %s |" % pair for pair in machine())
    shots = "\n".join("![%s](results/%s)" % (p, p) for p in pictures)
    return """# Benchmark: mailproxy beside Debian's nginx mail proxy

Made by `%s` (%.0f s, %d rounds, engines alternating %s). Figures are medians over rounds;
ratios are mailproxy / nginx. Both engines run the same `mail {}` block (IMAP, POP3 and SMTP servers,
`smtp_auth plain`, `xclient` on by default, `error_log ... error`, `worker_rlimit_nofile 20000`) against
the same bench backends (bench/backend.py) and auth server (bench/authserver.py); load comes from
separate processes (bench/load.py). Everything shares the machine's two cores (the load clients, the
backends, and other engineers' test runs on this machine too), so rates are relative, not absolute.

| machine | |
|---|---|
%s

## Results
%s

- login: sessions per second; p50/p99 are per-session latency. IMAP: connect, greeting, `LOGIN`,
  `LOGOUT`. POP3: greeting, `USER`, `PASS`, `QUIT`. SMTP: greeting, `EHLO`, `AUTH PLAIN` (the engine
  sends the backend EHLO and XCLIENT, then answers 235), `QUIT` (answered by the backend). Logins per
  concurrency and protocol: %s.
- CPU per login / CPU-s per GiB: utime+stime of the engine's master and workers over the scenario.
- relay (IMAP): %d MiB in one stream, %d streams of %d MiB in parallel, %d MiB upload; MB/s = 10^6 bytes/s.
- idle: %d authenticated sessions held at once; memory is the PSS delta over all the engine's processes
  divided by the sessions held; descriptors likewise. %d rather than 10,000: each session holds two
  descriptors in the worker, and 10,000 would not fit under the 20,000-descriptor hard limit.
- ceiling: the same load client straight to the bench backend, no proxy, no auth (shows the bench's
  own parts are not what limits the proxies).

%s
%s""" % (command, seconds, plan["rounds"], ", ".join(shown), facts, "\n".join(body),
       ", ".join("c=%d: %d" % item for item in plan["logins"].items()), plan["stream"] >> 20,
       plan["parallel"][0], plan["parallel"][1] >> 20, plan["stream"] >> 20, plan["idle"],
       plan["idle"], shots, _separate_sections())
