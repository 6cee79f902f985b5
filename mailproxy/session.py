"""One mail session: the place where the client's socket meets the client-facing protocol machines.

A greenlet runs ``handle`` from accept to the start of the relay: it greets the client, feeds its bytes
to the protocol machine, carries out the machine's actions, asks the auth server, has backend_login.py
log in to the backend and hands both sockets to the relay. Then the greenlet ends; the relay lives on io watchers alone, so an
idle relayed session costs no greenlet stack.
"""

import errno
import select
import socket
import ssl
import time

import gevent
from gevent import ssl as gevent_ssl
from gevent.monkey import get_original
from gevent.socket import wait_read

from mailproxy.auth_http import cache as auth_cache
from mailproxy.auth_http import request as auth_request
from mailproxy.auth_http.client import AuthHttpClient
from mailproxy.auth_http.response import (
    AuthError,
    AuthFail,
    AuthHttpError,
    AuthRetry,
    decide,
)
from mailproxy.protocol import imap, pop3, sieve, smtp, sasl
from mailproxy.protocol.common import Authenticate, Close, Log, Send, StartTLS, escape_for_log
from mailproxy.backend_login import BackendLogin, BackendLoginFailed
from mailproxy import log as errorlog
from mailproxy import metrics, session_log, throttle
from mailproxy import netio, proxy_protocol, relay, resolver
from mailproxy.tls import client as client_tls, openssl

_READ_SIZE = 16384


class _ProtocolSpec:
    """What differs between the three protocols at the session's level."""

    def __init__(self, name, config_class, machine_class):
        self.name = name
        self.config_class = config_class
        self.machine_class = machine_class


PROTOCOLS = {
    "imap": _ProtocolSpec("imap", imap.ImapConfig, imap.ImapMachine),
    "pop3": _ProtocolSpec("pop3", pop3.Pop3Config, pop3.Pop3Machine),
    "smtp": _ProtocolSpec("smtp", smtp.SmtpConfig, smtp.SmtpMachine),
    "sieve": _ProtocolSpec("sieve", sieve.SieveConfig, sieve.SieveMachine),
}

# Wire bytes and auth clients are prepared once per server block, not per session.
_configs = {}
_auth_clients = {}


def auth_client(server):
    entry = _auth_clients.get(id(server))
    if entry is None or entry[0] is not server:
        entry = (server, AuthHttpClient(server))
        _auth_clients[id(server)] = entry
    return entry[1]


def protocol_config(server):
    config = _configs.get(id(server))
    if config is None or config[0] is not server:
        config = (server, PROTOCOLS[server.protocol].config_class.from_server(server))
        _configs[id(server)] = config
    return config[1]


class SessionClosed(Exception):
    """The session ends here; everything worth logging was logged."""


def handle(sock, peer, listen, server, worker):
    session = Session(sock, peer, listen, server, worker)
    try:
        session.run()
    except SessionClosed:
        pass
    except gevent.GreenletExit:
        raise
    except Exception as exc:  # a bug must cost one session, never the worker
        session.result = "error"
        session.log_bug("session failed: %s: %s" % (type(exc).__name__, exc), exc)
    finally:
        session.release()


