"""A client that leaves while the proxy waits for it (issue 25 item 9): during an `Auth-Status: WAIT`
loop or a failure's Auth-Wait the session watches the client, and at its EOF stops: no further request
to the auth server, no backend login for a client that is gone."""

import socket

import pytest

from support.authserver import RecordingAuthServer
from support.harness import free_port, mail_config

WAIT = b"HTTP/1.0 200 OK\r\nAuth-Status: WAIT\r\nAuth-Wait: 2\r\n\r\n"
FAIL_WAIT = b"HTTP/1.0 200 OK\r\nAuth-Status: Invalid login or password\r\nAuth-Wait: 3\r\n\r\n"

LOGINS = {"imap": b"a LOGIN alice secret\r\n", "pop3": b"USER alice\r\nPASS secret\r\n",
          "smtp": b"EHLO x\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n"}


@pytest.fixture
def edge(mailproxy_master):
    backend = socket.socket()
    backend.bind(("127.0.0.1", 0))
    backend.listen(16)
    backend_address = backend.getsockname()
    auth = RecordingAuthServer({"alice": "secret"}, {name: backend_address for name in LOGINS})
    ports = {name: free_port() for name in LOGINS}
    config = mail_config(auth.url, """
%s}
""" % ("".join("    server { listen 127.0.0.1:%d; protocol %s; %s}\n"
                         % (ports[name], name, "smtp_auth plain; " if name == "smtp" else "")
                         for name in LOGINS)), timeout="30s")
    master = mailproxy_master(config, handler=None)
    yield ports, auth, backend, master
    auth.close()
    backend.close()
    assert "[alert]" not in master.error_log()


def leave_while_waiting(port, login, auth, requests_before):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.recv(4096)
        client.sendall(login)
        # The auth server has the request, and will answer WAIT or a failure with Auth-Wait: leave now.
        while len(auth.requests) == requests_before:
            client.settimeout(0.05)
            try:
                client.recv(4096)
            except socket.timeout:
                pass


@pytest.mark.parametrize("protocol", sorted(LOGINS))
@pytest.mark.parametrize("reply", [WAIT, FAIL_WAIT], ids=["wait", "failure-wait"])
def test_session_ends_when_client_leaves_during_wait(edge, protocol, reply):
    ports, auth, backend, master = edge
    auth.script = [reply]
    before = len(auth.requests)
    leave_while_waiting(ports[protocol], LOGINS[protocol], auth, before)
    # The session notices the EOF at once, well before the Auth-Wait is over.
    master.wait_log("client closed connection while in http auth state", timeout=1.5)
    if reply is FAIL_WAIT:
        assert 'client login failed: "Invalid login or password"' in master.error_log()
    assert len(auth.requests) == before + 1
    backend.settimeout(0)
    with pytest.raises(BlockingIOError):
        backend.accept()  # nothing ever connected to the backend
