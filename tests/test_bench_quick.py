"""The benchmark harness end to end in quick mode: both engines measured, the table written (issue 15)."""

import importlib.util
import os
import subprocess
import sys

from support.harness import missing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NGINX_READY = os.path.exists("/usr/sbin/nginx") and os.path.exists(
    "/usr/lib/nginx/modules/ngx_mail_module.so")


def needs_nginx():
    # As root the bench installs Debian's nginx itself.
    if not NGINX_READY and os.geteuid() != 0:
        missing("Debian's nginx mail module")


def test_quick_mode_writes_both_engines_rows(tmp_path):
    needs_nginx()
    if importlib.util.find_spec("matplotlib") is None:  # the figure beside the table
        missing("matplotlib (pip install .[bench])")
    # Other runs of the harness may share this machine: only engines that appear during ours count.
    before = set(_bench_engines())
    done = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "results.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    for metric in ("IMAP login c=1", "IMAP login c=50", "POP3 login c=1", "POP3 login c=50",
                   "SMTP login c=1", "SMTP login c=50", "relay 1 stream down", "CPU-s per GiB relayed",
                   "memory per idle session"):
        cells = [cell.strip() for cell in rows[metric].split("|")[1:-1]]
        nginx, mailproxy, ratio = cells[2], cells[3], cells[4]
        assert nginx != "–" and mailproxy != "–" and ratio.endswith("x"), rows[metric]
    assert rows["idle sessions held"].split("|")[3].strip() == "500"
    assert rows["idle sessions held"].split("|")[4].strip() == "500"
    for picture in ("login_rate.png", "relay_throughput.png", "ratios.png"):
        assert (tmp_path / picture).stat().st_size > 0
    # Everything the harness started is gone: no engine of ours still holds a port in the temp prefix.
    assert set(_bench_engines()) - before == set()


def _bench_engines():
    found = subprocess.run(["pgrep", "-f", "bench-(nginx|mailproxy)-"], capture_output=True, text=True)
    return found.stdout.split()


def test_tls_relay_quick_prints_both_engines(tmp_path):
    """bench.tls_relay --quick (about 10 s): client-TLS rows for both engines, backend-TLS rows for
    mailproxy alone, and nothing of ours left running."""
    needs_nginx()
    before = set(_bench_engines())
    output = tmp_path / "tls_relay.md"
    done = subprocess.run([sys.executable, "-m", "bench.tls_relay", "--quick", "--output", str(output)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert output.read_text() in done.stdout
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in done.stdout.splitlines() if line.startswith("| ")}
    for metric in ("IMAPS login c=50", "TLS relay 1 stream down", "TLS relay 1 stream up",
                   "TLS relay 8 streams down", "CPU-s per GiB relayed (client TLS)",
                   "plaintext relay 1 stream down"):
        unit, nginx, mailproxy, ratio = rows[metric][:4]
        assert nginx != "–" and mailproxy != "–" and ratio.endswith("x"), (metric, rows[metric])
    for metric in ("backend TLS relay 1 stream down", "TLS both sides relay 1 stream down"):
        unit, nginx, mailproxy, ratio, _ceiling, note = rows[metric]
        assert nginx == "–" and mailproxy != "–" and note.startswith("nginx cannot"), rows[metric]
    assert set(_bench_engines()) - before == set()
