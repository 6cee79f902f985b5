"""poplib and raw POP3 through mailproxy to a real Dovecot, with a real HTTP auth server (issue 6)."""

import base64
import hashlib
import hmac
import os
import poplib
import re
import socket
import struct

import pytest

from support.authserver import RecordingAuthServer
from support.backends import USERS
from support.harness import free_port, mail_config

SERVER_NAME = "pop.mailproxy.test"
GREETING = re.compile(rb"\+OK POP3 ready (<\d+\.\d+@" + re.escape(SERVER_NAME.encode()) + rb">)\r\n")
ALICE = USERS["alice"].encode()


@pytest.fixture
def edge(dovecot, mailproxy_master):
    auth = RecordingAuthServer(USERS, {"pop3": ("127.0.0.1", dovecot.pop3_port)})
    port, passing_port = free_port(), free_port()
    config = mail_config(auth.url, """
    server_name %s;
    pop3_auth plain apop cram-md5;
    server { listen 127.0.0.1:%d; protocol pop3; }
    server { listen 127.0.0.1:%d; protocol pop3; proxy_pass_error_message on; }
}
""" % (SERVER_NAME, port, passing_port))
    master = mailproxy_master(config, handler=None)
    edge = type("Edge", (), {})()
    edge.port, edge.passing_port, edge.auth, edge.master, edge.dovecot = port, passing_port, auth, master, dovecot
    yield edge
    auth.close()
    log = master.error_log()
    assert "[alert]" not in log, log


def client(edge):
    return poplib.POP3("127.0.0.1", edge.port, timeout=20)


class Raw:
    """A line-level POP3 client for what poplib cannot say (SASL, pipelining, hang-ups)."""

    def __init__(self, port):
        self.conn = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.reader = self.conn.makefile("rb")
        self.greeting = self.reader.readline()
        match = GREETING.fullmatch(self.greeting)
        assert match, self.greeting
        self.salt = match.group(1)

    def ask(self, line):
        self.conn.sendall(line + b"\r\n")
        return self.reader.readline()

    def rest(self):
        return self.reader.read()

    def close(self):
        self.reader.close()
        self.conn.close()


def expected_request(method, user, password, salt=None, attempt=1):
    """The auth request byte for byte (spec 3.2): Auth-Salt only for apop and cram-md5."""
    return (
        b"GET /auth HTTP/1.0\r\nHost: 127.0.0.1\r\nAuth-Method: %s\r\nAuth-User: %s\r\nAuth-Pass: %s\r\n"
        % (method, user, password)
        + (b"Auth-Salt: %s\r\n" % salt if salt is not None else b"")
        + b"Auth-Protocol: pop3\r\nAuth-Login-Attempt: %d\r\nClient-IP: 127.0.0.1\r\n\r\n" % attempt
    )


def b64(data):
    return base64.b64encode(data)


# -- logins ---------------------------------------------------------------------------------------


def test_user_pass_stat_quit(edge):
    pop = client(edge)
    assert GREETING.fullmatch(pop.welcome + b"\r\n")
    assert pop.user("alice") == b"+OK"
    assert pop.pass_(USERS["alice"]).startswith(b"+OK Logged in.")
    count, size = pop.stat()
    assert count >= 0 and size >= 0
    assert pop.quit().startswith(b"+OK")
    assert edge.auth.requests[-1][0] == expected_request(b"plain", b"alice", ALICE)
    edge.master.wait_log("client logged in")
    edge.master.wait_log("proxied session done")


def test_password_with_spaces_is_escaped(edge):
    pop = client(edge)
    pop.user("bob")
    assert pop.pass_(USERS["bob"]).startswith(b"+OK")
    pop.quit()
    assert edge.auth.requests[-1][0] == expected_request(b"plain", b"bob", b"b0b%20pass+=")


def test_apop(edge):
    pop = client(edge)
    salt = GREETING.fullmatch(pop.welcome + b"\r\n").group(1)
    assert pop.apop("alice", USERS["alice"]).startswith(b"+OK Logged in.")
    assert pop.stat()[0] >= 0
    pop.quit()
    digest = hashlib.md5(salt + ALICE).hexdigest().encode()
    assert edge.auth.requests[-1][0] == expected_request(b"apop", b"alice", digest, salt)


def sasl_plain_ir(raw):
    return [raw.ask(b"AUTH PLAIN " + b64(b"\0alice\0" + ALICE))]


def sasl_plain(raw):
    return [raw.ask(b"AUTH PLAIN"), raw.ask(b64(b"\0alice\0" + ALICE))]


