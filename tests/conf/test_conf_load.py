"""load_config and check(): defaults, inheritance, include, -g, -t/-T output, whole example configs."""

import io
import os
import socket

import pytest

from mailproxy.conf import ConfigError, check, load_config
from mailproxy.conf.directives import DIRECTIVES
from mailproxy.conf.settings import ServerSettings

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAGE = os.sysconf("SC_PAGESIZE")

MINIMAL = """
events {}
mail {
    auth_http 127.0.0.1:9000/auth;
    server { listen 127.0.0.1:8143; protocol imap; }
}
"""

# Spec 1.1, 1.3, 9.1, 9.13 and our auth_http_keepalive, written out rather than read from the table.
from mailproxy.conf.directives import SIEVE_EXTENSIONS  # noqa: E402

SERVER_DEFAULTS = {
    "timeout": 60.0, "server_name": socket.gethostname().lower(), "resolver": None, "resolver_timeout": 30.0,
    "max_errors": 5, "max_commands": 1000, "auth_http_header": (), "auth_http_pass_client_cert": False,
    "auth_http_timeout": 60.0, "auth_http_keepalive": False, "auth_http_cache": None, "proxy_client_id": False, "imap_client_id": False,
    "proxy": False, "proxy_buffer": PAGE,
    "proxy_timeout": 86400.0, "proxy_pass_error_message": False, "xclient": True, "proxy_smtp_auth": False,
    "proxy_protocol": "off", "imap_auth": frozenset({"plain"}),
    "proxy_ssl": False, "proxy_starttls": False, "proxy_ssl_verify": False, "proxy_ssl_verify_depth": 1,
    "proxy_ssl_trusted_certificate": None, "proxy_ssl_name": None, "proxy_ssl_server_name": False,
    "proxy_ssl_certificate": None, "proxy_ssl_certificate_key": None,
    "proxy_ssl_protocols": frozenset({"TLSv1.2", "TLSv1.3"}), "proxy_ssl_ciphers": "DEFAULT",
    "proxy_ssl_session_reuse": True, "proxy_ssl_conf_command": (),
    "imap_capabilities": ("IMAP4", "IMAP4rev1", "UIDPLUS"), "imap_client_buffer": PAGE,
    "pop3_auth": frozenset({"plain"}), "pop3_capabilities": ("TOP", "USER", "UIDL"), "pop3_client_buffer": 128,
    "smtp_auth": frozenset({"plain", "login"}), "smtp_capabilities": (), "smtp_client_buffer": PAGE,
    "smtp_greeting_delay": 0.0, "sieve_auth": frozenset({"plain"}), "sieve_capabilities": SIEVE_EXTENSIONS,
    "sieve_client_buffer": PAGE, "starttls": "off", "ssl_certificate": (), "ssl_certificate_key": (),
    "ssl_password_file": None, "ssl_certificate_compression": False, "ssl_ciphers": "HIGH:!aNULL:!MD5",
    "ssl_prefer_server_ciphers": False, "ssl_protocols": frozenset({"TLSv1.2", "TLSv1.3"}),
    "ssl_dhparam": None, "ssl_ecdh_curve": "auto", "ssl_session_cache": "none", "ssl_session_tickets": True,
    "ssl_session_ticket_key": (), "ssl_session_timeout": 300.0, "ssl_verify_client": "off",
    "ssl_verify_depth": 1, "ssl_client_certificate": None, "ssl_trusted_certificate": None, "ssl_crl": None,
    "ssl_conf_command": (), "set_real_ip_from": (), "session_log": None,
    "mail_login_limit": None,
}


def test_every_mail_directive_default(load, tmp_path):
    config = load(MINIMAL)
    (server,) = config.servers
    inherited = {d.name for d in DIRECTIVES if d.inherit}
    assert inherited == set(SERVER_DEFAULTS) | {"auth_http"}
    for name, value in SERVER_DEFAULTS.items():
        assert getattr(server, name) == value, name
    assert server.error_log == ((str(tmp_path / "logs/error.log"), "error"),)
    assert server.protocol == "imap"
    assert server.line == 5


