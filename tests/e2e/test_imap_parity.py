"""Issue 5, done when: for the same client bytes mailproxy answers exactly what Debian's nginx answers.

Debian's nginx 1.22 (tests/support/nginxref.py) and mailproxy run the same ``mail {}`` block, ask the same
RecordingAuthServer and log in to the same private Dovecot. Every case plays the same client bytes
against both and compares everything the client receives, step by step, up to the close. Where
mailproxy deliberately answers otherwise (the spec's introduction, 9.10, 9.11, 9.13, the ``{0}``
literal, buffer compaction) the case carries both expected transcripts and the reason, so a change on
either side is noticed.

Reading: nginx is the reference, and silence is one of its possible answers, so its replies are read
until the connection has been quiet for a moment (or up to the tagged line a step waits for). mailproxy
is then read until it has sent as many lines as nginx did, and briefly beyond to catch any extra.
"""

import base64
import binascii
import hashlib
import hmac
import re
import socket
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import pytest

from support import nginxref
from support.authserver import RecordingAuthServer
from support.backends import USERS, require
from support.harness import MasterProcess, free_port, missing
from support.servers import TcpServer

EOF = b"<EOF>"  # appended to a step's bytes when the server closed the connection
QUIET = 0.1  # nginx answers loopback commands in well under a millisecond
PATIENCE = 3.0  # longest wait for the first byte of a reply that must come
LOGIN_PATIENCE = 15.0  # auth server, Auth-Wait, Dovecot forking its imap process

MAIL_BLOCK = """
    auth_http %(auth)s;
    timeout 30s;
    server_name mail.test;
    %(directives)s
    server { listen 127.0.0.1:%(port)d; protocol imap; }
    server { listen 127.0.0.1:%(down_port)d; protocol imap; auth_http 127.0.0.1:%(dead)d/auth; }
"""


class Config(NamedTuple):
    name: str
    directives: str
    buffer: int = 4096
    max_errors: int = 5
    methods: frozenset = frozenset(("plain",))
    pass_error: bool = False


CONFIGS = {
    config.name: config
    for config in (
        Config("defaults", ""),
        Config(
            "small",
            'imap_auth plain login cram-md5; imap_capabilities IMAP4rev1 IDLE "LITERAL+" SASL-IR;'
            " imap_client_buffer 128; max_errors 2; proxy_pass_error_message on;",
            128, 2, frozenset(("plain", "login", "cram-md5")), True,
        ),
        Config(
            "cram", "imap_auth cram-md5 login; imap_capabilities IMAP4rev1 ID; imap_client_buffer 1k;",
            1024, 5, frozenset(("login", "cram-md5")),
        ),
    )
}


# --- the client -----------------------------------------------------------------------------------


@dataclass
class Step:
    data: object  # bytes, or a function of everything received so far (for CRAM-MD5 digests)
    until: Optional[bytes] = None  # read until a line with this tag (or the close)
    silent: bool = False  # no reply expected: do not wait long for one


def steps_of(items):
    return [item if isinstance(item, Step) else Step(item) for item in items]


def play(port, steps, want=None):
    """The connection's transcript: [(sent, received + EOF marker if closed)], greeting first.

    ``want`` (ours only): the lines each step must bring and whether it must end in a close, taken
    from the reference; without it (nginx) a step's reply ends when the connection goes quiet."""
    transcript = []
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        for index, step in enumerate([Step(b"", silent=False)] + steps):
            if want is not None and index == len(want):
                break  # the reference had closed by now: the transcripts already differ
            data = step.data(received) if callable(step.data) else step.data
            if data:
                try:
                    conn.sendall(data)
                except OSError as exc:
                    transcript.append((data, b"<%s>" % exc.__class__.__name__.encode()))
                    break
            got, closed = _collect(conn, step, want[index] if want else None)
            received += got
            transcript.append((data, got + (EOF if closed else b"")))
            if closed:
                break
    return transcript


