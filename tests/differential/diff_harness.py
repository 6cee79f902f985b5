"""The differential fuzzer's machinery: the two proxies, their auth server, the client and the masks.

Debian's nginx (support/nginxref.py) and mailproxy run one ``mail {}`` block (six servers: IMAP, POP3 and
SMTP, each once with several SASL methods and once with a small client buffer), ask one auth server and
log in to one Dovecot (IMAP, POP3) and one Postfix (SMTP), as the byte-parity tests in tests/e2e do.

The client plays a dialogue's writes in order. nginx is the reference: after each write its replies are
read until the connection has been quiet for a moment (longer where a login may be under way), so each
write reaches it in a read of its own. mailproxy is then read after each write until it has sent as many
lines as nginx had by then (or closed), so a slower Python process is never cut short, and briefly beyond
to catch extra bytes. The final read always lasts until the close or a longer quiet.
"""

import base64
import re
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import List

from support.authserver import RecordingAuthServer

SERVER_NAME = "mail.diff.test"

# Client-side pacing. nginx answers a loopback command in well under a millisecond. A login takes
# longer (the auth server is a Python thread, Dovecot forks its login process), so the client also asks
# the auth server what it answered to this dialogue's address, and when (FuzzAuthServer.expecting).
QUIET = 0.08  # silence that ends a write's reply
LOGIN_QUIET = 0.25  # ... for a write that may start a login: the auth request may still be on its way
LOGIN_PATIENCE = 3.0  # longest wait for a reply the auth server's answer calls for
FINAL_QUIET = 0.4  # after the last write: silence that ends the dialogue unless the server closes first
OURS_PATIENCE = 5.0  # mailproxy: longest wait for the lines nginx had sent by then

# One server block per variant; the ports differ between the two proxies.
SERVERS = {
    "imap": ("imap", 4096, "imap_auth plain login cram-md5 external;"
                           ' imap_capabilities IMAP4rev1 "LITERAL+" SASL-IR;'),
    "imap_small": ("imap", 128, "imap_client_buffer 128; max_errors 3; proxy_pass_error_message on;"),
    "pop3": ("pop3", 128, "pop3_auth plain apop cram-md5 external;"
                          ' pop3_capabilities TOP USER UIDL "EXPIRE NEVER";'),
    "pop3_small": ("pop3", 128, "max_errors 3; proxy_pass_error_message on;"),
    "smtp": ("smtp", 4096, "smtp_auth plain login cram-md5 external;"
                           ' smtp_capabilities PIPELINING "SIZE 10240000" 8BITMIME;'),
    "smtp_small": ("smtp", 128, "smtp_auth none login plain; smtp_client_buffer 128; max_errors 3;"
                                " proxy_pass_error_message on;"),
}
PROTOCOL = {name: spec[0] for name, spec in SERVERS.items()}
BUFFER = {name: spec[1] for name, spec in SERVERS.items()}
METHODS = {
    "imap": frozenset(("plain", "login", "cram-md5", "external")),
    "imap_small": frozenset(("plain",)),
    "pop3": frozenset(("plain", "apop", "cram-md5", "external")),
    "pop3_small": frozenset(("plain",)),
    "smtp": frozenset(("plain", "login", "cram-md5", "external")),
    "smtp_small": frozenset(("none", "login", "plain")),
}


def mail_block(ports, auth_url):
    servers = "".join(
        "    server {\n        listen 127.0.0.1:%d;\n        protocol %s;\n        %s\n    }\n"
        % (ports[name], protocol, directives)
        for name, (protocol, _, directives) in SERVERS.items()
    )
    return ("    server_name %s;\n    auth_http %s;\n    timeout 60s;\n    xclient on;\n%s"
            % (SERVER_NAME, auth_url, servers))


# --- the auth server --------------------------------------------------------------------------------

