"""Servers the tests script on threads: a TCP server base, and a scripted SMTP backend.

``TcpServer`` listens on 127.0.0.1 (a free port) before its constructor returns, so a connect can never
race its start; each connection runs ``serve_connection(conn)`` on its own thread. ``stop_listening()``
stops accepting (shutdown() wakes the accept; close() alone would leave the port answering);
``close()`` also shuts the connections still open down, which wakes their threads.
"""

import socket
import threading


class TcpServer:
    backlog = 128

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=self.backlog)
        self.port = self.listener.getsockname()[1]
        self.connections = []
        self.accepted = 0
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def serve_connection(self, conn):
        raise NotImplementedError

    def stop_listening(self):
        """No new connection; those open go on (a backend retired under sessions it still serves)."""
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # never connected or already shut down: either way it no longer accepts
        self.listener.close()
        self.thread.join(5)

    def close(self):
        self.stop_listening()
        for conn in list(self.connections):
            try:
                conn.shutdown(socket.SHUT_RDWR)  # wakes a connection's thread still reading
            except OSError:
                pass  # closed already

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            self.connections.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        try:
            self.serve_connection(conn)
        except OSError:
            pass  # the peer (or close()) cut the connection: what was recorded is what the test checks
        finally:
            conn.close()
            self.connections.remove(conn)


class SmtpBackend(TcpServer):
    """An SMTP backend that answers by verb and records every line (``lines``); ``done`` is set when a
    session ends. With ``auth``, AUTH LOGIN walks its two challenges and any other AUTH succeeds at once;
    without, AUTH gets the ``ok`` reply like any other verb."""

    def __init__(self, ehlo=b"250-backend.test\r\n250 AUTH PLAIN\r\n", xclient=b"220 backend.test ESMTP\r\n",
                 helo=None, ok=b"250 ok\r\n", bye=b"221 bye\r\n", auth=b"235 2.7.0 Authentication successful\r\n"):
        self.replies = {b"EHLO": ehlo, b"HELO": ehlo if helo is None else helo, b"XCLI": xclient, b"QUIT": bye}
        if auth is not None:
            self.replies[b"AUTH"] = auth
        self.ok = ok
        self.lines = []
        self.done = threading.Event()
        super().__init__()

    def serve_connection(self, conn):
        steps = []
        with conn.makefile("rb") as reader:
            conn.sendall(b"220 backend.test ESMTP\r\n")
            for line in reader:
                self.lines.append(line)
                verb = line[:4].upper()
                if steps:
                    conn.sendall(steps.pop(0))
                elif line.upper() == b"AUTH LOGIN\r\n" and b"AUTH" in self.replies:
                    conn.sendall(b"334 VXNlcm5hbWU6\r\n")
                    steps = [b"334 UGFzc3dvcmQ6\r\n", self.replies[b"AUTH"]]
                else:
                    conn.sendall(self.replies.get(verb, self.ok))
                if verb == b"QUIT":
                    break
        self.done.set()
