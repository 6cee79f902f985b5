"""A bug in a session costs that session only, and is logged with its traceback (issue 24 item 4).

The session handler here is mailproxy's own, run by a real worker; only the listen block it is handed
raises where no configuration could, standing in for a bug the code does not have yet."""

import socket

# The worker imports this module for its handler before it drops root: what the handler runs must be
# imported here, not in the session, when the worker may no longer read the installation.
from mailproxy import session

HANDLER = "reliability.test_session_bug:session_with_a_bug"


class _BuggyListen:
    def __init__(self, listen):
        self._listen = listen

    def __getattr__(self, name):
        if name == "proxy_protocol":
            raise RuntimeError("injected bug")
        return getattr(self._listen, name)


def session_with_a_bug(sock, peer, listen, server, worker):
    session.handle(sock, peer, _BuggyListen(listen), server, worker)


def test_bug_is_an_alert_with_traceback_and_the_worker_lives(mailproxy_master):
    # Imported here: the worker imports this module for its handler, without the tests' path hook.
    from support.harness import free_port

    port = free_port()
    master = mailproxy_master("""
worker_processes 1;
error_log logs/error.log info;
events { worker_connections 16; }
mail {
    auth_http 127.0.0.1:9/auth;
    server { listen 127.0.0.1:%d; protocol imap; }
}
""" % port, handler=HANDLER)
    workers = master.workers()
    for _ in range(2):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            assert client.recv(100) == b""  # the session is closed, nothing sent
    master.wait_log("session failed: RuntimeError: injected bug")
    log = master.error_log()
    lines = [line for line in log.splitlines() if "[alert]" in line]
    assert any("Traceback (most recent call last):" in line for line in lines), lines
    assert any("in __getattr__" in line for line in lines), lines
    assert any("raise RuntimeError(\\x22injected bug\\x22)" in line or 'raise RuntimeError("injected bug")' in line
               for line in lines), lines
    assert master.workers() == workers  # the same worker served both