def sasl_login(raw):
    return [raw.ask(b"AUTH LOGIN"), raw.ask(b64(b"alice")), raw.ask(b64(ALICE))]


def sasl_login_ir(raw):
    return [raw.ask(b"AUTH LOGIN " + b64(b"alice")), raw.ask(b64(ALICE))]


def sasl_cram_md5(raw):
    challenge = raw.ask(b"AUTH CRAM-MD5")
    assert base64.b64decode(challenge[2:]) == raw.salt
    digest = hmac.new(ALICE, raw.salt, hashlib.md5).hexdigest().encode()
    return [challenge, raw.ask(b64(b"alice " + digest))]


SASL = {
    "plain-ir": (sasl_plain_ir, []),
    "plain": (sasl_plain, [b"+ \r\n"]),
    "login": (sasl_login, [b"+ VXNlcm5hbWU6\r\n", b"+ UGFzc3dvcmQ6\r\n"]),
    "login-ir": (sasl_login_ir, [b"+ UGFzc3dvcmQ6\r\n"]),
    "cram-md5": (sasl_cram_md5, None),
}


@pytest.mark.parametrize("exchange", sorted(SASL))
def test_auth_sasl(edge, exchange):
    run, challenges = SASL[exchange]
    raw = Raw(edge.port)
    replies = run(raw)
    if challenges is not None:
        assert replies[:-1] == challenges
    assert replies[-1].startswith(b"+OK Logged in."), replies
    assert raw.ask(b"STAT").startswith(b"+OK ")
    assert raw.ask(b"QUIT").startswith(b"+OK")
    assert raw.rest() == b""
    raw.close()
    request = edge.auth.requests[-1][0]
    if exchange == "cram-md5":
        digest = hmac.new(ALICE, raw.salt, hashlib.md5).hexdigest().encode()
        assert request == expected_request(b"cram-md5", b"alice", digest, raw.salt)
    else:
        assert request == expected_request(b"plain", b"alice", ALICE)


def test_retr_10_mib(edge):
    body = os.urandom(5 * 1024 * 1024).hex().encode()  # 10 MiB of 7-bit data
    lines = b"\r\n".join(body[i : i + 998] for i in range(0, len(body), 998))
    message = b"From: a@example.test\r\nSubject: big\r\n\r\n" + lines + b"\r\n"
    edge.dovecot.deliver("bob", message)
    pop = client(edge)
    pop.user("bob")
    pop.pass_(USERS["bob"])
    count, _ = pop.stat()
    sizes = [entry.split() for entry in pop.list()[1]]
    number, size = sizes[-1]
    assert int(number) == count and int(size) == len(message)
    reply, retrieved, _ = pop.retr(count)
    assert reply.startswith(b"+OK")
    got = b"\r\n".join(retrieved) + b"\r\n"
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(message).hexdigest()
    assert pop.dele(count).startswith(b"+OK")
    pop.quit()


# -- failures -------------------------------------------------------------------------------------


def test_wrong_password_closes(edge):
    raw = Raw(edge.port)
    assert raw.ask(b"USER alice") == b"+OK\r\n"
    assert raw.ask(b"PASS wrong") == b"-ERR Invalid login or password\r\n"
    assert raw.rest() == b""
    raw.close()
    edge.master.wait_log('client login failed: "Invalid login or password" while in http auth state')


def test_wrong_password_with_auth_wait_allows_retry(edge):
    edge.auth.wait_on_failure = 1
    pop = client(edge)
    pop.user("alice")
    with pytest.raises(poplib.error_proto, match="Invalid login or password"):
        pop.pass_("wrong")
    assert pop.noop() == b"+OK"
    pop.user("alice")
    assert pop.pass_(USERS["alice"]).startswith(b"+OK Logged in.")
    pop.quit()
    attempts = [headers["auth-login-attempt"] for _, headers in edge.auth.requests[-2:]]
    assert attempts == [b"1", b"2"]


def test_wrong_apop_digest(edge):
    pop = client(edge)
    with pytest.raises(poplib.error_proto, match="Invalid login or password"):
        pop.apop("alice", "not the secret")
    assert edge.auth.requests[-1][1]["auth-method"] == b"apop"


def test_auth_server_down(edge):
    edge.auth.close()
    raw = Raw(edge.port)
    raw.ask(b"USER alice")
    assert raw.ask(b"PASS " + ALICE) == b"-ERR internal server error\r\n"
    assert raw.rest() == b""
    raw.close()
    edge.master.wait_log("connect() to 127.0.0.1:%d failed (111: Connection refused)" % edge.auth.port)


