"""Issue 12: Prometheus metrics, the session log and `mailproxy-master status`, against real processes:
a master with its workers, Dovecot behind it, the recording auth server, and a real scraper."""

import json
import os
import socket

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from support.authserver import RecordingAuthServer
from support.backends import USERS
from support.harness import free_port, wait_for


class ImapClient:
    """A raw IMAP client that counts the bytes each way after the LOGIN reply, as the relay must."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.buffer = b""
        self.sent_after_login = 0
        self.received_after_login = 0
        self.logged_in = False
        self.greeting = self.line()

    def line(self):
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(self.buffer)
            if self.logged_in:
                self.received_after_login += len(chunk)
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def tagged(self, tag):
        while True:
            line = self.line()
            if line.startswith(tag + b" "):
                return line

    def send(self, data):
        self.sock.sendall(data)
        if self.logged_in:
            self.sent_after_login += len(data)

    def login(self, user, password):
        self.send(b'a LOGIN "%s" "%s"\r\n' % (user.encode(), password.encode()))
        reply = self.tagged(b"a")
        if reply.startswith(b"a OK"):
            self.logged_in = True
            # Bytes that came in the same segment as the reply were relayed after it.
            self.received_after_login += len(self.buffer)
        return reply

    def logout_to_close(self):
        self.send(b"c LOGOUT\r\n")
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.received_after_login += len(chunk)
        self.sock.close()

    def close(self):
        self.sock.close()


def relayed_session(port, commands=(b"b NOOP\r\n", b"b2 SELECT INBOX\r\n")):
    client = ImapClient(port)
    assert client.login("alice", USERS["alice"]).startswith(b"a OK")
    for command in commands:
        client.send(command)
        client.tagged(command.split()[0])
    client.logout_to_close()
    return client


def refused_session(port):
    client = ImapClient(port)
    reply = client.login("alice", "not-the-password")
    assert reply.startswith(b"a NO"), reply
    client.close()


def scrape(port):
    text = requests.get("http://127.0.0.1:%d/metrics" % port, timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return text, samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def auth(dovecot):
    server = RecordingAuthServer(USERS, {"imap": ("127.0.0.1", dovecot.imap_port)})
    yield server
    server.close()


def test_metrics_count_two_workers_exactly(auth, mailproxy_master):
    port, metrics_port = free_port(), free_port()
    master = mailproxy_master("""
worker_processes 2;
error_log logs/error.log info;
events { worker_connections 64; }
mail {
    auth_http %s;
    metrics_listen 127.0.0.1:%d;
    server { listen 127.0.0.1:%d; protocol imap; }
}
""" % (auth.url, metrics_port, port), handler=None)
    assert len(master.workers()) == 2
    clients = [relayed_session(port) for _ in range(6)]
    for _ in range(4):
        refused_session(port)
    to_backend = sum(c.sent_after_login for c in clients)
    to_client = sum(c.received_after_login for c in clients)

    def settled():
        _, samples = scrape(metrics_port)
        return value(samples, "mailproxy_sessions_open", protocol="imap") == 0 and value(
            samples, "mailproxy_relayed_bytes_total", protocol="imap", direction="backend_to_client") == to_client

    wait_for(settled, what="the relayed sessions in the metrics")
    text, samples = scrape(metrics_port)
    login = dict(protocol="imap", method="plain")
    assert value(samples, "mailproxy_logins_total", result="ok", **login) == 6
    assert value(samples, "mailproxy_logins_total", result="invalid", **login) == 4
    assert value(samples, "mailproxy_logins_total", result="temporary", **login) == 0
    assert value(samples, "mailproxy_sessions_total", protocol="imap") == 10
    assert value(samples, "mailproxy_relayed_bytes_total", protocol="imap", direction="client_to_backend") == to_backend
    assert value(samples, "mailproxy_relayed_bytes_total", protocol="imap", direction="backend_to_client") == to_client
    assert value(samples, "mailproxy_auth_http_request_duration_seconds_count", protocol="imap") == 10
    assert value(samples, "mailproxy_backend_login_duration_seconds_count", protocol="imap") == 6
    assert value(samples, "mailproxy_config_last_load_successful") == 1
    # No user names or addresses in any label.
    assert "alice" not in text and "127.0.0.1" not in text
    # The workers' files live in the master's private directory; the sum survives a worker's death.
    victim = master.workers()[0]
    os.kill(victim, 9)
    master.wait_log("worker process %d exited on signal 9" % victim)
    wait_for(lambda: value(scrape(metrics_port)[1], "mailproxy_worker_restarts_total") == 1, what="restart counted")
    _, samples = scrape(metrics_port)
    assert value(samples, "mailproxy_logins_total", result="ok", **login) == 6
    master.reload()
    _, samples = scrape(metrics_port)
    assert value(samples, "mailproxy_reloads_total", result="ok") == 1
    master.stop()
    assert master.error_log().count("[alert]") == 1  # the kill above, nothing else


def test_metrics_off_by_default(auth, mailproxy_master):
    port = free_port()
    master = mailproxy_master("""
