"""Real Dovecot (IMAP, POP3) and Postfix (SMTP) backends for end-to-end tests.

Each fixture starts a private instance in a fresh temporary directory, on free 127.0.0.1 ports, with
its own log file, waits until every port greets, and stops it by pid. Nothing under /etc or /var is
touched and no system service is needed, so they run as root on a machine where the Debian packages
are installed but not running. Mail is stored as ``nobody``, which exists on every Debian system, so
no user has to be created.

Use: ``from backends import dovecot, postfix`` in a test module (or ``pytest_plugins``). A missing
binary skips the test, except under ``CI=true`` where it fails: CI must not go green by skipping.
"""

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

DOVECOT = "/usr/sbin/dovecot"
# Pigeonhole (dovecot-managesieved): only when installed does the fixture serve ManageSieve too.
MANAGESIEVE = "/usr/lib/dovecot/managesieve"
POSTFIX = "/usr/sbin/postfix"
MAIL_USER = "nobody"
MAIL_DOMAIN = "example.test"
USERS = {"alice": "alice-secret", "bob": "b0b pass+="}
START_TIMEOUT = 20.0


def require(binary: str) -> None:
    if os.path.exists(binary) and os.access(binary, os.X_OK):
        return
    if os.environ.get("CI") == "true":
        pytest.fail("%s is required under CI=true (install the Debian package)" % binary)
    pytest.skip("%s not installed" % binary)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _greets(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
            conn.settimeout(2)
            return bool(conn.recv(512))
    except OSError:
        return False


def _wait_ready(process, ports, log_path: str, console: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    pending = list(ports)
    while pending:
        if process.poll() is not None:
            raise RuntimeError(
                "backend exited (%s): %s\n%s" % (process.returncode, _tail(console), _tail(log_path))
            )
        if time.monotonic() > deadline:
            raise RuntimeError(
                "backend not ready on %s: %s\n%s" % (pending, _tail(console), _tail(log_path))
            )
        if _greets(pending[0]):
            pending.pop(0)
        else:
            time.sleep(0.05)


def _tail(path: str) -> str:
    try:
        with open(path, errors="replace") as log:
            return log.read()[-3000:]
    except OSError as exc:
        return "(no log: %s)" % exc


def _stop(process) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _private_root(prefix: str) -> str:
    # mkdtemp gives 0700; the unprivileged service users must be able to traverse it.
    root = tempfile.mkdtemp(prefix=prefix)
    os.chmod(root, 0o755)
    return root


def _give_to_mail_user(path: str) -> None:
    entry = pwd.getpwnam(MAIL_USER)
    os.makedirs(path, exist_ok=True)
    os.chown(path, entry.pw_uid, entry.pw_gid)


def read_log(path: str) -> str:
    try:
        with open(path, errors="replace") as log:
            return log.read()
    except FileNotFoundError:
        return ""


def wait_for_log(path: str, needle: str, timeout: float = 10.0) -> str:
    """The log once it contains ``needle`` (logs are written asynchronously by the backends)."""
    deadline = time.monotonic() + timeout
    while True:
        text = read_log(path)
        if needle in text:
            return text
        if time.monotonic() > deadline:
            raise AssertionError("%r not in %s:\n%s" % (needle, path, text[-3000:]))
        time.sleep(0.05)


# -- Dovecot ---------------------------------------------------------------------------------------

_DOVECOT_CONF = """\
base_dir = {root}/run
state_dir = {root}/state
protocols = imap pop3{sieve_protocol}
listen = 127.0.0.1
{ssl}
disable_plaintext_auth = no
auth_mechanisms = plain login cram-md5 apop
auth_verbose = yes
# Tests exercise wrong passwords; the default 2 s penalty would only slow them down.
auth_failure_delay = 0
log_path = {log}
info_log_path = {log}
debug_log_path = {log}
login_trusted_networks = 127.0.0.0/8
haproxy_trusted_networks = 127.0.0.0/8
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = {uid}
last_valid_uid = {uid}
mail_location = maildir:{root}/mail/%u
pop3_uidl_format = %08Xu%08Xv
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={root}/mail/%u
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {imaps}
  }}
  inet_listener imap_haproxy {{
    address = 127.0.0.1
    port = {imap_haproxy}
    haproxy = yes
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {pop3}
  }}
  inet_listener pop3s {{
    address = 127.0.0.1
    port = {pop3s}
  }}
  inet_listener pop3_haproxy {{
    address = 127.0.0.1
    port = {pop3_haproxy}
    haproxy = yes
  }}
}}
# Wrong passwords from 127.0.0.1 are the tests' daily bread; anvil's growing penalty would stall later
# tests for seconds. Taking away its socket is Dovecot's documented way to turn it off.
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service lmtp {{
  inet_listener lmtp {{
    port = 0
  }}
  unix_listener lmtp {{
    mode = 0
  }}
}}
{managesieve}"""

_MANAGESIEVE_CONF = """\
service managesieve-login {{
  inet_listener sieve {{
    address = 127.0.0.1
    port = {port}
  }}
}}
plugin {{
  sieve = file:~/sieve;active=~/.dovecot.sieve
}}
"""


class Dovecot:
    def __init__(self, ssl_cert=None, ssl_key=None):
        # With a certificate (PEM paths): ssl = required, imaps/pop3s on their own ports, STARTTLS on
        # the plain ones. Without: ssl = no and no TLS ports, as before.
        self.ssl_cert, self.ssl_key = ssl_cert, ssl_key
        self.imaps_port = free_port() if ssl_cert else 0
        self.pop3s_port = free_port() if ssl_cert else 0
        self.sieve_port = free_port() if os.access(MANAGESIEVE, os.X_OK) else None
        self.root = _private_root("dovecot-")
        self.log_path = os.path.join(self.root, "dovecot.log")
        self.maildir_root = os.path.join(self.root, "mail")
        self.users = dict(USERS)
        self.imap_port, self.pop3_port = free_port(), free_port()
        self.imap_haproxy_port, self.pop3_haproxy_port = free_port(), free_port()
        self.conf_path = os.path.join(self.root, "dovecot.conf")
        self.process = None

    def start(self) -> "Dovecot":
        entry = pwd.getpwnam(MAIL_USER)
        _give_to_mail_user(self.maildir_root)
        with open(os.path.join(self.root, "passwd"), "w") as passwd:
            # PLAIN storage is what lets the test auth server hand back clear passwords, which the
            # proxy needs for APOP and CRAM-MD5 clients (spec 8.5).
            for name, password in self.users.items():
                passwd.write("%s:{PLAIN}%s\n" % (name, password))
        with open(self.conf_path, "w") as conf:
            conf.write(
                _DOVECOT_CONF.format(
                    root=self.root,
                    log=self.log_path,
                    uid=entry.pw_uid,
                    gid=entry.pw_gid,
                    imap=self.imap_port,
                    pop3=self.pop3_port,
                    imap_haproxy=self.imap_haproxy_port,
                    pop3_haproxy=self.pop3_haproxy_port,
                    imaps=self.imaps_port,
                    pop3s=self.pop3s_port,
                    sieve_protocol=" sieve" if self.sieve_port else "",
                    managesieve=_MANAGESIEVE_CONF.format(port=self.sieve_port) if self.sieve_port else "",
                    ssl="ssl = required\nssl_cert = <%s\nssl_key = <%s" % (self.ssl_cert, self.ssl_key)
                    if self.ssl_cert else "ssl = no",
                )
            )
        console = os.path.join(self.root, "console")
        with open(console, "w") as output:
            # Config errors are printed before log_path is opened.
            self.process = subprocess.Popen(
                [DOVECOT, "-F", "-c", self.conf_path],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        try:
            # The haproxy listeners never greet before a header, so readiness is judged on the rest.
            ports = [self.imap_port, self.pop3_port] + ([self.sieve_port] if self.sieve_port else [])
            _wait_ready(self.process, ports, self.log_path, console)
        except Exception:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process)
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        return read_log(self.log_path)

    def deliver(self, user: str, message: bytes) -> str:
        """Put a message straight into ``user``'s maildir (no LDA needed); returns its file name."""
        entry = pwd.getpwnam(MAIL_USER)
        base = os.path.join(self.maildir_root, user)
        for sub in ("", "cur", "new", "tmp"):
            _give_to_mail_user(os.path.join(base, sub))
        name = "%d.M%dP%d.mailproxytest" % (time.time(), time.monotonic_ns() % 10**6, os.getpid())
        path = os.path.join(base, "new", name)
        with open(path, "wb") as out:
            out.write(message.replace(b"\r\n", b"\n"))
        os.chown(path, entry.pw_uid, entry.pw_gid)
        return name


@pytest.fixture(scope="module")
def dovecot():
    require(DOVECOT)
    server = Dovecot().start()
    try:
        yield server
    finally:
        server.stop()


# -- Postfix ---------------------------------------------------------------------------------------

_POSTFIX_MAIN = """\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = mx.mailproxy.test
mydomain = mailproxy.test
myorigin = $myhostname
mydestination =
relay_domains =
relayhost =
local_recipient_maps =
alias_maps =
alias_database =
mynetworks = 127.0.0.0/8
smtpd_authorized_xclient_hosts = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_banner = $myhostname ESMTP
smtputf8_enable = no
biff = no
virtual_mailbox_domains = {domain}
virtual_mailbox_base = {root}/vmail
virtual_mailbox_maps = inline:{{ {mailboxes} }}
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
virtual_minimum_uid = 1
maillog_file = {log}
maillog_file_prefixes = {root}
"""

# chroot off everywhere: the instance lives in a temp dir, not in /var/spool/postfix.
_POSTFIX_MASTER = """\
127.0.0.1:{smtp} inet n - n - - smtpd
127.0.0.1:{proxy} inet n - n - - smtpd -o smtpd_upstream_proxy_protocol=haproxy
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
local     unix  - n n - - local
virtual   unix  - n n - - virtual
lmtp      unix  - - n - - lmtp
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


class Postfix:
    def __init__(self, tls_cert=None, tls_key=None):
        # With a certificate (PEM paths): smtpd_tls_security_level = encrypt, STARTTLS before anything.
        self.tls_cert, self.tls_key = tls_cert, tls_key
        self.root = _private_root("postfix-")
        self.config_dir = os.path.join(self.root, "etc")
        self.log_path = os.path.join(self.root, "maillog")
        self.mailbox_root = os.path.join(self.root, "vmail")
        self.domain = MAIL_DOMAIN
        self.users = sorted(USERS)
        self.smtp_port, self.smtp_proxy_port = free_port(), free_port()
        self.process = None

    def start(self) -> "Postfix":
        entry = pwd.getpwnam(MAIL_USER)
        os.makedirs(self.config_dir)
        os.makedirs(os.path.join(self.root, "queue"))
        data_dir = os.path.join(self.root, "data")
        os.makedirs(data_dir)
        postfix_user = pwd.getpwnam("postfix")
        # master takes its lock there as the mail_owner, not as root.
        os.chown(data_dir, postfix_user.pw_uid, postfix_user.pw_gid)
        _give_to_mail_user(self.mailbox_root)
        mailboxes = ", ".join("%s@%s=%s/" % (user, self.domain, user) for user in self.users)
        with open(os.path.join(self.config_dir, "main.cf"), "w") as main:
            main.write(
                _POSTFIX_MAIN.format(
                    root=self.root,
                    log=self.log_path,
                    domain=self.domain,
                    mailboxes=mailboxes,
                    uid=entry.pw_uid,
                    gid=entry.pw_gid,
                )
            )
            if self.tls_cert:
                main.write("smtpd_tls_cert_file = %s\nsmtpd_tls_key_file = %s\n"
                           "smtpd_tls_security_level = encrypt\n" % (self.tls_cert, self.tls_key))
        with open(os.path.join(self.config_dir, "master.cf"), "w") as master:
            master.write(_POSTFIX_MASTER.format(smtp=self.smtp_port, proxy=self.smtp_proxy_port))
            if self.tls_cert:
                master.write("tlsmgr    unix  - - n 1000? 1 tlsmgr\n")
        console = os.path.join(self.root, "console")
        with open(console, "w") as output:
            # Before maillog exists (bad main.cf, failed checks) postfix only talks to stderr.
            self.process = subprocess.Popen(
                [POSTFIX, "-c", self.config_dir, "start-fg"],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, MAIL_CONFIG=self.config_dir),
            )
        try:
            _wait_ready(self.process, [self.smtp_port], self.log_path, console)
        except Exception:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        # start-fg leaves master as a child of postfix-script, not exec'd (unless PID 1); a signal
        # to our child alone would orphan master and its daemons, so master is stopped by its pid.
        master = self._master_pid()
        if master is not None and self.process is not None and self.process.poll() is None:
            os.kill(master, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(master, signal.SIGKILL)
        if self.process is not None:
            _stop(self.process)
        shutil.rmtree(self.root, ignore_errors=True)

    def _master_pid(self):
        try:
            with open(os.path.join(self.root, "queue", "pid", "master.pid")) as pid_file:
                return int(pid_file.read().strip())
        except (OSError, ValueError):
            return None

    def log(self) -> str:
        return read_log(self.log_path)

    def messages(self, user: str):
        return sorted(glob.glob(os.path.join(self.mailbox_root, user, "new", "*")))

    def wait_for_message(self, user: str, needle: bytes = b"", timeout: float = 15.0) -> bytes:
        """The first delivered message for ``user`` containing ``needle``."""
        deadline = time.monotonic() + timeout
        while True:
            for path in self.messages(user):
                with open(path, "rb") as message:
                    data = message.read()
                if needle in data:
                    return data
            if time.monotonic() > deadline:
                raise AssertionError(
                    "no message for %s containing %r; log:\n%s" % (user, needle, self.log()[-3000:])
                )
            time.sleep(0.05)


@pytest.fixture(scope="module")
def postfix():
    require(POSTFIX)
    server = Postfix().start()
    try:
        yield server
    finally:
        server.stop()
