"""Process control as nginx's, through the real CLI and real processes (issue 23): limits the process may
not take, start-ups that fail, `-t` opening what it opens, signals by `-s`, `--help`, and what each worker
sets up before it serves (environment, directory, priority, CPUs), read back from the running workers."""

import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading

import pytest

import mailproxy.cli

from support.harness import (ROOT, cmdline, free_port, imap_config, imap_session, pid_alive, read_line, read_to_close,
                             wait_for)

NOTICE = "error_log logs/error.log notice;"
BYE = b"* OK IMAP4 ready\r\n* BYE\r\na OK completed\r\n"
CAP_SYS_RESOURCE = 24


def has_capability(bit):
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith("CapEff:"))
    return bool(int(line.split()[1], 16) >> bit & 1)


def ask(client, command, answer):
    client.sendall(b"a %s\r\n" % command)
    line = read_line(client)
    assert line.startswith(b"* %s " % answer), line
    assert read_line(client) == b"a OK\r\n"
    return line[len(answer) + 3:].strip()


def logout(client):
    client.sendall(b"a LOGOUT\r\n")
    assert read_to_close(client) == b"* BYE\r\na OK completed\r\n"
    client.close()


def nice(pid):
    with open("/proc/%d/stat" % pid) as handle:
        # After the command name (which has spaces here): state is field 3, nice field 19.
        return int(handle.read().rsplit(")", 1)[1].split()[16])


def start_foreground(master, preexec=None):
    """`start` with daemon off, like the fixture, with a hook run in the master before it execs."""
    proc = subprocess.Popen(master.command("-g", "daemon off;", "start"), env=master.env, cwd=master.prefix,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=preexec)
    master.proc, master.pid = proc, proc.pid
    master.known_pids.add(proc.pid)
    master.wait_notify("READY=1")
    master.known_pids.update(master.workers())


# -- limits ----------------------------------------------------------------------------------------


@pytest.mark.skipif(has_capability(CAP_SYS_RESOURCE), reason="this process may raise its hard limits")
def test_nofile_beyond_the_hard_limit_is_an_alert_and_the_workers_serve(mailproxy_master):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536
    if hard == resource.RLIM_INFINITY or hard >= wanted:
        pytest.skip("the hard RLIMIT_NOFILE (%d) is not below %d" % (hard, wanted))
    port = free_port()
    master = mailproxy_master(imap_config("127.0.0.1:%d" % port, main="worker_rlimit_nofile %d; %s"
                                          % (wanted, NOTICE)), daemon=True)  # `start` returned 0
    assert imap_session(("127.0.0.1", port)) == BYE
    (worker,) = master.workers()
    log = master.error_log()
    assert ("[alert] %d#0: setrlimit(RLIMIT_NOFILE, %d) failed (1: Operation not permitted)\n"
            % (worker, wanted)) in log
    assert "[emerg]" not in log
    with open("/proc/%d/limits" % worker) as handle:
        limits = next(line for line in handle if line.startswith("Max open files")).split()[3:5]
    assert limits == [str(soft), str(hard)]


@pytest.mark.skipif(has_capability(CAP_SYS_RESOURCE), reason="this process may raise its hard limits")
def test_core_beyond_the_hard_limit_is_an_alert_and_the_workers_serve(mailproxy_master):
    port = free_port()
    master = mailproxy_master(imap_config("127.0.0.1:%d" % port, main="worker_rlimit_core 1m; " + NOTICE),
                              start=False)
    # The master starts with no room for core files at all, so 1m is beyond what it may take.
    start_foreground(master, preexec=lambda: resource.setrlimit(resource.RLIMIT_CORE, (0, 0)))
    assert imap_session(("127.0.0.1", port)) == BYE
    (worker,) = master.workers()
    assert ("[alert] %d#0: setrlimit(RLIMIT_CORE, 1048576) failed (1: Operation not permitted)\n" % worker
            in master.error_log())


def test_limits_within_reach_are_set(mailproxy_master):
    port = free_port()
    master = mailproxy_master(imap_config("127.0.0.1:%d" % port, main="worker_rlimit_nofile 1000; "
                                          "worker_rlimit_core 2m; " + NOTICE))
    (worker,) = master.workers()
    with open("/proc/%d/limits" % worker) as handle:
        limits = {line[:26].strip(): line[26:].split()[:2] for line in handle}
    assert limits["Max open files"] == ["1000", "1000"]
    assert limits["Max core file size"] == [str(2 * 1024 * 1024)] * 2
    assert "[alert]" not in master.error_log()


