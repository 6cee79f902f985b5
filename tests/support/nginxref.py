"""Debian's nginx mail proxy as the running reference (spec: "when in doubt, compare the bytes").

``NginxMail(mail_block)`` starts ``/usr/sbin/nginx`` in a temporary prefix with the given ``mail {}`` body,
waits until every listen port answers, and stops it by pid. ``exchange(port, chunks)`` sends each chunk
after reading what the server had to say, and returns everything the server sent.
"""

import os
import shutil
import socket
import subprocess
import tempfile
import time

from support.harness import terminate

NGINX = "/usr/sbin/nginx"
MAIL_MODULE = "/usr/lib/nginx/modules/ngx_mail_module.so"


def available() -> bool:
    return os.path.exists(NGINX) and os.path.exists(MAIL_MODULE)




class NginxMail:
    def __init__(self, mail_block: str, ports, main_extra: str = ""):
        self.ports = list(ports)
        self.prefix = tempfile.mkdtemp(prefix="nginxref-")
        os.makedirs(os.path.join(self.prefix, "logs"))
        self.conf = os.path.join(self.prefix, "nginx.conf")
        with open(self.conf, "w") as conf:
            conf.write(
                "load_module %s;\nworker_processes 1;\ndaemon off;\nmaster_process on;\n"
                "pid %s/nginx.pid;\nerror_log %s/logs/error.log info;\n%s\n"
                "events { worker_connections 1024; }\nmail {\n%s\n}\n"
                % (MAIL_MODULE, self.prefix, self.prefix, main_extra, mail_block)
            )
        self.process = None

    def __enter__(self):
        self.process = subprocess.Popen(
            [NGINX, "-p", self.prefix, "-c", self.conf],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        for port in self.ports:
            while not _answers(port):
                if self.process.poll() is not None:
                    raise RuntimeError("nginx exited: %s" % self.process.stderr.read().decode())
                if time.monotonic() > deadline:
                    raise RuntimeError("nginx did not listen on %d" % port)
                time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        terminate(self.process)
        if self.process:
            self.process.stderr.close()
        shutil.rmtree(self.prefix, ignore_errors=True)

    def error_log(self) -> str:
        with open(os.path.join(self.prefix, "logs", "error.log")) as log:
            return log.read()


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def exchange(port: int, chunks, settle: float = 0.3, host: str = "127.0.0.1") -> bytes:
    """Read the greeting, then send each chunk and read what arrives within ``settle`` seconds."""
    received = bytearray()
    with socket.create_connection((host, port), timeout=5) as conn:
        received += _drain(conn, settle)
        for chunk in chunks:
            try:
                conn.sendall(chunk)
            except OSError:
                break
            received += _drain(conn, settle)
    return bytes(received)


def _drain(conn, settle: float) -> bytes:
    data = bytearray()
    conn.settimeout(settle)
    while True:
        try:
            piece = conn.recv(65536)
        except socket.timeout:
            break
        except OSError:
            break
        if not piece:
            break
        data += piece
    return bytes(data)
