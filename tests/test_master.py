"""The process model through the real CLI: start, stop, quit, reload, reopen, respawn (spec 7)."""

import os
import signal
import socket
import subprocess
import sys
import threading

import pytest

from support.harness import (ROOT, children, cmdline, free_port, imap_config, imap_session, pid_alive, read_line,
                             read_to_close, wait_for, wait_pid_exit)

NOTICE = "error_log logs/error.log notice;"
INFO = "error_log logs/error.log info;"
BYE = b"* OK IMAP4 ready\r\n* BYE\r\na OK completed\r\n"


def ask_pid(client):
    client.sendall(b"a PID\r\n")
    line = read_line(client)
    assert line.startswith(b"* PID "), line
    assert read_line(client) == b"a OK\r\n"
    return int(line.split()[2])


def logout(client):
    client.sendall(b"a LOGOUT\r\n")
    assert read_to_close(client) == b"* BYE\r\na OK completed\r\n"
    client.close()


@pytest.mark.parametrize("daemon", [False, True])
def test_start_serve_stop(mailproxy_master, daemon):
    port = free_port()
    master = mailproxy_master(imap_config("127.0.0.1:%d" % port, main=NOTICE), daemon=daemon)
    with open(master.pid_file) as handle:
        assert handle.read() == "%d\n" % master.pid
    assert imap_session(("127.0.0.1", port)) == BYE
    assert cmdline(master.pid).startswith("mailproxy: master process ")
    (worker,) = master.workers()
    assert cmdline(worker) == "mailproxy: worker process"
    if daemon:
        assert os.getsid(master.pid) != os.getsid(0)  # its own session, away from our terminal
    result = master.cli("stop")
    assert result.returncode == 0 and result.stderr == ""
    master.wait_exit()
    assert not os.path.exists(master.pid_file)
    assert not pid_alive(worker)
    log = master.error_log()
    for line in ("start worker processes", "start worker process %d" % worker,
                 "signal 15 (SIGTERM) received from", "exiting", "exit"):
        assert "[notice] %d#0: %s" % (master.pid if line != "exiting" else worker, line) in log


def test_second_start_refused_and_stale_pid_cleaned(mailproxy_master):
    port = free_port()
    master = mailproxy_master(imap_config("127.0.0.1:%d" % port), daemon=True)
    again = master.cli("start")
    assert again.returncode == 1
    assert again.stderr == ("mailproxy: [emerg] a master process is already running with pid %d\n"
                            % master.pid)
    assert master.cli("quit").returncode == 0
    master.wait_exit()
    with open(master.pid_file, "w") as handle:
        handle.write("999999999\n")  # no such process
    master.start(daemon=True)
    assert imap_session(("127.0.0.1", port)) == BYE
    assert master.cli("stop").returncode == 0


def test_signal_errors_worded_like_nginx(mailproxy_master):
    master = mailproxy_master(imap_config("127.0.0.1:%d" % free_port()), start=False)
    result = master.cli("stop")
    assert result.returncode == 1
    assert result.stderr == ('mailproxy: [emerg] open() "%s" failed (2: No such file or directory)\n'
                             % master.pid_file)
    with open(master.pid_file, "w") as handle:
        handle.write("12ab\n")
    result = master.cli("-s", "reload")
    assert result.returncode == 1
    assert result.stderr == 'mailproxy: [emerg] invalid PID number "12ab" in "%s"\n' % master.pid_file
    result = master.cli("-s", "restart")
    assert result.stderr == 'mailproxy: [emerg] invalid option: "-s restart"\n'


def test_start_failures_are_one_line(mailproxy_master):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    master = mailproxy_master(imap_config("127.0.0.1:%d" % port), start=False)
    try:
        result = master.cli("start")
    finally:
        busy.close()
    assert result.returncode == 1
    assert result.stderr == ("mailproxy: [emerg] bind() to 127.0.0.1:%d failed (98: Address already "
                             "in use)\n" % port)
    master.write_config("events {}\nmail { server { listen 127.0.0.1:%d; } }\n" % port)
    result = master.cli("start")
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("mailproxy: [emerg] ")
    assert not os.path.exists(master.pid_file)