def test_main_defaults(load, tmp_path):
    main = load(MINIMAL).main
    assert main.worker_processes == 1
    assert main.error_log == ((str(tmp_path / "logs/error.log"), "error"),)
    assert main.pid == str(tmp_path / "logs/mailproxy.pid")
    assert main.daemon is True and main.master_process is True
    assert main.worker_rlimit_nofile is None and main.worker_shutdown_timeout is None
    assert main.worker_connections == 512
    if os.geteuid() == 0:
        assert main.user in (("nobody", "nogroup"), ("nobody", "nobody"))
    else:
        assert main.user is None


def test_main_values(load, tmp_path):
    main = load("""
        worker_processes auto;
        worker_rlimit_nofile 4096;
        worker_shutdown_timeout 10s;
        daemon off;
        master_process off;
        pid run/x.pid;
        error_log stderr warn;
        error_log /var/log/x.log;
        load_module modules/ngx_mail_module.so;
        events { worker_connections 64; }
    """).main
    assert main.worker_processes == os.cpu_count()
    assert (main.worker_rlimit_nofile, main.worker_shutdown_timeout) == (4096, 10.0)
    assert (main.daemon, main.master_process) == (False, False)
    assert main.pid == str(tmp_path / "run/x.pid")
    assert main.error_log == (("stderr", "warn"), ("/var/log/x.log", "error"))
    assert main.worker_connections == 64


def test_pop3_buffer_widens_for_oauth(load):
    config = load("""
        events {}
        mail {
            auth_http 127.0.0.1:9000;
            pop3_auth plain xoauth2;
            server { listen 127.0.0.1:8110; protocol pop3; }
            server { listen 127.0.0.1:8111; protocol pop3; pop3_client_buffer 256; }
            server { listen 127.0.0.1:8112; protocol pop3; pop3_auth plain; }
        }
    """)
    assert [s.pop3_client_buffer for s in config.servers] == [4096, 256, 128]


def test_inheritance_scalars_and_lists(load):
    config = load("""
        events {}
        error_log stderr;
        mail {
            auth_http 127.0.0.1:9000/auth;
            timeout 10s;
            server_name mail.example.com;
            imap_capabilities IMAP4rev1 IDLE;
            imap_capabilities QUOTA;
            imap_auth plain;
            imap_auth cram-md5;
            auth_http_header X-A a;
            set_real_ip_from 10.0.0.0/8;
            error_log stderr info;
            server { listen 127.0.0.1:8143; protocol imap; }
            server {
                listen 127.0.0.1:8144; protocol imap;
                timeout 5s;
                imap_capabilities IMAP4;
                imap_auth external;
                auth_http_header X-B b;
                auth_http 127.0.0.1:9001;
                set_real_ip_from unix:;
                error_log stderr debug;
            }
        }
    """)
    inherits, overrides = config.servers
    assert inherits.timeout == 10.0 and overrides.timeout == 5.0
    assert inherits.server_name == overrides.server_name == "mail.example.com"
    assert inherits.imap_capabilities == ("IMAP4rev1", "IDLE", "QUOTA")
    assert overrides.imap_capabilities == ("IMAP4",)
    assert inherits.imap_auth == frozenset({"plain", "cram-md5"})
    assert overrides.imap_auth == frozenset({"external"})
    assert inherits.auth_http_header == (("X-A", "a"),)
    assert overrides.auth_http_header == (("X-B", "b"),)
    assert inherits.auth_http.uri == "/auth" and overrides.auth_http.uri == "/"
    assert overrides.auth_http.peer == "127.0.0.1:9001"
    assert [str(n) for n in inherits.set_real_ip_from] == ["10.0.0.0/8"]
    assert overrides.set_real_ip_from == ("unix:",)
    assert inherits.error_log == (("stderr", "info"),)
    assert overrides.error_log == (("stderr", "debug"),)


def test_error_log_falls_back_to_main(load):
    config = load("error_log stderr notice;\n" + MINIMAL)
    assert config.servers[0].error_log == (("stderr", "notice"),)


def test_empty_server_name_is_hostname(load):
    config = load(MINIMAL.replace("auth_http", 'server_name "";\n auth_http'))
    assert config.servers[0].server_name == socket.gethostname().lower()


def test_protocol_autodetection(load):
    config = load("""
        events {}
        mail {
            auth_http 127.0.0.1:9000;
            server { listen 127.0.0.1:8000; listen 127.0.0.1:110; listen 127.0.0.1:143; }
            server { listen 127.0.0.1:25; protocol imap; }
            server { protocol pop3; listen 127.0.0.1:587; }
            server { listen 127.0.0.1:993; }
            server { listen 127.0.0.1:465; }
        }
    """)
    assert [s.protocol for s in config.servers] == ["pop3", "imap", "pop3", "imap", "smtp"]
    assert not config.servers[3].listens[0].ssl


