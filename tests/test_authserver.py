"""mailproxy-auth against the auth_http protocol: a real process, real HTTP requests."""

import hashlib
import hmac
import os
import socket
import subprocess
import sys
import time

import pytest
import requests

from support.crypt_helper import bcrypt_hash, sha512_crypt
from tools.ports import free_port

USERS = """
# default backends
backend imap 127.0.0.1:1143
backend pop3 127.0.0.1:1110 127.0.0.1:2110
backend smtp 127.0.0.1:1025
domain example.org imap=127.0.0.1:3143 smtp=127.0.0.1:3025
user alice@example.com {PLAIN}wonderland
user bob@example.com %s
user carol@example.org %s imap=127.0.0.1:4143
"""




@pytest.fixture
def authserver(tmp_path):
    users = tmp_path / "users"
    users.write_text(USERS % ("{SHA512-CRYPT}" + sha512_crypt("builder"), "{BLF-CRYPT}" + bcrypt_hash("kitten")))
    port = free_port()
    log = tmp_path / "access.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "mailproxy.authserver.app", "--users", str(users),
         "--listen", "127.0.0.1:%d" % port, "--max-failures", "3", "--wait", "2",
         "--access-log", str(log)],
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.02)
    server = type("S", (), {})()
    server.url = "http://127.0.0.1:%d/auth" % port
    server.users = users
    server.log = log
    server.process = process
    yield server
    process.terminate()
    process.wait(10)
    process.stderr.close()


def ask(server, user, password, method="plain", protocol="imap", client="192.0.2.1", **extra):
    headers = {
        "Auth-Method": method,
        "Auth-User": user,
        "Auth-Pass": password,
        "Auth-Protocol": protocol,
        "Auth-Login-Attempt": "1",
        "Client-IP": client,
    }
    headers.update(extra)
    reply = requests.get(server.url, headers=headers, timeout=5)
    return {k: v for k, v in reply.headers.items() if k.startswith("Auth-")}


def test_plain_ok_routes_to_default_backend(authserver):
    assert ask(authserver, "alice@example.com", "wonderland") == {
        "Auth-Status": "OK", "Auth-Server": "127.0.0.1", "Auth-Port": "1143"}


def test_sha512_crypt_and_bcrypt(authserver):
    assert ask(authserver, "bob@example.com", "builder")["Auth-Status"] == "OK"
    assert ask(authserver, "carol@example.org", "kitten")["Auth-Port"] == "4143"
    assert ask(authserver, "bob@example.com", "wrong")["Auth-Status"] == "Invalid login or password"


def test_domain_routing_and_stable_hash(authserver):
    assert ask(authserver, "carol@example.org", "kitten", protocol="smtp")["Auth-Port"] == "3025"
    ports = {ask(authserver, "alice@example.com", "wonderland", protocol="pop3")["Auth-Port"] for _ in range(5)}
    assert len(ports) == 1 and ports <= {"1110", "2110"}


def test_reload_and_escaped_password(authserver, tmp_path):
    authserver.users.write_text(authserver.users.read_text() + "user dave {PLAIN}a%b\x01\n")
    authserver.process.send_signal(1)
    deadline = time.monotonic() + 10
    while ask(authserver, "dave", "a%25b%01", client="192.0.2.9")["Auth-Status"] != "OK":
        assert time.monotonic() < deadline, "users file not reloaded"


def test_apop_and_cram_md5_return_clear_password(authserver):
    salt = "<123.456@mail.example.com>"
    digest = hashlib.md5((salt + "wonderland").encode()).hexdigest()
    reply = ask(authserver, "alice@example.com", digest, method="apop", protocol="pop3", **{"Auth-Salt": salt})
    assert reply["Auth-Status"] == "OK" and reply["Auth-Pass"] == "wonderland"
    digest = hmac.new(b"wonderland", salt.encode(), hashlib.md5).hexdigest()
    reply = ask(authserver, "alice@example.com", digest, method="cram-md5", **{"Auth-Salt": salt})
    assert reply["Auth-Pass"] == "wonderland"
    # A hashed password cannot answer a challenge.
    assert ask(authserver, "bob@example.com", digest, method="cram-md5", **{"Auth-Salt": salt})[
        "Auth-Status"] != "OK"


def test_failure_wait_then_lockout_without_wait(authserver):
    first = ask(authserver, "alice@example.com", "bad", client="198.51.100.7")
    assert first == {"Auth-Status": "Invalid login or password", "Auth-Wait": "2"}
    ask(authserver, "alice@example.com", "bad", client="198.51.100.7")
    third = ask(authserver, "alice@example.com", "bad", client="198.51.100.7")
    assert "Auth-Wait" not in third
    # Locked out even with the right password; so is the login alice, from anywhere (it failed three
    # times too), while another login from another address is unaffected.
    assert "Auth-Wait" not in ask(authserver, "alice@example.com", "wonderland", client="198.51.100.7")
    assert "Auth-Wait" not in ask(authserver, "alice@example.com", "wonderland", client="198.51.100.8")
    assert ask(authserver, "bob@example.com", "builder", client="198.51.100.8")["Auth-Status"] == "OK"


def test_smtp_relay_without_auth_routes_by_recipient(authserver):
    reply = ask(authserver, "", "", method="none", protocol="smtp",
                **{"Auth-SMTP-To": "RCPT TO:<x@example.org>", "Auth-SMTP-From": "MAIL FROM:<a@b>"})
    assert reply["Auth-Port"] == "3025"


def test_access_log_has_no_password(authserver):
    ask(authserver, "alice@example.com", "wonderland")
    ask(authserver, "alice@example.com", "sekrit-wrong")
    deadline = time.monotonic() + 5
    while authserver.log.read_text().count("\n") < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    text = authserver.log.read_text()
    assert 'result="ok"' in text and 'result="invalid"' in text
    assert "wonderland" not in text and "sekrit" not in text


def test_broken_users_file_keeps_previous(authserver):
    authserver.users.write_text("nonsense line\n")
    os.utime(authserver.users, (time.time() + 10, time.time() + 10))
    authserver.process.send_signal(1)
    assert ask(authserver, "alice@example.com", "wonderland")["Auth-Status"] == "OK"