# -- start-up failures -------------------------------------------------------------------------------


def test_start_fails_with_the_reason_when_every_worker_dies(mailproxy_master):
    missing = "/nonexistent-mailproxy-%d" % os.getpid()
    port = free_port()
    master = mailproxy_master(imap_config("127.0.0.1:%d" % port, main="worker_processes 2; working_directory "
                                          "%s; %s" % (missing, NOTICE)), start=False)
    result = master.cli("start")
    assert result.returncode == 1
    assert result.stderr == ('mailproxy: [emerg] chdir("%s") failed (2: No such file or directory)\n' % missing)
    log = master.error_log()
    assert log.count('[alert] ') >= 2 and "exited with fatal code 3 and cannot be respawned" in log
    assert "[emerg] " in log and "no worker process started" in log
    assert not os.path.exists(master.pid_file)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)


def test_start_fails_when_the_session_cannot_load(mailproxy_master):
    master = mailproxy_master(imap_config("127.0.0.1:%d" % free_port(), main=NOTICE), start=False,
                              handler="conftest:no_such_handler")
    result = master.cli("start")
    assert result.returncode == 1
    assert result.stderr.startswith("mailproxy: [emerg] cannot load the session handler conftest:no_such_handler")
    assert result.stderr.count("\n") == 1


def test_start_fails_when_the_master_dies_before_serving(mailproxy_master):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    metrics_port = busy.getsockname()[1]
    master = mailproxy_master(imap_config("127.0.0.1:%d" % free_port(), main=NOTICE,
                                          mail="metrics_listen 127.0.0.1:%d;" % metrics_port), start=False)
    try:
        result = master.cli("start")
    finally:
        busy.close()
    assert result.returncode == 1
    wanted = "bind() to 127.0.0.1:%d failed (98: Address already in use)" % metrics_port
    assert result.stderr == "mailproxy: [emerg] %s\n" % wanted
    assert "[emerg] " in master.error_log() and wanted in master.error_log()


def test_bind_error_reaches_the_error_log_too(mailproxy_master):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    master = mailproxy_master(imap_config("127.0.0.1:%d" % port, main=NOTICE), start=False)
    try:
        result = master.cli("start")
    finally:
        busy.close()
    wanted = "bind() to 127.0.0.1:%d failed (98: Address already in use)" % port
    assert result.returncode == 1 and result.stderr == "mailproxy: [emerg] %s\n" % wanted
    assert re.search(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d \[emerg\] \d+#0: %s$" % re.escape(wanted),
                     master.error_log(), re.M)


def test_missing_log_directory_is_not_created(mailproxy_master):
    master = mailproxy_master(imap_config("127.0.0.1:%d" % free_port()), start=False)
    missing = os.path.join(master.prefix, "nowhere")
    master.write_config(imap_config("127.0.0.1:%d" % free_port(), main="error_log %s/error.log;" % missing))
    result = master.cli("start")
    assert result.returncode == 1
    assert result.stderr == ('mailproxy: [emerg] open() "%s/error.log" failed (2: No such file or directory)\n'
                             % missing)
    assert not os.path.exists(missing)


# -- -t ------------------------------------------------------------------------------------------------


def test_config_test_opens_the_error_log_and_the_pid_file(mailproxy_master):
    master = mailproxy_master(imap_config("127.0.0.1:%d" % free_port()), start=False)
    logs = os.path.join(master.prefix, "logs")
    for main, path, reason in (("error_log %s;" % logs, logs, "21: Is a directory"),
                               ("pid %s/gone/mailproxy.pid;" % logs, logs + "/gone/mailproxy.pid",
                                "2: No such file or directory")):
        master.write_config(imap_config("127.0.0.1:%d" % free_port(), main=main))
        result = master.cli("-t")
        assert result.returncode == 1
        wanted = ("mailproxy: the configuration file {0} syntax is ok\n"
                  'mailproxy: [emerg] open() "{1}" failed ({2})\n'
                  "mailproxy: configuration file {0} test failed\n")
        assert result.stderr == wanted.format(master.conf, path, reason)
    assert not os.path.exists(os.path.join(logs, "gone"))
    master.write_config(imap_config("127.0.0.1:%d" % free_port()))
    result = master.cli("-t")
    assert result.returncode == 0 and "test is successful" in result.stderr
    assert not os.path.exists(master.pid_file)  # opened for the test only
    assert master.cli("-t", "-q").stderr == ""


