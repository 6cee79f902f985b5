"""The error log: nginx's line format, levels, several targets, reopen, shared appends; syslog and memory
targets as nginx parses and formats them (tests/test_error_log_targets.py runs them in a real master)."""

import os
import re
import socket
import subprocess
import sys
import time

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


@pytest.mark.process  # a child's stderr
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


def test_missing_folder_is_an_open_error(tmp_path):
    # nginx creates no folder for its logs: a typo in a path must fail the start, not grow a tree.
    path = str(tmp_path / "logs" / "error.log")
    with pytest.raises(errorlog.LogOpenError) as info:
        errorlog.ErrorLog(((path, "error"),))
    assert str(info.value) == 'open() "%s" failed (2: No such file or directory)' % path
    assert not os.path.exists(tmp_path / "logs")


@pytest.mark.process  # forks writers
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


SYSLOG = re.compile(rb"^<(\d+)>([A-Z][a-z]{2}) ([ \d]\d) (\d\d):(\d\d):(\d\d) (?:(\S+) )?(\w*): (.*)$", re.S)


def test_syslog_message_as_ngx_syslog_writer(tmp_path):
    peer = errorlog.SyslogPeer("syslog:server=127.0.0.1:514")
    now = time.mktime((2026, 3, 5, 7, 8, 9, 0, 0, -1))
    line = errorlog.format_line("warn", "disk nearly full", conn=4, now=now)
    message = peer.message(errorlog.LEVELS.index("warn"), line, now=now)
    # local7 (23) * 8 + warning (4); the day padded with a space; the whole error line, without its LF.
    assert message == b"<188>Mar  5 07:08:09 %s nginx: %s" % (socket.gethostname().lower().encode(), line[:-1])
    bare = errorlog.SyslogPeer("syslog:server=127.0.0.1,facility=mail,tag=edge_1,nohostname,severity=debug")
    message = bare.message(errorlog.LEVELS.index("emerg"), line, now=now)
    # severity= only matters to access_log: an error line keeps its own level's severity (emerg: 0).
    assert message.startswith(b"<16>Mar  5 07:08:09 edge_1: 2026/03/05 07:08:09 [warn] ")
    assert SYSLOG.match(message).group(7) is None


def test_syslog_message_cut_like_nginx():
    peer = errorlog.SyslogPeer("syslog:server=127.0.0.1:514")
    message = peer.message(0, errorlog.format_line("debug", "x" * 5000))
    assert len(message) <= errorlog.SYSLOG_MAX and message.endswith(b"x")


@pytest.mark.parametrize("target, reason", [
    ("syslog:", 'unknown syslog parameter ""'),
    ("syslog:facility=mail", "no syslog server specified"),
    ("syslog:server=127.0.0.1,server=127.0.0.2", 'duplicate syslog "server"'),
    ("syslog:server=127.0.0.1:0", 'invalid port in syslog server "127.0.0.1:0"'),
    ("syslog:server=127.0.0.1:x", 'invalid port in syslog server "127.0.0.1:x"'),
    ("syslog:server=[::1", 'invalid host in syslog server "[::1"'),
    ("syslog:server=unix:", 'no path in the unix domain socket in syslog server "unix:"'),
    ("syslog:server=host.invalid", 'host not found in syslog server "host.invalid"'),
    ("syslog:server=127.0.0.1,facility=local8", 'unknown syslog facility "local8"'),
    ("syslog:server=127.0.0.1,severity=warning", 'unknown syslog severity "warning"'),
    ("syslog:server=127.0.0.1,tag=" + "t" * 33, "syslog tag length exceeds 32"),
    ("syslog:server=127.0.0.1,tag=mail-proxy", 'syslog "tag" only allows alphanumeric characters and underscore'),
    ("syslog:server=127.0.0.1,hostname", 'unknown syslog parameter "hostname"'),
    ("memory:1k", 'invalid buffer size "1k"'),
    ("memory:lots", 'invalid buffer size "lots"'),
])
def test_targets_refused_in_nginx_words(target, reason):
    with pytest.raises(errorlog.TargetError) as info:
        errorlog.check_target(target)
    assert str(info.value) == reason


def test_syslog_server_forms():
    assert errorlog.parse_syslog("syslog:server=127.0.0.1").address == ("127.0.0.1", 514)
    assert errorlog.parse_syslog("syslog:server=[::1]:5514").address == ("::1", 5514)
    unix = errorlog.parse_syslog("syslog:server=unix:/dev/log,tag=")
    assert (unix.family, unix.address, unix.tag) == (socket.AF_UNIX, "/dev/log", "")


def test_udp_syslog_target_sends_one_datagram_per_line():
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(5)
    with receiver:
        target = "syslog:server=127.0.0.1:%d,tag=t" % receiver.getsockname()[1]
        log = errorlog.ErrorLog(((target, "notice"),))
        log.log("info", "below the level")
        log.log("notice", "first")
        log.log("error", "second", conn=9)
        first, second = receiver.recv(4096), receiver.recv(4096)
    assert SYSLOG.match(first).group(1) == b"189" and first.endswith(b"[notice] %d#0: first" % os.getpid())
    assert SYSLOG.match(second).group(1) == b"187" and second.endswith(b": *9 second")


def test_absent_syslog_server_costs_lines_only(tmp_path):
    """Nobody at the port, nobody at the path: every log call returns at once and raises nothing."""
    port_socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    port_socket.bind(("127.0.0.1", 0))
    port = port_socket.getsockname()[1]
    port_socket.close()
    targets = (("syslog:server=127.0.0.1:%d" % port, "debug"),
               ("syslog:server=unix:%s" % (tmp_path / "nobody"), "debug"))
    log = errorlog.ErrorLog(targets)
    began = time.monotonic()
    for n in range(2000):
        log.log("info", "line %d" % n)
    assert time.monotonic() - began < 5


def test_memory_target_keeps_the_latest_lines():
    log = errorlog.ErrorLog((("memory:4k", "debug"),))
    for n in range(200):
        log.log("debug", "line %03d" % n)
    ring = bytes(errorlog.log_file("memory:4k").buffer)
    assert b"line 199\n" in ring and b"line 000" not in ring


def test_main_log_without_file_gets_the_default_file(tmp_path):
    from mailproxy.conf import load_config

    conf = tmp_path / "mailproxy.conf"
    conf.write_text("error_log syslog:server=127.0.0.1 info;\nevents {}\n")
    main = load_config(str(conf), str(tmp_path)).main
    # nginx's ngx_log_open_default: syslog alone still leaves a file at the default level.
    assert main.error_log == (("syslog:server=127.0.0.1", "info"), (str(tmp_path / "logs/error.log"), "error"))