def test_backend_down(edge):
    dead = free_port()
    edge.auth.backends["pop3"] = ("127.0.0.1", dead)
    raw = Raw(edge.port)
    raw.ask(b"USER alice")
    assert raw.ask(b"PASS " + ALICE) == b"-ERR internal server error\r\n"
    assert raw.rest() == b""
    raw.close()
    edge.master.wait_log("connect() to 127.0.0.1:%d failed (111: Connection refused)" % dead)


def refused_by_backend(edge, port):
    """The auth server says OK but hands Dovecot a wrong password: the backend refuses the PASS."""
    edge.auth.script.append(
        b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: %d\r\n"
        b"Auth-Pass: not-alices-password\r\n\r\n" % edge.dovecot.pop3_port
    )
    raw = Raw(port)
    raw.ask(b"USER alice")
    reply = raw.ask(b"PASS " + ALICE)
    assert raw.rest() == b""
    raw.close()
    return reply


def test_backend_refuses_login_pass_error_message_off(edge):
    assert refused_by_backend(edge, edge.port) == b"-ERR internal server error\r\n"
    # nginx names the phase it was in when the reply arrived, not the command it answers.
    edge.master.wait_log(
        'upstream sent invalid response: "-ERR [AUTH] Authentication failed." '
        "while reading response from upstream"
    )
    assert "[error]" in _line_with(edge.master.error_log(), "upstream sent invalid response")


def test_backend_refuses_login_pass_error_message_on(edge):
    assert refused_by_backend(edge, edge.passing_port) == b"-ERR [AUTH] Authentication failed.\r\n"
    edge.master.wait_log('upstream sent invalid response: "-ERR [AUTH] Authentication failed."')
    assert "[info]" in _line_with(edge.master.error_log(), "upstream sent invalid response")


def _line_with(log, text):
    return next(line for line in log.splitlines() if text in line)


# -- hang-ups -------------------------------------------------------------------------------------


def _cram_transcript(salt):
    digest = hmac.new(ALICE, salt, hashlib.md5).hexdigest().encode()
    return b"AUTH CRAM-MD5\r\n" + b64(b"alice " + digest) + b"\r\n"


TRANSCRIPTS = {
    "user-pass": lambda salt: b"CAPA\r\nUSER alice\r\nPASS " + ALICE + b"\r\nSTAT\r\nQUIT\r\n",
    "auth-login": lambda salt: b"AUTH LOGIN\r\n" + b64(b"alice") + b"\r\n" + b64(ALICE) + b"\r\nSTAT\r\n",
    "apop": lambda salt: b"APOP alice " + hashlib.md5(salt + ALICE).hexdigest().encode() + b"\r\nSTAT\r\n",
    "cram-md5": _cram_transcript,
}


def hang_up_after(raw, transcript, cut):
    """Send the transcript line by line, reading each reply, and hang up after ``cut`` bytes.

    Reading the replies keeps the proxy's writes succeeding, so the hang-up lands in the step the cut
    falls in: a partial command, the http auth request, the backend login or the relay.
    """
    sent = 0
    for line in transcript.splitlines(keepends=True):
        if sent + len(line) > cut:
            raw.conn.sendall(line[: cut - sent])
            return
        raw.conn.sendall(line)
        sent += len(line)
        if sent == cut:
            return
        reply = raw.reader.readline()
        while line.startswith(b"CAPA") and reply not in (b".\r\n", b""):
            reply = raw.reader.readline()


@pytest.mark.parametrize("name", sorted(TRANSCRIPTS))
def test_client_hangs_up_at_every_step(edge, name):
    workers = edge.master.workers()
    # The longest salt the greeting can carry gives the longest transcript; shorter ones end early.
    length = len(TRANSCRIPTS[name](b"<2147483647.9999999999@%s>" % SERVER_NAME.encode()))
    for cut in range(length + 1):
        raw = Raw(edge.port)
        hang_up_after(raw, TRANSCRIPTS[name](raw.salt), cut)
        if cut % 2:
            # An abortive close (RST) on every other cut: the proxy sees a recv() error, not EOF.
            raw.conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raw.close()
    assert edge.master.workers() == workers
    pop = client(edge)
    pop.user("alice")
    assert pop.pass_(USERS["alice"]).startswith(b"+OK")
    pop.quit()
    edge.master.wait_log("proxied session done")
    log = edge.master.error_log()
    assert "[alert]" not in log and "[crit]" not in log, log
