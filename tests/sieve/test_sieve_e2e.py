"""ManageSieve through mailproxy to Dovecot's managesieve, with sievelib and sieve-connect (issue 17.4)."""

import os
import socket
import subprocess

import pytest

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from support.authserver import RecordingAuthServer
from support.backends import MANAGESIEVE, USERS, require
from support.harness import free_port, mail_config, missing
from support.pki import Pki

try:
    from sievelib import managesieve as sievelib
except ImportError:  # the [test] extra brings it
    sievelib = None


@pytest.fixture(autouse=True)
def sievelib_installed():
    if sievelib is None:
        missing("sievelib (pip install sievelib)")

SIEVE_CONNECT = "/usr/bin/sieve-connect"
SCRIPT = 'require "fileinto";\nif header :contains "subject" "%s" { fileinto "INBOX"; }\n'


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return Pki(str(tmp_path_factory.mktemp("pki")))


@pytest.fixture
def edge(pki, dovecot, mailproxy_master):
    require(MANAGESIEVE)
    auth = RecordingAuthServer(USERS, {"sieve": ("127.0.0.1", dovecot.sieve_port)})
    ports = {"plain": free_port(), "starttls": free_port()}
    config = mail_config(auth.url, """
    sieve_auth plain login;
    %s
    server { listen 127.0.0.1:%d; protocol sieve; }
    server { listen 127.0.0.1:%d; protocol sieve; starttls only; }
}
""" % (pki.tls_directives(), ports["plain"], ports["starttls"]), timeout="10s")
    master = mailproxy_master(config, handler=None)
    edge = type("Edge", (), {})()
    edge.ports, edge.auth, edge.master, edge.dovecot, edge.pki = ports, auth, master, dovecot, pki
    yield edge
    auth.close()
    log = master.error_log()
    assert "[alert]" not in log, log


def active_script(edge, user):
    """What Dovecot runs for ``user``: the target of the active symlink (sieve = file:~/sieve;active=...)."""
    link = os.path.join(edge.dovecot.maildir_root, user, ".dovecot.sieve")
    if not os.path.islink(link):
        return None, None
    with open(link) as script:
        return os.path.basename(os.readlink(link)), script.read()


def test_sievelib_upload_list_activate(edge):
    client = sievelib.Client("127.0.0.1", edge.ports["plain"])
    assert client.connect("alice", USERS["alice"], authmech="PLAIN")
    assert client.get_implementation() == "mailproxy"
    assert "fileinto" in client.get_sieve_capabilities()
    assert client.putscript("proxied", SCRIPT % "plain")
    assert client.setactive("proxied")
    active, others = client.listscripts()
    assert active == "proxied"
    client.logout()
    assert active_script(edge, "alice") == ("proxied.sieve", SCRIPT % "plain")
    headers = edge.auth.requests[-1][1]
    assert headers["auth-protocol"] == b"sieve" and headers["auth-method"] == b"plain"
    edge.master.wait_log("client logged in")


def test_sievelib_over_starttls(edge, monkeypatch):
    # sievelib trusts the default CA store only; OpenSSL reads SSL_CERT_FILE for it.
    monkeypatch.setenv("SSL_CERT_FILE", edge.pki["server_ca.pem"])
    client = sievelib.Client("127.0.0.1", edge.ports["starttls"])
    assert client.connect("bob", USERS["bob"], starttls=True, authmech="LOGIN")
    assert client.putscript("tls", SCRIPT % "tls")
    assert client.setactive("tls")
    client.logout()
    assert active_script(edge, "bob") == ("tls.sieve", SCRIPT % "tls")
    headers = edge.auth.requests[-1][1]
    assert headers["auth-ssl"] == b"on"


def test_wrong_password_gets_no(edge):
    client = sievelib.Client("127.0.0.1", edge.ports["plain"])
    assert not client.connect("alice", "wrong", authmech="PLAIN")
    assert b"Invalid login or password" in client.errmsg


def test_starttls_only_offers_no_sasl_in_clear(edge):
    with socket.create_connection(("127.0.0.1", edge.ports["starttls"]), timeout=10) as conn:
        greeting = conn.makefile("rb").readline
        lines = []
        while not lines or not lines[-1].startswith(b"OK"):
            lines.append(greeting())
    assert b'"SASL" ""\r\n' in lines and b'"STARTTLS"\r\n' in lines


def _sieve_connect(edge, port, user, *args):
    read_end, write_end = os.pipe()
    os.write(write_end, USERS[user].encode() + b"\n")
    os.close(write_end)
    try:
        return subprocess.run(
            [SIEVE_CONNECT, "--server", "127.0.0.1", "--port", str(port), "--user", user,
             "--passwordfd", str(read_end), "--authmech", "PLAIN", *args],
            pass_fds=(read_end,), capture_output=True, timeout=30, stdin=subprocess.DEVNULL,
        )
    finally:
        os.close(read_end)


def test_sieve_connect_clear_and_starttls(edge, tmp_path):
    require(SIEVE_CONNECT)
    local = tmp_path / "vacation.sieve"
    local.write_text(SCRIPT % "sieve-connect")
    # --clearchan: sieve-connect refuses a connection without TLS unless told so.
    done = _sieve_connect(edge, edge.ports["plain"], "alice", "--clearchan",
                          "--upload", "--localsieve", str(local), "--remotesieve", "cli")
    assert done.returncode == 0, done.stderr
    done = _sieve_connect(edge, edge.ports["starttls"], "alice", "--tlscafile", edge.pki["server_ca.pem"],
                          "--activate", "--remotesieve", "cli")
    assert done.returncode == 0, done.stderr
    done = _sieve_connect(edge, edge.ports["starttls"], "alice", "--tlscafile", edge.pki["server_ca.pem"],
                          "--list")
    assert done.returncode == 0, done.stderr
    assert b"cli" in done.stdout
    assert active_script(edge, "alice") == ("cli.sieve", SCRIPT % "sieve-connect")


def _read_response(reader):
    lines = [reader.readline()]
    while lines[-1] and not lines[-1].split(b" ", 1)[0].rstrip(b"\r\n") in (b"OK", b"NO", b"BYE"):
        lines.append(reader.readline())
    return lines


def test_internal_error_is_bye_and_pipelined_command_reaches_backend(edge):
    import base64

    credentials = base64.b64encode(b"\0alice\0" + USERS["alice"].encode())
    edge.auth.script.append(b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\n\r\n")  # no server or port
    with socket.create_connection(("127.0.0.1", edge.ports["plain"]), timeout=10) as conn:
        reader = conn.makefile("rb")
        _read_response(reader)
        conn.sendall(b'AUTHENTICATE "PLAIN" "%s"\r\n' % credentials)
        assert reader.readline() == b'BYE "internal server error"\r\n'
        assert reader.readline() == b""
    with socket.create_connection(("127.0.0.1", edge.ports["plain"]), timeout=10) as conn:
        reader = conn.makefile("rb")
        _read_response(reader)
        # A literal credential and a command pipelined behind it: the backend answers both.
        conn.sendall(b'AUTHENTICATE "PLAIN" {%d+}\r\n%s\r\nLISTSCRIPTS\r\n' % (len(credentials), credentials))
        assert _read_response(reader)[-1].startswith(b"OK")
        assert _read_response(reader)[-1] == b'OK "Listscripts completed."\r\n'
