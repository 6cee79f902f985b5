"""A scriptable DNS server on 127.0.0.1 (UDP and TCP, one port) for the resolver tests.

    dns = DnsServer()                        # bound and serving when the constructor returns
    dns.ptr("127.0.0.1", "mx.example.test")  # 1.0.0.127.in-addr.arpa PTR mx.example.test.
    dns.a("mx.example.test", "127.0.0.1")
    dns.fail("2.0.0.127.in-addr.arpa", "PTR", dns.rcode.SERVFAIL)
    dns.silent("3.0.0.127.in-addr.arpa", "PTR")
    dns.count("mx.example.test", "A")        # queries seen, to prove the cache
    dns.wait_query("mx.example.test", "A")   # until one has arrived
    dns.close()

Names without any rule answer NXDOMAIN; a name with rules for other types answers NOERROR with an
empty answer section, as a real zone does. It answers from its own thread with plain sockets, so it
works whether or not the test process runs gevent; delayed answers go out from timers, so one slow
answer does not hold up the others.
"""

import select
import socket
import struct
import threading

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.PTR
import dns.reversename
import dns.rrset


def raw_name(text):
    """A name from dotted text taken byte for byte, so a test can serve names no zone file allows."""
    labels = [label.encode("latin-1") for label in text.split(".")] if text else []
    return dns.name.Name(labels + [b""])


class _Rule:
    def __init__(self, rcode=dns.rcode.NOERROR, records=(), ttl=300, delay=0.0, silent=False,
                 garbage=False, truncate=False):
        self.rcode, self.records, self.ttl, self.delay = rcode, list(records), ttl, delay
        self.silent, self.garbage, self.truncate = silent, garbage, truncate


