"""Every directive of nginx's core and events modules (nginx.org's "Core functionality" page, plus the
ones the Linux build has without a page: debug_points, epoll_events), through what `-t` runs.

Each case is one line in main or in events {}: a valid one passes the test, a bad one fails it with
nginx's words. The same file is then given to Debian's `nginx -t` where it is installed, and its
[emerg] and [warn] lines must be the same (apart from the few cases marked as differing, and why).
"""

import grp
import io
import os
import re
import subprocess

import pytest

from mailproxy.cli import probe_files
from mailproxy.conf import check

from support.harness import missing

NGINX = "/usr/sbin/nginx"
# Debian names the group "nogroup", others "nobody".
NOGROUP = next(name for name in ("nogroup", "nobody") if name in {g.gr_name for g in grp.getgrall()})
NGINX_LINE = re.compile(r"(?:nginx: |\S+ \S+ )\[(\w+)\] (?:\d+#\d+: )?(.*)")
OURS_LINE = re.compile(r"mailproxy: \[(\w+)\] (.*)")

# (context, line, outcome): outcome None passes; "warn: text" passes with that warning; else the [emerg]
# text without its " in file:line". `{file}` is the configuration's path; `{dir}` its directory.
CASES = [
    ("main", "daemon off;", None),
    ("main", "daemon maybe;", 'invalid value "maybe" in "daemon" directive, it must be "on" or "off"'),
    ("main", "master_process on;", None),
    ("main", "master_process 1;", 'invalid value "1" in "master_process" directive, it must be "on" or "off"'),
    ("main", "timer_resolution 100ms;", None),
    ("main", "timer_resolution soon;", '"timer_resolution" directive invalid value'),
    ("main", "pid logs/other.pid;", None),
    ("main", "pid a b;", 'invalid number of arguments in "pid" directive'),
    ("main", "lock_file logs/mailproxy.lock;", None),
    ("main", "lock_file;", 'invalid number of arguments in "lock_file" directive'),
    ("main", "worker_processes auto;", None),
    ("main", "worker_processes 4;", None),
    ("main", "worker_processes many;", '"worker_processes" directive invalid value'),
    ("main", "debug_points abort;", None),
    ("main", "debug_points crash;", 'invalid value "crash"'),
    ("main", "user nobody %s;" % NOGROUP, None),
    ("main", "user no_such_user_here;", 'getpwnam("no_such_user_here") failed'),
    ("main", "worker_priority -5;", None),
    ("main", "worker_priority +10;", None),
    ("main", "worker_priority high;", '"worker_priority" directive invalid number'),
    ("main", "worker_priority 1; worker_priority 2;", '"worker_priority" directive is duplicate'),
    ("main", "worker_cpu_affinity auto;", None),
    ("main", "worker_cpu_affinity auto 1010;", None),
    ("main", "worker_cpu_affinity 0101;", None),
    ("main", "worker_cpu_affinity 01 10;", 'warn: the number of "worker_processes" is not equal to the number of '
                                          '"worker_cpu_affinity" masks, using last mask for remaining worker '
                                          'processes'),
    ("main", "worker_cpu_affinity 0x1;", 'invalid character "x" in "worker_cpu_affinity"'),
    ("main", "worker_cpu_affinity auto 01 10;", 'invalid number of arguments in "worker_cpu_affinity" directive'),
    ("main", "worker_rlimit_nofile 65536;", None),
    ("main", "worker_rlimit_nofile lots;", '"worker_rlimit_nofile" directive invalid number'),
    ("main", "worker_rlimit_core 500m;", None),
    ("main", "worker_rlimit_core 1G;", None),
    ("main", "worker_rlimit_core 10x;", '"worker_rlimit_core" directive invalid value'),
    ("main", "worker_shutdown_timeout 10s;", None),
    ("main", "worker_shutdown_timeout 10q;", '"worker_shutdown_timeout" directive invalid value'),
    ("main", "working_directory /tmp;", None),
    ("main", "working_directory /tmp; working_directory /;", '"working_directory" directive is duplicate'),
    ("main", "env TZ; env MAILPROXY_X=1; env PATH;", None),
    ("main", "env;", 'invalid number of arguments in "env" directive'),
    ("main", "load_module;", 'invalid number of arguments in "load_module" directive'),
    ("main", "error_log logs/other.log info;", None),
    ("main", "error_log logs/other.log loud;", 'invalid log level "loud"'),
    ("main", "include {dir}/empty.conf;", None),
    ("main", "include {dir}/missing.conf;", 'open() "{dir}/missing.conf" failed (2: No such file or directory)'),
    ("main", "pcre_jit on;", None),
    ("main", "pcre_jit yes;", 'invalid value "yes" in "pcre_jit" directive, it must be "on" or "off"'),
    ("main", "thread_pool default threads=32 max_queue=65536;", None),
    ("main", "thread_pool io threads=0;", 'invalid threads value "threads=0"'),
    ("main", "thread_pool io threads=2 max_queue=x;", 'invalid max_queue value "max_queue=x"'),
    ("main", "thread_pool io max_queue=10 other=1;", '"thread_pool" must have "threads" parameter'),
    ("main", "thread_pool io threads=1; thread_pool io threads=2;", 'duplicate thread pool "io"'),
    ("main", "ssl_engine dynamic;", None),
    ("main", "ssl_engine;", 'invalid number of arguments in "ssl_engine" directive'),
    ("main", "ssl_object_cache_inheritable off;", None),
    ("main", "ssl_object_cache_inheritable no;",
     'invalid value "no" in "ssl_object_cache_inheritable" directive, it must be "on" or "off"'),
    ("events", "worker_connections 1024;", None),
    ("events", "worker_connections some;", 'invalid number "some"'),
    ("events", "use epoll;", None),
    ("events", "use kqueue;", 'invalid event type "kqueue"'),
    ("events", "use epoll; use epoll;", '"use" directive is duplicate'),
    ("events", "multi_accept on;", None),
    ("events", "multi_accept all;", 'invalid value "all" in "multi_accept" directive, it must be "on" or "off"'),
    ("events", "accept_mutex on;", None),
    ("events", "accept_mutex 1;", 'invalid value "1" in "accept_mutex" directive, it must be "on" or "off"'),
    ("events", "accept_mutex_delay 100ms;", None),
    ("events", "accept_mutex_delay fast;", '"accept_mutex_delay" directive invalid value'),
    ("events", "debug_connection 127.0.0.1; debug_connection 10.0.0.0/8; debug_connection unix:;", None),
    ("events", "debug_connection ::1;", None),
    ("events", "debug_connection localhost;", None),
    ("events", "debug_connection 192.168.1.1/24;", "warn: low address bits of 192.168.1.1/24 are meaningless"),
    ("events", "debug_connection 10.0.0.1/33;", 'host not found in debug_connection "10.0.0.1/33"'),
    ("events", "debug_connection no.such.host.invalid;",
     'host not found in debug_connection "no.such.host.invalid"'),
    ("events", "worker_aio_requests 64;", None),
    ("events", "worker_aio_requests x;", '"worker_aio_requests" directive invalid number'),
    ("events", "epoll_events 512;", None),
    ("events", "epoll_events -1;", '"epoll_events" directive invalid number'),
]

