"""Certificates by SNI: several servers on one `listen ... ssl` (or STARTTLS) address, seen by openssl s_client."""

import re
import subprocess

import pytest
import trustme

from mailproxy.conf.lexer import ConfigError
from mailproxy.conf.load import load_config

from support.authserver import RecordingAuthServer
from support.harness import free_port, mail_config

DOMAINS = {"default": "mail.default.test", "one": "mail.one.test", "wild": "*.two.test"}


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sni")
    ca = trustme.CA()
    paths = {}
    for label, name in DOMAINS.items():
        cert = ca.issue_cert(name, common_name="cn-" + label)
        pem, key = root / (label + ".pem"), root / (label + ".key")
        pem.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        key.write_bytes(cert.private_key_pem.bytes())
        paths[label] = (str(pem), str(key))
    return paths


def servers(certs, port, listen_extra="ssl", server_extra=""):
    return "".join(
        "    server { listen 127.0.0.1:%d %s; protocol imap; server_name %s; %s"
        "ssl_certificate %s; ssl_certificate_key %s; }\n"
        % (port, listen_extra, DOMAINS[label], server_extra, certs[label][0], certs[label][1])
        for label in DOMAINS
    )


def config(auth_url, body):
    return mail_config(auth_url, body + "}\n")


def s_client(port, servername=None, starttls=False, stdin=b"a LOGIN alice secret\r\n"):
    args = ["openssl", "s_client", "-connect", "127.0.0.1:%d" % port, "-ign_eof"]
    if servername:
        args += ["-servername", servername]
    else:
        args += ["-noservername"]
    if starttls:
        args += ["-starttls", "imap"]
    done = subprocess.run(args, input=stdin, capture_output=True, timeout=30)
    return done.stdout.decode("latin-1")


def subject_cn(output):
    # Match the CN attribute itself: trustme's random OU text can contain the letters "CN".
    for line in output.splitlines():
        if line.startswith("subject="):
            found = re.search(r"(?:^subject=|, )CN ?= ?([^,]+)", line)
            if found:
                return found.group(1).strip()
    raise AssertionError(output)


@pytest.fixture
def auth():
    server = RecordingAuthServer({}, {})
    yield server
    server.close()


@pytest.mark.parametrize("starttls", [False, True])
def test_certificate_by_server_name(certs, auth, mailproxy_master, starttls):
    port = free_port()
    body = servers(certs, port, "" if starttls else "ssl", "starttls on;" if starttls else "")
    master = mailproxy_master(config(auth.url, body), handler=None)
    cases = [("mail.one.test", "cn-one"), ("MAIL.ONE.TEST", "cn-one"), ("imap.two.test", "cn-wild"),
             ("mail.default.test", "cn-default"), ("other.test", "cn-default"), (None, "cn-default")]
    for name, cn in cases:
        out = s_client(port, name, starttls)
        assert subject_cn(out) == cn, (name, out)
        # The session went on to ask the auth server, which refused the login.
        assert "a NO Invalid login or password" in out, out
    headers = [h for _, h in auth.requests]
    assert [h.get("auth-ssl-server-name") for h in headers] == [
        b"mail.one.test", b"mail.one.test", b"imap.two.test", b"mail.default.test", b"other.test", None]
    raw = auth.requests[0][0]
    # Ours comes last, after every header nginx sends.
    assert raw.endswith(b"Auth-SSL-Server-Name: mail.one.test\r\n\r\n"), raw
    assert "[alert]" not in master.error_log()


