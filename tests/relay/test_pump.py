"""mailproxy._splice on its own: statuses, errors, and pipes that never leak."""

import os
import socket
import subprocess
import sys

import pytest

from mailproxy import _splice

from .conftest import ROOT


def nb_pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def test_pump_statuses():
    src_w, src = nb_pair()
    dst, dst_r = nb_pair()
    pipe = _splice.Pipe(1 << 16)
    try:
        assert pipe.size == 1 << 16
        assert _splice.pump(src.fileno(), pipe, dst.fileno(), 1 << 30) == (0, _splice.AGAIN_SRC)
        src_w.sendall(b"hello")
        assert _splice.pump(src.fileno(), pipe, dst.fileno(), 1 << 30) == (5, _splice.AGAIN_SRC)
        assert dst_r.recv(10) == b"hello"
        src_w.sendall(b"x" * 100)
        assert _splice.pump(src.fileno(), pipe, dst.fileno(), 1) == (100, _splice.BUDGET)
        assert len(dst_r.recv(1000)) == 100
        src_w.close()
        assert _splice.pump(src.fileno(), pipe, dst.fileno(), 1 << 30) == (0, _splice.EOF)
        assert pipe.fill == 0
    finally:
        pipe.close()
        for s in (src, dst, dst_r):
            s.close()


def test_full_destination_keeps_bytes_in_the_pipe():
    src_w, src = socket.socketpair()
    dst, dst_r = nb_pair()
    src.setblocking(False)
    pipe = _splice.Pipe(1 << 20)
    try:
        sent = 0
        block = b"y" * 65536
        while sent < 8 << 20:
            try:
                src_w.setblocking(False)
                sent += src_w.send(block)
            except BlockingIOError:
                moved, status = _splice.pump(src.fileno(), pipe, dst.fileno(), 1 << 30)
                if status == _splice.AGAIN_DST:
                    break
        assert status == _splice.AGAIN_DST and pipe.fill > 0
        held = pipe.fill
        got = 0
        while True:
            try:
                got += len(dst_r.recv(1 << 20))
            except BlockingIOError:
                break
        moved, status = _splice.pump(src.fileno(), pipe, dst.fileno(), 1 << 30)
        assert moved >= held
    finally:
        pipe.close()
        for s in (src_w, src, dst, dst_r):
            s.close()


def test_errors_name_their_side():
    src_w, src = nb_pair()
    dst, dst_r = nb_pair()
    pipe = _splice.Pipe()
    try:
        src_w.sendall(b"abc")
        dst_r.close()
        with pytest.raises(_splice.SpliceError) as info:
            _splice.pump(src.fileno(), pipe, dst.fileno(), 1 << 30)
        assert info.value.errno == 32 and info.value.side == "dst" and info.value.moved == 0
        assert pipe.fill == 3  # undeliverable: the relay closes such a pipe instead of pooling it
        with pytest.raises(_splice.SpliceError) as info:
            _splice.pump(-1, _splice.Pipe(), dst.fileno(), 1 << 30)
        assert info.value.errno == 9 and info.value.side == "src"
    finally:
        pipe.close()
        for s in (src_w, src, dst):
            s.close()


def test_einval_for_descriptors_splice_refuses(tmp_path):
    # splice(2) refuses an O_APPEND target with EINVAL: the relay's cue to copy in user space, after
    # taking back what is already in the pipe.
    src_w, src = nb_pair()
    target = os.open(tmp_path / "append", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    pipe = _splice.Pipe()
    try:
        src_w.sendall(b"abc")
        with pytest.raises(_splice.SpliceError) as info:
            _splice.pump(src.fileno(), pipe, target, 1 << 30)
        assert (info.value.errno, info.value.side, pipe.fill) == (22, "dst", 3)
        assert os.read(pipe.r, 10) == b"abc"
    finally:
        pipe.close()
        os.close(target)
        src_w.close()
        src.close()


def test_pipes_close_once_and_never_leak():
    before = open_fds()
    pipes = [_splice.Pipe(1 << 18) for _ in range(50)]
    assert open_fds() == before + 100
    for p in pipes[:25]:
        p.close()
        p.close()
        assert p.closed
    del pipes  # the other 25 close on deallocation
    assert open_fds() == before
    with pytest.raises(ValueError):
        _splice.pump(0, closed_pipe(), 1, 1)


def closed_pipe():
    p = _splice.Pipe()
    p.close()
    return p


def test_refused_pipe_size_leaks_nothing():
    # Past 2 GiB the kernel refuses any caller, root included (root may pass pipe-max-size).
    before = open_fds()
    with pytest.raises(OSError):
        _splice.Pipe((1 << 31) - 1)
    assert open_fds() == before


@pytest.mark.process
def test_missing_extension_fails_loudly_unless_opted_out(tmp_path):
    # A sitecustomize that hides the extension, as a package without a compiled _splice would.
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\nsys.modules['mailproxy._splice'] = None\n")
    env = dict(os.environ, PYTHONPATH="%s:%s" % (tmp_path, ROOT))
    env.pop("MAILPROXY_NO_SPLICE", None)
    probe = "import mailproxy.relay as r; print(r.SPLICE_AVAILABLE)"
    run = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert run.returncode != 0
    assert "ImportError: mailproxy: the splice relay extension mailproxy._splice is not built" in run.stderr
    env["MAILPROXY_NO_SPLICE"] = "1"
    run = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert (run.returncode, run.stdout) == (0, "False\n")
