"""Real PostgreSQL and OpenLDAP (slapd) servers for the store tests and bench/auth_stores.py.

Each lives in a fresh temporary directory, listens on a free 127.0.0.1 port, runs as its Debian
package's unprivileged user (PostgreSQL refuses root; slapd drops to openldap), is ready when a real
client gets an answer (pg_isready, ldapsearch), and is stopped by pid. ``stop()`` keeps the data
so that ``start()`` brings the same server back on the same port (a store that went away and returns);
``remove()`` stops it and deletes the directory.
"""

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time

READY_TIMEOUT = 30.0
SLAPD = "/usr/sbin/slapd"
LDAPSEARCH = "/usr/bin/ldapsearch"
LDAPADD = "/usr/bin/ldapadd"
SCHEMAS = ("core", "cosine", "inetorgperson", "nis", "misc")
SUFFIX = "dc=example,dc=test"
ADMIN_DN = "cn=admin," + SUFFIX
SEARCH_DN = "cn=mailproxy," + SUFFIX


def postgres_bin():
    """The newest installed PostgreSQL's bin directory, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                   key=lambda path: int(path.split("/")[4]) if path.split("/")[4].isdigit() else 0)
    return os.path.dirname(found[-1]) if found else None


def _account(name):
    entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid


def _wait(ready, process, what, log):
    deadline = time.monotonic() + READY_TIMEOUT
    while not ready():
        if process.poll() is not None:
            raise RuntimeError("%s exited (%s): %s" % (what, process.returncode, _tail(log)))
        if time.monotonic() > deadline:
            raise RuntimeError("%s not ready: %s" % (what, _tail(log)))
        time.sleep(0.05)


def _tail(path):
    try:
        with open(path, errors="replace") as log:
            return log.read()[-3000:]
    except OSError as exc:
        return "(no log: %s)" % exc


def _stop(process, sig):
    if process is not None and process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class PostgreSQL:
    """A private cluster: superuser `postgres`, trust authentication on 127.0.0.1 only."""

    def __init__(self, port):
        self.bin = postgres_bin()
        self.port = port
        self.root = tempfile.mkdtemp(prefix="authstores-pg-")
        self.data = os.path.join(self.root, "data")
        self.log = os.path.join(self.root, "postgres.log")
        self.uid, self.gid = _account("postgres")
        os.chown(self.root, self.uid, self.gid)
        self.process = None
        # initdb runs once; start() after stop() reuses the cluster.
        self._run([os.path.join(self.bin, "initdb"), "-D", self.data, "-U", "postgres", "-A", "trust",
                   "-E", "UTF8", "--no-sync", "--no-instructions"])

    def _run(self, command, **kwargs):
        return subprocess.run(command, user=self.uid, group=self.gid, extra_groups=[], cwd=self.root,
                              capture_output=True, text=True, check=True, timeout=120, **kwargs)

    @property
    def url(self):
        return "postgresql://postgres@127.0.0.1:%d/mail" % self.port

    def start(self):
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(
                [os.path.join(self.bin, "postgres"), "-D", self.data, "-p", str(self.port),
                 "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=" + self.root,
                 "-c", "fsync=off", "-c", "max_connections=60"],
                user=self.uid, group=self.gid, extra_groups=[], cwd=self.root, stdout=log, stderr=log,
                stdin=subprocess.DEVNULL)

        def ready():
            return subprocess.run([os.path.join(self.bin, "pg_isready"), "-q", "-h", "127.0.0.1", "-p",
                                   str(self.port), "-t", "1"]).returncode == 0

        _wait(ready, self.process, "postgres", self.log)
        return self

    def sql(self, text, database="mail"):
        return self._run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(self.port),
                          "-U", "postgres", "-d", database], input=text).stdout

    def stop(self):
        _stop(self.process, signal.SIGINT)  # "fast" shutdown: clients are cut off at once
        self.process = None

    def remove(self):
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


SLAPD_CONF = """\
%(includes)s
pidfile %(root)s/run/slapd.pid
argsfile %(root)s/run/slapd.args
modulepath /usr/lib/ldap
moduleload back_mdb
TLSCACertificateFile %(ca)s
TLSCertificateFile %(cert)s
TLSCertificateKeyFile %(key)s
database mdb
maxsize 104857600
suffix "%(suffix)s"
rootdn "%(admin)s"
rootpw %(admin_password)s
directory %(root)s/db
# The search account may read the hashes (auth = password); everyone else may only bind with them.
access to attrs=userPassword by dn.exact="%(search)s" read by anonymous auth by * none
access to * by dn.exact="%(search)s" read by * none
"""


class Slapd:
    """A private OpenLDAP directory under dc=example,dc=test, on ldap:// (StartTLS offered) and ldaps://
    with the given certificate; `cn=mailproxy` is the search account."""

    def __init__(self, port, ldaps_port, cert, key, ca):
        self.port, self.ldaps_port = port, ldaps_port
        self.root = tempfile.mkdtemp(prefix="authstores-ldap-")
        os.chmod(self.root, 0o755)
        self.log = os.path.join(self.root, "slapd.log")
        self.admin_password = os.urandom(12).hex()
        self.search_password = os.urandom(12).hex()
        self.uid, self.gid = _account("openldap")
        os.makedirs(os.path.join(self.root, "db"))
        os.makedirs(os.path.join(self.root, "run"))
        for name, source in (("cert.pem", cert), ("key.pem", key), ("ca.pem", ca)):
            shutil.copy(source, os.path.join(self.root, name))
        for name in ("db", "run", "cert.pem", "key.pem", "ca.pem"):
            os.chown(os.path.join(self.root, name), self.uid, self.gid)
        self.conf = os.path.join(self.root, "slapd.conf")
        with open(self.conf, "w") as conf:
            conf.write(SLAPD_CONF % dict(
                includes="\n".join("include /etc/ldap/schema/%s.schema" % name for name in SCHEMAS),
                root=self.root, suffix=SUFFIX, admin=ADMIN_DN, admin_password=self.admin_password,
                search=SEARCH_DN, ca=os.path.join(self.root, "ca.pem"),
                cert=os.path.join(self.root, "cert.pem"), key=os.path.join(self.root, "key.pem")))
        os.chmod(self.conf, 0o640)
        os.chown(self.conf, 0, self.gid)
        self.password_file = os.path.join(self.root, "admin.secret")
        with open(self.password_file, "w") as secret:
            secret.write(self.admin_password)  # ldapadd -y: no newline, and no password in argv
        os.chmod(self.password_file, 0o600)
        self.process = None
        self.loaded = False

    @property
    def url(self):
        return "ldap://127.0.0.1:%d" % self.port

    def start(self):
        with open(self.log, "a") as log:
            # -d 0: in the foreground (the pid is ours to stop) without debug output.
            self.process = subprocess.Popen(
                [SLAPD, "-d", "0", "-f", self.conf, "-u", "openldap", "-g", "openldap",
                 "-h", "ldap://127.0.0.1:%d/ ldaps://127.0.0.1:%d/" % (self.port, self.ldaps_port)],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL)

        def ready():
            return subprocess.run([LDAPSEARCH, "-x", "-H", self.url, "-b", "", "-s", "base", "-o", "nettimeout=1",
                                   "namingContexts"], capture_output=True).returncode == 0

        _wait(ready, self.process, "slapd", self.log)
        if not self.loaded:
            self.add("dn: %s\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: example\n\n"
                     "dn: %s\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\ncn: mailproxy\n"
                     "userPassword: %s\n\n"
                     "dn: ou=people,%s\nobjectClass: organizationalUnit\nou: people\n"
                     % (SUFFIX, SEARCH_DN, self.search_password, SUFFIX))
            self.loaded = True
        return self

    def add(self, ldif):
        subprocess.run([LDAPADD, "-x", "-H", self.url, "-D", ADMIN_DN, "-y", self.password_file],
                       input=ldif, text=True, capture_output=True, check=True, timeout=60)

    def stop(self):
        _stop(self.process, signal.SIGTERM)
        self.process = None

    def remove(self):
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
