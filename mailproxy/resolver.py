"""The SMTP client's host name (spec 5): a PTR lookup confirmed by A/AAAA, over gevent sockets.

dnspython builds and parses the messages; the exchange is ours, on gevent sockets named explicitly, so
that a slow DNS server parks only the greenlet that waits for it, whether or not the process is
monkey-patched (the unit tests are not). Each worker keeps one ``Resolver`` per distinct `resolver`
configuration, with its cache; nothing is shared between workers, as in nginx.

What a lookup yields mirrors nginx's resolver, because the log lines and the
[UNAVAILABLE]/[TEMPUNAVAIL] split depend on it:
- an rcode other than NOERROR is the error, answers are not cached;
- NOERROR with an empty answer section is "Host not found" (3);
- a reply that cannot be parsed, or answers none of the question, is ignored: the query waits on,
  is re-sent to the next server, and ends as "Operation timed out" (110) if nothing better comes;
- A and AAAA go out together; if either fails the name fails, even if the other matched (when
  both fail nginx reports the later answer's error, we report AAAA's), else the addresses of both
  count, and none at all is "Host not found".
"""

import ipaddress
import struct
import time

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.reversename

# dnspython imports an rdata module the first time it meets the type; a worker that has dropped its
# privileges may no longer be able to read them, so the types a lookup can meet are loaded now.
import dns.rdtypes.ANY.CNAME  # noqa: F401
import dns.rdtypes.ANY.NS  # noqa: F401
import dns.rdtypes.ANY.PTR  # noqa: F401
import dns.rdtypes.ANY.SOA  # noqa: F401
import dns.rdtypes.IN.A  # noqa: F401
import dns.rdtypes.IN.AAAA  # noqa: F401
import gevent
import gevent.event
import gevent.socket

UNAVAILABLE = "[UNAVAILABLE]"
TEMPUNAVAIL = "[TEMPUNAVAIL]"

FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED, TIMEDOUT = 1, 2, 3, 4, 5, 110
_ERROR_TEXTS = {
    FORMERR: "Format error",
    SERVFAIL: "Server failure",
    NXDOMAIN: "Host not found",
    NOTIMP: "Unimplemented",
    REFUSED: "Operation refused",
    TIMEDOUT: "Operation timed out",
}

ADDRESS_ACTION = "in resolving client address"
HOSTNAME_ACTION = "in resolving client hostname"

# nginx re-sends an unanswered query every 5 s, rotating through the servers.
RESEND_INTERVAL = 5.0
# CNAME chains longer than this are a loop or an attack, not a mail client's host name.
MAX_CNAMES = 16
_UDP_PAYLOAD = 65535
CACHE_LIMIT = 10000  # entries per worker and resolver


def error_text(code):
    return _ERROR_TEXTS.get(code, "Unknown error")


def valid_host_name(name):
    return bool(name) and all(c.isascii() and (c.isalnum() or c in "-.") for c in name)


def client_host(resolver, ip, log):
    """The host for Client-Host and XCLIENT NAME (spec 5 steps 3 and 4).

    ``log(action, level, message)`` reports each step's error with the action it happened in.
    """
    code, name = resolver.resolve_address(ip)
    if code:
        log(ADDRESS_ACTION, "error", "%s could not be resolved (%d: %s)" % (ip, code, error_text(code)))
        return UNAVAILABLE if code == NXDOMAIN else TEMPUNAVAIL
    if not valid_host_name(name):
        log(ADDRESS_ACTION, "error", '%s resolved to invalid host name "%s"' % (ip, name))
        return TEMPUNAVAIL
    code, addresses = resolver.resolve_name(name)
    if code:
        log(HOSTNAME_ACTION, "error", '"%s" could not be resolved (%d: %s)' % (name, code, error_text(code)))
        return UNAVAILABLE if code == NXDOMAIN else TEMPUNAVAIL
    client = ipaddress.ip_address(ip)
    return name if client in addresses else UNAVAILABLE


_resolvers = {}


def for_server(server):
    """The worker's resolver for a server block; blocks with the same `resolver` share it and its cache."""
    key = (server.resolver, server.resolver_valid, server.resolver_ipv4, server.resolver_ipv6,
           server.resolver_timeout)
    found = _resolvers.get(key)
    if found is None:
        found = _resolvers[key] = Resolver(
            server.resolver, server.resolver_timeout, valid=server.resolver_valid,
            ipv4=server.resolver_ipv4, ipv6=server.resolver_ipv6,
        )
    return found


def parse_server(text):
    """ "ip:port" or "[ipv6]:port", as the configuration prints them -> (family, ip, port)."""
    host, _, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") else host
    family = gevent.socket.AF_INET6 if ":" in host else gevent.socket.AF_INET
    return family, host, int(port)