# Logins whose first letters choose how the auth server refuses them (the generator picks them).
WAIT_PREFIX = "slow"  # refused with Auth-Wait: 1: the session stays open for another try
BROKEN_PREFIX = "broken"  # an unparsable reply: the internal-error line
CODED_PREFIX = "coded"  # refused with Auth-Error-Code (SMTP shows the code)
AUTH_ONLY = {"mallory": "mallory-pw"}  # known to the auth server, not to Dovecot


class FuzzAuthServer(RecordingAuthServer):
    """RecordingAuthServer with a few more outcomes, chosen by the login so that concurrent dialogues
    need no script: EXTERNAL accepted for known users, Auth-Wait, Auth-Error-Code, a broken reply.

    Each dialogue connects from its own loopback address (``source_address``), so the answers given to
    its Client-IP tell the client when a reply is still due from the proxy."""

    def __init__(self, *args, **kwargs):
        RecordingAuthServer.__init__(self, *args, **kwargs)
        self.answers = {}  # Client-IP -> [(time answered, Auth-Wait seconds, raw request)]
        self.answers_lock = threading.Lock()

    def _decide(self, headers):
        reply = self._verdict(headers)
        wait = 1.0 if b"Auth-Wait: 1\r\n" in reply else 0.0
        with self.lock:
            raw = next(raw for raw, parsed in reversed(self.requests) if parsed is headers)
        with self.answers_lock:
            self.answers.setdefault(headers.get("client-ip", b"").decode(), []).append(
                (time.monotonic(), wait, raw))
        return reply

    def requests_from(self, ip: str, start: float, end: float):
        """The raw requests about this client address that arrived between ``start`` and ``end``."""
        with self.answers_lock:
            return [raw for answered, _, raw in self.answers.get(ip, ()) if start <= answered <= end]

    def expecting(self, ip: str, last_byte: float):
        """A deadline while the proxy owes this client the reply to an answered login, else None."""
        with self.answers_lock:
            answers = list(self.answers.get(ip, ()))
        for answered, wait, _ in answers:
            if last_byte < answered + wait:
                return answered + wait + LOGIN_PATIENCE
        return None

    def _verdict(self, headers):
        user = urllib.parse.unquote_to_bytes(headers.get("auth-user", b"")).decode("latin-1")
        method = headers.get("auth-method", b"").decode()
        if method == "none":
            # Mail without a login is judged without one: nginx 1.22 still sends the login of an earlier
            # refused attempt here, mailproxy none (the no-stale-credentials-with-none entry); a verdict
            # keyed on that stale login would turn a difference in the request into one on the wire.
            user = ""
        protocol = headers.get("auth-protocol", b"").decode()
        if user.startswith(BROKEN_PREFIX):
            return b"HTTP/1.0 200 OK\r\nAuth-Status OK\r\n\r\n"
        if method == "external" and user in self.users:
            ip, port = self.backends[protocol]
            return ("HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: %s\r\nAuth-Port: %d\r\n"
                    "Auth-Pass: %s\r\n\r\n" % (ip, port, urllib.parse.quote(self.users[user]))).encode()
        reply = RecordingAuthServer._decide(self, headers)
        if b"Auth-Status: OK" in reply:
            return reply
        extra = b""
        if user.startswith(WAIT_PREFIX):
            extra += b"Auth-Wait: 1\r\n"
        if user.startswith(CODED_PREFIX):
            extra += b"Auth-Error-Code: 550 5.7.1\r\n"
        return reply[:-2] + extra + b"\r\n" if extra else reply


