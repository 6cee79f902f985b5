"""proxy_client_id: Dovecot logs the client's own address (rip=) for IMAP (ID) and POP3 (XCLIENT) logins."""

import imaplib
import poplib
import socket

import pytest

from support.authserver import RecordingAuthServer
from support.backends import USERS, wait_for_log
from support.harness import free_port, mail_config

CLIENT_IP = "127.0.0.5"  # not the proxy's own address towards Dovecot (127.0.0.1)


@pytest.fixture
def edge(dovecot, mailproxy_master):  # noqa: F811
    auth = RecordingAuthServer(
        USERS, {"imap": ("127.0.0.1", dovecot.imap_port), "pop3": ("127.0.0.1", dovecot.pop3_port)})
    ports = {"imap": free_port(), "pop3": free_port(), "plain": free_port()}
    config = mail_config(auth.url, """    server { listen 127.0.0.1:%d; protocol imap; proxy_client_id on; }
    server { listen 127.0.0.1:%d; protocol pop3; proxy_client_id on; }
    server { listen 127.0.0.1:%d; protocol imap; }
}
""" % (ports["imap"], ports["pop3"], ports["plain"]))
    master = mailproxy_master(config, handler=None)
    yield ports, dovecot
    auth.close()
    assert "[alert]" not in master.error_log()


def from_client_ip(port):
    sock = socket.socket()
    sock.settimeout(20)
    sock.bind((CLIENT_IP, 0))
    sock.connect(("127.0.0.1", port))
    return sock, sock.getsockname()[1]


class Imap(imaplib.IMAP4):
    def _create_socket(self, timeout):
        self.sock_, self.source_port = from_client_ip(self.port)
        return self.sock_


class Pop3(poplib.POP3):
    def _create_socket(self, timeout):
        self.sock_, self.source_port = from_client_ip(self.port)
        return self.sock_


def test_imap_login_shows_client_address(edge):
    ports, dovecot = edge
    imap = Imap("127.0.0.1", ports["imap"])
    assert imap.login("alice", USERS["alice"])[0] == "OK"
    assert imap.select("INBOX")[0] == "OK"
    imap.logout()
    wait_for_log(dovecot.log_path, "Login: user=<alice>, method=PLAIN, rip=%s, lip=127.0.0.1" % CLIENT_IP)


def test_pop3_login_shows_client_address(edge):
    ports, dovecot = edge
    pop = Pop3("127.0.0.1", ports["pop3"])
    pop.user("bob")
    assert pop.pass_(USERS["bob"]).startswith(b"+OK")
    pop.stat()
    pop.quit()
    log = wait_for_log(dovecot.log_path, "pop3-login: Info: Login: user=<bob>")
    lines = [line for line in log.splitlines() if "pop3-login: Info: Login: user=<bob>" in line]
    assert "rip=%s" % CLIENT_IP in lines[-1], lines[-1]


def test_off_by_default_shows_the_proxy(edge):
    ports, dovecot = edge
    imap = Imap("127.0.0.1", ports["plain"])
    assert imap.login("bob", USERS["bob"])[0] == "OK"
    imap.logout()
    log = wait_for_log(dovecot.log_path, "imap-login: Info: Login: user=<bob>")
    lines = [line for line in log.splitlines() if "imap-login: Info: Login: user=<bob>" in line]
    assert "rip=127.0.0.1," in lines[-1], lines[-1]
