"""CPU cost of one auth_http request, client side: our client (nginx mode and keep-alive) and geventhttpclient.

The auth server runs in a child process so that only the client's CPU is counted (``time.process_time``
in this process). Usage: ``python bench/auth_http_cost.py [requests]`` (default 5000).
"""

import multiprocessing
import os
import socket
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

REPLY_HEAD = b"Auth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: 143\r\nContent-Length: 0\r\n"


def serve(ready):
    from gevent.server import StreamServer

    def handle(conn, _address):
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            if b" HTTP/1.1\r\n" in head.split(b"\r\n", 1)[0] + b"\r\n":
                conn.sendall(b"HTTP/1.1 200 OK\r\n" + REPLY_HEAD + b"\r\n")
            else:
                conn.sendall(b"HTTP/1.0 200 OK\r\n" + REPLY_HEAD + b"\r\n")
                return

    server = StreamServer(("127.0.0.1", 0), handle, backlog=1024)
    server.start()
    ready.put(server.address[1])
    server.serve_forever()


def cpu_per_request(label, one_request, count):
    for _ in range(min(200, count)):  # warm-up: imports, pools, caches
        one_request()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        one_request()
    cpu = time.process_time() - cpu
    wall = time.perf_counter() - wall
    print("%-34s %8.1f us CPU/request  %8.1f us wall/request" % (label, cpu / count * 1e6, wall / count * 1e6))


def main():
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    ready = multiprocessing.Queue()
    server = multiprocessing.Process(target=serve, args=(ready,), daemon=True)
    server.start()
    port = ready.get(timeout=30)  # the server is listening once it has told us its port

    from geventhttpclient import HTTPClient

    from mailproxy.auth_http import request
    from mailproxy.auth_http.client import AuthHttpClient
    from mailproxy.protocol.common import AuthAttempt

    url = SimpleNamespace(host_header="127.0.0.1", uri="/auth", sockaddr=("127.0.0.1", port),
                          family=socket.AF_INET, peer="127.0.0.1:%d" % port)
    attempt = AuthAttempt(method="plain", login=b"user", password=b"secret", attempt=1)

    def ours(keepalive):
        conf = SimpleNamespace(auth_http=url, auth_http_header=(), auth_http_timeout=5.0,
                               auth_http_keepalive=keepalive, auth_http_pass_client_cert=False)
        client = AuthHttpClient(conf)

        def one():
            client.ask(request.build(conf, attempt, "imap", "127.0.0.1"))

        return one

    ghc = HTTPClient("127.0.0.1", port, concurrency=1, connection_timeout=5, network_timeout=5)
    ghc_headers = {"Auth-Method": "plain", "Auth-User": "user", "Auth-Pass": "secret", "Auth-Protocol": "imap",
                   "Auth-Login-Attempt": "1", "Client-IP": "127.0.0.1"}

    def geventhttpclient_one():
        response = ghc.get("/auth", headers=ghc_headers)
        response.read()
        response.release()

    try:
        print("%d requests each, one at a time, against a local gevent auth server\n" % count)
        cpu_per_request("mailproxy, new connection (nginx)", ours(False), count)
        cpu_per_request("mailproxy, keep-alive", ours(True), count)
        cpu_per_request("geventhttpclient, keep-alive", geventhttpclient_one, count)
    finally:
        ghc.close()
        server.terminate()
        server.join()


if __name__ == "__main__":
    main()
