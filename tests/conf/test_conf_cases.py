"""Config cases as files: each tests/conf/cases/*.conf states its own expected outcome in its header.

Header lines: `# emerg: <message>` (the load fails with exactly this text), `# warn: <message>` (a
warning, in order), `# ok` (loads), `# ok_no_mail` (loads, no servers), `# check_emerg: <message>` (loads,
but -t fails: it also reads certificates, mailproxy/tls/client.py). `{file}` is the case's path.
Cases whose header says `# nginx 1.22.1 (nginx -t): same text` were run through Debian's nginx with the
mail module; when that nginx is installed the comparison is repeated here.
"""

import io
import os
import re
import shutil
import subprocess

import pytest

from mailproxy.conf import ConfigError, check, load_config
from mailproxy.tls import client as tls

from support.harness import missing

CASES = os.path.join(os.path.dirname(__file__), "cases")
NGINX = "/usr/sbin/nginx"
MAIL_MODULE = "/usr/lib/nginx/modules/ngx_mail_module.so"
NGINX_LINE = re.compile(r"(?:nginx: |\S+ \S+ )\[\w+\] (?:\d+#\d+: )?(.*)")


def read_case(name):
    path = os.path.join(CASES, name)
    header = []
    with open(path) as f:
        for line in f:
            if not line.startswith("# "):
                break
            header.append(line[2:].rstrip("\n"))
    expect = {"emerg": None, "warn": [], "ok": False, "nginx_same": False}
    for line in header:
        kind, _, text = line.partition(": ")
        text = text.replace("{file}", path)
        if kind == "emerg":
            expect["emerg"] = text
        elif kind == "check_emerg":
            expect["check_emerg"] = text
        elif kind == "warn":
            expect["warn"].append("[warn] " + text)
        elif kind in ("ok", "ok_no_mail"):
            expect["ok"] = kind
        elif kind.startswith("nginx") and text == "same text":
            expect["nginx_same"] = True
    return path, expect


CASE_NAMES = sorted(n for n in os.listdir(CASES) if n.endswith(".conf"))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_case_load_config(name, tmp_path):
    path, expect = read_case(name)
    if expect["emerg"] is not None:
        with pytest.raises(ConfigError) as info:
            load_config(path, prefix=str(tmp_path))
        assert str(info.value) == expect["emerg"]
        assert list(info.value.warnings) == expect["warn"]
    else:
        config = load_config(path, prefix=str(tmp_path))
        assert list(config.warnings) == expect["warn"]
        assert bool(config.servers) == (expect["ok"] == "ok")


@pytest.mark.parametrize("name", CASE_NAMES)
def test_case_check_output(name, tmp_path):
    path, expect = read_case(name)
    out, err = io.StringIO(), io.StringIO()
    # As the command line runs it: with the TLS preparation, which the conf package leaves to it.
    status = check(path, prefix=str(tmp_path), out=out, err=err, prepare=tls.prepare)
    lines = err.getvalue().splitlines()
    warn_lines = ["mailproxy: " + w for w in expect["warn"]]
    emerg = expect.get("check_emerg") or expect["emerg"]
    if emerg is not None:
        assert status == 1
        assert lines == warn_lines + ["mailproxy: [emerg] " + emerg,
                                      "mailproxy: configuration file %s test failed" % path]
    else:
        assert status == 0
        assert lines == warn_lines + ["mailproxy: the configuration file %s syntax is ok" % path,
                                      "mailproxy: configuration file %s test is successful" % path]
    assert out.getvalue() == ""


NGINX_CASES = [n for n in CASE_NAMES if read_case(n)[1]["nginx_same"]]


@pytest.mark.parametrize("name", NGINX_CASES)
def test_case_against_nginx(name, tmp_path):
    if not (shutil.which(NGINX) and os.path.exists(MAIL_MODULE)):
        missing("Debian's nginx and its mail module")
    path, expect = read_case(name)
    # The module and a scratch pid file come in through -g so the case's own line numbers stay as they are.
    with open(path) as f:
        directives = "" if "load_module" in f.read() else "load_module %s;" % MAIL_MODULE
    if "pid_dup" not in name:
        directives += " pid %s;" % (tmp_path / "nginx.pid")
    proc = subprocess.run([NGINX, "-t", "-p", str(tmp_path), "-c", path, "-g", directives],
                          capture_output=True, text=True, timeout=30)
    # Early messages come as `nginx: [emerg] text`, later ones as error-log lines `... [emerg] 12#12: text`.
    messages = [m.group(1) for m in map(NGINX_LINE.match, proc.stderr.splitlines()) if m]
    if expect["emerg"] is not None:
        assert proc.returncode == 1
        assert expect["emerg"] in messages
    else:
        assert proc.returncode == 0, proc.stderr
    for warning in expect["warn"]:
        assert warning[len("[warn] "):] in messages
