"""proxy_smtp_auth plain|login and the auth server's Auth-Method: none|plain|login, per session."""

import base64
import smtplib
import socket
import threading

import pytest

from support.authserver import RecordingAuthServer
from support.backends import USERS
from support.harness import free_port, mail_config
from support.servers import SmtpBackend


def ok_reply(port, method=None):
    extra = "Auth-Method: %s\r\n" % method if method else ""
    return ("HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: %d\r\n%s\r\n"
            % (port, extra)).encode()


@pytest.fixture
def edge(mailproxy_master):
    auth = RecordingAuthServer(USERS, {})
    ports = {"off": free_port(), "login": free_port(), "on": free_port()}
    config = mail_config(auth.url, """    server_name proxy.test;
    xclient off;
    server { listen 127.0.0.1:%d; protocol smtp; }
    server { listen 127.0.0.1:%d; protocol smtp; proxy_smtp_auth login; }
    server { listen 127.0.0.1:%d; protocol smtp; proxy_smtp_auth on; }
}
""" % (ports["off"], ports["login"], ports["on"]))
    master = mailproxy_master(config, handler=None)
    yield ports, auth, master
    auth.close()
    assert "[alert]" not in master.error_log()


PLAIN = [b"AUTH PLAIN %s\r\n" % base64.b64encode(b"\0bob\0" + USERS["bob"].encode())]
LOGIN = [b"AUTH LOGIN\r\n", base64.b64encode(b"bob") + b"\r\n", base64.b64encode(USERS["bob"].encode()) + b"\r\n"]


@pytest.mark.parametrize("server, method, expected", [
    ("off", None, []),  # nginx's default: no AUTH
    ("on", None, PLAIN),  # nginx's proxy_smtp_auth on
    ("login", None, LOGIN),
    ("off", "plain", PLAIN),  # the auth server turns it on for this session
    ("off", "login", LOGIN),
    ("on", "none", []),  # ... or off
    ("login", "PLAIN", PLAIN),
    ("on", "cram-md5", PLAIN),  # a value it cannot mean is ignored, as nginx ignores the header
])
def test_backend_auth(edge, server, method, expected):
    ports, auth, master = edge
    backend = SmtpBackend(ehlo=b"250-backend.test\r\n250 AUTH PLAIN LOGIN\r\n")
    auth.script.append(ok_reply(backend.port, method))
    try:
        with smtplib.SMTP("127.0.0.1", ports[server], timeout=20) as client:
            client.ehlo("client.test")
            assert client.login("bob", USERS["bob"])[0] == 235
            assert client.noop()[0] == 250
        assert backend.done.wait(10)
    finally:
        backend.close()
    assert backend.lines[0] == b"EHLO proxy.test\r\n"
    assert backend.lines[1:1 + len(expected)] == expected
    assert backend.lines[1 + len(expected)].upper() == b"NOOP\r\n"
    # The credentials never reach the log above debug.
    assert USERS["bob"] not in master.error_log()


def test_backend_refuses_auth_login(edge):
    ports, auth, master = edge
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    auth.script.append(ok_reply(listener.getsockname()[1], "login"))

    def serve():
        conn, _ = listener.accept()
        with conn, conn.makefile("rb") as reader:
            conn.sendall(b"220 hi\r\n")
            reader.readline()
            conn.sendall(b"250 hi\r\n")
            reader.readline()  # AUTH LOGIN
            conn.sendall(b"504 5.5.4 mechanism not supported\r\n")
            reader.readline()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with smtplib.SMTP("127.0.0.1", ports["off"], timeout=20) as client:
        client.ehlo("client.test")
        with pytest.raises(smtplib.SMTPException):
            client.login("bob", USERS["bob"])
    listener.close()
    master.wait_log('upstream sent invalid response: "504 5.5.4 mechanism not supported"')


def test_postfix_with_auth_method_none(postfix, mailproxy_master):  # noqa: F811
    """Postfix has no SASL here: the auth server must say `none`, else Postfix refuses the AUTH."""
    auth = RecordingAuthServer(USERS, {"smtp": ("127.0.0.1", postfix.smtp_port)})
    port = free_port()
    config = mail_config(auth.url, """    server_name proxy.test;
    proxy_smtp_auth on;
    server { listen 127.0.0.1:%d; protocol smtp; }
}
""" % (port))
    master = mailproxy_master(config, handler=None)
    try:
        # proxy_smtp_auth on alone: Postfix answers AUTH with 503, the client gets the internal error.
        auth.script.append(ok_reply(postfix.smtp_port))
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
            with pytest.raises(smtplib.SMTPException):
                client.login("bob", USERS["bob"])
        master.wait_log("upstream sent invalid response")
        # Auth-Method: none for this session: no AUTH, and mail flows through.
        auth.script.append(ok_reply(postfix.smtp_port, "none"))
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
            assert client.login("bob", USERS["bob"])[0] == 235
            assert client.noop()[0] == 250
    finally:
        auth.close()
