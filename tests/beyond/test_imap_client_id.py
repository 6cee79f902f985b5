"""imap_client_id (issue 18 item 4): ID before login answered, its fields told to the auth server and,
as Dovecot's ID before LOGIN, to the backend. Off, the reply stays nginx's BAD."""

import socket

import pytest

from support.authserver import RecordingAuthServer
from support.backends import USERS, wait_for_log
from support.harness import free_port, mail_config

THUNDERBIRD = b'a ID ("name" "Thunderbird" "version" "115.0")\r\n'
CLIENT_IP = "127.0.0.6"  # not the proxy's own address towards Dovecot


@pytest.fixture
def edge(dovecot, mailproxy_master):  # noqa: F811
    auth = RecordingAuthServer(USERS, {"imap": ("127.0.0.1", dovecot.imap_port)})
    ports = {"on": free_port(), "both": free_port(), "off": free_port()}
    config = mail_config(auth.url, """    server { listen 127.0.0.1:%d; protocol imap; imap_client_id on; }
    server { listen 127.0.0.1:%d; protocol imap; imap_client_id on; proxy_client_id on; }
    server { listen 127.0.0.1:%d; protocol imap; }
}
""" % (ports["on"], ports["both"], ports["off"]))
    master = mailproxy_master(config, handler=None)
    yield ports, dovecot, auth
    auth.close()
    assert "[alert]" not in master.error_log()


class Client:
    def __init__(self, port):
        self.sock = socket.socket()
        self.sock.settimeout(20)
        self.sock.bind((CLIENT_IP, 0))
        self.sock.connect(("127.0.0.1", port))
        self.buffer = b""
        self.until(b"\r\n")

    def until(self, end):
        while end not in self.buffer:
            piece = self.sock.recv(4096)
            assert piece, self.buffer
            self.buffer += piece
        got, _, self.buffer = self.buffer.partition(end)
        return got + end

    def tagged(self, tag):
        """Lines up to and including the one tagged ``tag``."""
        lines = [self.until(b"\r\n")]
        while not lines[-1].startswith(tag + b" "):
            lines.append(self.until(b"\r\n"))
        return b"".join(lines)

    def close(self):
        self.sock.close()


def test_id_answered_and_passed_on(edge):
    ports, dovecot, auth = edge
    client = Client(ports["on"])
    client.sock.sendall(THUNDERBIRD)
    assert client.until(b"a OK ID completed\r\n") == b"* ID NIL\r\na OK ID completed\r\n"
    client.sock.sendall(b'b LOGIN alice "%s"\r\n' % USERS["alice"].encode())
    assert b"b OK" in client.tagged(b"b")
    client.sock.sendall(b"c LOGOUT\r\n")
    client.until(b"c OK")
    client.close()
    headers = auth.requests[-1][1]
    assert headers["auth-imap-id"] == b"name=Thunderbird version=115.0"
    wait_for_log(dovecot.log_path, "ID sent: name=Thunderbird, version=115.0")


def test_id_merged_with_proxy_client_id(edge):
    ports, dovecot, auth = edge
    client = Client(ports["both"])
    client.sock.sendall(b'a ID ("name" "Thunderbird" "version" "115.1" "x-originating-ip" "10.9.9.9")\r\n')
    client.until(b"a OK ID completed\r\n")
    client.sock.sendall(b'b LOGIN bob "%s"\r\n' % USERS["bob"].encode())
    assert b"b OK" in client.tagged(b"b")
    client.close()
    # The auth server sees all the client said; the backend, none of its x- fields.
    assert auth.requests[-1][1]["auth-imap-id"] == b"name=Thunderbird version=115.1 x-originating-ip=10.9.9.9"
    log = wait_for_log(dovecot.log_path, "version=115.1")
    line = [each for each in log.splitlines() if "version=115.1" in each][-1]
    assert "10.9.9.9" not in line and "x-originating-ip=%s" % CLIENT_IP in line, line
    login = wait_for_log(dovecot.log_path, "Login: user=<bob>")
    assert "rip=%s" % CLIENT_IP in [each for each in login.splitlines() if "Login: user=<bob>" in each][-1]


def test_off_stays_nginx(edge):
    ports, dovecot, auth = edge
    client = Client(ports["off"])
    client.sock.sendall(THUNDERBIRD + b"b NOOP\r\n")
    assert client.until(b"b OK completed\r\n") == b"a BAD invalid command\r\nb OK completed\r\n"
    client.close()


# issue 25 item 1: a client must never choose the address Dovecot believes. Each of these names was, or
# could become on the way, a field Dovecot trusts from the proxy (login_trusted_networks covers it).
FORGED_NAMES = [
    b'"x\x01-originating-ip"',  # the control byte was dropped after the filter had looked
    b'{17}\r\nx\x01-originating-ip',  # the same as a literal
    b'"X-Originating-IP"',  # case
    b'" x-originating-ip"',  # a leading space
    b'"x-\xc3\xa9originating-ip"',  # non-ASCII
]


@pytest.mark.parametrize("port_name", ["on", "both"])
@pytest.mark.parametrize("forged", FORGED_NAMES, ids=range(len(FORGED_NAMES)))
def test_client_cannot_forge_trusted_fields(edge, port_name, forged):
    ports, dovecot, auth = edge
    client = Client(ports[port_name])
    marker = b"115.%d" % (abs(hash((port_name, forged))) % 100000)
    command = (b'a ID ("name" "Thunderbird" "version" "' + marker + b'" ' + forged + b' "6.6.6.6" '
               b'"x\x01-session-id" "forged-session" "x\x7f-forward-evil" "1")\r\n')
    if b"{17}" in forged:
        head, _, rest = command.partition(b"\r\n")
        client.sock.sendall(head + b"\r\n")
        assert client.until(b"\r\n").startswith(b"+ ")
        client.sock.sendall(rest)
    else:
        client.sock.sendall(command)
    client.until(b"a OK ID completed\r\n")
    client.sock.sendall(b'b LOGIN bob "%s"\r\n' % USERS["bob"].encode())
    assert b"b OK" in client.tagged(b"b")
    client.sock.sendall(b"c LOGOUT\r\n")
    client.until(b"c OK")
    client.close()
    log = wait_for_log(dovecot.log_path, marker.decode())
    sent = [each for each in log.splitlines() if marker.decode() in each][-1]
    assert "6.6.6.6" not in sent and "forged-session" not in sent and "evil" not in sent, sent
    login = [each for each in wait_for_log(dovecot.log_path, "Login: user=<bob>").splitlines()
             if "Login: user=<bob>" in each][-1]
    assert "6.6.6.6" not in login and "forged-session" not in login, login
    # With proxy_client_id the backend hears the real client; without, the proxy's own address.
    assert "rip=%s" % (CLIENT_IP if port_name == "both" else "127.0.0.1") in login, login
