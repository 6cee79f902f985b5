"""The TLS pump inside a real worker: a corrupted record from an IMAPS client mid-session is logged in
OpenSSL's words, as the copy loop logs it, and the worker goes on serving."""

import socket
import ssl
import sys

import pytest

from bench import engines  # noqa: E402  (the bench's IMAP backend, started and stopped by pid)
from mailproxy import relay

from .conftest import WAIT
from .test_tls_pump import BAD_RECORD, HandTls, corrupt
from support.authserver import RecordingAuthServer
from support.backends import USERS
from support.harness import free_port, mail_config, missing


@pytest.fixture(autouse=True)
def tls_pump_in_use():
    if not relay.TLS_PUMP_AVAILABLE:
        missing("the TLS pump (the OpenSSL bridge active, MAILPROXY_TLS_PUMP unset)")


@pytest.fixture
def imap_backend():
    backend, port = engines.start_printing_port([sys.executable, "-m", "bench.backend", "imap"],
                                                "bench IMAP backend")
    try:
        yield port
    finally:
        backend.stop()


def login(port, ca_file):
    raw = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    tls = HandTls(raw, ssl.create_default_context(cafile=ca_file), False, "localhost")
    assert tls.read_until(b"\r\n").startswith(b"* OK")
    raw.sendall(tls.records(b"a LOGIN alice %s\r\n" % USERS["alice"].encode()))
    assert b"a OK" in tls.read_until(b"a OK")
    return raw, tls


@pytest.mark.parametrize("engine", ["pump", "copy"])
def test_corrupted_record_is_logged_and_the_worker_lives(mailproxy_master, certs, tmp_path, imap_backend,
                                                         engine):
    ca_file = str(tmp_path / "ca.pem")
    certs.ca.cert_pem.write_to_path(ca_file)
    auth = RecordingAuthServer(USERS, {"imap": ("127.0.0.1", imap_backend)})
    port = free_port()
    config = mail_config(auth.url, """
    server { listen 127.0.0.1:%d ssl; protocol imap; ssl_certificate %s; ssl_certificate_key %s; }
}
""" % (port, certs.cert, certs.key), timeout="20s")
    env = {"MAILPROXY_TLS_PUMP": "off"} if engine == "copy" else {}
    try:
        master = mailproxy_master(config, handler=None, env=env)
        workers = master.workers()
        raw, tls = login(port, ca_file)
        with raw:
            raw.sendall(tls.records(b"b NOOP\r\n"))
            assert b"b OK" in tls.read_until(b"b OK")
            raw.sendall(corrupt(tls.records(b"c NOOP\r\n")))
            master.wait_log(BAD_RECORD)
        line = [entry for entry in master.error_log().splitlines() if BAD_RECORD in entry][0]
        assert "[info]" in line and "client: 127.0.0.1" in line, line
        # The same worker serves the next session.
        raw, tls = login(port, ca_file)
        raw.close()
        assert master.workers() == workers
        log = master.error_log()
        assert "Traceback" not in log and "[alert]" not in log, log
    finally:
        auth.close()