# -- signals -------------------------------------------------------------------------------------------


def test_quit_returns_once_the_master_has_the_signal(mailproxy_master):
    port = free_port()
    master = mailproxy_master(imap_config("127.0.0.1:%d" % port, main=NOTICE), daemon=True)
    held = imap_session(("127.0.0.1", port), hold=True)
    (worker,) = master.workers()
    result = master.cli("quit", timeout=10)
    assert result.returncode == 0 and result.stderr == ""
    master.wait_log("[notice] %d#0: gracefully shutting down" % worker)
    assert pid_alive(master.pid)
    assert cmdline(worker) == "mailproxy: worker process is shutting down"
    # Waiting is asked for: with a limit it says when the master did not exit in time.
    waited = master.cli("-w", "0.2", "quit", timeout=10)
    assert waited.returncode == 1
    assert waited.stderr == "mailproxy: [emerg] master process %d did not exit within 0.2 seconds\n" % master.pid
    logout(held)
    master.wait_exit()
    assert not os.path.exists(master.pid_file)


def test_dash_s_forms(mailproxy_master):
    port = free_port()
    master = mailproxy_master(imap_config("127.0.0.1:%d" % port, main=NOTICE), daemon=True)
    assert master.cli("-s", "reopen").returncode == 0
    master.wait_log("signal 10 (SIGUSR1) received from")
    master.drain_notify()
    assert master.cli("-sreload").returncode == 0
    master.wait_notify("READY=1")
    assert "signal 1 (SIGHUP) received from" in master.error_log()
    assert imap_session(("127.0.0.1", port)) == BYE
    result = master.cli("-s", "stop", "--wait")
    assert result.returncode == 0 and result.stderr == ""
    assert not os.path.exists(master.pid_file)  # removed by the master as it exits
    assert master.cli("-s", "restart").stderr == 'mailproxy: [emerg] invalid option: "-s restart"\n'


def test_help_describes_every_option():
    options = (set(mailproxy.cli.FLAG_OPTIONS) | set(mailproxy.cli.VALUE_OPTIONS)
               | set(mailproxy.cli.LONG_OPTIONS) | set(mailproxy.cli.COMMANDS))
    for flag in ("-h", "--help", "-?"):
        result = subprocess.run([sys.executable, "-m", "mailproxy.cli", flag], capture_output=True, text=True,
                                cwd=ROOT)
        assert result.returncode == 0
        assert result.stderr.startswith("mailproxy version: mailproxy/")
        for option in options:
            # Each option or command starts a line of its own, alone or among its aliases.
            assert re.search(r"^  (\S+, ?)*%s[ ,]" % re.escape(option), result.stderr, re.M), option


# -- what each worker sets up --------------------------------------------------------------------------


def test_worker_environment_directory_and_priority(mailproxy_master):
    port = free_port()
    # A directory the workers' user (nobody) may enter; the test's own temporary one is root's alone.
    directory = "/usr/share"
    main = "worker_processes 2; worker_priority 7; working_directory %s; env KEEP_ME; env SET_ME=set; %s" % (
        directory, NOTICE)
    master = mailproxy_master(imap_config("127.0.0.1:%d" % port, main=main),
                              env={"KEEP_ME": "kept", "DROP_ME": "dropped", "TZ": "Europe/Paris"})
    for worker in master.workers():
        assert os.readlink("/proc/%d/cwd" % worker) == directory
        assert nice(worker) == 7
    assert nice(master.pid) == 0
    client = imap_session(("127.0.0.1", port), hold=True)
    # Only what `env` names, and TZ, which nginx keeps unless `env` sets it.
    assert json.loads(ask(client, b"ENV", b"ENV")) == {"KEEP_ME": "kept", "SET_ME": "set", "TZ": "Europe/Paris"}
    logout(client)


