"""A real HTTP auth server for end-to-end tests: records every request, answers by a routing table.

It speaks plain HTTP over a real socket (a thread per connection), unescapes Auth-User/Auth-Pass as an
nginx auth server must, and answers from ``users`` (login -> password) and ``backends``
(protocol -> (ip, port)). ``script`` overrides the answer for the next requests, for failure cases.
"""

import hashlib
import hmac
import threading
import urllib.parse

from support.servers import TcpServer


class RecordingAuthServer(TcpServer):
    def __init__(self, users, backends, wait_on_failure=0):
        self.users = dict(users)
        self.backends = dict(backends)
        self.wait_on_failure = wait_on_failure
        self.requests = []  # (raw request bytes, parsed headers)
        self.script = []  # raw replies to send instead of the computed one, in order
        self.lock = threading.Lock()
        super().__init__()

    @property
    def url(self):
        return "127.0.0.1:%d/auth" % self.port

    def serve_connection(self, conn):
        raw = b""
        while b"\r\n\r\n" not in raw:
            piece = conn.recv(65536)
            if not piece:
                return
            raw += piece
        headers = {}
        for line in raw.split(b"\r\n")[1:]:
            if b":" in line:
                name, _, value = line.partition(b":")
                headers[name.decode().lower()] = value.strip()
        with self.lock:
            self.requests.append((raw, headers))
            scripted = self.script.pop(0) if self.script else None
        conn.sendall(scripted if scripted is not None else self._decide(headers))

    def _decide(self, headers):
        user = urllib.parse.unquote_to_bytes(headers.get("auth-user", b"")).decode("latin-1")
        password = urllib.parse.unquote_to_bytes(headers.get("auth-pass", b"")).decode("latin-1")
        method = headers.get("auth-method", b"").decode()
        protocol = headers.get("auth-protocol", b"").decode()
        known = self.users.get(user)
        if method == "none" or (known is not None and _verify(method, known, password, headers)):
            ip, port = self.backends[protocol]
            extra = ""
            if method in ("apop", "cram-md5") and known is not None:
                extra = "Auth-Pass: %s\r\n" % known
            return (
                "HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: %s\r\nAuth-Port: %d\r\n%s\r\n"
                % (ip, port, extra)
            ).encode()
        wait = "Auth-Wait: %d\r\n" % self.wait_on_failure if self.wait_on_failure else ""
        return ("HTTP/1.0 200 OK\r\nAuth-Status: Invalid login or password\r\n%s\r\n" % wait).encode()


def _verify(method, known, password, headers):
    salt = headers.get("auth-salt", b"")
    if method == "apop":
        return hashlib.md5(salt + known.encode()).hexdigest() == password
    if method == "cram-md5":
        return hmac.new(known.encode(), salt, hashlib.md5).hexdigest() == password
    return known == password
