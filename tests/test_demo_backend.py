"""The quick start's demo backend answers what README's examples send (issue 23 item 4): curl's IMAP and
POP3 URLs and imaplib, through a real mailproxy master and a real mailproxy-auth, as the quick start
wires them (etc/users.example)."""

import imaplib
import os
import subprocess
import sys

import pytest

from support.harness import free_port, wait_listening

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER, PASSWORD = "alice@example.com", "wonderland"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    backend = {name: free_port() for name in ("imap", "pop3", "smtp")}
    users = folder / "users"
    with open(os.path.join(ROOT, "etc", "users.example")) as example:
        text = example.read()
    # The example routes to the quick start's fixed backend ports; these tests use free ones.
    for name, fixed in (("imap", 1143), ("pop3", 1110), ("smtp", 1025)):
        text = text.replace("127.0.0.1:%d" % fixed, "127.0.0.1:%d" % backend[name])
    users.write_text(text)
    auth_port = free_port()
    processes = [subprocess.Popen(
        [sys.executable, "-m", "tools.demo_backend"]
        + ["--%s=127.0.0.1:%d" % item for item in backend.items()], stderr=subprocess.DEVNULL)]
    try:
        wait_listening(backend["imap"], processes[0], "demo backend")
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "mailproxy.authserver.app", "--users", str(users),
             "--listen", "127.0.0.1:%d" % auth_port, "--access-log", str(folder / "auth.log")],
            stderr=subprocess.DEVNULL))
        wait_listening(auth_port, processes[1], "mailproxy-auth")
        yield auth_port
    finally:
        for process in processes:
            process.terminate()
            process.wait(10)


@pytest.fixture
def proxy(demo, mailproxy_master):
    ports = {"imap": free_port(), "pop3": free_port()}
    config = """
worker_processes 1;
error_log logs/error.log info;
events { worker_connections 64; }
mail {
    auth_http 127.0.0.1:%d/auth;
    server { listen 127.0.0.1:%d; protocol imap; }
    server { listen 127.0.0.1:%d; protocol pop3; }
}
""" % (demo, ports["imap"], ports["pop3"])
    mailproxy_master(config, handler=None)
    return ports


def curl(url, *extra):
    done = subprocess.run(["curl", "-sS", "--max-time", "20", "--user", "%s:%s" % (USER, PASSWORD), url, *extra],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_curl_lists_and_reads_imap(proxy):
    base = "imap://127.0.0.1:%d/" % proxy["imap"]
    assert "INBOX" in curl(base)
    assert "INBOX" in curl(base + "INBOX")
    assert "Subject: welcome" in curl(base + "INBOX;UID=1")
    assert "Subject: how this got here" in curl(base + "INBOX;UID=2")
    assert "SEARCH 1 2" in curl(base + "INBOX?ALL")


def test_curl_pop3(proxy):
    base = "pop3://127.0.0.1:%d/" % proxy["pop3"]
    listing = [line.split() for line in curl(base).splitlines()]
    assert [number for number, _ in listing] == ["1", "2"] and all(size.isdigit() for _, size in listing)
    message = curl(base + "1")
    # curl hands over the message with its CRLFs read as text: each line lost one byte.
    assert "Subject: welcome" in message and len(message) + message.count("\n") == int(listing[0][1])


def test_imaplib_reads_headers_and_bodies(proxy):
    imap = imaplib.IMAP4("127.0.0.1", proxy["imap"], timeout=20)
    assert imap.login(USER, PASSWORD)[0] == "OK"
    assert imap.select("INBOX") == ("OK", [b"2"])
    status, data = imap.fetch("1:*", "(UID RFC822.SIZE BODY.PEEK[HEADER])")
    assert status == "OK" and b"Subject: welcome" in data[0][1]
    status, data = imap.uid("FETCH", "2", "(RFC822)")
    assert status == "OK" and b"relayed" in data[0][1]
    assert imap.logout()[0] == "BYE"

