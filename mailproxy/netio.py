"""Socket calls of the login path, without the costs gevent's general versions carry on every call.

- ``send_all``: gevent's ``sendall`` asks the kernel for SO_SNDBUF (a getsockopt(2)) on every call to size
  its chunks, then runs a Python loop with a deadline. A login's writes are a few dozen bytes that the
  kernel takes at once, so one send(2) is tried first and ``sendall`` only finishes what it left.
- ``connect_ip``: ``socket.create_connection`` passes even an IP literal through getaddrinfo, which gevent
  runs in its thread pool (a thread hand-off, futex wake-ups and GIL traffic per backend connect). The
  auth server's Auth-Server is always an IP literal (spec 3.4), so the socket is made for its family and
  connected to it directly.

Both keep the semantics of the calls they replace: the same exceptions (``socket.timeout`` after
``timeout`` seconds, ``OSError`` with the kernel's errno) and the same bytes on the wire.
"""

import os
import socket as _stdlib_socket
import ssl

from gevent import socket

from mailproxy.tls.openssl import ssl_error_text

_GeventSocket = socket.socket


def send_all(sock, data) -> None:
    """``sock.sendall(data)`` under the socket's timeout, one send(2) when the kernel takes everything."""
    # Only plain gevent sockets: an SSLSocket's send() ignores the timeout argument and would wait.
    if type(sock) is _GeventSocket:
        try:
            sent = sock.send(data, 0, 0.0)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            return
        data = memoryview(data)[sent:]
    sock.sendall(data)


def connect_ip(address: str, port: int, timeout: float):
    """A connected TCP socket to an IP literal (dotted IPv4 or bare IPv6), as create_connection would."""
    family = _stdlib_socket.AF_INET6 if ":" in address else _stdlib_socket.AF_INET
    sock = socket.socket(family, _stdlib_socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        # gevent connects a literal without asking the resolver (it checks with inet_pton first).
        sock.connect((address, port))
    except BaseException:
        sock.close()
        raise
    return sock


def failed_call(call: str, exc: OSError) -> str:
    """nginx's words for a failed ``recv``/``send``: the kernel's errno, or for a TLS connection OpenSSL's
    reason under SSL_read/SSL_write (an SSLError's errno is OpenSSL's error class, not an errno: strerror
    would turn SSL_ERROR_SSL into "Operation not permitted")."""
    if isinstance(exc, ssl.SSLError):
        return "SSL_%s() failed (SSL: %s)" % ("read" if call == "recv" else "write", ssl_error_text(exc))
    code = exc.errno or 0
    return "%s() failed (%d: %s)" % (call, code, os.strerror(code))