MAIN_ONLY = ["daemon on;", "master_process on;", "timer_resolution 1s;", "pid x.pid;", "lock_file x;",
             "worker_processes 1;", "debug_points stop;", "user nobody;", "worker_priority 1;",
             "worker_cpu_affinity auto;", "worker_rlimit_nofile 10;", "worker_rlimit_core 1m;",
             "worker_shutdown_timeout 1s;", "working_directory /tmp;", "env TZ;", "load_module x.so;",
             "error_log logs/x.log;", "pcre_jit on;", "thread_pool p threads=1;", "ssl_engine dynamic;",
             "ssl_object_cache_inheritable on;"]
EVENTS_ONLY = ["worker_connections 10;", "use epoll;", "multi_accept on;", "accept_mutex on;",
               "accept_mutex_delay 1s;", "debug_connection 127.0.0.1;", "worker_aio_requests 10;",
               "epoll_events 10;"]
# Debian's nginx 1.22.1 predates ssl_object_cache_inheritable (1.27.4); its engines are OpenSSL's, which
# Python's ssl cannot load (mailproxy accepts any name: README's table).
NGINX_DIFFERS = {"ssl_object_cache_inheritable"}


def write(tmp_path, context, line):
    (tmp_path / "logs").mkdir(exist_ok=True)
    (tmp_path / "empty.conf").write_text("")
    line = line.replace("{dir}", str(tmp_path))
    head = "" if line.startswith("pid ") else "pid %s/logs/test.pid;\n" % tmp_path
    main, events = (line, "") if context == "main" else ("", line)
    text = "%serror_log %s/logs/error.log;\n%s\nevents {\n%s\n}\n" % (head, tmp_path, main, events)
    path = tmp_path / "mailproxy.conf"
    path.write_text(text)
    return str(path), (3 if context == "main" else 5) - (0 if head else 1)


def ours(path, prefix):
    err = io.StringIO()
    status = check(path, prefix, None, False, io.StringIO(), err, probe=probe_files)
    lines = [OURS_LINE.match(line) for line in err.getvalue().splitlines()]
    return status, [m.groups() for m in lines if m and m.group(1) in ("emerg", "warn")]


def nginx(path, prefix):
    result = subprocess.run([NGINX, "-t", "-p", prefix + "/", "-c", path], capture_output=True, text=True)
    lines = [NGINX_LINE.match(line) for line in result.stderr.splitlines()]
    return result.returncode, [m.groups() for m in lines if m and m.group(1) in ("emerg", "warn")]


