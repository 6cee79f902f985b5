"""The bench's backend: just enough IMAP, POP3 and SMTP to be logged in to (and, for IMAP, streamed
from and written to), fast.

    python -m bench.backend [imap|pop3|smtp]   # prints "listening PORT" once it accepts, then serves
    python -m bench.backend imap --tls CERT KEY   # the same, each connection TLS from its first byte

It must never be the bottleneck, so it speaks only what the scenarios need and the harness measures it
directly (the "ceiling" rows): greeting ``* OK ready``; ``LOGIN`` with atoms or literals (``{n}`` gets a
``+`` continuation, ``{n+}`` does not), as nginx and mailproxy log in with literals; ``STREAM n`` answers
n payload bytes then ``tag OK``; ``SINK n`` answers ``+ go``, swallows exactly n bytes, then ``tag OK``
(a byte count rather than a terminator, so the sink never scans the payload); ``NOOP``; ``LOGOUT``.

POP3: greeting ``+OK``; ``USER``, ``PASS``, ``NOOP`` get ``+OK``; ``QUIT`` gets ``+OK`` and a close.
SMTP: greeting ``220``; ``EHLO``/``HELO`` get a one-line ``250``; ``XCLIENT`` gets ``220`` (a fresh
greeting, as Postfix answers it); ``AUTH`` gets ``235`` (only the ceiling, the load client
without a proxy, sends it); ``QUIT`` gets ``221`` and a close; anything else (``MAIL``, ``RCPT``,
``RSET``, ``NOOP``) gets ``250``. The proxies log in with USER/PASS and EHLO+XCLIENT and answer the
client's ``PASS``/``AUTH`` themselves, so nothing more is needed.
"""

import re
import sys

from gevent import monkey

monkey.patch_all()

import resource  # noqa: E402

from gevent.server import StreamServer  # noqa: E402

CHUNK = memoryview(b"x" * (1 << 20))
LITERAL = re.compile(rb"\{(\d+)(\+?)\}$")


class Conn:
    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()

    def line(self):
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[: end + 2]
                return line
            data = self.sock.recv(65536)
            if not data:
                return None
            self.buf += data

    def exact(self, n):
        while len(self.buf) < n:
            data = self.sock.recv(65536)
            if not data:
                return None
            self.buf += data
        taken = bytes(self.buf[:n])
        del self.buf[:n]
        return taken

    def command(self):
        """One command with its literals folded in, answering each synchronizing literal with '+'."""
        parts = []
        while True:
            line = self.line()
            if line is None:
                return None
            literal = LITERAL.search(line)
            if not literal:
                parts.append(line)
                return b"".join(parts)
            parts.append(line[: literal.start()])
            if not literal.group(2):
                self.sock.sendall(b"+ OK\r\n")
            value = self.exact(int(literal.group(1)))
            if value is None:
                return None
            parts.append(value)

    def sink(self, n):
        # Bytes already buffered behind the command count first; the rest are read into one scratch
        # buffer so that swallowing a GiB allocates nothing per read.
        taken = min(n, len(self.buf))
        del self.buf[:taken]
        left = n - taken
        scratch = bytearray(1 << 20)
        view = memoryview(scratch)
        while left:
            got = self.sock.recv_into(view[: min(left, len(scratch))])
            if not got:
                return False
            left -= got
        return True

    def stream(self, n):
        while n:
            piece = CHUNK[: min(n, len(CHUNK))]
            self.sock.sendall(piece)
            n -= len(piece)


def _session(dialogue):
    """A StreamServer handler running ``dialogue(sock, conn)`` until either side ends it."""
    def handler(sock, _address):
        try:
            dialogue(sock, Conn(sock))
        except ConnectionError:
            return  # a client that resets mid-stream (a killed load process) is not the backend's failure
        finally:
            sock.close()

    return handler


def imap_dialogue(sock, conn):
    sock.sendall(b"* OK ready\r\n")
    while True:
        command = conn.command()
        if command is None:
            return
        tag, _, rest = command.partition(b" ")
        verb, _, arg = rest.partition(b" ")
        verb = verb.upper()
        if verb == b"LOGIN":
            sock.sendall(tag + b" OK LOGIN done\r\n")
        elif verb == b"STREAM":
            conn.stream(int(arg))
            sock.sendall(tag + b" OK\r\n")
        elif verb == b"SINK":
            sock.sendall(b"+ go\r\n")
            if not conn.sink(int(arg)):
                return
            sock.sendall(tag + b" OK\r\n")
        elif verb == b"LOGOUT":
            sock.sendall(b"* BYE\r\n" + tag + b" OK\r\n")
            return
        elif verb == b"NOOP":
            sock.sendall(tag + b" OK\r\n")
        else:
            sock.sendall(tag + b" BAD\r\n")


def pop3_dialogue(sock, conn):
    sock.sendall(b"+OK ready\r\n")
    while True:
        line = conn.line()
        if line is None:
            return
        verb = line.split(b" ", 1)[0].upper()
        if verb == b"QUIT":
            sock.sendall(b"+OK bye\r\n")
            return
        sock.sendall(b"+OK\r\n" if verb in (b"USER", b"PASS", b"NOOP") else b"-ERR\r\n")


def smtp_dialogue(sock, conn):
    sock.sendall(b"220 bench ESMTP\r\n")
    while True:
        line = conn.line()
        if line is None:
            return
        verb = line.split(b" ", 1)[0].upper()
        if verb == b"QUIT":
            sock.sendall(b"221 bye\r\n")
            return
        sock.sendall(b"220 bench ESMTP\r\n" if verb == b"XCLIENT" else
                     b"235 ok\r\n" if verb == b"AUTH" else b"250 ok\r\n")


HANDLERS = {"imap": _session(imap_dialogue), "pop3": _session(pop3_dialogue), "smtp": _session(smtp_dialogue)}


def implicit_tls(handler, cert, key):
    """``handler`` behind a server-side TLS handshake (IMAPS-style: no STARTTLS, TLS before the
    greeting), for measuring a proxy's TLS towards its backends."""
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)

    def wrapped(sock, address):
        try:
            tls = context.wrap_socket(sock, server_side=True)
        except OSError:
            sock.close()  # a client that gave up during the handshake is not the backend's failure
            return
        handler(tls, address)

    return wrapped


def main():
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    args = sys.argv[1:]
    tls = None
    if "--tls" in args:
        at = args.index("--tls")
        tls, args = args[at + 1: at + 3], args[:at] + args[at + 3:]
        if len(tls) != 2:
            sys.exit("usage: python -m bench.backend [imap|pop3|smtp] [--tls CERT KEY]")
    protocol = args[0] if args else "imap"
    handler = implicit_tls(HANDLERS[protocol], *tls) if tls else HANDLERS[protocol]
    server = StreamServer(("127.0.0.1", 0), handler, backlog=4096)
    server.start()
    print("listening %d" % server.address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
