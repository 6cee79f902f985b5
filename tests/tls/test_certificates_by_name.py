"""ssl_certificate naming $ssl_server_name (ours, issue 18 item 2): ten thousand EC certificates, each
found by the name `openssl s_client -servername` sends, a default without SNI, files renewed on disk."""

import concurrent.futures
import hashlib
import os
import shutil
import socket
import ssl
import subprocess
import tempfile

import pytest
import trustme

from mailproxy.tls import by_name as tls_by_name

from support.harness import free_port

OPENSSL = "/usr/bin/openssl"
DOMAINS = ["d%d.example.test" % i for i in range(10000)]


class Certs:
    def __init__(self, root):
        self.root = root
        self.ca = trustme.CA(organization_name="by-name CA")
        self.ca_path = os.path.join(root, "ca.pem")
        self.ca.cert_pem.write_to_path(self.ca_path)
        self.issue("default.example.test", "default")
        for name in DOMAINS:
            self.issue(name, name)

    def issue(self, name, stem):
        """Write <stem>.pem and <stem>.key for ``name`` (by rename, as a renewal tool would)."""
        cert = self.ca.issue_cert(name, key_type=trustme.KeyType.ECDSA)
        for suffix, blobs in ((".pem", cert.cert_chain_pems), (".key", [cert.private_key_pem])):
            scratch = os.path.join(self.root, "." + stem + suffix)
            with open(scratch, "wb") as out:
                out.write(b"".join(blob.bytes() for blob in blobs))
            os.replace(scratch, os.path.join(self.root, stem + suffix))
        return hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())).hexdigest()


@pytest.fixture(scope="module")
def certs():
    # Workers read these files after dropping root (to nobody, as nginx's): pytest's private tmp_path is
    # out of their reach, so the test files sit in a world-readable directory of their own.
    root = tempfile.mkdtemp(prefix="mailproxy-by-name-")
    os.chmod(root, 0o755)
    old = os.umask(0o022)
    try:
        yield Certs(root)
    finally:
        os.umask(old)
        shutil.rmtree(root)


@pytest.fixture
def served(certs, mailproxy_master):
    """(port, master) of an IMAPS server finding its certificates by name."""
    port = free_port()
    root = certs.root
    master = mailproxy_master("""
worker_processes 2;
error_log logs/error.log info;
events { worker_connections 256; }
mail {
    auth_http 127.0.0.1:1/auth;
    server {
        listen 127.0.0.1:%d ssl;
        protocol imap;
        ssl_certificate %s/default.pem;
        ssl_certificate_key %s/default.key;
        ssl_certificate %s/$ssl_server_name.pem;
        ssl_certificate_key %s/${ssl_server_name}.key;
    }
}
""" % (port, root, root, root, root), handler=None)
    return port, master


@pytest.fixture
def port(served):
    return served[0]


def s_client(port, ca, name=None, check=None):
    """Whether openssl s_client verified the chain for ``check`` (a host name) and saw the session
    through to LOGOUT's BYE (its exit status is 1 when the server closes first, so it tells nothing)."""
    # Only the test's CA is trusted: -no-CApath and -no-CAstore also spare each run reading the system's
    # store (about 20 ms of its 27), which is what lets ten thousand runs fit in a test.
    args = [OPENSSL, "s_client", "-connect", "127.0.0.1:%d" % port, "-CAfile", ca, "-no-CApath", "-no-CAstore",
            "-verify_return_error", "-ign_eof"]  # read on to the server's BYE: LOGOUT below ends the session
    args += ["-servername", name] if name else ["-noservername"]
    if check:
        args += ["-verify_hostname", check]
    done = subprocess.run(args, input=b"a LOGOUT\r\n", capture_output=True, timeout=30)
    out = done.stdout.decode(errors="replace")
    return "Verify return code: 0 (ok)" in out and "* OK IMAP4 ready" in out and "* BYE" in out, out


def peer_fingerprint(port, ca, name):
    ctx = ssl.create_default_context(cafile=ca)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=name) as tls:
            return hashlib.sha256(tls.getpeercert(binary_form=True)).hexdigest()


def test_ten_thousand_names(certs, port):
    def one(name):
        return name, s_client(port, certs.ca_path, name, check=name)[0]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, DOMAINS))
    failed = [name for name, ok in results if not ok]
    assert not failed, failed[:5]


def test_default_without_sni_or_files(certs, port):
    assert s_client(port, certs.ca_path, None, check="default.example.test")[0]
    # A name without files, and names that are no host names, all get the default.
    for name in ("nowhere.example.test", "ca", "bad_name.example.test"):
        ok, out = s_client(port, certs.ca_path, name, check="default.example.test")
        assert ok, (name, out[-500:])