@pytest.mark.parametrize("starttls", [False, True])
def test_chosen_server_runs_an_implicit_tls_session(certs, auth, mailproxy_master, starttls):
    """With `listen ... ssl` the server the name chose runs the session (its auth_http, capabilities);
    after STARTTLS the first server keeps it: its greeting and capabilities were already sent."""
    other_auth = RecordingAuthServer({}, {})
    try:
        port = free_port()
        tls_mode = ("", "starttls on; ") if starttls else ("ssl", "")
        body = "".join(
            "    server { listen 127.0.0.1:%d %s; protocol imap; server_name %s; %s%s"
            "ssl_certificate %s; ssl_certificate_key %s; }\n"
            % (port, tls_mode[0], DOMAINS[label], tls_mode[1], extra, certs[label][0], certs[label][1])
            for label, extra in (
                ("default", ""),
                ("one", 'auth_http %s; imap_capabilities "IMAP4rev1" "X-ONE";' % other_auth.url)))
        master = mailproxy_master(config(auth.url, body), handler=None)
        stdin = b"c CAPABILITY\r\na LOGIN alice secret\r\n"
        one = s_client(port, "mail.one.test", starttls, stdin)
        default = s_client(port, "mail.default.test", starttls, stdin)
        assert subject_cn(one) == "cn-one" and subject_cn(default) == "cn-default"
        for out in (one, default):
            assert "a NO Invalid login or password" in out, out
        assert "X-ONE" not in default
        if starttls:
            assert "X-ONE" not in one
            assert [h.get("auth-ssl-server-name") for _, h in auth.requests] == [
                b"mail.one.test", b"mail.default.test"]
            assert other_auth.requests == []
        else:
            assert "* CAPABILITY IMAP4rev1 X-ONE" in one, one
            assert [h.get("auth-ssl-server-name") for _, h in other_auth.requests] == [b"mail.one.test"]
            assert [h.get("auth-ssl-server-name") for _, h in auth.requests] == [b"mail.default.test"]
        assert "[alert]" not in master.error_log()
    finally:
        other_auth.close()


def test_single_server_sends_no_server_name(certs, auth, mailproxy_master):
    port = free_port()
    body = "    server { listen 127.0.0.1:%d ssl; protocol imap; server_name mail.one.test; " \
           "ssl_certificate %s; ssl_certificate_key %s; }\n" % (port, certs["one"][0], certs["one"][1])
    mailproxy_master(config(auth.url, body), handler=None)
    out = s_client(port, "mail.one.test")
    assert subject_cn(out) == "cn-one"
    assert "auth-ssl-server-name" not in auth.requests[-1][1]


# -- configuration: nginx's error stays wherever SNI cannot choose ------------------------------------


def load(tmp_path, body):
    path = tmp_path / "mailproxy.conf"
    path.write_text("events {}\nmail {\n    auth_http 127.0.0.1:9/auth;\n%s}\n" % body)
    return load_config(str(path), prefix=str(tmp_path))


def test_shared_address_loads(certs, tmp_path):
    loaded = load(tmp_path, servers(certs, 9993))
    assert [s.server_name for s in loaded.servers] == list(DOMAINS.values())
    from mailproxy import listeners
    assert len(listeners.plan(loaded.servers)) == 1


@pytest.mark.parametrize("body, line", [
    # plain listeners: nginx's case
    ("server { listen 127.0.0.1:143; server_name a; }\nserver { listen 127.0.0.1:143; server_name b; }\n", 5),
    # same server_name
    ("server { listen 127.0.0.1:993 ssl; server_name a; %(tls)s }\n"
     "server { listen 127.0.0.1:993 ssl; server_name a; %(tls)s }\n", 5),
    # one ssl, one not
    ("server { listen 127.0.0.1:993 ssl; server_name a; %(tls)s }\n"
     "server { listen 127.0.0.1:993; server_name b; starttls on; %(tls)s }\n", 5),
    # starttls on only one of them
    ("server { listen 127.0.0.1:143; server_name a; starttls on; %(tls)s }\n"
     "server { listen 127.0.0.1:143; server_name b; }\n", 5),
    # different protocols
    ("server { listen 127.0.0.1:993 ssl; server_name a; %(tls)s }\n"
     "server { listen 127.0.0.1:993 ssl; server_name b; protocol pop3; %(tls)s }\n", 5),
])
def test_duplicate_still_refused(certs, tmp_path, body, line):
    tls = "ssl_certificate %s; ssl_certificate_key %s;" % certs["one"]
    with pytest.raises(ConfigError) as info:
        load(tmp_path, body % {"tls": tls})
    port = "993" if "993" in body else "143"
    assert str(info.value) == 'duplicate "127.0.0.1:%s" address and port pair in %s:%d' % (
        port, tmp_path / "mailproxy.conf", line)