def test_tls_server_loads(load, tmp_path):
    config = load("""
        events {}
        mail {
            auth_http 127.0.0.1:9000;
            ssl_certificate cert.pem;
            ssl_certificate_key /abs/key.pem;
            starttls on;
            server { listen 127.0.0.1:8993 ssl; protocol imap; starttls off; }
            server { listen 127.0.0.1:8143; protocol imap; ssl_verify_client optional; ssl_trusted_certificate ca.pem; }
        }
    """)
    tls, starttls = config.servers
    assert tls.ssl_certificate == (str(tmp_path / "cert.pem"),)
    assert tls.ssl_certificate_key == ("/abs/key.pem",)
    assert tls.listens[0].ssl and tls.uses_tls and tls.starttls == "off"
    assert starttls.starttls == "on" and starttls.ssl_trusted_certificate == str(tmp_path / "ca.pem")


def test_include_glob_relative_to_config_dir(write_conf, tmp_path):
    write_conf("server { listen 127.0.0.1:8143; protocol imap; }\n", "conf.d/a.conf")
    write_conf("server { listen 127.0.0.1:8110; protocol pop3; }\n", "conf.d/b.conf")
    write_conf("server { listen 127.0.0.1:8025; protocol smtp; }\n", "conf.d/c.disabled")
    path = write_conf("events {}\nmail {\n  auth_http 127.0.0.1:9000;\n  include conf.d/*.conf;\n}\n",
                      "etc/../main.conf")
    config = load_config(path, prefix=str(tmp_path / "elsewhere"))
    assert [s.protocol for s in config.servers] == ["imap", "pop3"]
    assert config.servers[1].file == str(tmp_path / "conf.d/b.conf")
    assert [f for f, _ in config.files] == [str(tmp_path / n) for n in ("main.conf", "conf.d/a.conf", "conf.d/b.conf")]


