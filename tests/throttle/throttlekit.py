"""Helpers the throttling tests share (their fixtures are in conftest.py): a tiny IMAP backend for
the logins that succeed; readiness of the processes they start is tests/conftest.py's wait_listening."""

import socket
import threading

from mailproxy_testing import missing, wait_listening  # noqa: F401  (the throttle tests import it from here)


def require(what, present):
    if not present:
        missing(what)


class TinyImapBackend:
    """Greets, takes LOGIN in literals (as the proxy sends it), says OK to anything, BYE on LOGOUT."""

    def __init__(self):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed by the test
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn):
        with conn, conn.makefile("rb") as reader:
            conn.sendall(b"* OK backend ready\r\n")
            command = b""
            for line in reader:
                command += line
                if line.endswith(b"}\r\n"):
                    size = int(line[line.rindex(b"{") + 1:-3])
                    conn.sendall(b"+ go on\r\n")
                    command += reader.read(size)
                    continue
                tag, _, rest = command.partition(b" ")
                command = b""
                if rest.upper().startswith(b"LOGOUT"):
                    conn.sendall(b"* BYE\r\n" + tag + b" OK bye\r\n")
                    return
                conn.sendall(tag + b" OK done\r\n")

    def close(self):
        self.listener.close()