@pytest.mark.skipif(os.sysconf("SC_NPROCESSORS_ONLN") < 2, reason="one CPU online")
@pytest.mark.parametrize("affinity,wanted", [("auto", [{0}, {1}]), ("10 01", [{1}, {0}])])
def test_worker_cpu_affinity(mailproxy_master, affinity, wanted):
    port = free_port()
    master = mailproxy_master(imap_config("127.0.0.1:%d" % port, main="worker_processes 2; worker_cpu_affinity "
                                          "%s; %s" % (affinity, NOTICE)))
    log = master.error_log()
    found = []
    for worker in master.workers():
        cpus = os.sched_getaffinity(worker)
        found.append(cpus)
        for cpu in cpus:
            assert "[notice] %d#0: sched_setaffinity(): using cpu #%d" % (worker, cpu) in log
    assert sorted(found, key=min) == sorted(wanted, key=min)
    # Worker number 0, the first one forked, got the first mask.
    first = min(master.workers(), key=lambda pid: log.index("start worker process %d" % pid))
    assert os.sched_getaffinity(first) == wanted[0]


def test_accept_mutex_survives_its_holder_killed(mailproxy_master):
    port = free_port()
    master = mailproxy_master(imap_config("127.0.0.1:%d" % port, main="worker_processes 2; " + NOTICE,
                                          events="accept_mutex on; accept_mutex_delay 20ms; multi_accept on;"))
    for _ in range(10):
        assert imap_session(("127.0.0.1", port)) == BYE
    client = imap_session(("127.0.0.1", port), hold=True)
    holder = int(ask(client, b"PID", b"PID"))
    client.close()
    # The last one to accept most likely holds the mutex; the kernel releases it with the process.
    os.kill(holder, signal.SIGKILL)
    master.wait_log("worker process %d exited on signal 9" % holder)
    wait_for(lambda: len(master.workers()) == 2 and holder not in master.workers(), what="a replacement worker")
    for _ in range(10):
        assert imap_session(("127.0.0.1", port)) == BYE


def test_man_pages_describe_every_option():
    """The man pages setup.py installs (share/man/man8) know every option the programs take."""
    with open(os.path.join(ROOT, "man", "mailproxy-master.8")) as handle:
        page = handle.read().replace("\\-", "-")
    for option in (set(mailproxy.cli.FLAG_OPTIONS) | set(mailproxy.cli.VALUE_OPTIONS)
                   | set(mailproxy.cli.LONG_OPTIONS)):
        assert option in page, option
    for command in mailproxy.cli.COMMANDS:
        assert ".B %s\n" % command in page, command
    auth = subprocess.run([sys.executable, "-m", "mailproxy.authserver.app", "--help"], capture_output=True,
                          text=True, cwd=ROOT).stdout
    with open(os.path.join(ROOT, "man", "mailproxy-auth.8")) as handle:
        page = handle.read().replace("\\-", "-")
    for option in set(re.findall(r"(--[a-z-]+)", auth)):
        assert option in page, option


# -- upgrade on the fly --------------------------------------------------------------------------------


