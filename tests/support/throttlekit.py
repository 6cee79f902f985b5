"""Helpers the throttling tests share (their fixtures are in conftest.py): a tiny IMAP backend for
the logins that succeed; readiness of the processes they start is tests/conftest.py's wait_listening."""


from support.harness import missing
from support.servers import TcpServer


def require(what, present):
    if not present:
        missing(what)


class TinyImapBackend(TcpServer):
    """Greets, takes LOGIN in literals (as the proxy sends it), says OK to anything, BYE on LOGOUT."""

    def serve_connection(self, conn):
        with conn.makefile("rb") as reader:
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