def _collect(conn, step, want):
    data = bytearray()
    patience = LOGIN_PATIENCE if step.until is not None or want else PATIENCE
    deadline = time.monotonic() + (0.2 if step.silent and not want else patience)
    while True:
        if want is not None:
            lines, must_close = want
            done = data.count(b"\n") >= lines and not must_close
        elif step.until is not None:
            done = re.search(rb"(^|\n)%s [^\n]*\n" % re.escape(step.until), data) is not None
        else:
            done = data.endswith(b"\n")
        timeout = QUIET if done else deadline - time.monotonic()
        if timeout <= 0:
            return bytes(data), False
        conn.settimeout(timeout)
        try:
            piece = conn.recv(65536)
        except socket.timeout:
            return bytes(data), False
        except ConnectionResetError:
            return bytes(data), True
        if not piece:
            return bytes(data), True
        data += piece


def _want(steps):
    return [(got.count(b"\n"), got.endswith(EOF)) for got in steps]


_TIMING = re.compile(rb"\(\d+\.\d+ \+ \d+\.\d+(?: \+ \d+\.\d+)? secs\)")
_CHALLENGE = re.compile(rb"^\+ ([A-Za-z0-9+/=]+)\r$", re.M)


def mask(received: bytes) -> bytes:
    """Hide the bytes that differ between any two runs: Dovecot's timings and the CRAM-MD5 salt."""
    received = _TIMING.sub(b"(<time> secs)", received)

    def salt(match):
        try:
            decoded = base64.b64decode(match.group(1), validate=True)
        except binascii.Error:
            return match.group(0)  # "+ OK" and other continuations that are no challenge
        # Check the salt's shape (spec 2.0.8) before masking it: <random.time@server_name>
        return b"+ <salt>\r" if re.fullmatch(rb"<\d+\.\d+@mail\.test>", decoded) else match.group(0)

    return _CHALLENGE.sub(salt, received)


# --- a backend that puts an untagged CAPABILITY before its LOGIN OK (Dovecot never does) --------------


class CapabilityBackend(TcpServer):
    def serve_connection(self, conn):
        with conn.makefile("rb") as reader:
            conn.sendall(b"* OK ready\r\n")
            tag = reader.readline().split(b" ")[0]  # <tag> LOGIN {n}
            conn.sendall(b"+ go\r\n")
            reader.readline()
            conn.sendall(b"+ go\r\n")
            reader.readline()
            conn.sendall(b"* CAPABILITY IMAP4rev1 X-FAKE\r\n%s OK logged in\r\n" % tag)
            line = reader.readline()
            conn.sendall(b"* BYE\r\n%s OK bye\r\n" % line.split(b" ")[0])


# --- the cases ------------------------------------------------------------------------------------


def always(config):
    return True


@dataclass
class Case:
    name: str
    steps: object  # list, or a function of the Config returning one
    script: tuple = ()  # auth server replies, with %(imap)d / %(fake)d for the backends' ports
    wait: int = 0  # Auth-Wait on failures
    port: str = "main"  # or "down": the server whose auth_http port is closed
    applies: Callable = always
    # config -> (reason, nginx's step bytes, ours) for a deliberate difference, or None
    differs: Callable = lambda config: None

    def steps_for(self, config):
        return steps_of(self.steps(config) if callable(self.steps) else self.steps)


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def cram_response(user, password):
    def respond(received):
        challenge = base64.b64decode(received.rsplit(b"+ ", 1)[1].strip())
        digest = hmac.new(password.encode(), challenge, hashlib.md5).hexdigest().encode()
        return b64(user.encode() + b" " + digest) + b"\r\n"

    return respond


def _fits(config):
    """The literal size that fills the buffer exactly with "a LOGIN u {n}" CRLF, the data and an LF."""
    size = config.buffer
    while len(b"a LOGIN u {%d}\r\n" % size) + size + 1 > config.buffer:
        size -= 1
    return size


ALICE = USERS["alice"].encode()
LOGIN_ALICE = b"a LOGIN alice %s\r\n" % ALICE
SELECT_LOGOUT = [Step(b"b SELECT INBOX\r\n", until=b"b"), Step(b"c LOGOUT\r\n", until=b"c")]
BAD = b"BAD invalid command\r\n"
INTERNAL = b"* BAD internal server error\r\n" + EOF
NO = b"NO Invalid login or password\r\n"
OK_TO = b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: %(imap)d\r\n"
CRAM = "cram-md5"


