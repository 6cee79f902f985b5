"""README's first command, run as a user would: ./quickstart, then real clients log in (issue 11).

It installs the package (pip install .) and listens on the fixed ports the README prints, so each run
stops everything it started with `./quickstart stop` before the next one starts. Two runs, one after
the other: as a user would (private Dovecot and Postfix where both are installed, which CI=true
requires, else the demo backend), then forced to the demo backend with MAILPROXY_QUICKSTART_BACKEND.
"""

import imaplib
import os
import poplib
import smtplib
import subprocess
import time
import uuid

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_INSTALLED = all(os.access(binary, os.X_OK) for binary in ("/usr/sbin/dovecot", "/usr/sbin/postfix"))


def _run(args, env, timeout):
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module", params=["default", "demo"])
def quickstart(request, tmp_path_factory):
    if request.param == "default" and not REAL_INSTALLED and os.environ.get("CI") == "true":
        pytest.fail("CI=true must run the quick start on real Dovecot and Postfix (install them)")
    state = str(tmp_path_factory.mktemp("quickstart-%s" % request.param))
    env = dict(os.environ, MAILPROXY_STATE=state)
    env.pop("MAILPROXY_QUICKSTART_BACKEND", None)
    if request.param == "demo":
        env["MAILPROXY_QUICKSTART_BACKEND"] = "demo"
    started = _run([os.path.join(ROOT, "quickstart")], env, 900)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield started.stdout
    finally:
        stopped = _run([os.path.join(ROOT, "quickstart"), "stop"], env, 120)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        # Nothing of the private instances may outlive `stop`: their supervisor's record and directories.
        assert not os.path.exists(os.path.join(state, "localmail.json"))
        for line in started.stdout.splitlines():
            for word in line.replace(";", " ").split():
                if word.startswith(("/tmp/dovecot-", "/tmp/postfix-")):
                    assert not os.path.exists(word), word


def test_prints_how_to_log_in(quickstart, request):
    assert "alice@example.com" in quickstart and "127.0.0.1', 8143" in quickstart
    if request.node.callspec.params["quickstart"] == "default" and REAL_INSTALLED:
        assert "Dovecot: IMAP 127.0.0.1:" in quickstart and "DEMO" not in quickstart
    else:
        assert "DEMO backend" in quickstart and "apt-get install dovecot-imapd dovecot-pop3d postfix" in quickstart


def test_imap_login(quickstart):
    imap = imaplib.IMAP4("127.0.0.1", 8143, timeout=20)
    assert imap.login("alice@example.com", "wonderland")[0] == "OK"
    assert imap.select("INBOX")[0] == "OK"
    imap.logout()


def test_wrong_password_refused(quickstart):
    imap = imaplib.IMAP4("127.0.0.1", 8143, timeout=20)
    with pytest.raises(imaplib.IMAP4.error, match="Invalid login or password"):
        imap.login("alice@example.com", "not-the-password")


def test_pop3_and_smtp(quickstart):
    pop = poplib.POP3("127.0.0.1", 8110, timeout=20)
    pop.user("bob@example.com")
    assert pop.pass_("builder").startswith(b"+OK")
    pop.quit()
    token = uuid.uuid4().hex
    with smtplib.SMTP("127.0.0.1", 8025, timeout=20) as smtp:
        smtp.ehlo("client.example")
        smtp.login("alice@example.com", "wonderland")
        message = ("Subject: hi\r\n\r\nhello %s\r\n" % token).encode()
        refused = smtp.sendmail("alice@example.com", ["bob@example.com"], message)
        assert refused == {}
    # The mail reaches bob's mailbox (Postfix delivers into Dovecot's maildir in the background).
    deadline = time.monotonic() + 20
    while True:
        pop = poplib.POP3("127.0.0.1", 8110, timeout=20)
        pop.user("bob@example.com")
        pop.pass_("builder")
        count = pop.stat()[0]
        bodies = [b"\n".join(pop.retr(number)[1]) for number in range(1, count + 1)]
        pop.quit()
        if any(token.encode() in body for body in bodies):
            break
        assert time.monotonic() < deadline, "message %s never reached bob: %r" % (token, bodies)
        time.sleep(0.1)


def test_printed_commands_work_as_printed(quickstart):
    """The curl line and the control commands the quick start prints, run exactly as printed."""
    printed = [line.strip() for line in quickstart.splitlines()
               if line.strip().startswith(("curl ", "mailproxy-master "))]
    commands = {line.split()[-1]: line for line in printed if line.startswith("mailproxy-master ")}
    assert sorted(commands) == ["quit", "reload", "reopen", "status", "stop"], printed
    curl = [line for line in printed if line.startswith("curl ")]
    assert len(curl) == 1
    done = subprocess.run(curl[0] + " --max-time 20", shell=True, cwd=ROOT, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0 and "INBOX" in done.stdout, done.stdout + done.stderr
    for name in ("status", "reopen", "reload", "status"):
        done = subprocess.run(commands[name], shell=True, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (name, done.stdout, done.stderr)
    # After the reload the proxy still serves.
    imap = imaplib.IMAP4("127.0.0.1", 8143, timeout=20)
    assert imap.login("alice@example.com", "wonderland")[0] == "OK"
    imap.logout()