class DnsServer:
    def __init__(self):
        self.rules = {}  # (lower-case name text, rdtype) -> _Rule
        self.queries = []  # (name text, rdtype text, "udp"|"tcp") in arrival order
        self.lock = threading.Lock()
        self.arrived = threading.Condition(self.lock)
        self.timers = []
        self.udp, self.tcp = _bind_pair()
        self.port = self.udp.getsockname()[1]
        self.address = "127.0.0.1:%d" % self.port
        self._wake_r, self._wake_w = socket.socketpair()
        self.thread = threading.Thread(target=self._serve, name="dnsserver", daemon=True)
        self.thread.start()

    # -- the table -------------------------------------------------------------------------------

    def ptr(self, ip, name, ttl=300, delay=0.0):
        qname = dns.reversename.from_address(ip).to_text()
        rdata = dns.rdtypes.ANY.PTR.PTR(dns.rdataclass.IN, dns.rdatatype.PTR, raw_name(name))
        self._set(qname, "PTR", _Rule(records=[rdata], ttl=ttl, delay=delay))

    def a(self, name, *addresses, ttl=300, delay=0.0, truncate=False):
        self._address_rule(name, "A", addresses, ttl, delay, truncate)

    def aaaa(self, name, *addresses, ttl=300, delay=0.0):
        self._address_rule(name, "AAAA", addresses, ttl, delay, False)

    def cname(self, name, rdtype, target, ttl=300):
        rdata = dns.rdata.from_text("IN", "CNAME", target + ".")
        self._set(name, rdtype, _Rule(records=[rdata], ttl=ttl))

    def empty(self, name, rdtype):
        """NOERROR with no answer (the name exists, not with this type)."""
        self._set(name, rdtype, _Rule())

    def fail(self, name, rdtype, rcode, delay=0.0):
        self._set(name, rdtype, _Rule(rcode=rcode, delay=delay))

    def silent(self, name, rdtype):
        self._set(name, rdtype, _Rule(silent=True))

    def garbage(self, name, rdtype):
        """Answer with the right id and bytes that do not parse as a DNS message."""
        self._set(name, rdtype, _Rule(garbage=True))

    def count(self, name, rdtype):
        key = (_key_name(name), rdtype)
        with self.lock:
            return sum(1 for q in self.queries if (q[0], q[1]) == key)

    def wait_query(self, name, rdtype, timeout=10.0):
        """Block until a query for (name, rdtype) has arrived (it may still be unanswered)."""
        key = (_key_name(name), rdtype)
        with self.arrived:
            if not self.arrived.wait_for(lambda: any((q[0], q[1]) == key for q in self.queries), timeout):
                raise AssertionError("no %s query for %s reached the DNS server" % (rdtype, name))

    def _address_rule(self, name, rdtype, addresses, ttl, delay, truncate):
        records = [dns.rdata.from_text("IN", rdtype, address) for address in addresses]
        self._set(name, rdtype, _Rule(records=records, ttl=ttl, delay=delay, truncate=truncate))

    def _set(self, name, rdtype, rule):
        with self.lock:
            self.rules[(_key_name(name), rdtype)] = rule

    # -- serving ---------------------------------------------------------------------------------

    def close(self):
        self._wake_w.send(b"x")
        self.thread.join(5)
        with self.lock:
            for timer in self.timers:
                timer.cancel()
        for sock in (self.udp, self.tcp, self._wake_r, self._wake_w):
            sock.close()

    def _serve(self):
        while True:
            readable, _, _ = select.select([self.udp, self.tcp, self._wake_r], [], [])
            if self._wake_r in readable:
                return
            if self.udp in readable:
                data, peer = self.udp.recvfrom(65535)
                self._answer(data, lambda wire, peer=peer: self._send_udp(wire, peer), "udp")
            if self.tcp in readable:
                conn, _ = self.tcp.accept()
                threading.Thread(target=self._serve_tcp, args=(conn,), daemon=True).start()

    def _send_udp(self, wire, peer):
        try:
            self.udp.sendto(wire, peer)
        except OSError:
            pass  # closed by close() while a delayed answer was pending: nobody waits for it now

    def _serve_tcp(self, conn):
        with conn:
            conn.settimeout(10)
            try:
                (length,) = struct.unpack("!H", _recv_exact(conn, 2))
                data = _recv_exact(conn, length)
            except (OSError, EOFError):
                return  # the client gave up; the next test does not care
            done = threading.Event()

            def reply(wire):
                try:
                    conn.sendall(struct.pack("!H", len(wire)) + wire)
                finally:
                    done.set()

            self._answer(data, reply, "tcp")
            done.wait(10)

    def _answer(self, data, reply, transport):
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return
        question = query.question[0]
        name = question.name.to_text().lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        with self.lock:
            self.queries.append((name, rdtype, transport))
            self.arrived.notify_all()
            rule = self.rules.get((name, rdtype))
            known = any(key[0] == name for key in self.rules)
        if rule is None:
            rule = _Rule() if known else _Rule(rcode=dns.rcode.NXDOMAIN)
        if rule.silent:
            return
        if rule.garbage:
            wire = data[:2] + b"\x81\x80garbage"
        else:
            response = dns.message.make_response(query)
            response.set_rcode(rule.rcode)
            if rule.truncate and transport == "udp":
                response.flags |= dns.flags.TC
            elif rule.records:
                rrset = dns.rrset.RRset(question.name, dns.rdataclass.IN, rule.records[0].rdtype)
                for rdata in rule.records:
                    rrset.add(rdata)
                rrset.ttl = rule.ttl
                response.answer.append(rrset)
            wire = response.to_wire()
        if rule.delay:
            timer = threading.Timer(rule.delay, reply, args=(wire,))
            with self.lock:
                self.timers.append(timer)
            timer.start()
        else:
            reply(wire)


def _key_name(name):
    name = name.lower()
    return name if name.endswith(".") else name + "."


def _bind_pair():
    """A UDP and a TCP socket on the same free port (the kernel picks UDP's; TCP may find it taken)."""
    for _ in range(50):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            tcp.bind(("127.0.0.1", udp.getsockname()[1]))
        except OSError:
            udp.close()
            tcp.close()
            continue
        tcp.listen(16)
        return udp, tcp
    raise RuntimeError("no port free for both UDP and TCP")


def _recv_exact(conn, size):
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise EOFError()
        data += chunk
    return data
