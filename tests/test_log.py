"""The error log: nginx's line format, levels, several targets, reopen, shared appends."""

import os
import re
import subprocess
import sys

import pytest

from mailproxy import log as errorlog

LINE = re.compile(rb"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d \[(\w+)\] (\d+)#0: (.*)\n$")


@pytest.fixture(autouse=True)
def fresh_registry():
    yield
    errorlog.retain_only(())


def lines(path):
    with open(path, "rb") as handle:
        return handle.read().splitlines(keepends=True)


def test_line_format_with_and_without_connection_number(tmp_path):
    path = str(tmp_path / "error.log")
    log = errorlog.ErrorLog(((path, "info"),))
    log.log("info", "client 127.0.0.1:5000 connected to 127.0.0.1:143", conn=7)
    log.log("notice", "reopening logs")
    first, second = lines(path)
    match = LINE.match(first)
    assert match and match.group(1) == b"info" and int(match.group(2)) == os.getpid()
    assert match.group(3) == b"*7 client 127.0.0.1:5000 connected to 127.0.0.1:143"
    assert LINE.match(second).group(3) == b"reopening logs"


def test_levels_filter_per_target(tmp_path):
    quiet, chatty = str(tmp_path / "quiet.log"), str(tmp_path / "chatty.log")
    log = errorlog.ErrorLog(((quiet, "error"), (chatty, "debug")))
    assert log.enabled("debug") and log.enabled("emerg")
    for level in errorlog.LEVELS:
        log.log(level, "at " + level)
    assert [LINE.match(l).group(1).decode() for l in lines(chatty)] == list(errorlog.LEVELS)
    assert [LINE.match(l).group(1).decode() for l in lines(quiet)] == ["error", "crit", "alert", "emerg"]


def test_default_error_level_hides_info(tmp_path):
    path = str(tmp_path / "error.log")
    log = errorlog.ErrorLog(((path, "error"),))
    assert not log.enabled("info")
    log.log("info", "hidden")
    log.log("warn", "hidden too")
    assert not os.path.getsize(path)


def test_non_utf8_client_bytes_escaped(tmp_path):
    # nginx writes these bytes raw; mailproxy shows them as \xNN (a deliberate difference, log.py).
    path = str(tmp_path / "error.log")
    raw = b'client sent too long command "\xff\xfe \xc3\xa9"'
    errorlog.ErrorLog(((path, "info"),)).log("info", raw.decode("utf-8", "surrogateescape"), conn=1)
    assert lines(path)[0].endswith(b'*1 client sent too long command "\\xFF\\xFE \xc3\xa9"\n')


def test_control_bytes_cannot_forge_lines(tmp_path):
    path = str(tmp_path / "error.log")
    log = errorlog.ErrorLog(((path, "info"),))
    log.log("info", 'client login failed: "x"\r\n2026/01/01 00:00:00 [emerg] 1#0: forged\x00\x1b[31m\x85\t')
    log.log("info", b"bytes \n too \\x0A")
    assert [line.split(b": ", 1)[1] for line in lines(path)] == [
        b'client login failed: "x"\\x0D\\x0A2026/01/01 00:00:00 [emerg] 1#0: forged\\x00\\x1B[31m\\xC2\\x85\\x09\n',
        b"bytes \\x0A too \\x0A\n",
    ]
    assert errorlog.escape_line("\ud800") == "\ud800"  # not ours to escape; written backslashreplaced


def test_long_lines_cut_like_nginx(tmp_path):
    path = str(tmp_path / "error.log")
    errorlog.ErrorLog(((path, "error"),)).log("error", "x" * 5000)
    (line,) = lines(path)
    assert len(line) == errorlog.MAX_LINE and line.endswith(b"x\n")


def test_stderr_target():
    code = ("from mailproxy import log; "
            "log.ErrorLog((('stderr', 'notice'),)).log('notice', 'start worker processes')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert LINE.match(result.stderr).group(3) == b"start worker processes"


def test_reopen_follows_rotation(tmp_path):
    path = str(tmp_path / "error.log")
    log = errorlog.ErrorLog(((path, "notice"),))
    log.log("notice", "before")
    os.rename(path, path + ".1")
    log.log("notice", "still to the rotated file")
    assert errorlog.reopen_all() == []
    log.log("notice", "after")
    assert [LINE.match(l).group(3) for l in lines(path + ".1")] == [b"before", b"still to the rotated file"]
    assert [LINE.match(l).group(3) for l in lines(path)] == [b"after"]


def test_same_path_shares_one_descriptor(tmp_path):
    path = str(tmp_path / "error.log")
    first = errorlog.ErrorLog(((path, "error"),))
    second = errorlog.ErrorLog(((path, "info"),))
    assert first.targets[0][0] is second.targets[0][0]
    assert len(errorlog.file_descriptors()) == 1


def test_open_failure_worded_like_nginx(tmp_path):
    (tmp_path / "a-file").write_text("")
    path = str(tmp_path / "a-file" / "error.log")
    with pytest.raises(errorlog.LogOpenError) as info:
        errorlog.ErrorLog(((path, "error"),))
    assert str(info.value) == 'open() "%s" failed (20: Not a directory)' % path


def test_missing_folder_is_created(tmp_path):
    path = str(tmp_path / "logs" / "error.log")
    errorlog.ErrorLog(((path, "error"),)).log("error", "first line")
    with open(path) as log:
        assert log.read().endswith("[error] %d#0: first line\n" % os.getpid())


def test_processes_append_whole_lines(tmp_path):
    """Master and workers write one file; each line must land whole, none lost."""
    path = str(tmp_path / "error.log")
    log = errorlog.ErrorLog(((path, "info"),))
    pids = []
    for n in range(4):
        pid = os.fork()
        if pid == 0:
            status = 0
            try:
                for i in range(500):
                    log.log("info", "worker %d line %d %s" % (n, i, "y" * (n * 300)))
            except BaseException:
                status = 1
            finally:
                os._exit(status)
        pids.append(pid)
    for pid in pids:
        assert os.waitpid(pid, 0)[1] == 0
    written = lines(path)
    assert len(written) == 2000
    assert all(LINE.match(line) for line in written)