class _Answer:
    """One question's outcome: an rcode-like ``code`` (0 = usable) and the records it brought."""

    __slots__ = ("code", "records", "ttl", "cname")

    def __init__(self, code, records=(), ttl=0, cname=None):
        self.code, self.records, self.ttl, self.cname = code, list(records), ttl, cname


class Resolver:
    def __init__(self, servers, timeout, valid=None, ipv4=True, ipv6=True, resend=RESEND_INTERVAL):
        self.servers = [parse_server(text) for text in servers]
        if not self.servers:
            raise ValueError("a resolver needs at least one server")
        self.timeout = timeout
        self.valid = valid
        self.types = [t for t, on in ((dns.rdatatype.A, ipv4), (dns.rdatatype.AAAA, ipv6)) if on]
        # Each server gets a share of the budget, so a dead first server cannot eat all of it.
        self.window = max(0.01, min(resend, timeout / len(self.servers)))
        self.cache = {}  # (name, rdtype) -> (expires, _Answer)
        self.pending = {}  # (name, rdtype) -> AsyncResult: one query in flight, the others wait on it
        self.next_server = 0

    # -- the two lookups of spec 5 ---------------------------------------------------------------

    def resolve_address(self, ip):
        """PTR of ``ip`` -> (0, name) or (code, None)."""
        qname = dns.reversename.from_address(ip)
        answer = self.query([(qname, dns.rdatatype.PTR)])[0]
        if answer.code:
            return answer.code, None
        target = answer.records[0].target
        labels = target.labels[:-1] if target.is_absolute() else target.labels
        return 0, b".".join(labels).decode("latin-1")

    def resolve_name(self, name):
        """A (and AAAA) of ``name`` -> (0, set of ipaddress objects) or (code, None)."""
        try:
            qname = dns.name.from_text(name)
        except dns.exception.DNSException:
            return FORMERR, None
        deadline = time.monotonic() + self.timeout
        questions = [(qname, rdtype) for rdtype in self.types]
        addresses, code = set(), 0
        for _ in range(MAX_CNAMES):
            answers = self.query(questions, deadline)
            follow = []
            for question, answer in zip(questions, answers):
                if answer.code:
                    code = answer.code
                elif answer.records:
                    addresses.update(ipaddress.ip_address(r.address) for r in answer.records)
                elif answer.cname is not None:
                    follow.append((answer.cname, question[1]))
            if code:
                return code, None
            if not follow:
                return (0, addresses) if addresses else (NXDOMAIN, None)
            questions = follow
        return (0, addresses) if addresses else (NXDOMAIN, None)

    # -- cache, de-duplication, exchange ----------------------------------------------------------

    def query(self, questions, deadline=None):
        """One _Answer per (qname, rdtype), from the cache, a query already in flight, or the servers."""
        if deadline is None:
            deadline = time.monotonic() + self.timeout
        answers, mine, theirs = {}, [], []
        for key in dict.fromkeys(questions):
            cached = self.cache_lookup(key)
            if cached is not None:
                answers[key] = cached
            elif key in self.pending:
                theirs.append((key, self.pending[key]))
            else:
                mine.append(key)
        if mine:
            results = {key: gevent.event.AsyncResult() for key in mine}
            self.pending.update(results)
            got = {}
            try:
                got = self.exchange(mine, deadline)
            finally:
                # Even when this greenlet is killed, the ones waiting on its queries must wake.
                for key in mine:
                    answer = got.get(key) or _Answer(TIMEDOUT)
                    del self.pending[key]
                    self.remember(key, answer)
                    results[key].set(answer)
                    answers[key] = answer
        for key, result in theirs:
            try:
                answers[key] = result.get(timeout=max(0.0, deadline - time.monotonic()))
            except gevent.Timeout:
                answers[key] = _Answer(TIMEDOUT)
        return [answers[key] for key in questions]

    def cache_lookup(self, key):
        cached = self.cache.get(key)
        if cached is None:
            return None
        if cached[0] > time.monotonic():
            return cached[1]
        del self.cache[key]
        return None

    def remember(self, key, answer):
        if answer.code or not (answer.records or answer.cname is not None):
            return  # nginx keeps no negative answers
        lifetime = self.valid if self.valid is not None else answer.ttl
        if lifetime <= 0:
            return
        now = time.monotonic()
        if len(self.cache) >= CACHE_LIMIT:
            # Clients from ever new addresses must not grow a worker without bound: drop what has
            # expired, and if that is not enough the oldest entries (dicts keep insertion order).
            for old in [k for k, (expires, _) in self.cache.items() if expires <= now]:
                del self.cache[old]
            while len(self.cache) >= CACHE_LIMIT:
                del self.cache[next(iter(self.cache))]
        self.cache.pop(key, None)
        self.cache[key] = (now + lifetime, answer)

    def exchange(self, questions, deadline):
        """Ask the servers until every question has an answer or the deadline passes.

        The queries go out together on one socket; unanswered ones are re-sent to the next server
        each ``window`` seconds. Returns {question: _Answer}; the missing ones timed out.
        """
        outstanding = {}  # query id -> (question, QueryMessage, wire)
        for question in questions:
            message = dns.message.make_query(question[0], question[1])
            while message.id in outstanding:  # ids are random: two alike would lose an answer
                message.id = dns.message.make_query(question[0], question[1]).id
            outstanding[message.id] = (question, message, message.to_wire())
        answers, sockets, asked = {}, {}, set()
        start = self.next_server
        self.next_server = (self.next_server + 1) % len(self.servers)
        try:
            attempt = 0
            while outstanding and time.monotonic() < deadline:
                family, ip, port = self.servers[(start + attempt) % len(self.servers)]
                attempt += 1
                window_end = min(deadline, time.monotonic() + self.window)
                sock = sockets.get(family)
                try:
                    if sock is None:
                        sock = sockets[family] = gevent.socket.socket(family, gevent.socket.SOCK_DGRAM)
                    asked.add((ip, port))
                    for _, _, wire in outstanding.values():
                        sock.sendto(wire, (ip, port))
                except OSError:
                    # This server is unreachable from here (no route, no IPv6): its window still
                    # passes, so that a lone bad server costs paced retries, not a busy loop.
                    if sock is None:
                        gevent.sleep(max(0.0, window_end - time.monotonic()))
                        continue
                self.collect(sock, outstanding, answers, asked, window_end, deadline)
        finally:
            for sock in sockets.values():
                sock.close()
        return answers

    def collect(self, sock, outstanding, answers, asked, window_end, deadline):
        while outstanding:
            remaining = window_end - time.monotonic()
            if remaining <= 0:
                return
            sock.settimeout(remaining)
            try:
                data, source = sock.recvfrom(_UDP_PAYLOAD)
            except gevent.socket.timeout:
                return
            except OSError:
                return  # an ICMP error for this server: move on to the next one
            if (_normal_ip(source[0]), source[1]) not in {(_normal_ip(a), p) for a, p in asked}:
                continue  # not from a server we asked: a stray or spoofed datagram
            try:
                reply = dns.message.from_wire(data)
            except dns.exception.DNSException:
                reply = _truncated_header(data)
                if reply is None:
                    continue
            entry = outstanding.get(reply.id)
            if entry is None or not entry[1].is_response(reply):
                continue
            if reply.flags & dns.flags.TC:
                reply = self.over_tcp(entry[2], entry[1], (source[0], source[1]), deadline)
                if reply is None:
                    continue
            answer = _read_answer(reply, entry[0])
            if answer is not None:
                answers[entry[0]] = answer
                del outstanding[reply.id]

    def over_tcp(self, wire, query, server, deadline):
        """A truncated UDP reply: the same question over TCP to the same server (RFC 7766)."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        try:
            with gevent.socket.create_connection(server, timeout=remaining) as conn:
                conn.settimeout(max(0.001, deadline - time.monotonic()))
                conn.sendall(struct.pack("!H", len(wire)) + wire)
                (length,) = struct.unpack("!H", _recv_exact(conn, 2))
                reply = dns.message.from_wire(_recv_exact(conn, length))
        except (OSError, EOFError, dns.exception.DNSException):
            return None
        return reply if query.is_response(reply) else None


def _read_answer(reply, question):
    """The _Answer a reply gives ``question``, or None if the reply is no use (nginx waits on)."""
    rcode = reply.rcode()
    if rcode != dns.rcode.NOERROR:
        return _Answer(int(rcode))
    if not reply.answer:
        return _Answer(NXDOMAIN) if question[1] == dns.rdatatype.PTR else _Answer(0)
    records, ttl, cname = [], None, None
    for rrset in reply.answer:
        if rrset.rdclass != dns.rdataclass.IN:
            continue
        if rrset.rdtype == question[1]:
            records.extend(rrset)
            ttl = rrset.ttl if ttl is None else min(ttl, rrset.ttl)
        elif rrset.rdtype == dns.rdatatype.CNAME and question[1] != dns.rdatatype.PTR:
            cname, cname_ttl = rrset[0].target, rrset.ttl
    if records:
        return _Answer(0, records, ttl)
    if cname is not None:
        return _Answer(0, ttl=cname_ttl, cname=cname)
    return None


def _truncated_header(data):
    """A UDP reply cut off in its records still says TC=1, and that is all we need from it."""
    try:
        reply = dns.message.from_wire(data, question_only=True)
    except dns.exception.DNSException:
        return None
    return reply if reply.flags & dns.flags.TC else None


def _recv_exact(conn, size):
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise EOFError("DNS server closed the TCP connection")
        data += chunk
    return data


def _normal_ip(text):
    return ipaddress.ip_address(text.split("%", 1)[0])