def test_missing_session_module_fails_loudly(mailproxy_master):
    master = mailproxy_master(imap_config("127.0.0.1:%d" % free_port()), start=False,
                              handler="mailproxy_no_such_module:handle")
    result = master.cli("start")
    assert result.returncode == 1
    assert result.stderr == ('mailproxy: [emerg] session handler module "mailproxy_no_such_module" '
                             'not found\n')


def test_worker_boot_failure_stops_the_master(mailproxy_master):
    """A worker that cannot load its session exits with the boot code; no fork loop follows."""
    master = mailproxy_master(imap_config("127.0.0.1:%d" % free_port(), main=NOTICE), start=False,
                              handler="conftest:no_such_handler")
    result = master.cli("-g", "daemon off;", "start")
    assert result.returncode == 1
    log = master.error_log()
    assert "[emerg]" in log and "no_such_handler" in log
    assert "exited with fatal code 3 and cannot be respawned" in log
    assert log.count("start worker process ") == 1


def test_version_flags():
    run = [sys.executable, "-m", "mailproxy.cli"]
    import mailproxy

    short = subprocess.run(run + ["-v"], capture_output=True, text=True, cwd=ROOT)
    assert short.returncode == 0
    assert short.stderr == "mailproxy version: mailproxy/%s\n" % mailproxy.__version__
    full = subprocess.run(run + ["-V"], capture_output=True, text=True, cwd=ROOT).stderr
    assert "built with Python " in full and "gevent" in full and "OpenSSL" in full
    assert "mailproxy._splice" in full


def test_killed_worker_is_replaced_while_other_sessions_go_on(mailproxy_master):
    port = free_port()
    master = mailproxy_master(imap_config("127.0.0.1:%d" % port, main="worker_processes 2; " + NOTICE))
    first, second = master.workers()
    # Hold sessions until both workers have one: the kernel spreads accepts unevenly.
    held = {}
    while len(held) < 2:
        client = imap_session(("127.0.0.1", port), hold=True)
        owner = ask_pid(client)
        if owner in held:
            logout(client)
        else:
            held[owner] = client
    os.kill(first, signal.SIGKILL)
    master.wait_log("worker process %d exited on signal 9" % first)
    wait_for(lambda: len(master.workers()) == 2 and first not in master.workers(),
             what="a replacement worker")
    assert "[alert]" in master.error_log().split("exited on signal 9")[0].rsplit("\n", 1)[1]
    survivor = held[second]
    assert ask_pid(survivor) == second
    logout(survivor)
    assert imap_session(("127.0.0.1", port)) == BYE