class Session:
    def __init__(self, sock, peer, listen, server, worker):
        self.sock = sock
        self.listen = listen
        self.server = server
        self.worker = worker
        self.spec = PROTOCOLS[server.protocol]
        self.number = worker.next_connection_number()
        self.client_ip, self.client_port = _address_text(peer, listen)
        self.use_log(server)
        self.action = None
        self.login = b""
        self.machine = None
        self.upstream = None
        self.deadline = None
        self.backend = None
        self.backend_tls = False
        self.handed_to_relay = False
        self.tls = False
        self.starttls = False  # nginx tags the session's log lines "using starttls" from STARTTLS on
        self.ssl_info = None
        self.proxy_protocol_info = None
        self.sni_name = None
        self.token = worker.session_started(self.close_now)
        # Observability (metrics.py, session_log.py): the result words are defined in session_log.py.
        self.started = time.monotonic()
        self.metrics = metrics.for_protocol(server.protocol)
        self.metrics.open.inc()
        self.metrics.sessions.inc()
        self.result = None
        self.method = None
        self.login_result = None
        self.ended = False

    # -- logging ---------------------------------------------------------------------------------

    def use_log(self, server):
        """The server's error_log; a client listed in debug_connection gets every level on it."""
        self.error_log = self.worker.log_for(server)
        # debug_connection: the client's own address (before any PROXY header), nginx's networks test.
        if proxy_protocol.trusted(self.client_ip, self.worker.config.main.debug_connection):
            self.error_log = errorlog.ConnectionLog(self.error_log)
        # Checked before a debug line's text is even formatted: at other levels they cost one test.
        self.debugging = self.error_log.enabled("debug")

    def debug(self, message):
        """nginx's debug lines: the connection number, no `while ..., client: ...` context."""
        self.error_log.log("debug", message, self.number)

    def log(self, level, message):
        if not self.error_log.enabled(level):
            return
        if level == "debug":
            self.debug(message)
            return
        parts = [message]
        if self.action:
            parts.append(" while " + self.action)
        starttls = " using starttls" if self.starttls else ""
        parts.append(", client: %s%s, server: %s" % (self.client_ip, starttls, self.listen.text))
        # Until the auth server has routed the session the client's own words name the login, as soon as
        # it gave them (nginx's s->login); from then on the login the auth server answered (Auth-User).
        login = self.login if self.upstream or self.machine is None else self.machine.login
        if login:
            parts.append(', login: "%s"' % escape_for_log(login))
        # nginx stops at an empty login: SMTP relay sessions (method none) never show their upstream.
        if login and self.upstream:
            parts.append(", upstream: %s" % self.upstream)
        self.error_log.log(level, "".join(parts), self.number)

    def log_bug(self, message, exc):
        """An exception no code path expects: `[alert]` with the session's context, then the traceback."""
        self.log("alert", message)
        for line in errorlog.traceback_lines(exc):
            self.error_log.log("alert", line, self.number)

    def log_while(self, action, level, message):
        """The logger for the edge modules (resolver, backend_login), which keep their own action."""
        self.action = action
        self.log(level, message)

    # -- the pre-relay phase ---------------------------------------------------------------------

    def run(self):
        if self.debugging:
            self.debug("accept: %s fd:%d" % (_peer_text(self.client_ip, self.client_port), self.sock.fileno()))
        if self.error_log.enabled("info"):
            self.error_log.log(
                "info",
                "client %s connected to %s" % (_peer_text(self.client_ip, self.client_port), self.listen.text),
                self.number,
            )
        self.arm_deadline()
        if self.listen.proxy_protocol:
            self.read_proxy_protocol()
        if self.listen.ssl:
            self.handshake()
        config = self.config = protocol_config(self.server)
        self.client_host = "[UNAVAILABLE]"
        if self.server.protocol == "smtp":
            self.client_host = self.resolve_client_host()
        if self.server.protocol == "pop3":
            salt = sasl.make_salt(self.server.server_name) if config.needs_salt else None
            self.machine = self.spec.machine_class(config, tls=self.tls, salt=salt)
        else:
            self.machine = self.spec.machine_class(config, tls=self.tls)
        self.action = "sending client greeting line"
        if self.server.protocol == "smtp" and self.server.smtp_greeting_delay > 0:
            self.delay_greeting()
        self.arm_deadline()
        self.execute(self.machine.greeting())
        self.action = "in auth state"
        while True:
            self.execute(self.machine.receive_data(self.recv()))

    def delay_greeting(self):
        self.action = "in delay pipelining state"
        self.sock.settimeout(self.server.smtp_greeting_delay)
        try:
            early = self.sock.recv(_READ_SIZE)
        except socket.timeout:
            self.action = "sending client greeting line"
            return
        except OSError as exc:
            self.fail_socket("recv", exc)
        if not early:
            raise SessionClosed()
        self.execute(self.machine.early_input(early))
        raise SessionClosed()

    def arm_deadline(self):
        self.deadline = time.monotonic() + self.server.timeout

    def recv(self):
        remaining = self.deadline - time.monotonic() if self.deadline else None
        if remaining is not None and remaining <= 0:
            self.timed_out()
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(_READ_SIZE)
        except socket.timeout:
            self.timed_out()
        except OSError as exc:
            self.fail_socket("recv", exc)
        if self.debugging:
            self.debug("recv: fd:%d %d of %d" % (self.sock.fileno(), len(data), _READ_SIZE))
        return data

    def timed_out(self):
        self.result = "timeout"
        self.log("info", "client timed out (110: Connection timed out)")
        raise SessionClosed()

    def fail_socket(self, call, exc):
        self.log("info", netio.failed_call(call, exc))
        raise SessionClosed()

    def send(self, data):
        self.sock.settimeout(self.server.timeout)
        try:
            netio.send_all(self.sock, data)
        except socket.timeout:
            self.timed_out()
        except OSError as exc:
            self.fail_socket("send", exc)
        if self.debugging:
            self.debug("send: fd:%d %d bytes" % (self.sock.fileno(), len(data)))

    def execute(self, actions):
        for action in actions:
            if isinstance(action, Send):
                self.send(action.data)
            elif isinstance(action, Log):
                self.log(action.level, action.message)
            elif isinstance(action, Close):
                raise SessionClosed()
            elif isinstance(action, Authenticate):
                self.authenticate(action.request)
            elif isinstance(action, StartTLS):
                self.start_tls()
            else:
                raise TypeError("unknown action %r" % (action,))

    # -- hooks filled by the edge modules (PROXY protocol, TLS, resolver) --------------------------

    def read_proxy_protocol(self):
        """listen ... proxy_protocol: read the header, apply set_real_ip_from (spec 2.0.10)."""
        self.action = "reading PROXY protocol"
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            self.timed_out()
        self.sock.settimeout(remaining)
        try:
            # One peek, as nginx: a header split across segments is refused rather than waited for,
            # and nothing past the header leaves the kernel buffer before the machine wants it.
            peeked = self.sock.recv(proxy_protocol.PEEK_SIZE, socket.MSG_PEEK)
        except socket.timeout:
            self.timed_out()
        except OSError as exc:
            self.fail_socket("recv", exc)
        try:
            header, consumed = proxy_protocol.parse(peeked)
        except proxy_protocol.BrokenHeader as exc:
            self.result = "error"
            self.log("error", exc.log_message)
            raise SessionClosed()
        while consumed:
            try:
                chunk = self.sock.recv(consumed)
            except OSError as exc:
                self.fail_socket("recv", exc)
            if not chunk:
                raise SessionClosed()
            consumed -= len(chunk)
        self.proxy_protocol_info = header
        networks = self.server.set_real_ip_from
        if header.src_addr is not None and networks and proxy_protocol.trusted(self.client_ip, networks):
            self.client_ip, self.client_port = header.src_addr, header.src_port
        self.action = None

    def handshake(self):
        """listen ... ssl: the TLS handshake before the greeting (spec 2.0.1)."""
        self.tls_handshake()
        self.action = None

    def start_tls(self):
        """STARTTLS/STLS accepted by the machine: handshake, then machine.tls_established()."""
        # From here on nginx tags every log line of the session, even a failed handshake's.
        self.starttls = True
        action = self.action
        self.tls_handshake()
        self.action = action
        self.execute(self.machine.tls_established())

    def tls_handshake(self):
        """The handshake under the session deadline, then the client-certificate check (spec 2.0.9)."""
        self.action = "SSL handshaking"
        remaining = self.deadline - time.monotonic() if self.deadline else self.server.timeout
        if remaining <= 0:
            raise SessionClosed()  # a handshake that times out closes silently (spec 2.0.6)
        self.sock.settimeout(remaining)
        self.metrics.tls.inc()
        context = client_tls.context_for(self.server, self.listen)
        try:
            # The SSL socket takes over the descriptor: from here self.sock must be the only owner. Building
            # it already reads the socket (a peer that reset it, or closed it with bytes queued, fails here),
            # so it belongs to the handshake's failures, not to the session's bugs.
            self.sock = gevent_ssl.SSLSocket(
                sock=self.sock, server_side=True, do_handshake_on_connect=False, _context=context,
            )
            self.sock.do_handshake()
        except socket.timeout:
            self.handshake_failed("timeout")
            raise SessionClosed()
        except ssl.SSLError as exc:
            self.handshake_failed("error")
            # gevent words a peer that closed before the handshake with bytes queued as an SSLError whose
            # errno is the kernel's ENOTCONN: for nginx that is the same closed peer.
            if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)) or exc.errno == errno.ENOTCONN:
                self.log("info", "peer closed connection in SSL handshake")
            else:
                self.log("info", "SSL_do_handshake() failed (SSL: %s)" % openssl.ssl_error_text(exc))
            raise SessionClosed()
        except OSError as exc:
            self.handshake_failed("error")
            self.fail_socket("recv", exc)
        self.tls = True
        group = client_tls.sni_group(self.listen)
        if group is not None:
            # Certificates by SNI (ours): the auth server learns which name the client asked for.
            self.sni_name = getattr(self.sock, "mailproxy_server_name", None)
            if not self.starttls:
                # With `listen ... ssl` the name arrives before the greeting, so the server it chose runs
                # the whole session: its auth_http, capabilities, timeouts, logs and client-certificate
                # rules. After STARTTLS the client has already seen the first server's greeting and
                # capabilities, so that server keeps the session and only the certificate follows the name.
                self.server = group.server_of(self.sock)
                self.use_log(self.server)
        broken = client_tls.load_error(self.sock)
        if broken:
            # Certificate files by SNI name (ours): the default certificate served instead.
            self.log("error", broken)
        verdict = client_tls.client_verdict(self.sock, self.server)
        if not verdict.ok:
            config = protocol_config(self.server)
            reply = config.ssl_no_cert if verdict.reply == "no_cert" else config.ssl_cert_error
            self.log("info", verdict.message)
            self.send(reply)
            raise SessionClosed()
        self.ssl_info = client_tls.session_info(self.sock, self.server)

    def resolve_client_host(self):
        """SMTP's Client-Host and XCLIENT NAME (spec 5); runs before the greeting, the client unread."""
        if not self.server.resolver:
            return resolver.UNAVAILABLE
        if self.client_ip == "unix:":
            return resolver.TEMPUNAVAIL
        self.action = resolver.ADDRESS_ACTION
        return resolver.client_host(resolver.for_server(self.server), self.client_ip, self.log_while)

    # -- auth_http -------------------------------------------------------------------------------

    def handshake_failed(self, result):
        self.metrics.tls_failed.inc()
        self.result = result

    def pause(self, seconds):
        """Wait ``seconds`` (Auth-Wait, a throttle's delay) while watching the client. A client that leaves
        ends the session here: asking the auth server again, or logging in to the backend, for nobody
        would be work for an attacker's benefit (a client could open sessions, get WAIT and vanish)."""
        deadline = time.monotonic() + seconds
        fd = self.sock.fileno()
        try:
            wait_read(fd, seconds)
        except socket.timeout:
            return
        # POLLRDHUP sees the client's FIN even behind bytes it sent ahead, which stay for the machine.
        if _client_gone(fd):
            self.log("info", "client closed connection")
            raise SessionClosed()
        # Readable with the client still there: its bytes wait in the kernel for the machine.
        gevent.sleep(max(0.0, deadline - time.monotonic()))

    def login_done(self, result):
        """The verdict on one login attempt, counted once (metrics.LOGIN_RESULTS says what each means)."""
        if self.login_result is None:
            self.login_result = self.result = result
            self.metrics.login(self.method, result)

    def authenticate(self, attempt):
        self.method, self.login_result = attempt.method, None
        self.deadline = None
        self.login = attempt.login
        self.action = "in http auth state"
        request = auth_request.build(
            self.server,
            attempt,
            self.server.protocol,
            self.client_ip,
            client_host=self.client_host if self.server.protocol == "smtp" else None,
            proxy_protocol=self.proxy_protocol_info,
            ssl=self.ssl_info,
            sni_name=self.sni_name,
        )
        limiter = throttle.for_server(self.server)
        limit_keys = limiter.keys(self.client_ip, attempt.login) if limiter is not None else ()
        if limit_keys:
            blocked, delay = limiter.check(limit_keys)
            if blocked:
                self.login_throttled()
                return
            if delay:
                self.pause(delay)
        client = auth_client(self.server)
        cache = auth_cache.cache_for(self.server)
        cache_key = outcome = None
        if cache is not None:
            cache_key = cache.key(request, attempt.method)
            outcome = cache.get(cache_key)
            if outcome is not None:
                self.log("debug", "auth http cache hit")
        while outcome is None:
            began = time.monotonic()
            try:
                if self.debugging:
                    self.debug('mail auth http request: method "%s", login "%s", attempt %d, %d bytes'
                               % (attempt.method, escape_for_log(attempt.login), attempt.attempt, len(request)))
                reply = client.ask(request, self.debug if self.debugging else None)
                outcome = decide(reply, self.server.protocol, attempt.method)
            except AuthHttpError as exc:
                self.metrics.auth_seconds.observe(time.monotonic() - began)
                self.metrics.auth_errors.inc()
                # client.py words every timeout this way (nginx's text); anything else is a failure.
                self.login_done("timeout" if "timed out" in str(exc) else "temporary")
                self.log("error", str(exc))
                self.internal_error()
            self.metrics.auth_seconds.observe(time.monotonic() - began)
            if isinstance(outcome, AuthRetry):
                self.pause(outcome.wait)
                outcome = None
                continue
            if cache is not None:
                cache.put(cache_key, outcome)
        if isinstance(outcome, AuthError):
            self.login_done("temporary")
            self.log("error", outcome.log_message)
            self.internal_error()
        if isinstance(outcome, AuthFail):
            self.login_done("invalid")
            if limit_keys and limiter.failed(limit_keys):
                self.log("notice", "too many failed logins, blocked for %gs" % limiter.limit.block)
            actions = self.machine.auth_failed(
                outcome.text,
                wait=bool(outcome.wait),
                error_code=outcome.error_code,
                sasl_error=outcome.sasl_error,
            )
            # nginx logs the verdict ("client login failed") while still in the http auth state, before
            # the Auth-Wait: a client that leaves during the wait still has its failure logged.
            while actions and isinstance(actions[0], Log):
                self.execute([actions.pop(0)])
            if outcome.wait:
                self.pause(outcome.wait)
            self.action = "in auth state"
            if outcome.wait:
                self.arm_deadline()
            self.execute(actions)
            return
        try:
            self.proxy(attempt, outcome)
        except SessionClosed:
            # Every way out of the backend login that is not a timeout is a backend or internal failure.
            self.login_done("temporary")
            raise

    def login_throttled(self):
        """mail_login_limit: blocked, so the auth server is not asked; the protocol words the refusal."""
        self.login_done("invalid")
        self.log("info", "login refused by mail_login_limit")
        actions = self.machine.auth_failed(throttle.BLOCKED_TEXT, wait=False)
        while actions and isinstance(actions[0], Log):
            self.execute([actions.pop(0)])
        self.action = "in auth state"
        self.execute(actions)

    def internal_error(self):
        self.send(self.config.internal_error)
        raise SessionClosed()

    # -- the backend login (backend_login.py) ----------------------------------------------------

    def proxy(self, attempt, ok):
        self.upstream = ok.upstream_text
        if ok.login is not None:
            self.login = ok.login
        backend = BackendLogin(self.server, self.sock, self.client_ip, self.client_port, self.client_host,
                               self.log_while, self.metrics, self.debug if self.debugging else None)
        try:
            logged_in = backend.run(attempt, ok, self.login)
        except BackendLoginFailed as failure:
            self.action = backend.action
            if failure.timed_out:
                self.login_done("timeout")
            if failure.client_reply is None:
                self.internal_error()
            self.send(failure.client_reply)
            raise SessionClosed()
        finally:
            # Whatever happened, release() closes the backend, after the client's last reply.
            self.backend = backend.sock
        self.action = backend.action
        self.backend_tls = backend.tls
        self.login_done("ok")
        self.start_relay(logged_in)

    # -- the relay -------------------------------------------------------------------------------

    def start_relay(self, logged_in):
        self.send(logged_in.client_reply)
        self.action = None
        self.log("info", "client logged in")
        if self.worker.draining_past_timeout():
            # nginx closes a session that reaches the relay after worker_shutdown_timeout fired.
            raise SessionClosed()
        self.sock.settimeout(None)
        self.backend.settimeout(None)
        if self.debugging:
            spliced = relay.SPLICE_AVAILABLE and not self.tls and not self.backend_tls
            self.debug("mail proxy relay start: client fd:%d, upstream fd:%d, %s" % (
                self.sock.fileno(), self.backend.fileno(), "splice" if spliced else "copy"))
        self.relay = relay.start(
            self.sock,
            self.backend,
            client_pending=self.machine.trailing_data(),
            backend_pending=logged_in.backend_pending,
            proxy_timeout=self.server.proxy_timeout,
            proxy_buffer=self.server.proxy_buffer,
            client_buffer=getattr(self.server, "%s_client_buffer" % self.server.protocol),
            tls=self.tls,
            backend_tls=self.backend_tls,
            on_close=self.relay_closed,
        )
        self.handed_to_relay = True
        # The greenlet's part ends here; were it to return into the command loop it would read the
        # client's next bytes itself (a TLS socket still reads) and steal them from the relay.
        raise SessionClosed()

    def relay_closed(self, result):
        self.action = None
        if self.debugging:
            self.debug("close mail proxy connection: %s" % result.reason)
        if result.reason == "timed out":
            self.log("info", "client timed out (110: Connection timed out)")
        elif result.reason == "shutdown":
            self.log("info", "shutdown timeout")
        elif result.reason in ("client closed", "backend closed"):
            self.log(
                "info",
                "proxied session done, bytes from client: %d, to client: %d"
                % (result.client_to_backend, result.backend_to_client),
            )
        else:
            self.log("info", result.reason)
        self.metrics.to_backend.inc(result.client_to_backend)
        self.metrics.to_client.inc(result.backend_to_client)
        self.finished(result.client_to_backend, result.backend_to_client)
        self.worker.session_finished(self.token)

    def close_now(self):
        """Called by the worker when worker_shutdown_timeout fires."""
        if self.handed_to_relay:
            self.relay.close_now()

    def release(self):
        if self.handed_to_relay:
            return
        if self.debugging:
            self.debug("close mail connection: fd:%d" % self.sock.fileno())
        for conn in (self.sock, self.backend):
            if conn is not None:
                try:
                    conn.close()
                except OSError as exc:
                    if exc.errno != errno.EBADF:
                        raise
        self.finished(0, 0)
        self.worker.session_finished(self.token)

    def finished(self, from_client, to_client):
        if self.ended:
            return
        self.ended = True
        self.metrics.open.dec()
        if self.server.session_log:
            session_log.record(
                self.server.session_log, self.server.protocol, _peer_text(self.client_ip, self.client_port),
                self.listen.text, self.login, self.upstream, self.result or "closed",
                from_client, to_client, self.started,
            )



def _address_text(peer, listen):
    if listen.family == socket.AF_UNIX:
        return "unix:", 0
    return peer[0], peer[1]


def _peer_text(ip, port):
    if ip == "unix:":
        return ip
    if ":" in ip:
        return "[%s]:%d" % (ip, port)
    return "%s:%d" % (ip, port)


# The kernel's poll(2): the worker's monkey-patched select.poll knows only readable and writable.
_poll = get_original("select", "poll")


def _client_gone(fd) -> bool:
    poller = _poll()
    poller.register(fd, select.POLLRDHUP)
    return any(events & (select.POLLRDHUP | select.POLLHUP | select.POLLERR) for _, events in poller.poll(0))