def source_address(index: int) -> str:
    """A loopback address of its own for dialogue ``index`` (all of 127/8 is local on Linux)."""
    return "127.1.%d.%d" % (index // 250 % 250, index % 250 + 1)


# --- the client -------------------------------------------------------------------------------------


@dataclass
class Write:
    """Bytes the client sends in one go (or a function of everything received so far, for APOP and
    CRAM-MD5 digests), cut at these fractions of its length into separate writes."""

    data: object
    cuts: tuple = ()
    patience: float = 0.0  # wait this long for a first reply byte after the last piece
    note: str = ""


@dataclass
class Transcript:
    """What one side received: per write sent, the bytes that arrived before the next write."""

    steps: List[tuple] = field(default_factory=list)  # (bytes sent, bytes received)
    closed: str = ""  # "", "eof" or "reset"
    greeting: bytes = b""
    ip: str = ""  # the client's own address and port: its session in the server's error log
    port: int = 0
    started: float = 0.0  # time.monotonic() at the connect and after the last read
    ended: float = 0.0
    digests: List[bytes] = field(default_factory=list)  # lines computed from this server's salt

    @property
    def masked(self) -> bytes:
        """What the server sent, normalised (``normalise``), and with the client's APOP/CRAM-MD5 digest
        lines masked where a backend echoes them (Dovecot: "-ERR Unknown command: <line>"): the client
        computed them from each proxy's own salt, so they differ between the two."""
        data = normalise(self.received)
        for line in self.digests:
            for form in (line, line.upper()):
                data = data.replace(form, b"<digest line>")
        return data

    @property
    def received(self) -> bytes:
        return self.greeting + b"".join(got for _, got in self.steps)

    def lines_after(self):
        """Cumulative reply lines after the greeting and after each step, for the other side's reads."""
        counts = [self.greeting.count(b"\n")]
        for _, got in self.steps:
            counts.append(counts[-1] + got.count(b"\n"))
        return counts


def pieces(data: bytes, cuts) -> List[bytes]:
    offsets = sorted({int(cut * len(data)) for cut in cuts} - {0, len(data)})
    bounds = [0] + [offset for offset in offsets if 0 < offset < len(data)] + [len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def play(port: int, writes, source: str, auth: FuzzAuthServer, want=None) -> Transcript:
    """One connection from ``source``: the greeting, then each write's pieces, each followed by a read.

    A read ends after QUIET without a byte (LOGIN_QUIET for a write that may start a login; its first
    byte may take ``patience``), but never while the auth server's answer to this client still awaits the
    proxy's reply. ``want`` (mailproxy only): the reference transcript; each read first lasts until as
    many lines arrived as the reference had by then (or the close), as long as the lines so far are the
    reference's (masked): once they differ, the counts mean nothing and only silence ends a read."""
    transcript = Transcript(started=time.monotonic())
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transcript.ip, transcript.port = conn.getsockname()[:2]
        total = bytearray()
        last_byte = [time.monotonic()]

        def read(quiet, patience, target):
            got = bytearray()
            now = time.monotonic()
            deadline = now + (OURS_PATIENCE if target is not None else max(patience, quiet))
            while not transcript.closed:
                now = time.monotonic()
                arrived = total.count(b"\n") + got.count(b"\n")
                if target is not None and (arrived >= target or diverged(got)):
                    target = None
                    deadline = now + quiet
                if deadline <= now and target is None:
                    due = auth.expecting(source, last_byte[0])
                    if due is not None and due > now:
                        deadline = min(due, now + quiet)
                if deadline <= now:
                    break
                conn.settimeout(deadline - now)
                try:
                    # Acknowledge at once: a delayed ACK would let the server's Nagle hold its next reply.
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
                    piece = conn.recv(65536)
                except socket.timeout:
                    continue
                except ConnectionResetError:
                    transcript.closed = "reset"
                    break
                if not piece:
                    transcript.closed = "eof"
                    break
                got += piece
                last_byte[0] = time.monotonic()
                if target is None:
                    deadline = last_byte[0] + quiet
            total.extend(got)
            return bytes(got)

        targets = iter(want.lines_after()) if want is not None else None
        reference = want.masked if want is not None else b""

        def diverged(got):
            lines = bytes(total + got)
            lines = lines[:lines.rfind(b"\n") + 1]
            return not reference.startswith(Transcript(greeting=lines, digests=transcript.digests).masked)

        def next_target():
            if targets is None:
                return None
            return next(targets, total.count(b"\n"))

        transcript.greeting = read(QUIET, LOGIN_PATIENCE, next_target())
        for write in writes:
            if transcript.closed:
                break
            data = write.data(bytes(total)) if callable(write.data) else write.data
            if callable(write.data):
                transcript.digests.append(data.rstrip(b"\r\n"))
            parts = pieces(data, write.cuts)
            for number, part in enumerate(parts):
                if transcript.closed:
                    break
                try:
                    conn.settimeout(10)  # not a read's remaining patience: a write must not time out
                    conn.sendall(part)
                except OSError:
                    # The server closed while this was on its way: read what it sent before.
                    transcript.steps.append((part, read(QUIET, 0.0, None)))
                    transcript.closed = transcript.closed or "reset"
                    break
                last = number == len(parts) - 1
                quiet = LOGIN_QUIET if last and write.patience else QUIET
                transcript.steps.append((part, read(quiet, write.patience if last else 0.0, next_target())))
        # The end: until the server closes, or a longer silence.
        tail = read(FINAL_QUIET, 0.0, None) if not transcript.closed else b""
        if tail:
            transcript.steps.append((b"", tail))
    transcript.ended = time.monotonic()
    return transcript


# --- normalisation: only what two servers cannot share -----------------------------------------------

_SALT = re.compile(rb"<\d+\.\d+@" + re.escape(SERVER_NAME.encode()) + rb">")
_CHALLENGE = re.compile(rb"^(\+ |334 )([A-Za-z0-9+/]+=*)\r$", re.M)
_DOVECOT_TIMING = re.compile(rb" \(\d+\.\d+ \+ \d+\.\d+(?: \+ \d+\.\d+)? secs\)")


def normalise(data: bytes) -> bytes:
    """Mask what differs between any two servers or runs, and nothing else:

    - the APOP/CRAM-MD5 salt ``<random.time@server_name>`` (spec 2.0.8), in the POP3 greeting and
      base64-encoded in a CRAM-MD5 challenge: a random number and the clock, made by each proxy;
    - Dovecot's command timings ``(0.001 + 0.000 secs)`` in replies relayed after a login: the backend's
      clock, not the proxy's bytes.
    """

    def challenge(match):
        try:
            decoded = base64.b64decode(match.group(2), validate=True)
        except ValueError:
            return match.group(0)
        if _SALT.fullmatch(decoded):
            return match.group(1) + b"<base64 salt>\r"
        return match.group(0)

    data = _CHALLENGE.sub(challenge, data)
    data = _SALT.sub(b"<salt>", data)
    return _DOVECOT_TIMING.sub(b" (<time> secs)", data)


_REQUEST_SALT = re.compile(rb"(Auth-Salt: )<\d+\.\d+@")
_DIGEST = re.compile(rb"(Auth-Method: (?:apop|cram-md5)\r\nAuth-User: [^\r]*\r\nAuth-Pass: )[0-9a-f]{32}\r\n")


def normalise_request(raw: bytes) -> bytes:
    """An auth request with the salt masked, and the APOP/CRAM-MD5 digest made from it."""
    return _REQUEST_SALT.sub(rb"\1<salt@", _DIGEST.sub(rb"\1<digest>\r\n", raw))


def salt_in(received: bytes) -> bytes:
    """The salt this side's server sent (POP3 greeting or a CRAM-MD5 challenge), for a digest."""
    found = _SALT.findall(received)
    if found:
        return found[-1]
    for match in _CHALLENGE.finditer(received):
        try:
            decoded = base64.b64decode(match.group(2), validate=True)
        except ValueError:
            continue
        if _SALT.fullmatch(decoded):
            found.append(decoded)
    return found[-1] if found else b"<no salt>"


def brief(data: bytes) -> str:
    """repr() of client or server bytes with long runs of one byte folded, for failure messages."""
    out, index = [], 0
    for match in re.finditer(rb"(.)\1{15,}", data, re.S):
        out.append(repr(data[index:match.start()])[2:-1])
        out.append("<%r x %d>" % (match.group(1)[:1], match.end() - match.start()))
        index = match.end()
    out.append(repr(data[index:])[2:-1])
    text = "".join(out)
    return "'%s'" % (text if len(text) < 3000 else text[:1500] + " ... " + text[-1500:])