def test_reload_under_load_refuses_nothing(mailproxy_master):
    port = free_port()
    config = imap_config("127.0.0.1:%d" % port, main="worker_processes 2; " + NOTICE)
    master = mailproxy_master(config)
    done = threading.Event()
    counts = {"ok": 0}
    failures = []
    lock = threading.Lock()

    def client_loop():
        while not done.is_set() or counts["ok"] < 2000:
            try:
                reply = imap_session(("127.0.0.1", port))
            except OSError as exc:
                failures.append(repr(exc))
                return
            if reply != BYE:
                failures.append(reply)
                return
            with lock:
                counts["ok"] += 1

    threads = [threading.Thread(target=client_loop) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        for round_ in range(10):
            # Spread the reloads over the run so that every one meets sessions in flight.
            wait_for(lambda: counts["ok"] >= 150 * round_ or failures, timeout=60,
                     what="sessions between reloads")
            master.reload()
    finally:
        done.set()
        for thread in threads:
            thread.join(120)
    assert failures == []
    assert counts["ok"] >= 2000
    log = master.error_log()
    assert log.count("signal 1 (SIGHUP) received from %d, reconfiguring" % os.getpid()) == 10
    assert log.count("[notice] %d#0: reconfiguring" % master.pid) == 10
    wait_for(lambda: len(master.workers()) == 2, what="old workers to exit")


def test_broken_config_reload_keeps_serving(mailproxy_master):
    port = free_port()
    master = mailproxy_master(imap_config("127.0.0.1:%d" % port, main=NOTICE))
    workers = master.workers()
    master.write_config("events {}\nmail { bogus_directive on; }\n")
    result = master.cli("reload")  # as nginx -s reload: the CLI itself must read the config first
    assert result.returncode == 1
    assert result.stderr.startswith('mailproxy: [emerg] unknown directive "bogus_directive" in ')
    master.drain_notify()
    os.kill(master.pid, signal.SIGHUP)
    master.wait_notify("READY=1")
    master.wait_log("[emerg] %d#0: unknown directive \"bogus_directive\"" % master.pid)
    assert master.workers() == workers
    assert imap_session(("127.0.0.1", port)) == BYE


def test_reload_moves_listeners(mailproxy_master):
    old_port, new_port = free_port(), free_port()
    master = mailproxy_master(imap_config("127.0.0.1:%d" % old_port, main=NOTICE))
    held = imap_session(("127.0.0.1", old_port), hold=True)
    old_worker = ask_pid(held)
    master.write_config(imap_config("127.0.0.1:%d" % new_port, main=NOTICE))
    master.reload()
    assert imap_session(("127.0.0.1", new_port)) == BYE
    with pytest.raises(ConnectionRefusedError):
        imap_session(("127.0.0.1", old_port))
    # The old worker drains: its session carries on under the old configuration.
    assert cmdline(old_worker) == "mailproxy: worker process is shutting down"
    assert ask_pid(held) == old_worker
    logout(held)
    assert wait_pid_exit(old_worker)


def test_graceful_quit_waits_for_sessions(mailproxy_master):
    port = free_port()
    master = mailproxy_master(imap_config("127.0.0.1:%d" % port, main=NOTICE))
    held = imap_session(("127.0.0.1", port), hold=True)
    (worker,) = master.workers()
    quitter = subprocess.Popen(master.command("quit", "--wait"), env=master.env, stderr=subprocess.PIPE)
    try:
        master.wait_log("[notice] %d#0: gracefully shutting down" % worker)
        assert cmdline(worker) == "mailproxy: worker process is shutting down"
        assert pid_alive(master.pid)
        logout(held)
        assert quitter.wait(30) == 0
    finally:
        quitter.stderr.close()
    master.wait_exit()
    assert not os.path.exists(master.pid_file)


def test_worker_shutdown_timeout_closes_sessions(mailproxy_master):
    port = free_port()
    main = "worker_shutdown_timeout 200ms; " + INFO
    master = mailproxy_master(imap_config("127.0.0.1:%d" % port, main=main))
    held = imap_session(("127.0.0.1", port), hold=True)
    (worker,) = master.workers()
    os.kill(master.pid, signal.SIGQUIT)
    assert read_to_close(held) == b""  # closed by the worker, no protocol message
    held.close()
    master.wait_exit()
    assert "[info] %d#0: *1 shutdown timeout" % worker in master.error_log()


def test_fast_stop_drops_sessions(mailproxy_master):
    port = free_port()
    master = mailproxy_master(imap_config("127.0.0.1:%d" % port))
    held = imap_session(("127.0.0.1", port), hold=True)
    result = master.cli("stop")
    assert result.returncode == 0
    # The client just sees the connection go: an orderly close or a reset, never a reply.
    try:
        remainder = read_to_close(held)
    except ConnectionResetError:
        remainder = b""
    assert remainder == b""
    held.close()


def test_reopen_logs(mailproxy_master):
    port = free_port()
    master = mailproxy_master(imap_config("127.0.0.1:%d" % port, main="user root; " + NOTICE))
    (worker,) = master.workers()
    os.rename(master.log_path, master.log_path + ".1")
    assert master.cli("reopen").returncode == 0
    # Each process announces the reopen on the file it had, then writes to the new one.
    with open(master.log_path + ".1") as handle:
        wait_for(lambda: "[notice] %d#0: reopening logs" % worker in handle.read(),
                 what="the worker's reopen")
    with open(master.log_path + ".1") as handle:
        rotated = handle.read()
    assert "signal 10 (SIGUSR1) received from" in rotated
    assert "[notice] %d#0: reopening logs" % master.pid in rotated
    os.kill(worker, signal.SIGQUIT)
    master.wait_log("[notice] %d#0: gracefully shutting down" % worker)
    master.wait_log("worker process %d exited with code 0" % worker)


def test_worker_connections_backpressure(mailproxy_master):
    port = free_port()
    master = mailproxy_master(imap_config("127.0.0.1:%d" % port, main=NOTICE,
                                          events="worker_connections 2;"))
    first = imap_session(("127.0.0.1", port), hold=True)
    second = imap_session(("127.0.0.1", port), hold=True)
    waiting = socket.create_connection(("127.0.0.1", port))
    waiting.settimeout(0.3)
    with pytest.raises(socket.timeout):
        waiting.recv(1)  # queued in the backlog, not accepted
    master.wait_log("2 worker_connections are not enough")
    logout(first)
    waiting.settimeout(10)
    assert read_line(waiting) == b"* OK IMAP4 ready\r\n"
    logout(waiting)
    logout(second)


def test_workers_drop_privileges_and_share_connection_numbers(mailproxy_master):
    port = free_port()
    master = mailproxy_master(imap_config("127.0.0.1:%d" % port, main="worker_processes 2; " + INFO))
    for _ in range(20):
        imap_session(("127.0.0.1", port))
    for worker in master.workers():
        wait_for(lambda: cmdline(worker) == "mailproxy: worker process", what="worker boot")
        with open("/proc/%d/status" % worker) as handle:
            uid_line = next(line for line in handle if line.startswith("Uid:"))
        assert uid_line.split()[1:] == ["65534"] * 4  # nobody: the default user under root
    numbers = sorted(int(line.split("*")[1].split()[0])
                     for line in master.error_log().splitlines() if "connected to" in line)
    assert numbers == list(range(1, 21))


def test_unix_and_shared_wildcard_through_master(mailproxy_master, tmp_path):
    port = free_port(host="0.0.0.0")
    path = "/tmp/mp-%d.sock" % os.getpid()
    config = imap_config("%d" % port, "127.0.0.2:%d" % port, "unix:%s" % path, main=INFO)
    master = mailproxy_master(config)
    assert imap_session(("127.0.0.2", port)) == BYE
    assert imap_session(("127.0.0.1", port)) == BYE
    assert imap_session(path, family=socket.AF_UNIX) == BYE
    log = master.error_log()
    assert "connected to 127.0.0.2:%d" % port in log and "connected to 0.0.0.0:%d" % port in log
    master.stop()
    assert not os.path.exists(path)
    assert children(master.pid) == []


def test_status_and_config_test(mailproxy_master):
    master = mailproxy_master(imap_config("127.0.0.1:%d" % free_port()), start=False)
    stopped = master.cli("status")
    assert stopped.returncode == 3 and "not running" in stopped.stdout
    tested = master.cli("-t")
    assert tested.returncode == 0
    assert "configuration file %s test is successful" % master.conf in tested.stderr
    dumped = master.cli("-T")
    assert dumped.stdout.startswith("# configuration file %s:" % master.conf)
    master.start()
    running = master.cli("status")
    assert running.returncode == 0 and str(master.pid) in running.stdout


def test_single_process_mode(mailproxy_master):
    port = free_port()
    master = mailproxy_master(imap_config("127.0.0.1:%d" % port, main="master_process off;"),
                              start=False)
    proc = subprocess.Popen(master.command("-g", "daemon off;"), env=master.env, cwd=master.prefix)
    master.proc, master.pid = proc, proc.pid
    master.known_pids.add(proc.pid)
    wait_for(lambda: cmdline(proc.pid) == "mailproxy: worker process", what="single process boot")
    assert imap_session(("127.0.0.1", port)) == BYE
    assert children(proc.pid) == []
    assert master.cli("quit").returncode == 0
    assert proc.wait(10) == 0
    assert not os.path.exists(master.pid_file)


def test_out_of_descriptors_backs_off(mailproxy_master):
    port = free_port()
    master = mailproxy_master(imap_config(
        "127.0.0.1:%d" % port, main="worker_rlimit_nofile 48; user root; " + NOTICE))
    first = imap_session(("127.0.0.1", port), hold=True)
    (worker,) = master.workers()
    with open("/proc/%d/limits" % worker) as handle:
        assert next(l for l in handle if l.startswith("Max open files")).split()[3:5] == ["48", "48"]
    clients = [first]
    try:
        for _ in range(60):
            clients.append(socket.create_connection(("127.0.0.1", port)))
        master.wait_log("accept4() failed (24: Too many open files)")
        for client in clients[:40]:
            client.close()
        # The queued connections are taken once descriptors are free again.
        last = clients[-1]
        last.settimeout(10)
        assert read_line(last) == b"* OK IMAP4 ready\r\n"
    finally:
        for client in clients:
            client.close()
    # A doubling wait between attempts, not a busy loop: a handful of lines, not thousands.
    assert master.error_log().count("Too many open files") < 20
