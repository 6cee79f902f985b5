# cython: language_level=3
"""splice(2) pump for the relay: kernel-to-kernel copies through a pipe, nothing else.

This module holds no policy. It does not know about sessions, timeouts, pools or event loops: it moves
bytes until a descriptor would block, and says which one. The caller (mailproxy/relay.py) decides what to
wait for. The system calls run with the GIL released so that other threads (the log writer, a resolver)
are not stalled while a large pipe is flushed.
"""

from libc.errno cimport errno, EINTR, EAGAIN
from posix.unistd cimport close as c_close

import os

cdef extern from "<fcntl.h>" nogil:
    # _GNU_SOURCE comes from pyconfig.h, which Python.h includes before this header.
    ssize_t splice(int fd_in, void *off_in, int fd_out, void *off_out, size_t len, unsigned int flags)
    int pipe2(int *pipefd, int flags)
    int fcntl(int fd, int cmd, ...)
    enum:
        SPLICE_F_MOVE
        SPLICE_F_NONBLOCK
        F_SETPIPE_SZ
        F_GETPIPE_SZ
        O_NONBLOCK
        O_CLOEXEC

# What stopped a pump() call. The pipe is empty for every status except AGAIN_DST.
cdef enum:
    _AGAIN_SRC = 0  # the source has nothing to read right now
    _AGAIN_DST = 1  # the destination cannot take more; the pipe still holds `Pipe.fill` bytes
    _EOF = 2        # the source reached end of file and everything read was delivered
    _BUDGET = 3     # max_bytes were delivered; the source may have more
    _ERR_SRC = 10
    _ERR_DST = 11

AGAIN_SRC = _AGAIN_SRC
AGAIN_DST = _AGAIN_DST
EOF = _EOF
BUDGET = _BUDGET

# SPLICE_F_MOVE is only a hint, but costs nothing; SPLICE_F_NONBLOCK makes the pipe side non-blocking
# even if a caller handed us a blocking pipe, so EAGAIN can only mean "this descriptor is not ready".
cdef unsigned int _FLAGS = SPLICE_F_MOVE | SPLICE_F_NONBLOCK


class SpliceError(OSError):
    """splice(2) failed with an errno other than EINTR/EAGAIN.

    `side` is "src" (reading the source into the pipe) or "dst" (writing the pipe to the destination),
    because the relay logs the two as nginx does (recv() failed / send() failed) and treats them
    differently (a read error counts as EOF, a write error ends the session). `moved` is the number of
    bytes delivered to the destination by this call before the error.
    """


cdef object _error(int err, str side, Py_ssize_t moved):
    exc = SpliceError(err, os.strerror(err))
    exc.side = side
    exc.moved = moved
    return exc


def set_pipe_size(int fd, Py_ssize_t size):
    """F_SETPIPE_SZ, then return the size the kernel actually chose (it rounds up to a power of two
    number of pages). Raises OSError (EPERM above pipe-max-size or the per-user soft limit)."""
    cdef int rc
    with nogil:
        rc = fcntl(fd, F_SETPIPE_SZ, <int>size)
    if rc < 0:
        raise OSError(errno, os.strerror(errno))
    return rc


cdef class Pipe:
    """One non-blocking, close-on-exec pipe and the number of bytes the pump left in it.

    close() is idempotent and also runs on deallocation, so a Pipe dropped on an error path cannot leak
    its two descriptors.
    """

    cdef readonly int r
    cdef readonly int w
    cdef readonly Py_ssize_t size
    cdef public Py_ssize_t fill

    def __cinit__(self, Py_ssize_t size=0):
        cdef int fds[2]
        self.r = -1
        self.w = -1
        self.fill = 0
        if pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0:
            raise OSError(errno, os.strerror(errno))
        self.r = fds[0]
        self.w = fds[1]
        try:
            if size > 0:
                self.size = set_pipe_size(self.w, size)
            else:
                self.size = fcntl(self.w, F_GETPIPE_SZ)
        except OSError:
            self.close()
            raise

    def close(self):
        if self.r >= 0:
            c_close(self.r)
            self.r = -1
        if self.w >= 0:
            c_close(self.w)
            self.w = -1
        self.fill = 0

    @property
    def closed(self):
        return self.r < 0

    def __dealloc__(self):
        if self.r >= 0:
            c_close(self.r)
        if self.w >= 0:
            c_close(self.w)

    def __repr__(self):
        return "<Pipe r=%d w=%d size=%d fill=%d>" % (self.r, self.w, self.size, self.fill)


cdef int _pump(int src, int pw, int pr, int dst, size_t room, Py_ssize_t *fill,
               Py_ssize_t max_bytes, Py_ssize_t *moved, int *err) noexcept nogil:
    # The pipe is always drained before it is refilled. A pipe's capacity is counted in page slots,
    # not bytes, so EAGAIN from splice(src -> pipe) would be ambiguous (source empty or pipe full)
    # unless the pipe is known to be empty; draining first makes it mean "source empty".
    cdef ssize_t n
    cdef int e
    while True:
        while fill[0] > 0:
            n = splice(pr, NULL, dst, NULL, <size_t>fill[0], _FLAGS)
            if n < 0:
                e = errno
                if e == EINTR:
                    continue
                if e == EAGAIN:
                    return _AGAIN_DST
                err[0] = e
                return _ERR_DST
            fill[0] -= n
            moved[0] += n
        if moved[0] >= max_bytes:
            return _BUDGET
        n = splice(src, NULL, pw, NULL, room, _FLAGS)
        if n < 0:
            e = errno
            if e == EINTR:
                continue
            if e == EAGAIN:
                return _AGAIN_SRC
            err[0] = e
            return _ERR_SRC
        if n == 0:
            return _EOF
        fill[0] += n


def pump(int src_fd, Pipe pipe not None, int dst_fd, Py_ssize_t max_bytes):
    """Move bytes src_fd -> pipe -> dst_fd until something would block, the source ends, or at least
    max_bytes were delivered. Bytes already in the pipe (pipe.fill) go out first.

    Returns (delivered, status) with status one of AGAIN_SRC, AGAIN_DST, EOF, BUDGET; pipe.fill is
    updated. Raises SpliceError for any other errno (EINVAL included: the caller falls back to copying).
    """
    cdef Py_ssize_t fill = pipe.fill
    cdef Py_ssize_t moved = 0
    cdef int err = 0
    cdef int status
    cdef int pw = pipe.w
    cdef int pr = pipe.r
    cdef size_t room = <size_t>pipe.size
    if pr < 0:
        raise ValueError("pump() on a closed Pipe")
    with nogil:
        status = _pump(src_fd, pw, pr, dst_fd, room, &fill, max_bytes, &moved, &err)
    pipe.fill = fill
    if status == _ERR_SRC:
        raise _error(err, "src", moved)
    if status == _ERR_DST:
        raise _error(err, "dst", moved)
    return moved, status
