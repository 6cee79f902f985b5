"""Certificates by SNI name at scale (issue 18 item 2): `ssl_certificate certs/$ssl_server_name.pem;`
with N certificate files on disk, one IMAPS server, one worker.

    python bench/cert_domains.py [--domains 10000] [--latency-names 200] [--memory-names 1000]

Run by hand (not part of the test suite). It measures:

* master start (exec to the first TLS greeting on the port) with N files present vs with 10: the files
  are read by the worker at first use, so the two should not differ;
* the first handshake for a name (its files are read and a context made) vs the same names again
  (served from the worker's LRU cache, which still stats the files), beside the default certificate;
* memory per loaded certificate: worker RSS / PSS growth after loading M distinct names, divided by M;
* beside Debian's nginx where it can do the same work: nginx's mail module takes `$ssl_server_name` in
  `ssl_certificate` as a literal file name (`nginx -t` fails), so it serves one certificate per
  listening address; its start and default-certificate handshake are measured with the default pair.

Each client handshake is a fresh Python ssl socket with server_hostname set, verifying the chain and the
name, and no session offered (so nothing is resumed). Writes bench/results/cert_domains.md.
"""

import argparse
import datetime
import os
import platform
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tools.ports import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results", "cert_domains.md")

# One IMAPS server. mailproxy finds a certificate by the client's server name beside the default pair;
# nginx gets the same server less what it cannot take (BY_NAME), and a pid file in its prefix.
CONFIG = """
%(head)s
worker_processes 1;
error_log %(prefix)slogs/error.log error;
events { worker_connections 1024; }
mail {
    auth_http 127.0.0.1:1/auth;
    server {
        listen 127.0.0.1:%(port)d ssl;
        protocol imap;
        ssl_certificate %(certs)s/default.pem;
        ssl_certificate_key %(certs)s/default.key;%(by_name)s
    }
}
"""
BY_NAME = """
        ssl_certificate %(certs)s/$ssl_server_name.pem;
        ssl_certificate_key %(certs)s/$ssl_server_name.key;"""


def mailproxy_config(port, certs):
    return CONFIG % dict(head="user root;", prefix="", port=port, certs=certs, by_name=BY_NAME % dict(certs=certs))


def nginx_config(prefix, port, certs, by_name=False):
    head = "load_module %s;\npid %s/logs/nginx.pid;" % (NGINX_MAIL_MODULE, prefix)
    return CONFIG % dict(head=head, prefix=prefix + "/", port=port, certs=certs,
                         by_name=BY_NAME % dict(certs=certs) if by_name else "")


NGINX = "/usr/sbin/nginx"
NGINX_MAIL_MODULE = "/usr/lib/nginx/modules/ngx_mail_module.so"


def name_of(i):
    return "d%05d.example.test" % i



class Certificates:
    """One CA; a default pair and ``count`` leaf pairs, all P-256, written to ``root``."""

    def __init__(self, root, count):
        self.root = root
        now = datetime.datetime.now(datetime.timezone.utc)
        self.not_before, self.not_after = now - datetime.timedelta(days=1), now + datetime.timedelta(days=30)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cert_domains bench CA")])
        self.ca = (self._builder(self.ca_name, self.ca_key.public_key())
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(self.ca_key, hashes.SHA256()))
        self.ca_path = os.path.join(root, "ca.pem")
        with open(self.ca_path, "wb") as out:
            out.write(self.ca.public_bytes(serialization.Encoding.PEM))
        started = time.perf_counter()
        self.issue("default.example.test", "default")
        for i in range(count):
            self.issue(name_of(i), name_of(i))
        self.seconds = time.perf_counter() - started

    def _builder(self, subject, public_key):
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(self.ca_name)
                .public_key(public_key).serial_number(x509.random_serial_number())
                .not_valid_before(self.not_before).not_valid_after(self.not_after))

    def issue(self, name, stem):
        # A key of its own per certificate, as real domains have: P-256 keys take microseconds to make,
        # and a shared key would let OpenSSL's per-context memory look smaller than it is.
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (self._builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), key.public_key())
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
                .sign(self.ca_key, hashes.SHA256()))
        with open(os.path.join(self.root, stem + ".pem"), "wb") as out:
            out.write(cert.public_bytes(serialization.Encoding.PEM))
        with open(os.path.join(self.root, stem + ".key"), "wb") as out:
            out.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))


