"""Raw clients for the edge tests: a chosen source address, an optional PROXY header, exact bytes."""

import socket


def connect(address, source=None, header=b"", family=socket.AF_INET, timeout=20.0):
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    if source is not None:
        # Loopback answers for all of 127.0.0.0/8, so each client can be told apart by its address.
        sock.bind((source, 0))
    sock.connect(address)
    if header:
        sock.sendall(header)
    return sock


def read_until(sock, end):
    data = b""
    while not data.endswith(end):
        piece = sock.recv(4096)
        if not piece:
            raise AssertionError("connection closed after %r" % data)
        data += piece
    return data


def read_to_close(sock):
    data = b""
    while True:
        try:
            piece = sock.recv(4096)
        except ConnectionResetError:
            return data
        if not piece:
            return data
        data += piece


def imap_command(sock, tag, command):
    """Sends one tagged command; returns the whole response through the tagged line."""
    sock.sendall(b"%s %s\r\n" % (tag, command))
    return read_tagged(sock, tag)


def read_tagged(sock, tag):
    data = b""
    while True:
        data += read_until(sock, b"\r\n")
        last = data[data.rfind(b"\n", 0, len(data) - 1) + 1:]
        if last.startswith(tag + b" "):
            return data


def imap_login(sock, user, password, tag=b"a1"):
    greeting = read_until(sock, b"\r\n")
    assert greeting.startswith(b"* OK"), greeting
    reply = imap_command(sock, tag, b'LOGIN %s "%s"' % (user.encode(), password.encode()))
    return reply
