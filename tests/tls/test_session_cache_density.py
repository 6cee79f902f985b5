"""ssl_session_cache shared:name:size stores each session at its own length, as nginx's zone does ("one
megabyte of the cache contains about 4000 sessions"): real handshakes in memory, resumed afterwards."""

import ssl

import pytest

from mailproxy.conf import load_config
from mailproxy.tls import client as client_tls
from mailproxy.tls import openssl


@pytest.fixture(autouse=True)
def bridge_active():
    if openssl.bridge is None:
        pytest.fail("the OpenSSL bridge is off: %s" % openssl.bridge_off_reason)


def server_context(tmp_path, pki, directives):
    conf = tmp_path / "mailproxy.conf"
    conf.write_text("events {}\nmail {\n auth_http 127.0.0.1:9000/auth;\n server {\n  listen 127.0.0.1:8993 ssl;\n"
                    "  protocol imap; %s %s\n }\n}\n" % (pki.tls_directives(), directives))
    return client_tls.build_context(load_config(str(conf), prefix=str(tmp_path)).servers[0])


def handshake(server_ctx, client_ctx, session=None):
    """Both sides over memory BIOs; the server's session is kept as the session keeps it (no close path
    drops it from the cache). Returns the client's SSLObject."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(to_client, to_server, server_hostname="localhost", session=session)
    server_in, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_ctx.wrap_bio(server_in, server_out, server_side=True)
    done = set()
    for _ in range(10):
        for name, side in (("client", client), ("server", server)):
            if name not in done:
                try:
                    side.do_handshake()
                    done.add(name)
                except ssl.SSLWantReadError:
                    pass
        server_in.write(to_server.read())
        to_client.write(server_out.read())
        if done == {"client", "server"}:
            openssl.bridge.keep_session(server._sslobj)
            try:
                client.read(1)  # takes in TLS 1.3's NewSessionTicket, which the session comes with
            except ssl.SSLWantReadError:
                pass
            return client
    raise AssertionError("the handshake did not finish")


# TLS 1.3 stores two sessions a connection (OpenSSL's two tickets, as in nginx) and two more for each
# resumption, which uses its ticket up; a TLS 1.2 session is resumed in place. A server session is about
# 150 bytes of DER.
@pytest.mark.parametrize("version,connections", [(ssl.TLSVersion.TLSv1_2, 200), (ssl.TLSVersion.TLSv1_3, 80)],
                         ids=["TLSv1.2", "TLSv1.3"])
def test_a_small_zone_holds_as_many_sessions_as_nginx_s(tmp_path, pki, version, connections):
    # 64 KiB: about 250 sessions at nginx's density; fixed 2 KiB slots held 31.
    zone = "DENSITY_%s" % version.name  # a zone of its own: a zone outlives its contexts
    server_ctx = server_context(tmp_path, pki, "ssl_session_cache shared:%s:64k; ssl_session_tickets off;" % zone)
    client_ctx = pki.client_context()
    client_ctx.maximum_version = version
    sessions = [handshake(server_ctx, client_ctx).session for _ in range(connections)]
    assert all(session is not None for session in sessions)
    resumed = sum(handshake(server_ctx, client_ctx, session).session_reused for session in sessions)
    assert resumed >= connections * 0.95, resumed


def test_sessions_with_client_certificates_fill_the_ring_and_the_oldest_go(tmp_path, pki):
    """A client certificate makes a session a kilobyte longer: a zone whose ring is full of them writes
    over the oldest, which then are not resumed, while the newest are."""
    server_ctx = server_context(tmp_path, pki, "ssl_session_cache shared:CERTS:32k; ssl_session_tickets off; "
                                "ssl_verify_client optional; ssl_client_certificate %s;" % pki["client_ca.pem"])
    client_ctx = pki.client_context("client")
    client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    sessions = [handshake(server_ctx, client_ctx).session for _ in range(40)]
    # TLS 1.2 resumes a session in place: resuming writes nothing to the ring.
    assert [handshake(server_ctx, client_ctx, session).session_reused for session in sessions[-5:]] == [True] * 5
    assert [handshake(server_ctx, client_ctx, session).session_reused for session in sessions[:5]] == [False] * 5
