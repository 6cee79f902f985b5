# cython: language_level=3
"""recv(2) and send(2) on a non-blocking socket, for the session before the relay (mailproxy/events.py)
and the relay's copy path between plain sockets (mailproxy/relay.py); and whether a connect has completed.

socket.socket's own methods parse their arguments and release and retake the GIL around every call, which
a non-blocking descriptor never needs: the call cannot block. Without them a login's dozen recv and send
calls cost 16,500 fewer instructions (callgrind, IMAP login and LOGOUT). Like mailproxy._splice this holds
no policy: would-block is None, a failure the OSError socket.socket would raise for the same errno.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.exc cimport PyErr_SetFromErrno
from libc.errno cimport EAGAIN, EINTR, errno

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    struct sockaddr:
        pass
    struct sockaddr_storage:
        pass
    ssize_t c_recv "recv"(int fd, void *buf, size_t n, int flags)
    ssize_t c_send "send"(int fd, const void *buf, size_t n, int flags)
    int c_getpeername "getpeername"(int fd, sockaddr *addr, socklen_t *size)

cdef enum:
    # A read lands here first and is copied out at its size: a 20-byte command costs a 20-byte object,
    # not a 16 KiB one shrunk afterwards.
    _STACK_READ = 16384


def recv(int fd, Py_ssize_t size):
    """Up to ``size`` bytes from ``fd``; b"" at EOF; None when the call would block."""
    cdef char buf[_STACK_READ]
    cdef ssize_t got
    cdef bytes data
    if size > _STACK_READ:
        data = PyBytes_FromStringAndSize(NULL, size)
        got = _call(fd, PyBytes_AS_STRING(data), size, False)
        if got < 0:
            return None
        return data if got == size else data[:got]
    got = _call(fd, buf, size, False)
    if got < 0:
        return None
    return PyBytes_FromStringAndSize(buf, got)


def recv_into(int fd, buffer, Py_ssize_t size):
    """Up to ``size`` bytes from ``fd`` into the start of ``buffer`` (a writable buffer, bounding
    ``size``): their count, 0 at EOF, None when the call would block."""
    cdef Py_buffer view
    cdef ssize_t got
    PyObject_GetBuffer(buffer, &view, PyBUF_WRITABLE)
    try:
        got = _call(fd, <char *> view.buf, min(size, view.len), False)
    finally:
        PyBuffer_Release(&view)
    if got < 0:
        return None
    return got


def send(int fd, data):
    """Bytes of ``data`` (any contiguous buffer) written to ``fd``; None when the call would block."""
    cdef Py_buffer view
    cdef ssize_t sent
    if PyBytes_CheckExact(data):
        sent = _call(fd, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), True)
    else:
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            sent = _call(fd, <char *> view.buf, view.len, True)
        finally:
            PyBuffer_Release(&view)
    if sent < 0:
        return None
    return sent


def connected(int fd):
    """Whether the socket ``fd`` has a peer: its connect(2) has completed. getpeername(2) alone, without
    the peer's address made into text and a tuple as socket.getpeername makes it (inet_ntop through
    sprintf: some 2,500 instructions a call)."""
    cdef sockaddr_storage peer
    cdef socklen_t size = sizeof(peer)
    return c_getpeername(fd, <sockaddr *> &peer, &size) == 0


cdef ssize_t _call(int fd, char *buf, Py_ssize_t size, bint sending) except -2:
    """One recv(2) or send(2): the bytes moved, -1 for would-block, -2 with OSError set."""
    cdef ssize_t done
    while True:
        # Flags 0, as socket.socket's: SIGPIPE is ignored in a Python process, so a gone peer is EPIPE.
        if sending:
            done = c_send(fd, buf, <size_t> size, 0)
        else:
            done = c_recv(fd, buf, <size_t> size, 0)
        if done >= 0:
            return done
        if errno == EINTR:
            continue
        if errno == EAGAIN:  # EWOULDBLOCK is EAGAIN on Linux
            return -1
        PyErr_SetFromErrno(OSError)
        return -2