def test_upgrade_on_the_fly_under_load_then_roll_back(mailproxy_master):
    """USR2 starts the installed program (here a changed copy, first on PYTHONPATH) as a new master on the
    same sockets; WINCH lets the old workers go; HUP and QUIT to the new master roll back. Sessions keep
    coming all along and none is refused; the one held since before the upgrade goes on relaying."""
    from support.harness import TESTS, children, wait_pid_exit

    site = tempfile.mkdtemp(prefix="mp-site-")
    os.chmod(site, 0o755)  # read by the new master's workers after they left root
    try:
        port = free_port()
        master = mailproxy_master(imap_config("127.0.0.1:%d" % port, main="worker_processes 2; " + NOTICE),
                                  daemon=True, env={"PYTHONPATH": os.pathsep.join([site, ROOT, TESTS])})
        old = master.pid
        held = imap_session(("127.0.0.1", port), hold=True)
        held_worker = int(ask(held, b"PID", b"PID"))

        done, failures, served = threading.Event(), [], []

        def load():
            while not done.is_set():
                try:
                    reply = imap_session(("127.0.0.1", port))
                except OSError as exc:
                    failures.append(repr(exc))
                    return
                if reply != BYE:
                    failures.append(reply)
                    return
                served.append(1)

        threads = [threading.Thread(target=load) for _ in range(2)]
        for thread in threads:
            thread.start()
        try:
            shutil.copytree(os.path.join(ROOT, "mailproxy"), os.path.join(site, "mailproxy"),
                            ignore=shutil.ignore_patterns("__pycache__"))
            init = os.path.join(site, "mailproxy", "__init__.py")
            with open(init) as handle:
                text = handle.read()
            with open(init, "w") as handle:
                handle.write(text.replace('__version__ = "', '__version__ = "9.9.9+'))

            master.drain_notify()
            os.kill(old, signal.SIGUSR2)
            ready = master.wait_notify("READY=1")
            new = int(re.search(r"MAINPID=(\d+)", ready).group(1))
            master.known_pids.update([new] + children(new))
            with open(master.pid_file) as handle:
                assert int(handle.read()) == new
            with open(master.pid_file + ".oldbin") as handle:
                assert int(handle.read()) == old
            log = master.error_log()
            assert "[notice] %d#0: signal 12 (SIGUSR2) received from %d, changing binary" % (old, os.getpid()) in log
            assert "[notice] %d#0: using inherited sockets from " % new in log
            assert "[notice] %d#0: mailproxy/9.9.9+" % new in log
            # `status` asks the master the pid file names; the old one answers beside `.oldbin`.
            shown = master.cli("status")
            assert shown.returncode == 0 and "master process %d" % new in shown.stdout, shown.stdout + shown.stderr
            count = len(served)
            wait_for(lambda: len(served) > count + 20 or failures, timeout=60, what="sessions on both masters")

            os.kill(old, signal.SIGWINCH)
            others = [pid for pid in children(old) if pid not in (held_worker, new)]
            for pid in others:
                assert wait_pid_exit(pid)
            # The held worker renames itself when it takes the signal, which the others' exits do not order.
            wait_for(lambda: cmdline(held_worker) == "mailproxy: worker process is shutting down",
                     what="the held worker shutting down")
            assert int(ask(held, b"PID", b"PID")) == held_worker  # still relaying
            client = imap_session(("127.0.0.1", port), hold=True)
            assert int(ask(client, b"PID", b"PID")) in children(new)
            logout(client)
            count = len(served)
            wait_for(lambda: len(served) > count + 20 or failures, timeout=60, what="sessions on the new master")

            # Roll back: the old master's workers again, then the new master leaves.
            os.kill(old, signal.SIGHUP)
            wait_for(lambda: sum(cmdline(pid) == "mailproxy: worker process" for pid in children(old)) == 2,
                     what="the old master's workers back")
            master.known_pids.update(children(old))
            os.kill(new, signal.SIGQUIT)
            assert wait_pid_exit(new, 15)
            wait_for(lambda: not os.path.exists(master.pid_file + ".oldbin"), what="the pid file renamed back")
            with open(master.pid_file) as handle:
                assert int(handle.read()) == old
            shown = master.cli("status")
            assert shown.returncode == 0 and "master process %d" % old in shown.stdout, shown.stdout + shown.stderr
            count = len(served)
            wait_for(lambda: len(served) > count + 20 or failures, timeout=60, what="sessions after the roll-back")
            client = imap_session(("127.0.0.1", port), hold=True)
            assert int(ask(client, b"PID", b"PID")) in children(old)
            logout(client)
        finally:
            done.set()
            for thread in threads:
                thread.join(60)
        assert failures == []
        assert int(ask(held, b"PID", b"PID")) == held_worker
        logout(held)
        assert "new binary process %d exited with code 0" % new in master.error_log()
        master.stop()
    finally:
        shutil.rmtree(site, ignore_errors=True)


def test_winch_lets_the_workers_go_only_away_from_a_terminal(mailproxy_master):
    port = free_port()
    foreground = mailproxy_master(imap_config("127.0.0.1:%d" % port, main="worker_processes 2; " + NOTICE))
    workers = foreground.workers()
    os.kill(foreground.pid, signal.SIGWINCH)  # a terminal resized: nothing to do
    foreground.wait_log("signal 28 (SIGWINCH) received from %d\n" % os.getpid())
    assert foreground.workers() == workers and imap_session(("127.0.0.1", port)) == BYE
    foreground.stop()

    daemon = mailproxy_master(imap_config("127.0.0.1:%d" % port, main="worker_processes 2; " + NOTICE),
                              daemon=True)
    workers = daemon.workers()
    os.kill(daemon.pid, signal.SIGWINCH)
    wait_for(lambda: daemon.workers() == [], what="the workers to finish")
    assert all("exited with code 0" in daemon.error_log().split("worker process %d " % pid)[-1][:20]
               for pid in workers)
    daemon.reload()  # HUP brings workers back
    assert len(daemon.workers()) == 2 and imap_session(("127.0.0.1", port)) == BYE
