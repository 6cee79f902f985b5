"""README's first command, run as a user would: ./quickstart, then real clients log in (issue 11).

It installs the package (pip install .) and listens on the fixed ports the README prints, so it runs
once per suite and stops everything it started with `./quickstart stop`.
"""

import imaplib
import os
import poplib
import smtplib
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    state = str(tmp_path_factory.mktemp("quickstart"))
    env = dict(os.environ, MAILPROXY_STATE=state)
    started = subprocess.run(
        [os.path.join(ROOT, "quickstart")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield started.stdout
    finally:
        stopped = subprocess.run(
            [os.path.join(ROOT, "quickstart"), "stop"], cwd=ROOT, env=env, capture_output=True, text=True,
            timeout=120,
        )
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr


def test_prints_how_to_log_in(quickstart):
    assert "alice@example.com" in quickstart and "127.0.0.1', 8143" in quickstart


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
    with smtplib.SMTP("127.0.0.1", 8025, timeout=20) as smtp:
        smtp.ehlo("client.example")
        smtp.login("alice@example.com", "wonderland")
        refused = smtp.sendmail("alice@example.com", ["bob@example.com"], b"Subject: hi\r\n\r\nhello\r\n")
        assert refused == {}
