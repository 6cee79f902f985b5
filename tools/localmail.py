"""Private Dovecot (IMAP, POP3, ManageSieve) and Postfix (SMTP) instances, no pytest needed.

Each instance lives in a fresh temporary directory, on free 127.0.0.1 ports, with its own log file;
``start()`` returns once every port greets and ``stop()`` stops it by pid and removes the directory.
Nothing under /etc or /var is touched and no system service is needed, so they run as root on a machine
where the Debian packages are installed but not running. Mail is stored as ``nobody``, which exists on
every Debian system, so no user has to be created.

The test suite's fixtures (tests/support/backends.py) and the quick start (``./quickstart``, through
``python3 -m tools.localmail serve|stop``) both use them.
"""

import argparse
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from tools.ports import free_port

DOVECOT = "/usr/sbin/dovecot"
# Pigeonhole (dovecot-managesieved): only when installed does the fixture serve ManageSieve too.
MANAGESIEVE = "/usr/lib/dovecot/managesieve"
POSTFIX = "/usr/sbin/postfix"
MAIL_USER = "nobody"
MAIL_DOMAIN = "example.test"
USERS = {"alice": "alice-secret", "bob": "b0b pass+="}
START_TIMEOUT = 20.0



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
# Shows the ID fields clients (and, with imap_client_id, the proxy for them) send before login.
imap_id_log = *
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
    def __init__(self, ssl_cert=None, ssl_key=None, users=None, passwords=None):
        # With a certificate (PEM paths): ssl = required, imaps/pop3s on their own ports, STARTTLS on
        # the plain ones. Without: ssl = no and no TLS ports, as before.
        # users: login -> clear password (stored {PLAIN}); passwords: login -> password as Dovecot
        # stores it ("{SHA512-CRYPT}$6$..."), for users whose clear text nobody should need.
        self.passwords = dict(passwords or {})
        self.ssl_cert, self.ssl_key = ssl_cert, ssl_key
        self.imaps_port = free_port() if ssl_cert else 0
        self.pop3s_port = free_port() if ssl_cert else 0
        self.sieve_port = free_port() if os.access(MANAGESIEVE, os.X_OK) else None
        self.root = _private_root("dovecot-")
        self.log_path = os.path.join(self.root, "dovecot.log")
        self.maildir_root = os.path.join(self.root, "mail")
        self.users = dict(USERS if users is None else users)
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
            for name, stored in self.passwords.items():
                passwd.write("%s:%s\n" % (name, stored))
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
virtual_mailbox_base = {mailbox_root}
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
    def __init__(self, tls_cert=None, tls_key=None, domain=None, users=None, mailbox_root=None):
        # With a certificate (PEM paths): smtpd_tls_security_level = encrypt, STARTTLS before anything.
        # users: local parts (mailbox <root>/<user>/, address user@domain) or whole addresses (mailbox
        # <root>/<address>/, Dovecot's maildir for %u). mailbox_root: another instance's maildirs, such
        # as Dovecot's maildir_root, so that mail accepted here can be read there; its owner removes it.
        self.tls_cert, self.tls_key = tls_cert, tls_key
        self.root = _private_root("postfix-")
        self.config_dir = os.path.join(self.root, "etc")
        self.log_path = os.path.join(self.root, "maillog")
        self.mailbox_root = mailbox_root or os.path.join(self.root, "vmail")
        self.domain = domain or MAIL_DOMAIN
        self.users = sorted(USERS if users is None else users)
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
        mailboxes = ", ".join(
            "%s=%s/" % (user if "@" in user else "%s@%s" % (user, self.domain), user) for user in self.users
        )
        with open(os.path.join(self.config_dir, "main.cf"), "w") as main:
            main.write(
                _POSTFIX_MAIN.format(
                    root=self.root,
                    log=self.log_path,
                    domain=self.domain,
                    mailboxes=mailboxes,
                    mailbox_root=self.mailbox_root,
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


# -- The quick start's instances -------------------------------------------------------------------
#
# `serve` stays in the foreground (the quick start runs it in the background, its pid in the state dir)
# holding one Dovecot and one Postfix that share the maildirs, so mail Postfix accepts can be read over
# IMAP and POP3. On SIGTERM it stops both and removes their directories. It records what it started in
# STATE/localmail.json, so that `stop` can still clean up by pid if the supervisor itself was killed.

STATE_FILE = "localmail.json"


def _users_from_template(text: str):
    """Logins and their stored passwords ("{SCHEME}..."), and the domains mail is accepted for."""
    from mailproxy.authserver.users import parse

    directory = parse(text)
    passwords = {name: "{%s}%s" % (user.scheme, user.secret) for name, user in directory.users.items()}
    domains = set(directory.domains)
    domains.update(name.rpartition("@")[2].lower() for name in passwords if "@" in name)
    return passwords, sorted(domains)


def _routed_users_file(text: str, dovecot: "Dovecot", postfix: "Postfix") -> str:
    """The template with its backend and domain lines pointed at these instances' ports."""
    ports = {"imap": dovecot.imap_port, "pop3": dovecot.pop3_port, "smtp": postfix.smtp_port}
    lines = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if words[:1] == ["backend"] and len(words) >= 3 and words[1] in ports:
            line = "backend %s 127.0.0.1:%d" % (words[1], ports[words[1]])
        elif words[:1] == ["domain"] and len(words) >= 3:
            line = "domain %s %s" % (
                words[1], " ".join("%s=127.0.0.1:%d" % (protocol, port) for protocol, port in ports.items())
            )
        lines.append(line)
    return "\n".join(lines) + "\n"


def _write_atomically(path: str, text: str) -> None:
    # Readers poll for the file's existence: it must never be seen half written.
    with open(path + ".tmp", "w") as out:
        out.write(text)
    os.replace(path + ".tmp", path)


def _record(state: str, instances: dict) -> None:
    _write_atomically(os.path.join(state, STATE_FILE), json.dumps(instances, indent=1))


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def serve(state: str, template: str, users_out: str) -> int:
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _terminate)
    with open(template) as source:
        text = source.read()
    passwords, domains = _users_from_template(text)
    dovecot = Dovecot(users={}, passwords=passwords)
    postfix = Postfix(domain=", ".join(domains), users=sorted(passwords), mailbox_root=dovecot.maildir_root)
    instances = {"supervisor": os.getpid()}
    try:
        instances["dovecot"] = {"root": dovecot.root}
        instances["postfix"] = {"root": postfix.root}
        _record(state, instances)
        dovecot.start()
        instances["dovecot"]["pid"] = dovecot.process.pid
        _record(state, instances)
        postfix.start()
        instances["postfix"]["pid"] = postfix.process.pid
        instances["postfix"]["master"] = postfix._master_pid()
        _record(state, instances)
        _write_atomically(users_out, _routed_users_file(text, dovecot, postfix))
        print(
            "Dovecot: IMAP 127.0.0.1:%d, POP3 127.0.0.1:%d, log %s; Postfix: SMTP 127.0.0.1:%d for %s, log %s;"
            " maildirs in %s" % (dovecot.imap_port, dovecot.pop3_port, dovecot.log_path, postfix.smtp_port,
                                 ", ".join(domains), postfix.log_path, dovecot.maildir_root),
            flush=True,
        )
        while True:
            signal.pause()
    finally:
        # A second signal must not cut the clean-up short and leave daemons or directories behind.
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        # Postfix first: it delivers into Dovecot's maildirs, which go with Dovecot's directory.
        postfix.stop()
        dovecot.stop()
        os.unlink(os.path.join(state, STATE_FILE))


def alive(pid: int, name: str) -> bool:
    """Whether pid is still a running process whose command line mentions name (pids get reused)."""
    try:
        with open("/proc/%d/stat" % pid) as stat:
            if stat.read().rpartition(")")[2].split()[0] == "Z":
                return False  # exited; its parent (perhaps not us) has yet to reap it
        with open("/proc/%d/cmdline" % pid, "rb") as cmdline:
            return name.encode() in cmdline.read()
    except (OSError, IndexError):
        return False


def stop_pid(pid: int, name: str, timeout: float = 30.0) -> None:
    """SIGTERM pid (if it is still `name`) and wait until it is gone; SIGKILL after timeout."""
    if not alive(pid, name):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while alive(pid, name):
        if time.monotonic() > deadline:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return  # it exited between the check and the kill
            deadline = time.monotonic() + timeout
        time.sleep(0.05)


def stop(state: str) -> int:
    path = os.path.join(state, STATE_FILE)
    try:
        with open(path) as record:
            instances = json.load(record)
    except FileNotFoundError:
        return 0
    stop_pid(instances["supervisor"], "localmail")
    if not os.path.exists(path):
        return 0  # the supervisor stopped both instances and removed their directories
    # The supervisor was gone (killed, crashed): stop what it recorded, master before its launcher.
    postfix, dovecot = instances.get("postfix", {}), instances.get("dovecot", {})
    if postfix.get("master"):
        stop_pid(postfix["master"], "master")
    if postfix.get("pid"):
        stop_pid(postfix["pid"], "postfix")
    if dovecot.get("pid"):
        stop_pid(dovecot["pid"], "dovecot")
    for instance in (postfix, dovecot):
        if instance.get("root"):
            shutil.rmtree(instance["root"], ignore_errors=True)
    os.unlink(path)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tools.localmail", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve_command = commands.add_parser("serve", help="run private Dovecot and Postfix until SIGTERM")
    serve_command.add_argument("--state", required=True, help="directory for localmail.json")
    serve_command.add_argument("--users", required=True, help="mailproxy-auth users file to take users from")
    serve_command.add_argument("--users-out", required=True, help="that file, routed to these instances")
    stop_command = commands.add_parser("stop", help="stop what `serve` started, by pid from the state dir")
    stop_command.add_argument("--state", required=True)
    stop_pid_command = commands.add_parser("stop-pid", help="SIGTERM a process and wait until it is gone")
    stop_pid_command.add_argument("pid", type=int)
    stop_pid_command.add_argument("name", help="a word of its command line (guards against pid reuse)")
    args = parser.parse_args(argv)
    if args.command == "serve":
        for binary in (DOVECOT, POSTFIX):
            if not os.access(binary, os.X_OK):
                parser.error("%s is not installed" % binary)
        return serve(args.state, args.users, args.users_out)
    if args.command == "stop":
        return stop(args.state)
    stop_pid(args.pid, args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