def test_include_error_names_included_file(write_conf):
    write_conf("\n\nfoo;\n", "inc.conf")
    path = write_conf("events {}\ninclude inc.conf;\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == 'unknown directive "foo" in %s:3' % os.path.join(os.path.dirname(path), "inc.conf")


def test_include_cannot_close_outer_block(write_conf):
    write_conf("}\n", "inc.conf")
    path = write_conf("events {\ninclude inc.conf;\n}\n")
    with pytest.raises(ConfigError, match=r'^unexpected "}" in .*inc.conf:1$'):
        load_config(path)


def test_command_line_directives(load):
    config = load(MINIMAL, directives="daemon off; worker_processes 3;")
    assert config.main.daemon is False and config.main.worker_processes == 3


@pytest.mark.parametrize("directives, message", [
    ("daemon off;", '"daemon" directive is duplicate in {file}:1'),
    ("daemon off; daemon on;", '"daemon" directive is duplicate in command line'),
    ("foo;", 'unknown directive "foo" in command line'),
    ("daemon off", 'unexpected end of parameter, expecting ";" in command line'),
    ("timeout 1s;", '"timeout" directive is not allowed here in command line'),
])
def test_command_line_errors(write_conf, directives, message):
    path = write_conf("daemon on;\n" + MINIMAL)
    with pytest.raises(ConfigError) as info:
        load_config(path, directives=directives)
    assert str(info.value) == message.format(file=path)


def test_nginx_docs_example(load):
    config = load("""
        events {}
        mail {
            server_name mail.example.com;
            auth_http localhost:9000/cgi-bin/nginx_auth.cgi;
            imap_capabilities IMAP4rev1 UIDPLUS IDLE LITERAL+ QUOTA;
            pop3_auth plain apop cram-md5;
            pop3_capabilities LAST TOP USER PIPELINING UIDL;
            smtp_auth login plain cram-md5;
            smtp_capabilities "SIZE 10485760" ENHANCEDSTATUSCODES 8BITMIME DSN;
            xclient off;
            server { listen 25; protocol smtp; }
            server { listen 110; protocol pop3; proxy_pass_error_message on; }
            server { listen 143; protocol imap; }
            server { listen 587; protocol smtp; }
        }
    """)
    assert [(s.protocol, s.listens[0].text) for s in config.servers] == [
        ("smtp", "0.0.0.0:25"), ("pop3", "0.0.0.0:110"), ("imap", "0.0.0.0:143"), ("smtp", "0.0.0.0:587")]
    smtp = config.servers[0]
    assert smtp.smtp_capabilities == ("SIZE 10485760", "ENHANCEDSTATUSCODES", "8BITMIME", "DSN")
    assert smtp.smtp_auth == frozenset({"login", "plain", "cram-md5"})
    assert smtp.xclient is False and smtp.server_name == "mail.example.com"
    assert smtp.auth_http.host_header == "localhost" and smtp.auth_http.uri == "/cgi-bin/nginx_auth.cgi"
    assert config.servers[1].proxy_pass_error_message and not config.servers[2].proxy_pass_error_message
    assert all(s.listens[0].wildcard for s in config.servers)


def test_bundled_example_config_passes():
    path = os.path.join(REPO, "etc", "mailproxy.conf")
    out, err = io.StringIO(), io.StringIO()
    assert check(path, out=out, err=err) == 0, err.getvalue()
    config = load_config(path)
    assert config.prefix == REPO
    assert sorted(s.protocol for s in config.servers) == ["imap", "pop3", "smtp"]
    assert all(s.listens[0].sockaddr[0] == "127.0.0.1" for s in config.servers)
    assert all(s.auth_http.peer == "127.0.0.1:9000" and s.auth_http.uri == "/auth" for s in config.servers)


def test_dump_prints_every_file(write_conf):
    inc = write_conf("# included\n", "inc.conf")
    path = write_conf(MINIMAL + "include inc.conf;\n")
    out, err = io.StringIO(), io.StringIO()
    assert check(path, dump=True, out=out, err=err) == 0
    assert out.getvalue() == "# configuration file %s:\n%s\n# configuration file %s:\n# included\n\n" % (
        path, open(path).read(), inc)
    assert err.getvalue().splitlines() == [
        "mailproxy: the configuration file %s syntax is ok" % path,
        "mailproxy: configuration file %s test is successful" % path]


def test_check_missing_file(tmp_path):
    path = str(tmp_path / "none.conf")
    err = io.StringIO()
    assert check(path, out=io.StringIO(), err=err) == 1
    assert err.getvalue().splitlines() == [
        'mailproxy: [emerg] open() "%s" failed (2: No such file or directory)' % path,
        "mailproxy: configuration file %s test failed" % path]


def test_check_directory_is_not_a_file(tmp_path):
    err = io.StringIO()
    assert check(str(tmp_path), out=io.StringIO(), err=err) == 1
    assert '(21: Is a directory)' in err.getvalue()


def test_default_prefix_is_parent_of_config_dir(write_conf, tmp_path):
    path = write_conf(MINIMAL, "etc/mailproxy.conf")
    config = load_config(path)
    assert config.prefix == str(tmp_path)
    assert config.main.pid == str(tmp_path / "logs/mailproxy.pid")


def test_settings_are_frozen(load):
    server = load(MINIMAL).servers[0]
    assert isinstance(server, ServerSettings)
    with pytest.raises(AttributeError):
        server.timeout = 1.0


@pytest.mark.parametrize("path", ["/tmp/a\0b.conf", "/tmp/\udcff-not-utf8.conf"])
def test_check_never_raises_on_odd_paths(path):
    err = io.StringIO()
    assert check(path, out=io.StringIO(), err=err) == 1
    assert err.getvalue().splitlines()[-1].endswith("test failed")


def test_non_utf8_config_is_read_and_dumped(tmp_path):
    path = tmp_path / "latin.conf"
    path.write_bytes(MINIMAL.replace("auth_http", "server_name caf\xe9;\nauth_http").encode("latin-1"))
    out = io.StringIO()
    assert check(str(path), dump=True, out=out, err=io.StringIO()) == 0
    assert "caf" in out.getvalue()


def test_hostname_listen_drops_its_own_duplicates(load):
    config = load(MINIMAL.replace("listen 127.0.0.1:8143;", "listen localhost:8143; listen 127.0.0.2:8143;"))
    assert [l.text for l in config.servers[0].listens][-1] == "127.0.0.2:8143"