def test_broken_file_logged_default_served(certs, served):
    port, master = served
    with open(os.path.join(certs.root, "broken.example.test.pem"), "w") as out:
        out.write("not a certificate\n")
    with open(os.path.join(certs.root, "broken.example.test.key"), "w") as out:
        out.write("not a key\n")
    for _ in range(4):
        ok, out = s_client(port, certs.ca_path, "broken.example.test", check="default.example.test")
        assert ok, out[-500:]
    master.wait_log("broken.example.test.pem")
    lines = [line for line in master.error_log().splitlines() if "broken.example.test" in line]
    # Once per worker at most (2 workers): the failure is remembered until the files change.
    assert 1 <= len(lines) <= 2, lines
    assert "[error]" in lines[0] and 'cannot load certificate "' in lines[0], lines[0]


def test_renewed_file_picked_up(certs, port):
    name = DOMAINS[0]
    before = peer_fingerprint(port, certs.ca_path, name)
    renewed = certs.issue(name, name)
    assert renewed != before
    # Both workers: each has its own cache, each must notice.
    seen = {peer_fingerprint(port, certs.ca_path, name) for _ in range(6)}
    assert seen == {renewed}


def test_not_a_host_name_never_reaches_the_file_system(tmp_path, monkeypatch):
    def no_stat(path):
        raise AssertionError("stat(%r)" % path)

    by_name = tls_by_name.CertificatesByName(((str(tmp_path / "$ssl_server_name.pem"),) * 2,), build=None)
    monkeypatch.setattr(tls_by_name.os, "stat", no_stat)
    for name in ("../etc/passwd", "a/b", "..", "a..b", "-a.test", "a-.test", "x\x00y", "a b", "",
                 None, "é.test", "a" * 64 + ".test", ("a" * 60 + ".") * 5):
        assert by_name.context(name) is None, name
    assert tls_by_name.host_name("Mail.Example.TEST.") == "mail.example.test"


def test_cache_is_bounded_and_follows_files(tmp_path):
    built = []

    def build(paths):
        built.append(paths[0][0])
        return object()

    for i in range(5):
        (tmp_path / ("n%d.test.pem" % i)).write_text("x")
    by_name = tls_by_name.CertificatesByName(((str(tmp_path / "$ssl_server_name.pem"),) * 2,), build, size=3)
    first = by_name.context("n0.test")
    assert by_name.context("N0.test.") is first and len(built) == 1
    for i in range(1, 5):
        by_name.context("n%d.test" % i)
    assert list(by_name.cache) == ["n2.test", "n3.test", "n4.test"]
    (tmp_path / "n4.test.pem").write_text("longer")  # new size (and mtime): built again
    assert by_name.context("n4.test") is not None and len(built) == 6
    os.unlink(tmp_path / "n3.test.pem")
    assert by_name.context("n3.test") is None and "n3.test" not in by_name.cache


def test_a_default_is_required(certs, tmp_path):
    from mailproxy.conf.lexer import ConfigError
    from mailproxy.conf.load import load_config
    from mailproxy.tls import client as client_tls

    conf = tmp_path / "mailproxy.conf"
    conf.write_text("events {}\nmail { auth_http 127.0.0.1:1/a; server { listen 127.0.0.1:%d ssl; protocol imap; "
                    "ssl_certificate %s/$ssl_server_name.pem; ssl_certificate_key %s/$ssl_server_name.key; } }\n"
                    % (free_port(), certs.root, certs.root))
    with pytest.raises(ConfigError, match="needs one without variables"):
        client_tls.build_context(load_config(str(conf), str(tmp_path)).servers[0])


def test_failed_file_tried_again_after_chmod(tmp_path):
    # A key the worker user cannot read (mode 0600, owned by root) fails to load; a chmod alone, which
    # leaves mtime, size and inode as they were, must make the next handshake try it again. The tests
    # run as root, who reads anything: the build below refuses a key others cannot read instead.
    from mailproxy.conf.lexer import ConfigError

    tried = []

    def build(paths):
        key = paths[0][1]
        tried.append(key)
        if not os.stat(key).st_mode & 0o004:
            raise ConfigError('cannot load certificate key "%s": (13: Permission denied)' % key)
        return object()

    (tmp_path / "n.test.pem").write_text("x")
    key = tmp_path / "n.test.key"
    key.write_text("k")
    os.chmod(key, 0o600)
    stamp = os.stat(key)
    by_name = tls_by_name.CertificatesByName(((str(tmp_path / "$ssl_server_name.pem"),
                                               str(tmp_path / "$ssl_server_name.key")),), build)
    reports = []
    assert by_name.context("n.test", reports.append) is None and len(tried) == 1 and len(reports) == 1
    assert by_name.context("n.test", reports.append) is None and len(tried) == 1  # unchanged: not parsed again
    os.chmod(key, 0o644)
    os.utime(key, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert by_name.context("n.test") is not None and len(tried) == 2