class Master:
    """One mailproxy master (foreground) with one worker, on its own prefix and port."""

    def __init__(self, certs_dir, ca_path):
        self.prefix = tempfile.mkdtemp(prefix="certdom")
        os.makedirs(os.path.join(self.prefix, "logs"))
        self.port = free_port()
        self.conf = os.path.join(self.prefix, "mailproxy.conf")
        with open(self.conf, "w") as out:
            out.write(mailproxy_config(self.port, certs_dir))
        self.ca_path = ca_path
        self.versions = set()  # TLS versions negotiated, for the report
        # READY=1 on a notify socket (as systemd's) says the master is up without polling its port; the
        # socket name must stay under 108 bytes, hence its own short directory.
        self.notify_dir = tempfile.mkdtemp(prefix="mpn")
        self.notify_path = os.path.join(self.notify_dir, "n")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(self.notify_path)
        env = dict(os.environ, PYTHONPATH=ROOT, NOTIFY_SOCKET=self.notify_path)
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "mailproxy.cli", "-p", self.prefix, "-c", self.conf,
                                      "-g", "daemon off;"], env=env, cwd=self.prefix,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            self.start_seconds = self._wait_greeting(timeout=60)
        except BaseException:
            self.stop()  # the caller never gets this object to stop, so its processes end here
            raise

    def _wait_greeting(self, timeout):
        """Seconds from exec until a TLS client gets the IMAP greeting (a worker is serving).

        After READY=1 the listening socket exists, so the connection waits in its backlog until the
        worker accepts it: the greeting marks the first moment a client is served."""
        deadline = self.started + timeout
        while True:
            remaining = deadline - time.perf_counter()
            if remaining <= 0 or self.proc.poll() is not None:
                raise RuntimeError("master not ready (exit %s): %s\n%s" % (
                    self.proc.poll(), self.proc.stderr.read().decode() if self.proc.poll() is not None else "",
                    self.error_log()))
            self.notify.settimeout(min(remaining, 0.5))
            try:
                message = self.notify.recv(4096).decode()
            except socket.timeout:
                continue
            if "READY=1" in message.split("\n"):
                break
        self.handshake(None, greeting=True)
        return time.perf_counter() - self.started

    def handshake(self, name, greeting=False):
        """Seconds for TCP connect + TLS handshake with ``name`` as SNI (None: no SNI)."""
        ctx = ssl.create_default_context(cafile=self.ca_path)
        if name is None:
            ctx.check_hostname = False  # no SNI: the default certificate, checked below by its name
        expected = name or "default.example.test"
        began = time.perf_counter()
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as raw:
            with ctx.wrap_socket(raw, server_hostname=name) as tls:
                spent = time.perf_counter() - began
                self.versions.add(tls.version())
                subject = dict(pair[0] for pair in tls.getpeercert()["subject"])
                if subject["commonName"] != expected:
                    raise RuntimeError("%s got the certificate of %s" % (expected, subject["commonName"]))
                if greeting:
                    line = tls.recv(200)
                    if not line.startswith(b"* OK"):
                        raise RuntimeError("no greeting: %r" % line)
        return spent

    def worker(self):
        with open("/proc/%d/task/%d/children" % (self.proc.pid, self.proc.pid)) as handle:
            pids = [int(pid) for pid in handle.read().split()]
        if len(pids) != 1:
            raise RuntimeError("expected one worker, found %s" % pids)
        return pids[0]

    def memory_kib(self):
        """(RSS, PSS) of the worker in KiB."""
        figures = {}
        with open("/proc/%d/smaps_rollup" % self.worker()) as handle:
            for line in handle:
                field, _, rest = line.partition(":")
                if field in ("Rss", "Pss"):
                    figures[field] = int(rest.split()[0])
        return figures["Rss"], figures["Pss"]

    def error_log(self):
        try:
            with open(os.path.join(self.prefix, "logs", "error.log"), errors="replace") as handle:
                return handle.read()
        except FileNotFoundError:
            return ""

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                # Either master reaps its worker on TERM; if it hangs, KILL it and its one worker by pid.
                for pid in self._children():
                    os.kill(pid, signal.SIGKILL)
                self.proc.kill()
                self.proc.wait(10)
        self.proc.stderr.close()
        if self.notify is not None:  # nginx has no readiness notification
            self.notify.close()
            shutil.rmtree(self.notify_dir)
        shutil.rmtree(self.prefix)

    def _children(self):
        try:
            with open("/proc/%d/task/%d/children" % (self.proc.pid, self.proc.pid)) as handle:
                return [int(pid) for pid in handle.read().split()]
        except FileNotFoundError:
            return []