error_log logs/error.log info;
events { }
mail { auth_http %s; server { listen 127.0.0.1:%d; protocol imap; } }
""" % (auth.url, port), handler=None, env={"PROMETHEUS_MULTIPROC_DIR": "/nonexistent"})
    relayed_session(port)
    master.wait_log("proxied session done")
    master.stop()
    assert "[alert]" not in master.error_log()


def read_lines(path):
    try:
        with open(path) as handle:
            return handle.read().splitlines()
    except FileNotFoundError:
        return []


def test_session_log_outcomes(auth, mailproxy_master):
    ports = [free_port() for _ in range(3)]
    closed_port = free_port()
    # Workers keep root here: the fixture's prefix sits in a 0700 temporary directory, where `nobody`
    # could not reopen anything after the rotation below.
    master = mailproxy_master("""
user root;
worker_processes 2;
error_log logs/error.log info;
events { }
mail {
    auth_http %s;
    session_log logs/sessions.log json;
    server { listen 127.0.0.1:%d; protocol imap; }
    server { listen 127.0.0.1:%d; protocol imap; auth_http 127.0.0.1:%d/auth; }
    server { listen 127.0.0.1:%d; protocol imap; timeout 1s; session_log logs/combined.log combined; }
}
""" % (auth.url, ports[0], ports[1], closed_port, ports[2]), handler=None)
    json_log = os.path.join(master.prefix, "logs", "sessions.log")
    combined_log = os.path.join(master.prefix, "logs", "combined.log")

    ok = relayed_session(ports[0])
    refused_session(ports[0])
    internal = ImapClient(ports[1])  # its auth server is unreachable
    internal.send(b'a LOGIN "alice" "%s"\r\n' % USERS["alice"].encode())
    assert b"internal server error" in internal.line()
    internal.close()
    hangup = ImapClient(ports[0])
    hangup.close()
    idle = ImapClient(ports[2])
    assert idle.sock.recv(100) == b""  # closed by `timeout 1s`
    idle.close()

    wait_for(lambda: len(read_lines(json_log)) == 4 and len(read_lines(combined_log)) == 1,
             what="five session log lines")
    entries = [json.loads(line) for line in read_lines(json_log)]
    by_result = {entry["result"]: entry for entry in entries}
    assert sorted(by_result) == ["closed", "invalid", "ok", "temporary"]
    good = by_result["ok"]
    assert good["login"] == "alice" and good["protocol"] == "imap"
    assert good["upstream"] == "127.0.0.1:%d" % auth.backends["imap"][1]
    assert good["bytes_from_client"] == ok.sent_after_login
    assert good["bytes_to_client"] == ok.received_after_login
    assert good["client"].startswith("127.0.0.1:") and good["server"] == "127.0.0.1:%d" % ports[0]
    assert good["duration"] >= 0 and good["time"]
    assert by_result["invalid"]["login"] == "alice" and by_result["invalid"]["bytes_to_client"] == 0
    assert by_result["temporary"]["server"] == "127.0.0.1:%d" % ports[1]
    assert by_result["closed"]["login"] == "" and by_result["closed"]["upstream"] is None
    combined = read_lines(combined_log)[0]
    assert combined.startswith("127.0.0.1 - \"\" [") or combined.startswith("127.0.0.1:")
    assert " imap 127.0.0.1:%d timeout - 0 0 " % ports[2] in combined
    everything = open(json_log).read() + open(combined_log).read()
    assert USERS["alice"] not in everything and "not-the-password" not in everything

    # USR1: lines after a rotation go to the new file.
    os.rename(json_log, json_log + ".1")
    result = master.cli("reopen")
    assert result.returncode == 0, result.stderr
    wait_for(lambda: os.path.exists(json_log), what="the reopened session log")
    wait_for(lambda: master.error_log().count("reopening logs") >= 3, what="master and workers reopened")
    relayed_session(ports[0])
    wait_for(lambda: len(read_lines(json_log)) == 1, what="a line in the reopened log")
    assert len(read_lines(json_log + ".1")) == 4
    master.stop()
    assert "[alert]" not in master.error_log()


def test_session_log_escapes_login(auth, mailproxy_master):
    port = free_port()
    master = mailproxy_master("""
