"""OAuth 2.0 end-to-end kit: mailproxy-auth as a real process, tokens issued by the test, an RFC 7662
introspection endpoint on a real socket, and a client that sends exact bytes.

mailproxy-auth is started with ``python -m mailproxy.authserver.app`` (what the console script runs), and
is ready when its port accepts; it is stopped by pid.
"""

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

import jwt

from support.harness import missing, terminate, wait_listening
from tools.ports import free_port

SECRET = b"correct horse battery staple, long enough for HS512 as RFC 7518 3.2 asks of it"
# RFC 7628 3.2.2 error JSON as mailproxy-auth sends it in Auth-Error-SASL.
BEARER_ERROR = base64.b64encode(b'{"status":"401","schemes":"bearer"}')
READY_TIMEOUT = 20.0


def require_curl():
    if not shutil.which("curl"):
        missing("curl (apt-get install curl)")




def issue(sub="alice", key=SECRET, algorithm="HS256", lifetime=300, **claims):
    """A signed JWT; ``lifetime`` < 0 makes an expired one."""
    now = int(time.time())
    payload = {"sub": sub, "iat": now, "exp": now + lifetime}
    payload.update(claims)
    return jwt.encode(payload, key, algorithm=algorithm)


def xoauth2(user, token):
    return b"user=%s\x01auth=Bearer %s\x01\x01" % (user.encode(), token.encode())


def oauthbearer(user, token):
    return b"n,a=%s,\x01auth=Bearer %s\x01\x01" % (user.encode(), token.encode())


class AuthProcess:
    """mailproxy-auth on a free port with a users file naming the test backends."""

    def __init__(self, users_text, *options):
        self.root = tempfile.mkdtemp(prefix="mpauth-")
        self.users = os.path.join(self.root, "users")
        with open(self.users, "w") as out:
            out.write(users_text)
        self.secret = os.path.join(self.root, "jwt.secret")
        with open(self.secret, "wb") as out:
            out.write(SECRET + b"\n")  # as `echo` writes it: the newline is not part of the secret
        self.port = free_port()
        self.access_log = os.path.join(self.root, "access.log")
        self.stderr_path = os.path.join(self.root, "stderr")
        options = [option.replace("{secret}", self.secret) for option in options]
        with open(self.stderr_path, "w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mailproxy.authserver.app", "--users", self.users,
                 "--listen", "127.0.0.1:%d" % self.port, "--access-log", self.access_log, *options],
                stdin=subprocess.DEVNULL, stderr=stderr,
            )
        try:
            wait_listening(self.port, self.process, "mailproxy-auth", READY_TIMEOUT)
        except AssertionError:
            why = self.stderr()
            self.stop()
            raise RuntimeError("mailproxy-auth did not start: %s" % why) from None

    @property
    def url(self):
        return "http://127.0.0.1:%d/auth" % self.port

    def stderr(self):
        with open(self.stderr_path) as err:
            return err.read()

    def log(self):
        with open(self.access_log) as log:
            return log.read()

    def stop(self):
        terminate(self.process)
        shutil.rmtree(self.root, ignore_errors=True)


class IntrospectionEndpoint:
    """RFC 7662 endpoint: ``tokens`` maps an opaque token to its claims; unknown ones are inactive."""

    def __init__(self, tokens, credentials=("mailproxy", "s3cret")):
        self.tokens = dict(tokens)
        self.credentials = credentials
        self.asked = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length", "0"))
                form = parse_qs(self.rfile.read(length).decode())
                token = form.get("token", [""])[0]
                expected = "Basic " + base64.b64encode(("%s:%s" % endpoint.credentials).encode()).decode()
                if self.headers.get("Authorization") != expected:
                    self.send_response(401)
                    self.end_headers()
                    return
                endpoint.asked.append(token)
                claims = endpoint.tokens.get(token)
                body = json.dumps(dict(claims, active=True) if claims else {"active": False}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                return  # keep test output to failures

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self):
        return "http://127.0.0.1:%d/introspect" % self.server.server_address[1]

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


class Wire:
    """Exact bytes out, whole lines in."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.reader = self.sock.makefile("rb")

    def send(self, data):
        self.sock.sendall(data)

    def line(self):
        return self.reader.readline()

    def lines_until(self, prefix):
        lines = [self.line()]
        while lines[-1] and not lines[-1].startswith(prefix):
            lines.append(self.line())
        return lines

    def closed(self):
        return self.reader.read() == b""

    def close(self):
        self.reader.close()
        self.sock.close()
