"""The bench's auth_http server: every request gets an OK pointing at the bench backend of its protocol.

    python -m bench.authserver IMAP_PORT [POP3_PORT SMTP_PORT]   # prints "listening PORT" when ready

No parsing beyond the end of the header block, the HTTP version and Auth-Protocol: a real auth
server's cost is the auth server's business, and the bench compares proxies. HTTP/1.0 requests (nginx,
mailproxy by default) get the reply and a close; HTTP/1.1 (``auth_http_keepalive on``) keeps the
connection for the next one.
"""

import sys

from gevent import monkey

monkey.patch_all()

import resource  # noqa: E402

from gevent.server import StreamServer  # noqa: E402


def serve(ports):
    replies = {}
    for protocol, port in zip((b"imap", b"pop3", b"smtp"), ports):
        head = b"Auth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: %d\r\n" % port
        replies[protocol] = (b"HTTP/1.0 200 OK\r\n" + head + b"\r\n",
                             b"HTTP/1.1 200 OK\r\n" + head + b"Content-Length: 0\r\n\r\n")
    imap = replies[b"imap"]

    def handle(sock, _address):
        buf = b""
        try:
            while True:
                end = buf.find(b"\r\n\r\n")
                while end < 0:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buf += data
                    end = buf.find(b"\r\n\r\n")
                request, buf = buf[:end], buf[end + 4:]
                first = request[: request.find(b"\r\n")]
                keep = first.endswith(b"HTTP/1.1") and b"\nconnection: close" not in request.lower()
                # Both proxies write the header as "Auth-Protocol: imap"; an unknown one goes to IMAP.
                at = request.find(b"Auth-Protocol: ")
                reply10, reply11 = replies.get(request[at + 15: at + 19], imap) if at >= 0 else imap
                sock.sendall(reply11 if keep else reply10)
                if not keep:
                    return
        except ConnectionError:
            return  # the proxy gave up on this request (its timeout); nothing to answer
        finally:
            sock.close()

    server = StreamServer(("127.0.0.1", 0), handle, backlog=4096)
    server.start()
    print("listening %d" % server.address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sys.exit(serve([int(port) for port in sys.argv[1:]]))