CASES = [
    Case("greeting", []),
    Case("capability", [b"a CAPABILITY\r\n", b"b capability extra args\r\n"]),
    Case("noop", [b"a NOOP\r\n", b"b noop x \"y z\"\r\n", b"c NOOP\n", b"d   NOOP  \r\n"]),
    Case("logout", [b"a LOGOUT\r\n"]),
    Case("unknown-commands", [b"a ID NIL\r\n", b"b ENABLE UTF8=ACCEPT\r\n", b"c SELECT INBOX\r\n",
                              b"d NOOP1\r\n", b"e STARTTLS\r\n"]),
    Case("bad-tags", [b"a$ NOOP\r\n", b"a\r\n", b"a \r\n", b"b NOOP\r\n"]),
    Case("tag-lengths", [b"A" * 32 + b" NOOP\r\n", b"A" * 33 + b" NOOP\r\n", b"b NOOP\r\n"]),
    Case("empty-lines", [b"\r\n", b"\n", b"a NOOP\r\n"]),
    Case("leading-space", [b" NOOP\r\n", b" CAPABILITY\r\n", b" \r\n"]),
    Case("cr-without-lf", [b"a NOOP\rx\r\n", b"b NOOP\r\n"]),
    Case("login-arg-counts", [b"a LOGIN\r\n", b"b LOGIN alice\r\n", b"c LOGIN a b c\r\n", b'd LOGIN "" p\r\n',
                              b"e NOOP a b c d\r\n"]),
    Case("nonsync-literal-in-bad-line-closes", [b"a FOO {3+}\r\n", b"abc\r\n"]),
    Case("login-quoted", [Step(b'a LOGIN "alice" "%s"\r\n' % ALICE, until=b"a")] + SELECT_LOGOUT),
    Case("login-quoted-space", [Step(b'a login bob "b0b pass+="\r\n', until=b"a"), Step(b"c LOGOUT\r\n", until=b"c")]),
    Case("login-quoted-escapes", [Step(b'a LOGIN "al\\ice" "\\"x\\\\"\r\n', until=b"a")]),
    Case("login-sync-literals", [b"a LOGIN {5}\r\n", b"alice {12}\r\n", Step(ALICE + b"\r\n", until=b"a")]
         + SELECT_LOGOUT),
    Case("login-nonsync-literals", [Step(b"a LOGIN {5+}\r\nalice {12+}\r\n%s\r\n" % ALICE, until=b"a")]
         + SELECT_LOGOUT),
    Case("login-literal-in-pieces", [Step(b"a LOGIN {5+}\r\nal", silent=True),
                                     Step(b"ice {12+}\r\n" + ALICE[:3], silent=True),
                                     Step(ALICE[3:] + b"\r\n", until=b"a")]),
    Case("authenticate-plain", [b"a AUTHENTICATE PLAIN\r\n", Step(b64(b"\0alice\0" + ALICE) + b"\r\n", until=b"a")]
         + SELECT_LOGOUT),
    Case("authenticate-plain-ir", [Step(b"a AUTHENTICATE plain %s\r\n" % b64(b"x\0alice\0" + ALICE), until=b"a"),
                                   Step(b"c LOGOUT\r\n", until=b"c")]),
    Case("authenticate-login", [b"a AUTHENTICATE LOGIN\r\n", b64(b"alice") + b"\r\n",
                                Step(b64(ALICE) + b"\r\n", until=b"a")] + SELECT_LOGOUT),
    Case("authenticate-login-ir", [b"a AUTHENTICATE LOGIN %s\r\n" % b64(b"alice"),
                                   Step(b64(ALICE) + b"\r\n", until=b"a"), Step(b"c LOGOUT\r\n", until=b"c")]),
    Case("plain-bad-base64", [b"a AUTHENTICATE PLAIN\r\n", b"!!!\r\n", b"b AUTHENTICATE PLAIN\r\n", b"*\r\n",
                              b"c NOOP\r\n"]),
    Case("plain-bad-payload", [b"a AUTHENTICATE PLAIN %s\r\n" % b64(b"alice"),
                               b"b AUTHENTICATE PLAIN %s\r\n" % b64(b"\0alice"), b"c NOOP\r\n"]),
    Case("login-username-bad-base64", [b"a AUTHENTICATE LOGIN\r\n", b"=x=\r\n", b"b NOOP\r\n"]),
    Case("login-password-bad-base64", [b"a AUTHENTICATE LOGIN\r\n", b64(b"alice") + b"\r\n", b"a\r\n",
                                       b"b NOOP\r\n"]),
    Case("login-ir-bad-base64", [b"a AUTHENTICATE LOGIN a\r\n", b"b NOOP\r\n"]),
    Case("authenticate-mechanisms", [b"a AUTHENTICATE\r\n", b"b AUTHENTICATE FOO\r\n",
                                     b"c AUTHENTICATE EXTERNAL\r\n", b"d AUTHENTICATE CRAM-MD5 abc\r\n",
                                     b"e AUTHENTICATE PLAIN a b\r\n", b"f NOOP\r\n"]),
    Case("cram-md5-challenge", [b"a AUTHENTICATE CRAM-MD5\r\n", b"*\r\n", b"b AUTHENTICATE CRAM-MD5\r\n",
                                b64(b"alice short") + b"\r\n", b"c NOOP\r\n"]),
    Case("cram-md5-login", [b"a AUTHENTICATE CRAM-MD5\r\n", Step(cram_response("alice", USERS["alice"]), until=b"a")]
         + SELECT_LOGOUT, applies=lambda config: CRAM in config.methods),
    Case("wrong-password", [Step(b"a LOGIN alice wrong\r\n", until=b"a"), b"b NOOP\r\n"]),
    Case("wrong-password-auth-wait", [Step(b"a LOGIN alice wrong\r\n", until=b"a"), b"b NOOP\r\n",
                                      Step(b"c AUTHENTICATE PLAIN %s\r\n" % b64(b"\0alice\0bad"), until=b"c"),
                                      Step(LOGIN_ALICE.replace(b"a ", b"d ", 1), until=b"d")], wait=1),
    Case("wrong-password-pipelined", [Step(b"a LOGIN alice wrong\r\nb NOOP\r\nc LOGOUT\r\n", until=b"c")], wait=1),
    Case("auth-server-garbage", [Step(b"a LOGIN alice x\r\n", until=b"a")], script=(b"garbage\r\n\r\n",)),
    Case("auth-server-no-port", [Step(b"a LOGIN alice x\r\n", until=b"a")],
         script=(b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\n\r\n",)),
    Case("auth-server-down", [Step(b"a LOGIN alice x\r\n", until=b"a")], port="down"),
    Case("backend-refuses-login", [Step(LOGIN_ALICE, until=b"a"), b"b NOOP\r\n"],
         script=(OK_TO + b"Auth-Pass: wrong\r\n\r\n",)),
    Case("backend-down", [Step(LOGIN_ALICE, until=b"a")],
         script=(OK_TO.replace(b"%(imap)d", b"%(dead)d") + b"\r\n",)),
    Case("max-errors", lambda config: [b"x%d FOO\r\n" % n for n in range(config.max_errors + 1)]),
    Case("max-errors-pipelined", lambda config: [b"".join(b"x%d FOO\r\n" % n for n in range(config.max_errors + 1))]),
    Case("max-errors-rejections-free", lambda config: [b"a LOGIN u\r\n" * (config.max_errors + 1)
                                                       + b"x FOO\r\nb NOOP\r\n"]),
    Case("too-long-command", lambda config: [b"a NOOP " + b"x" * (config.buffer - 7)]),
    Case("line-fills-buffer", lambda config: [b"a NOOP " + b"x" * (config.buffer - 9) + b"\r\n", b"b NOOP\r\n"]),
    Case("literal-larger-than-buffer", lambda config: [
        b"a LOGIN alice {%d}\r\n" % config.buffer, b"p" * (config.buffer - 18 - len(str(config.buffer)))]),
    Case("literal-just-fits", lambda config: [
        b"a LOGIN u {%d}\r\n" % _fits(config), Step(b"p" * _fits(config) + b"\n", until=b"a")]),
    Case("pipelined-to-relay", [Step(b"a NOOP\r\nb CAPABILITY\r\nc LOGIN alice %s\r\nd SELECT INBOX\r\n" % ALICE,
                                     until=b"d"), Step(b"e LOGOUT\r\n", until=b"e")]),
    Case("pipelined-literal-login", [Step(b"a LOGIN {5}\r\nalice {12}\r\n%s\r\nb LOGOUT\r\n" % ALICE, until=b"b")]),
]


# --- deliberate differences: (reason, nginx 1.22's bytes per step, mailproxy's) -------------------

GREETING = b"* OK IMAP4 ready\r\n"


def zero_literal(config):
    return ("{0} is an empty literal; nginx takes the byte after the CRLF as a 1-byte literal (spec 2.1)",
            [GREETING, b"+ OK\r\n", b"a " + NO + EOF],
            [GREETING, b"+ OK\r\n", b"a " + BAD, b"b OK completed\r\n"])


def tag_reset(config):
    closes = EOF if config.max_errors <= 2 else b""
    return ("no stale tag prefix after a failed login (spec 9.10, 9.13)",
            [GREETING, b"foobar " + NO, b"\r\nobar " + BAD, b"* " + BAD + closes],
            [GREETING, b"foobar " + NO, b"* " + BAD, b"* " + BAD + closes])


def compaction(config):
    count = (config.buffer - 8) // 8
    return ("the buffer is compacted after each answered command (spec 9.9 a, 9.13)",
            [GREETING, b"a OK completed\r\n" * count, b"bb " + BAD + EOF],
            [GREETING, b"a OK completed\r\n" * count, b"", b"bb OK completed\r\n"])


def untagged_capability(config):
    relayed = b"* CAPABILITY IMAP4rev1 X-FAKE\r\na OK logged in\r\n"
    return ("one untagged line before the backend's LOGIN OK is accepted (1.27.3, spec 4.3)",
            [GREETING, relayed + EOF if config.pass_error else INTERNAL],
            [GREETING, relayed, b"* BYE\r\nb OK bye\r\n" + EOF])


def literal_garbage_after(config):
    return ("after a literal only SP, CR or LF may follow (1.29.6, spec 2.1)",
            [GREETING, b"+ OK\r\n", b"a " + NO + EOF],
            [GREETING, b"+ OK\r\n", b"a " + BAD, b"b OK completed\r\n"])


def literal_without_digits(config):
    return ("a literal count needs digits (1.29.6); 1.22 reads {} as {0}",
            [GREETING, b"+ OK\r\n", b"a " + NO + EOF],
            [GREETING, b"a " + BAD, b"b OK completed\r\n", b"b OK completed\r\n"])


def external_not_enabled(config):
    return ("EXTERNAL with an initial response needs imap_auth external (spec 9.11, 9.13)",
            [GREETING, b"a " + NO + EOF],
            [GREETING, b"a " + BAD, b"b OK completed\r\n"])


CASES += [
    Case("zero-literal", [b"a LOGIN alice {0}\r\n", b"X\r\n", b"b NOOP\r\n"], differs=zero_literal),
    Case("tag-reset-after-failure", [Step(b"foobar LOGIN alice wrong\r\n", until=b"foobar"), b"\r\n",
                                     b"ab$ NOOP\r\n"], wait=1, differs=tag_reset),
    Case("compaction", lambda config: [b"a NOOP\r\n" * ((config.buffer - 8) // 8) + b"bb NO",
                                       Step(b"OP\r", silent=True), b"\n"],
         applies=lambda config: config.buffer <= 1024, differs=compaction),
    Case("untagged-capability-before-login-ok", [Step(LOGIN_ALICE, until=b"a"), Step(b"b LOGOUT\r\n", until=b"b")],
         script=(OK_TO.replace(b"%(imap)d", b"%(fake)d") + b"\r\n",), differs=untagged_capability),
    Case("literal-garbage-after", [b"a LOGIN {1}\r\n", Step(b"ux p\r\n", until=b"a"), b"b NOOP\r\n"],
         differs=literal_garbage_after),
    Case("literal-without-digits", [b"a LOGIN {}\r\n", Step(b"b NOOP\r\n", until=b"a"), b"b NOOP\r\n"],
         differs=literal_without_digits),
    Case("external-ir-not-enabled", [Step(b"a AUTHENTICATE EXTERNAL %s\r\n" % b64(b"alice"), until=b"a"),
                                     b"b NOOP\r\n"], differs=external_not_enabled),
]


# --- the two servers ------------------------------------------------------------------------------


class Pair:
    """nginx and mailproxy side by side: one mail block, one auth server, one Dovecot."""

    def __init__(self, config, dovecot, prefix):
        self.config = config
        self.auth = RecordingAuthServer(USERS, {"imap": ("127.0.0.1", dovecot.imap_port)})
        self.fake = CapabilityBackend()
        dead = free_port()
        self.backend_ports = {b"imap": dovecot.imap_port, b"fake": self.fake.port, b"dead": dead}
        self.ports = {side: {"main": free_port(), "down": free_port()} for side in ("nginx", "ours")}
        blocks = {
            side: MAIL_BLOCK % dict(auth=self.auth.url, directives=config.directives, dead=dead,
                                    port=ports["main"], down_port=ports["down"])
            for side, ports in self.ports.items()
        }
        self.nginx = nginxref.NginxMail(blocks["nginx"], self.ports["nginx"].values())
        self.master = MasterProcess(
            prefix,
            "worker_processes 1;\nerror_log logs/error.log info;\nevents { worker_connections 256; }\n"
            "mail {%s}\n" % blocks["ours"],
            None,
            None,
        )

    def __enter__(self):
        try:
            self.nginx.__enter__()
            self.master.start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        self.master.kill_leftovers()
        self.nginx.__exit__(*exc)
        self.auth.close()
        self.fake.close()

    def run(self, side, case, want=None):
        """One connection of ``case`` against ``side``, with the auth server set up afresh for it."""
        self.auth.script = [reply % self.backend_ports for reply in case.script]
        self.auth.wait_on_failure = case.wait
        transcript = play(self.ports[side][case.port], case.steps_for(self.config), want)
        assert not self.auth.script, "%s: scripted auth replies left unused by %s" % (case.name, side)
        return [(sent, mask(got)) for sent, got in transcript]


@pytest.fixture(scope="module")
def pair(request, dovecot, tmp_path_factory):
    """The two engines for the configuration named by the test's parameter."""
    require(nginxref.NGINX)
    if not nginxref.available():  # the module is not executable, so require() cannot judge it
        missing("%s (libnginx-mod-mail)" % nginxref.MAIL_MODULE)
    with Pair(CONFIGS[request.param], dovecot, str(tmp_path_factory.mktemp("mp"))) as started:
        yield started
        log = started.master.error_log()
        assert "[alert]" not in log, log


def _show(transcript):
    return "\n".join("  C: %r\n  S: %r" % step for step in transcript)


# Only the combinations a case means something for: a test that skips on every run is no test.
COMBINATIONS = [(name, case) for name in sorted(CONFIGS) for case in CASES if case.applies(CONFIGS[name])]


@pytest.mark.parametrize("pair,case", COMBINATIONS, indirect=["pair"],
                         ids=["%s-%s" % (name, case.name) for name, case in COMBINATIONS])
def test_same_bytes_as_nginx(pair, case):
    nginx = pair.run("nginx", case)
    difference = case.differs(pair.config)
    if difference is None:
        ours = pair.run("ours", case, want=_want([got for _, got in nginx]))
        assert [got for _, got in ours] == [got for _, got in nginx], (
            "nginx:\n%s\nmailproxy:\n%s" % (_show(nginx), _show(ours)))
        return
    reason, nginx_expected, ours_expected = difference
    ours = pair.run("ours", case, want=_want(ours_expected))
    assert [got for _, got in nginx] == nginx_expected, "nginx 1.22 changed (%s):\n%s" % (reason, _show(nginx))
    assert [got for _, got in ours] == ours_expected, "mailproxy changed (%s):\n%s" % (reason, _show(ours))
    assert nginx_expected != ours_expected