error_log logs/error.log info;
events { }
mail { auth_http %s; session_log logs/s.log; server { listen 127.0.0.1:%d; protocol imap; } }
""" % (auth.url, port), handler=None)
    client = ImapClient(port)
    client.send(b'a LOGIN {7}\r\n')
    assert client.line().startswith(b"+")
    client.send(b'ev\x01l"\\\xe9 "pw"\r\n')
    assert client.tagged(b"a").startswith(b"a NO")
    client.close()
    path = os.path.join(master.prefix, "logs", "s.log")
    wait_for(lambda: read_lines(path), what="the session log line")
    line = read_lines(path)[0]
    assert '"ev\\x01l\\x22\\x5C\\xE9"' in line, line
    assert '"pw"' not in line and "pw" not in line.split('"', 2)[2]
    master.stop()


def test_status_while_reload_drains(auth, mailproxy_master):
    port = free_port()
    master = mailproxy_master("""
worker_processes 1;
error_log logs/error.log info;
events { }
mail { auth_http %s; server { listen 127.0.0.1:%d; protocol imap; } }
""" % (auth.url, port), handler=None)
    [old] = master.workers()
    result = master.cli("status")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "master process %d is running" % master.pid in out
    assert "configuration: %s" % master.conf in out
    assert "uptime: 00:00:" in out
    assert "worker %d  generation 0  running  sessions 0" % old in out

    held = ImapClient(port)
    assert held.login("alice", USERS["alice"]).startswith(b"a OK")
    wait_for(lambda: "sessions 1" in master.cli("status").stdout, what="the session in status")
    master.reload()
    new = [pid for pid in master.workers() if pid != old]
    assert len(new) == 1
    out = master.cli("status").stdout
    assert "worker %d  generation 0  shutting down  sessions 1" % old in out, out
    assert "worker %d  generation 1  running  sessions 0" % new[0] in out, out
    held.logout_to_close()
    master.wait_log("worker process %d exited" % old)
    out = master.cli("status").stdout
    assert "worker %d" % old not in out and "worker %d  generation 1  running" % new[0] in out
    master.stop()
    assert master.cli("status").returncode == 3


def write_conf(tmp_path, mail):
    path = tmp_path / "conf" / "mailproxy.conf"
    path.parent.mkdir(exist_ok=True)
    path.write_text("events { }\nmail { auth_http 127.0.0.1:9/auth; %s\n"
                    "server { listen 127.0.0.1:8143; protocol imap; } }\n" % mail)
    return str(path)


def test_directives_parse_and_default_off(tmp_path):
    from mailproxy.conf import ConfigError, load_config

    config = load_config(write_conf(tmp_path, ""))
    assert config.main.metrics_listen is None and config.servers[0].session_log is None
    config = load_config(write_conf(tmp_path, "metrics_listen 9108; session_log logs/s.log json;"))
    assert config.main.metrics_listen == (socket.AF_INET, ("127.0.0.1", 9108), "127.0.0.1:9108")
    assert config.servers[0].session_log == (str(tmp_path / "logs" / "s.log"), "json")
    config = load_config(write_conf(tmp_path, "session_log logs/s.log;"))
    assert config.servers[0].session_log[1] == "combined"
    for bad, message in [
        ("session_log logs/s.log xml;", 'invalid session log format "xml"'),
        ("metrics_listen 127.0.0.1:0;", "invalid port in metrics_listen"),
        ("metrics_listen 9108; metrics_listen 9109;", '"metrics_listen" directive is duplicate'),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(write_conf(tmp_path, bad))
    server_level = str(tmp_path / "conf" / "mailproxy.conf")
    with open(server_level, "w") as handle:
        handle.write("events { }\nmail { auth_http 127.0.0.1:9/auth;\n"
                     "server { listen 127.0.0.1:8143; protocol imap; metrics_listen 9108; } }\n")
    with pytest.raises(ConfigError, match='"metrics_listen" directive is not allowed here'):
        load_config(server_level)


def test_metrics_address_in_use_fails_start(auth, mailproxy_master):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    master = mailproxy_master("""
error_log logs/error.log info;
events { }
mail { auth_http %s; metrics_listen 127.0.0.1:%d; server { listen 127.0.0.1:%d; protocol imap; } }
""" % (auth.url, taken.getsockname()[1], free_port()), handler=None, start=False)
    port = taken.getsockname()[1]
    result = master.cli("-g", "daemon on;", "start")
    taken.close()
    assert result.returncode != 0
    assert "[emerg]" in master.error_log()
    assert "bind() to 127.0.0.1:%d failed (98: Address already in use)" % port in master.error_log()
    assert not os.path.exists(master.pid_file)