class NginxMaster(Master):
    """Debian's nginx (master and one worker) with NGINX_CONFIG; it has no readiness notification, so
    start time is exec to the first TLS greeting, polled every 5 ms."""

    def __init__(self, certs_dir, ca_path):
        self.prefix = tempfile.mkdtemp(prefix="certdom-nginx")
        os.makedirs(os.path.join(self.prefix, "logs"))
        self.port = free_port()
        self.conf = os.path.join(self.prefix, "nginx.conf")
        with open(self.conf, "w") as out:
            out.write(nginx_config(self.prefix, self.port, certs_dir))
        self.ca_path = ca_path
        self.versions = set()
        self.notify = self.notify_dir = None
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([NGINX, "-p", self.prefix, "-c", self.conf, "-g", "daemon off;"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = self.started + 60
            while True:
                if self.proc.poll() is not None or time.perf_counter() > deadline:
                    raise RuntimeError("nginx not ready (exit %s): %s" % (self.proc.poll(), self.error_log()))
                try:
                    self.handshake(None, greeting=True)
                    break
                except (ConnectionRefusedError, ssl.SSLError):
                    time.sleep(0.005)
            self.start_seconds = time.perf_counter() - self.started
        except BaseException:
            self.stop()
            raise


def nginx_refusal(certs_dir):
    """What `nginx -t` says of the $ssl_server_name configuration (the last line of its complaint)."""
    prefix = tempfile.mkdtemp(prefix="certdom-nginx-t")
    try:
        os.makedirs(os.path.join(prefix, "logs"))
        conf = os.path.join(prefix, "nginx.conf")
        with open(conf, "w") as out:
            out.write(nginx_config(prefix, free_port(), certs_dir, by_name=True))
        done = subprocess.run([NGINX, "-t", "-p", prefix, "-c", conf], capture_output=True, text=True)
        emerg = [line for line in done.stderr.splitlines() if "[emerg]" in line]
        if done.returncode == 0 or not emerg:
            return "nginx -t accepted it (exit %d)" % done.returncode
        return emerg[0].split("[emerg]", 1)[1].split(":", 1)[1].split(" (SSL:")[0].strip()
    finally:
        shutil.rmtree(prefix)


def ms(values):
    return "%.2f" % (1000 * statistics.median(values))


def p90(values):
    return "%.2f" % (1000 * sorted(values)[int(0.9 * (len(values) - 1))])


def machine():
    with open("/proc/meminfo") as meminfo:
        mem_kib = int(meminfo.readline().split()[1])
    model = "unknown"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return [("CPUs (nproc)", str(os.cpu_count())), ("CPU model", model),
            ("memory", "%.1f GiB" % (mem_kib / (1 << 20))), ("kernel", platform.release()),
            ("Python", platform.python_version()), ("OpenSSL (Python's ssl)", ssl.OPENSSL_VERSION),
            ("cryptography", metadata.version("cryptography")), ("nginx", _nginx_version()),
            ("mailproxy", "git HEAD %s, plus the working tree" % (commit or "?"))]


def _nginx_version():
    try:
        return subprocess.run([NGINX, "-v"], capture_output=True, text=True).stderr.strip().split(": ", 1)[-1]
    except OSError:
        return "not installed"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domains", type=int, default=10000, help="certificate pairs on disk")
    parser.add_argument("--latency-names", type=int, default=200, help="distinct names timed")
    parser.add_argument("--memory-names", type=int, default=1000, help="distinct names loaded for memory")
    parser.add_argument("--starts", type=int, default=5, help="master starts per file count")
    parser.add_argument("--output", default=RESULTS)
    args = parser.parse_args()
    if args.latency_names + args.memory_names > args.domains:
        parser.error("--domains must cover --latency-names + --memory-names")
    if args.memory_names > 1000:
        parser.error("at most 1000 memory names: the worker keeps 1000 contexts (tls/by_name.py's CACHE_SIZE)")

    began = time.perf_counter()
    scratch = tempfile.mkdtemp(prefix="certdom-files")
    masters = []
    try:
        many_dir, few_dir = os.path.join(scratch, "many"), os.path.join(scratch, "few")
        os.makedirs(many_dir)
        os.makedirs(few_dir)
        print("generating %d + 10 certificates ..." % args.domains, flush=True)
        many = Certificates(many_dir, args.domains)
        few = Certificates(few_dir, 10)

        # Start times, the two file counts alternating so drift on a shared machine hits both alike.
        starts = {"many": [], "few": []}
        for _ in range(args.starts):
            for label, certs in (("few", few), ("many", many)):
                master = Master(certs.root, certs.ca_path)
                masters.append(master)
                starts[label].append(master.start_seconds)
                master.stop()
                masters.remove(master)
        print("start: few %s ms, many %s ms" % (ms(starts["few"]), ms(starts["many"])), flush=True)

        # Latency: one master with all N files; names 0.. first (files read), then again (cached).
        master = Master(many.root, many.ca_path)
        masters.append(master)
        for _ in range(20):  # warm up the worker's code paths and the client on the default certificate
            master.handshake(None)
        default = [master.handshake(None) for _ in range(args.latency_names)]
        names = [name_of(i) for i in range(args.latency_names)]
        first = [master.handshake(name) for name in names]
        versions = sorted(master.versions)
        cached = [master.handshake(name) for name in names]
        no_file = []
        for i in range(args.latency_names):
            absent = "absent%05d.example.test" % i
            ctx = ssl.create_default_context(cafile=many.ca_path)
            ctx.check_hostname = False  # the default certificate answers a name without files
            t0 = time.perf_counter()
            with socket.create_connection(("127.0.0.1", master.port), timeout=30) as raw:
                with ctx.wrap_socket(raw, server_hostname=absent):
                    no_file.append(time.perf_counter() - t0)
        master.stop()
        masters.remove(master)
        print("handshake: default %s, first %s, cached %s, no file %s ms" % (
            ms(default), ms(first), ms(cached), ms(no_file)), flush=True)

        # nginx, where it can do the same work: start and the default certificate, alternating with a
        # fresh mailproxy so that both meet the same machine.
        nginx_starts, nginx_default, mailproxy_default = [], [], []
        have_nginx = os.path.exists(NGINX) and os.path.exists(NGINX_MAIL_MODULE)
        if have_nginx:
            refusal = nginx_refusal(many.root)
            for _ in range(args.starts):
                for kind in (NginxMaster, Master):
                    engine = kind(many.root, many.ca_path)
                    masters.append(engine)
                    if kind is NginxMaster:
                        nginx_starts.append(engine.start_seconds)
                    for _ in range(20):
                        engine.handshake(None)
                    timed = [engine.handshake(None) for _ in range(args.latency_names // args.starts)]
                    (nginx_default if kind is NginxMaster else mailproxy_default).extend(timed)
                    engine.stop()
                    masters.remove(engine)
            print("nginx: start %s ms, default handshake %s ms (mailproxy alongside %s ms)" % (
                ms(nginx_starts), ms(nginx_default), ms(mailproxy_default)), flush=True)

        # Memory: a fresh master, warmed on the default certificate, then M names it has not seen.
        master = Master(many.root, many.ca_path)
        masters.append(master)
        for _ in range(200):
            master.handshake(None)
        rss0, pss0 = master.memory_kib()
        offset = args.latency_names
        for i in range(offset, offset + args.memory_names):
            master.handshake(name_of(i))
        rss1, pss1 = master.memory_kib()
        # The same names again: memory that stays flat here is held by the contexts, not by garbage.
        for i in range(offset, offset + args.memory_names):
            master.handshake(name_of(i))
        rss2, pss2 = master.memory_kib()
        master.stop()
        masters.remove(master)
    finally:
        for master in masters:
            master.stop()
        shutil.rmtree(scratch)

    per_rss = (rss1 - rss0) / args.memory_names
    per_pss = (pss1 - pss0) / args.memory_names
    rows = [
        ("master start, 10 certificate pairs on disk", "ms", ms(starts["few"]),
         "median of %d; exec to first TLS greeting" % args.starts),
        ("master start, %s certificate pairs on disk" % format(args.domains, ","), "ms", ms(starts["many"]),
         "median of %d; nothing is read at start" % args.starts),
        ("handshake, default certificate (no SNI)", "ms", ms(default), "p90 %s; %d handshakes" % (
            p90(default), len(default))),
        ("handshake, first use of a name (files read)", "ms", ms(first), "p90 %s; %d distinct names" % (
            p90(first), len(first))),
        ("handshake, same names again (cached context)", "ms", ms(cached), "p90 %s" % p90(cached)),
        ("handshake, name without files (default served)", "ms", ms(no_file), "p90 %s; one failed stat" %
         p90(no_file)),
        ("worker RSS per loaded certificate", "KiB", "%.1f" % per_rss, "RSS %d -> %d KiB over %d names" % (
            rss0, rss1, args.memory_names)),
        ("worker PSS per loaded certificate", "KiB", "%.1f" % per_pss, "PSS %d -> %d KiB; %d KiB after "
         "the same names again" % (pss0, pss1, pss2)),
    ]
    if have_nginx:
        rows += [
            ("nginx: master start, default pair only", "ms", ms(nginx_starts),
             "median of %d; exec to first TLS greeting (polled every 5 ms); ratio mailproxy/nginx %.2f" % (
                 len(nginx_starts), statistics.median(starts["many"]) / statistics.median(nginx_starts))),
            ("nginx: handshake, default certificate", "ms", ms(nginx_default),
             "p90 %s; mailproxy in the same rounds %s ms (ratio %.2f)" % (
                 p90(nginx_default), ms(mailproxy_default),
                 statistics.median(mailproxy_default) / statistics.median(nginx_default))),
            ("nginx: certificate by SNI name", "", "cannot", "`nginx -t`: %s" % refusal),
        ]
    command = "python bench/cert_domains.py --domains %d --latency-names %d --memory-names %d --starts %d" % (
        args.domains, args.latency_names, args.memory_names, args.starts)
    lines = ["# Certificates by SNI name: %s domains, one worker" % format(args.domains, ","), "",
             "Made by `%s` (%.0f s, %s UTC). One IMAPS server with `ssl_certificate certs/$ssl_server_name.pem;`"
             % (command, time.perf_counter() - began, datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M")),
             "and its key beside a default pair, `worker_processes 1`, `user root`. %s P-256 certificates, each "
             "with its own key, signed by one CA (generated in %.1f s). Handshakes are fresh Python `ssl` "
             "clients (%s, no session offered) verifying chain and name; times include TCP connect. "
             "Client and server share the machine's cores, so times are relative." % (
                 format(args.domains, ","), many.seconds, " / ".join(versions)), "",
             "| metric | unit | value | notes |", "|---|---|--:|---|"]
    lines += ["| %s | %s | %s | %s |" % row for row in rows]
    lines += ["", "| machine | |", "|---|---|"] + ["| %s | %s |" % fact for fact in machine()]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as out:
        out.write(text)


if __name__ == "__main__":
    main()
