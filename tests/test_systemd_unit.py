"""etc/mailproxy.service passes `systemd-analyze verify` (issue 23 item 4) with the program where pip
installed it on this machine: the path in ExecStart* must name an executable, and Documentation= a man
page that `man` finds. Checked where systemd is present; a package rewrites the path the same way."""

import os
import shutil
import subprocess

from support.harness import missing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_unit_verifies_on_the_installed_path(tmp_path):
    if shutil.which("systemd-analyze") is None:
        missing("systemd-analyze (systemd)")
    program = shutil.which("mailproxy-master")
    assert program, "mailproxy-master is not on PATH: install the package first"
    with open(os.path.join(ROOT, "etc", "mailproxy.service")) as unit:
        text = unit.read()
    assert "/usr/local/bin/mailproxy-master" in text
    rendered = tmp_path / "mailproxy.service"
    rendered.write_text(text.replace("/usr/local/bin/mailproxy-master", program))
    # The man pages as pip installs them (<prefix>/share/man/man8); an editable install has only the
    # sources, so they are laid out the same way here.
    man8 = tmp_path / "man" / "man8"
    man8.mkdir(parents=True)
    for page in os.listdir(os.path.join(ROOT, "man")):
        shutil.copy(os.path.join(ROOT, "man", page), man8 / page)
    env = dict(os.environ, MANPATH="%s:" % (tmp_path / "man"))
    done = subprocess.run(["systemd-analyze", "verify", str(rendered)], capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == 0 and not done.stderr.strip(), done.stdout + done.stderr