def expected(outcome, path, line_no, tmp_path):
    if outcome is None:
        return 0, []
    outcome = outcome.replace("{dir}", str(tmp_path)).replace("{file}", path)
    if outcome.startswith("warn: "):
        text = outcome[6:]
        # Warnings found while reading name their line; the ones nginx gives afterwards do not.
        where = "" if text.startswith("the number of") else " in %s:%d" % (path, line_no)
        return 0, [("warn", text + where)]
    return 1, [("emerg", outcome + " in %s:%d" % (path, line_no))]


@pytest.mark.parametrize("context,line,outcome", CASES, ids=[c[1] for c in CASES])
def test_directive(tmp_path, context, line, outcome):
    if line.startswith("user ") and os.geteuid() != 0:
        pytest.skip("`user` is only checked for a master that runs as root")
    path, line_no = write(tmp_path, context, line)
    want = expected(outcome, path, line_no, tmp_path)
    assert ours(path, str(tmp_path)) == want


# Only what the reference nginx knows: a comparison that skips on every run is no test.
NGINX_CASES = [case for case in CASES if case[1].split()[0] not in NGINX_DIFFERS]


@pytest.mark.peer  # Debian's nginx -t on the same line
@pytest.mark.parametrize("context,line,outcome", NGINX_CASES, ids=[c[1] for c in NGINX_CASES])
def test_same_as_nginx(tmp_path, context, line, outcome):
    if not os.path.exists(NGINX):
        missing("Debian's nginx")
    path, _ = write(tmp_path, context, line)
    assert ours(path, str(tmp_path)) == nginx(path, str(tmp_path))


@pytest.mark.parametrize("line", MAIN_ONLY)
def test_main_directive_not_in_events(tmp_path, line):
    path, line_no = write(tmp_path, "events", line)
    name = line.split()[0]
    want = (1, [("emerg", '"%s" directive is not allowed here in %s:%d' % (name, path, line_no))])
    assert ours(path, str(tmp_path)) == want


@pytest.mark.parametrize("line", EVENTS_ONLY)
def test_events_directive_not_in_main(tmp_path, line):
    path, line_no = write(tmp_path, "main", line)
    name = line.split()[0]
    assert ours(path, str(tmp_path)) == (1, [("emerg", '"%s" directive is not allowed here in %s:%d'
                                               % (name, path, line_no))])


def test_pid_and_error_log_opened_as_nginx_does(tmp_path):
    """-t opens the pid file (creating it only for the test) and the logs, in nginx's words."""
    path, _ = write(tmp_path, "main", "pid %s/no/such/dir/x.pid;" % tmp_path)
    assert ours(path, str(tmp_path)) == (1, [("emerg", 'open() "%s/no/such/dir/x.pid" failed (2: No such file '
                                                       'or directory)' % tmp_path)])
    path, _ = write(tmp_path, "main", "error_log %s;" % tmp_path)  # a directory
    assert ours(path, str(tmp_path)) == (1, [("emerg", 'open() "%s" failed (21: Is a directory)' % tmp_path)])
    path, _ = write(tmp_path, "main", "")
    assert ours(path, str(tmp_path)) == (0, [])
    assert not os.path.exists(tmp_path / "logs" / "test.pid")


def test_values_reach_the_settings(tmp_path):
    """What the workers and the logs read, in the shape settings.py documents."""
    from ipaddress import ip_network

    from mailproxy.conf import load_config

    path = tmp_path / "mailproxy.conf"
    path.write_text("worker_processes 2; worker_priority -3; worker_cpu_affinity 0110 1; worker_rlimit_core 2k;\n"
                    "working_directory /tmp; env KEEP; env SET=a=b;\n"
                    "events { multi_accept on; accept_mutex on; accept_mutex_delay 20ms;\n"
                    "  debug_connection 127.0.0.1; debug_connection 10.1.2.0/24; debug_connection unix:; }\n")
    main = load_config(str(path), str(tmp_path)).main
    assert (main.worker_priority, main.worker_rlimit_core, main.working_directory) == (-3, 2048, "/tmp")
    assert main.worker_cpu_affinity == (False, ((1, 2), (0,)))
    assert main.env == (("KEEP", None), ("SET", "a=b"))
    assert (main.multi_accept, main.accept_mutex, main.accept_mutex_delay) == (True, True, 0.02)
    assert main.debug_connection == (ip_network("127.0.0.1/32"), ip_network("10.1.2.0/24"), "unix:")
    defaults = load_config(str(write(tmp_path, "main", "")[0]), str(tmp_path)).main
    assert (defaults.multi_accept, defaults.accept_mutex, defaults.accept_mutex_delay) == (False, False, 0.5)
    assert (defaults.env, defaults.debug_connection, defaults.worker_cpu_affinity) == ((), (), None)
