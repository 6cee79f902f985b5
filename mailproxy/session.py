"""One mail session before the relay: callbacks on the worker's loop, from accept to the relay's start.

The worker calls ``handle`` from its accept callback; it returns at once. From then on every step is a
callback on the worker's libev loop over the client's bare non-blocking socket (events.Connection): the
PROXY header, the TLS handshake, the greeting, each client command fed to the sans-IO machine of
protocol/, the login gate (login_gate.py: throttling, the auth cache, the auth_http exchange), the backend
login (backend_login.py) and the hand-over of both sockets to the relay (relay.py). A phase's timeout is
one timer; a wait is one io watcher. No greenlet runs a session: only the SMTP resolver, which is written
for one, gets its own for its lookups.

The machine's actions run in order from a queue: a send the client does not take at once parks the queue
until the socket is writable, and an action that needs the loop (Authenticate, StartTLS) parks it until
its answer; whatever follows it in the queue runs after the answer's own actions.

Errors: a step that ends the session raises SessionClosed once its log line is written; ``run``, which
wraps every callback, releases the session. Any other exception is a bug: `[alert]` with the traceback,
and only this session ends.
"""

import errno
import select
import ssl
import time
from collections import deque

import _socket
import gevent
from gevent.monkey import get_original

from mailproxy import log as errorlog
from mailproxy import login_gate, proxy_protocol, relay, resolver, session_log
from mailproxy.backend_login import BackendLogin, BackendLoginFailed
from mailproxy.events import READ, WRITE, Connection, Socket, failed_call
from mailproxy.protocol.common import Authenticate, Close, Log, Send, StartTLS
from mailproxy.tls import client as client_tls, openssl

_READ_SIZE = 16384
# The errnos ngx_connection_error logs at info on a mail connection, as a peer's doing.
_PEER_GONE = (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ETIMEDOUT, errno.ECONNREFUSED,
              errno.ENETDOWN, errno.ENETUNREACH, errno.EHOSTDOWN, errno.EHOSTUNREACH)


class SessionClosed(Exception):
    """The session ends here; everything worth logging was logged."""


class _Phase:
    """A queue entry that changes the `while ...` of the session's log lines once the actions before
    it have run (the greeting sent, the client is in the auth state)."""

    __slots__ = ("action",)

    def __init__(self, action):
        self.action = action


class _HandOver:
    """A queue entry: the client has its login reply; the relay takes both sockets."""

    __slots__ = ("logged_in",)

    def __init__(self, logged_in):
        self.logged_in = logged_in


_IN_AUTH_STATE = _Phase("in auth state")


def handle(sock, peer, listen, server, worker):
    """The worker's session handler (``on_loop``: called from the accept callback, no greenlet)."""
    if not isinstance(sock, Socket):
        # A handler that wraps this one hands over a gevent socket: the session wants the bare one.
        bare = Socket(sock.family, sock.type, sock.proto, sock.detach())
        bare.setblocking(False)
        sock = bare
    session = Session(sock, peer, listen, server, worker)
    session.run(session.start)


handle.on_loop = True


class Session:
    __slots__ = (
        "loop", "client", "listen", "server", "worker", "runtime", "number", "client_ip", "client_port",
        "error_log", "debugging", "action", "login", "machine", "upstream", "queue", "unsent", "timer",
        "expiry", "write_timer", "pause_timer", "pause_then", "handshake_then", "gate", "attempt", "backend",
        "resolving", "relay", "handed_to_relay", "released", "tls", "starttls", "ssl_info",
        "proxy_protocol_info", "sni_name", "client_host", "started", "metrics", "result", "method",
        "login_result", "ended", "token",
    )

    def __init__(self, sock, peer, listen, server, worker):
        self.loop = gevent.get_hub().loop
        self.client = Connection(self.loop, sock)
        self.listen = listen
        self.server = server
        self.worker = worker
        self.runtime = worker.runtime_for(server)
        self.number = worker.next_connection_number()
        self.client_ip, self.client_port = _address_text(peer, listen)
        self.use_log(server)
        self.action = None
        self.login = b""
        self.machine = None
        self.upstream = None
        self.queue = deque()
        self.unsent = None
        self.timer = None  # the phase's timeout; ``expiry`` says what its end means
        self.expiry = None
        self.write_timer = None
        self.pause_timer = None
        self.pause_then = None
        self.handshake_then = None
        self.gate = None
        self.attempt = None
        self.backend = None
        self.resolving = None
        self.relay = None
        self.handed_to_relay = False
        self.released = False
        self.tls = False
        self.starttls = False  # nginx tags the session's log lines "using starttls" from STARTTLS on
        self.ssl_info = None
        self.proxy_protocol_info = None
        self.sni_name = None
        self.client_host = resolver.UNAVAILABLE
        # Observability (metrics.py, session_log.py): the result words are defined in session_log.py.
        self.started = time.monotonic()
        self.metrics = self.runtime.metrics
        self.result = None
        self.method = None
        self.login_result = None
        self.ended = False
        # Last: from here the session owns the socket and its worker_connections slot.
        self.token = worker.session_started(self.close_now)
        self.metrics.open.inc()
        self.metrics.sessions.inc()

    def run(self, step, *args):
        """Every callback of the session goes through here: a bug costs this session, never the worker."""
        try:
            step(*args)
        except SessionClosed:
            self.release()
        except Exception as exc:
            if not self.released:
                self.result = "error"
            self.log_bug("session failed: %s: %s" % (type(exc).__name__, exc), exc)
            self.release()

    # -- logging ---------------------------------------------------------------------------------

    def use_log(self, server):
        """The server's error_log; a client listed in debug_connection gets every level on it."""
        self.error_log = self.worker.log_for(server)
        # debug_connection: the client's own address (before any PROXY header), nginx's networks test.
        networks = self.worker.config.main.debug_connection
        if networks and proxy_protocol.trusted(self.client_ip, networks):
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
            parts.append(', login: "%s"' % errorlog.escape_bytes(login))
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

    # -- timers ----------------------------------------------------------------------------------

    def arm(self, seconds, expiry):
        """The phase's one timer: ``expiry()`` runs when ``seconds`` pass first."""
        if self.timer is not None:
            self.timer.close()
        self.expiry = expiry
        self.timer = self.loop.timer(seconds)
        self.timer.start(self.run, self.expired)

    def arm_deadline(self):
        """The `timeout` of the client's side: the PROXY header, the handshake, the commands."""
        self.arm(self.server.timeout, self.timed_out)

    def disarm(self):
        if self.timer is not None:
            self.timer.close()
            self.timer = None
        # A bound method of this session: kept past its use, it would make the session a reference
        # cycle that only the collector frees (every relayed session, with all it holds).
        self.expiry = None

    def expired(self):
        expiry = self.expiry
        self.disarm()
        expiry()

    def timed_out(self):
        self.result = "timeout"
        self.log("info", "client timed out (110: Connection timed out)")
        raise SessionClosed()

    # -- the pre-relay phase ---------------------------------------------------------------------

    def start(self):
        if self.debugging:
            self.debug("accept: %s fd:%d" % (_peer_text(self.client_ip, self.client_port), self.client.fd))
        if self.error_log.enabled("info"):
            self.error_log.log(
                "info",
                "client %s connected to %s" % (_peer_text(self.client_ip, self.client_port), self.listen.text),
                self.number,
            )
        if self.listen.proxy_protocol or self.listen.ssl:
            self.arm_deadline()  # the greeting arms it anew: from then on it counts the commands
        if self.listen.proxy_protocol:
            self.action = "reading PROXY protocol"
            self.client.wait(READ, self.run, self.read_proxy_protocol)
            return
        self.after_proxy_protocol()

    def after_proxy_protocol(self):
        if self.listen.ssl:
            # listen ... ssl: the TLS handshake before the greeting (spec 2.0.1).
            self.tls_handshake(self.prepare_machine)
            return
        self.prepare_machine()

    def prepare_machine(self):
        self.action = None
        runtime = self.runtime
        self.machine = runtime.protocol.machine_class(runtime.config, tls=self.tls)
        if runtime.protocol.resolves_client:
            self.resolve_client_host()
            return
        self.greet()

    def greet(self):
        self.action = "sending client greeting line"
        delay = self.runtime.protocol.greeting_delay(self.server)
        if delay > 0:
            self.action = "in delay pipelining state"
            self.arm(delay, self.greeting_delay_over)
            self.wait_client(self.early_input)
            return
        self.send_greeting()

    def greeting_delay_over(self):
        self.client.stop()
        self.action = "sending client greeting line"
        self.send_greeting()

    def early_input(self):
        """smtp_greeting_delay: a client that talks before the greeting is refused."""
        early = self.recv(self.early_input)
        if early is None:
            return
        if not early:
            raise SessionClosed()
        self.disarm()
        self.client.stop()
        self.execute(self.machine.early_input(early) + [Close()])

    def send_greeting(self):
        self.arm_deadline()
        self.execute(self.machine.greeting() + [_IN_AUTH_STATE])

    # -- the client's socket ---------------------------------------------------------------------

    def recv(self, again):
        """The client's next bytes, b"" at EOF, or None when ``again`` waits for the socket."""
        client = self.client
        try:
            data = client.recv(_READ_SIZE)
        except OSError as exc:
            self.fail_socket("recv", exc)
        if data is None:
            client.wait(client.want, self.run, again)
            return None
        if self.debugging:
            self.debug("recv: fd:%d %d of %d" % (client.fd, len(data), _READ_SIZE))
        return data

    def read_command(self):
        self.wait_client(self.client_readable)

    def wait_client(self, step):
        """``step`` once the client has bytes for us."""
        if self.client.pending():
            # Bytes wait inside OpenSSL (decrypted, or read ahead with the handshake's last records):
            # no socket event will say so.
            self.loop.run_callback(self.run, step)
        else:
            self.client.wait(READ, self.run, step)

    def client_readable(self):
        if self.unsent is not None:
            return  # queued for decrypted bytes while a reply waits to be written: flush resumes
        if self.released or not self.machine.reading:
            self.client.stop()  # a callback queued before the session moved on
            return
        data = self.recv(self.client_readable)
        if data is not None:
            self.execute(self.machine.receive_data(data))

    def fail_socket(self, call, exc):
        self.log("info", failed_call(call, exc))
        raise SessionClosed()

    def send(self, data):
        """Write ``data`` to the client; False when the rest waits for the socket (``flush`` resumes)."""
        client = self.client
        try:
            sent = client.send(data)
        except OSError as exc:
            self.fail_socket("send", exc)
        if sent < len(data):
            self.unsent = data[sent:]
            client.wait(client.want, self.run, self.flush)
            if self.write_timer is None:
                self.write_timer = self.loop.timer(self.server.timeout)
                self.write_timer.start(self.run, self.timed_out)
            return False
        if self.debugging:
            self.debug("send: fd:%d %d bytes" % (client.fd, len(data)))
        return True

    def flush(self):
        if self.send(self.unsent):
            self.unsent = None
            self.write_timer.close()
            self.write_timer = None
            self.resume()

    # -- the machine's actions -------------------------------------------------------------------

    def execute(self, actions):
        """Run ``actions`` before anything still queued (they answer what parked the queue)."""
        self.queue.extendleft(reversed(actions))
        self.resume()

    def resume(self):
        queue = self.queue
        while queue:
            action = queue.popleft()
            kind = type(action)
            if kind is Send:
                if not self.send(action.data):
                    return
            elif kind is Log:
                self.log(action.level, action.message)
            elif kind is _Phase:
                self.action = action.action
            elif kind is Close:
                raise SessionClosed()
            elif kind is Authenticate:
                # The client is not read while its login is decided (its bytes wait in the kernel); a
                # level-triggered watcher left armed would fire for them without end.
                self.client.stop()
                self.authenticate(action.request)
                return
            elif kind is StartTLS:
                self.start_tls()
                return
            elif kind is _HandOver:
                self.hand_over(action.logged_in)
                return
            else:
                raise TypeError("unknown action %r" % (action,))
        self.read_command()

    # -- PROXY protocol, TLS, resolver -----------------------------------------------------------

    def read_proxy_protocol(self):
        """listen ... proxy_protocol: read the header, apply set_real_ip_from (spec 2.0.10)."""
        sock = self.client.sock
        try:
            # One peek, as nginx: a header split across segments is refused rather than waited for,
            # and nothing past the header leaves the kernel buffer before the machine wants it.
            peeked = sock.recv(proxy_protocol.PEEK_SIZE, _socket.MSG_PEEK)
        except BlockingIOError:
            return  # the watcher stays armed
        except OSError as exc:
            self.fail_socket("recv", exc)
        try:
            header, consumed = proxy_protocol.parse(peeked)
        except proxy_protocol.BrokenHeader as exc:
            self.result = "error"
            self.log("error", exc.log_message)
            raise SessionClosed()
        while consumed:
            # The bytes were peeked: they are in the kernel's buffer, so this never waits.
            try:
                chunk = sock.recv(consumed)
            except OSError as exc:
                self.fail_socket("recv", exc)
            if not chunk:
                raise SessionClosed()
            consumed -= len(chunk)
        self.client.stop()
        self.proxy_protocol_info = header
        networks = self.server.set_real_ip_from
        if header.src_addr is not None and networks and proxy_protocol.trusted(self.client_ip, networks):
            self.client_ip, self.client_port = header.src_addr, header.src_port
        self.action = None
        self.after_proxy_protocol()

    def start_tls(self):
        """STARTTLS/STLS accepted by the machine: handshake, then machine.tls_established()."""
        # From here on nginx tags every log line of the session, even a failed handshake's.
        self.starttls = True
        action = self.action

        def established():
            self.action = action
            self.execute(self.machine.tls_established())

        self.tls_handshake(established)

    def tls_handshake(self, then):
        """The handshake under the session deadline, then the client-certificate check (spec 2.0.9)."""
        self.action = "SSL handshaking"
        if self.timer is None:
            self.arm(self.server.timeout, self.handshake_timed_out)
        else:
            self.expiry = self.handshake_timed_out
        self.metrics.tls.inc()
        self.handshake_then = then
        context = client_tls.context_for(self.server, self.listen)
        try:
            self.client.sock = client_tls.ServerTls(self.client.sock, context)
        except (ssl.SSLError, OSError) as exc:
            self.handshake_error(exc)
        self.handshake_step()

    def handshake_step(self):
        client = self.client
        try:
            client.sock._sslobj.do_handshake()
        except ssl.SSLWantReadError:
            client.wait(READ, self.run, self.handshake_step)
            return
        except ssl.SSLWantWriteError:
            client.wait(WRITE, self.run, self.handshake_step)
            return
        except (ssl.SSLError, OSError) as exc:
            self.handshake_error(exc)
        client.stop()
        client.use_tls(client.sock)
        self.expiry = self.timed_out
        self.tls = True
        tls_sock = client.sock
        group = client_tls.sni_group(self.listen)
        if group is not None:
            # Certificates by SNI (ours): the auth server learns which name the client asked for.
            self.sni_name = getattr(tls_sock, "mailproxy_server_name", None)
            if not self.starttls:
                # With `listen ... ssl` the name arrives before the greeting, so the server it chose runs
                # the whole session: its auth_http, capabilities, timeouts, logs and client-certificate
                # rules. After STARTTLS the client has already seen the first server's greeting and
                # capabilities, so that server keeps the session and only the certificate follows the name.
                self.server = group.server_of(tls_sock)
                self.runtime = self.worker.runtime_for(self.server)
                self.use_log(self.server)
        broken = client_tls.load_error(tls_sock)
        if broken:
            # Certificate files by SNI name (ours): the default certificate served instead.
            self.log("error", broken)
        verdict = client_tls.client_verdict(tls_sock, self.server)
        if not verdict.ok:
            config = self.runtime.config
            self.log("info", verdict.message)
            self.execute([Send(config.ssl_no_cert if verdict.reply == "no_cert" else config.ssl_cert_error),
                          Close()])
            return
        self.ssl_info = client_tls.session_info(tls_sock, self.server)
        self.action = None
        then, self.handshake_then = self.handshake_then, None
        then()

    def handshake_error(self, exc):
        self.handshake_failed("error")
        if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
            self.log("info", "peer closed connection in SSL handshake")
        elif isinstance(exc, ssl.SSLError):
            self.log("info", "SSL_do_handshake() failed (SSL: %s)" % openssl.ssl_error_text(exc))
        elif not exc.errno:
            self.log("info", "peer closed connection in SSL handshake")
        else:
            # A system call failed with OpenSSL's queue empty (a reset, a peer gone before the
            # handshake): nginx's ngx_connection_error, at info for a peer's doing, else at alert.
            level = "info" if exc.errno in _PEER_GONE else "alert"
            self.log(level, "peer closed connection in SSL handshake %s" % errorlog.errno_text(exc.errno))
        raise SessionClosed()

    def handshake_timed_out(self):
        # A handshake that times out closes silently (spec 2.0.6).
        self.handshake_failed("timeout")
        raise SessionClosed()

    def handshake_failed(self, result):
        self.metrics.tls_failed.inc()
        self.result = result

    def resolve_client_host(self):
        """SMTP's Client-Host and XCLIENT NAME (spec 5); runs before the greeting, the client unread."""
        if not self.server.resolver:
            self.client_host = resolver.UNAVAILABLE
        elif self.client_ip == "unix:":
            self.client_host = resolver.TEMPUNAVAIL
        else:
            self.action = resolver.ADDRESS_ACTION
            self.disarm()  # the resolver keeps its own resolver_timeout
            # The resolver is written for a greenlet; it is the session's one.
            self.resolving = gevent.spawn(self.run, self.resolve_in_greenlet)
            return
        self.greet()

    def resolve_in_greenlet(self):
        host = resolver.client_host(resolver.for_server(self.server), self.client_ip, self.log_while)
        self.resolving = None
        self.loop.run_callback(self.run, self.resolved, host)

    def resolved(self, host):
        if self.released:
            return
        self.client_host = host
        self.greet()

    # -- the login -------------------------------------------------------------------------------

    def pause(self, seconds, then):
        """Wait ``seconds`` (Auth-Wait, a throttle's delay) while watching the client. A client that leaves
        ends the session here: asking the auth server again, or logging in to the backend, for nobody
        would be work for an attacker's benefit (a client could open sessions, get WAIT and vanish)."""
        self.pause_then = then
        self.pause_timer = self.loop.timer(seconds)
        self.pause_timer.start(self.run, self.pause_over)
        self.client.wait(READ, self.run, self.readable_in_pause)

    def readable_in_pause(self):
        # POLLRDHUP sees the client's FIN even behind bytes it sent ahead, which stay for the machine.
        if _client_gone(self.client.fd):
            self.log("info", "client closed connection")
            raise SessionClosed()
        # Readable with the client still there: its bytes wait in the kernel for the machine.
        self.client.stop()

    def pause_over(self):
        self.client.stop()
        self.pause_timer.close()
        self.pause_timer = None
        then, self.pause_then = self.pause_then, None
        then()

    def login_done(self, result):
        """The verdict on one login attempt, counted once (metrics.LOGIN_RESULTS says what each means)."""
        if self.login_result is None:
            self.login_result = self.result = result
            self.metrics.login(self.method, result)

    def authenticate(self, attempt):
        self.method, self.login_result = attempt.method, None
        self.disarm()  # the auth server and the backend have their own timeouts
        self.login = attempt.login
        self.attempt = attempt
        self.action = "in http auth state"
        request = self.runtime.auth_request.build(
            attempt,
            self.client_ip,
            client_host=self.client_host if self.runtime.protocol.resolves_client else None,
            proxy_protocol=self.proxy_protocol_info,
            ssl=self.ssl_info,
            sni_name=self.sni_name,
        )
        if self.gate is None:
            self.gate = login_gate.LoginGate(self.runtime, self.pause, self.run,
                                             self.debug if self.debugging else None)
        self.gate.decide(attempt, request, self.client_ip, self.verdict)

    def verdict(self, verdict):
        kind = verdict.kind
        if kind is login_gate.PASS:
            self.log_in_to_backend(verdict.outcome)
        elif kind is login_gate.REFUSED:
            self.refused(verdict)
        elif kind is login_gate.THROTTLED:
            # mail_login_limit: blocked, so the auth server was not asked; the protocol words the refusal.
            self.login_done("invalid")
            self.log("info", "login refused by mail_login_limit")
            self.answer_refusal(self.machine.auth_failed(login_gate.BLOCKED_TEXT, wait=False), 0)
        else:
            self.login_done(verdict.login_result)
            self.log("error", verdict.log_message)
            self.internal_error()

    def refused(self, verdict):
        outcome = verdict.outcome
        self.login_done("invalid")
        if verdict.now_blocked:
            self.log("notice", "too many failed logins, blocked for %gs" % self.runtime.limiter.limit.block)
        actions = self.machine.auth_failed(
            outcome.text,
            wait=bool(outcome.wait),
            error_code=outcome.error_code,
            sasl_error=outcome.sasl_error,
        )
        self.answer_refusal(actions, outcome.wait)

    def answer_refusal(self, actions, wait):
        # nginx logs the verdict ("client login failed") while still in the http auth state, before
        # the Auth-Wait: a client that leaves during the wait still has its failure logged.
        while actions and isinstance(actions[0], Log):
            self.log(actions[0].level, actions.pop(0).message)

        def answer():
            self.action = "in auth state"
            if wait:
                self.arm_deadline()
            self.execute(actions)

        if wait:
            self.pause(wait, answer)
        else:
            answer()

    def internal_error(self):
        self.execute([Send(self.runtime.config.internal_error), Close()])

    def log_in_to_backend(self, ok):
        self.upstream = ok.upstream_text
        if ok.login is not None:
            self.login = ok.login
        self.backend = BackendLogin(self.server, self.loop, self.client.sock, self.client_ip, self.client_port,
                                    self.client_host, self.log_while, self.metrics, self.run,
                                    self.debug if self.debugging else None)
        self.backend.start(self.attempt, ok, self.login, self.backend_done)

    def backend_done(self, result):
        backend = self.backend
        self.action = backend.action
        if isinstance(result, BackendLoginFailed):
            # Every way out of the backend login that is not a timeout is a backend or internal failure.
            self.login_done("timeout" if result.timed_out else "temporary")
            if result.client_reply is None:
                self.internal_error()
            else:
                self.execute([Send(result.client_reply), Close()])
            return
        self.login_done("ok")
        self.execute([Send(result.client_reply), _HandOver(result)])

    # -- the relay -------------------------------------------------------------------------------

    def hand_over(self, logged_in):
        self.action = None
        self.log("info", "client logged in")
        if self.worker.draining_past_timeout():
            # nginx closes a session that reaches the relay after worker_shutdown_timeout fired.
            raise SessionClosed()
        self.disarm()
        client, backend = self.client, self.backend.conn
        readers = (client.take_reader(), backend.take_reader())
        if self.debugging:
            spliced = relay.SPLICE_AVAILABLE and not self.tls and not self.backend.tls
            self.debug("mail proxy relay start: client fd:%d, upstream fd:%d, %s" % (
                client.fd, backend.fd, "splice" if spliced else "copy"))
        self.handed_to_relay = True
        self.relay = relay.start(
            client.sock,
            backend.sock,
            client_pending=self.machine.trailing_data(),
            backend_pending=logged_in.backend_pending,
            proxy_timeout=self.server.proxy_timeout,
            proxy_buffer=self.server.proxy_buffer,
            client_buffer=self.runtime.protocol.client_buffer(self.server),
            tls=self.tls,
            backend_tls=self.backend.tls,
            on_close=self.relay_closed,
            # The client's socket inherits the listener's TCP_NODELAY; the backend's was set at connect.
            nodelay=False,
            readers=readers,
        )
        # An idle relayed session keeps only what its end needs (its log line, metrics, session_log):
        # the login's parts go now, the password among them.
        self.machine = self.backend = self.gate = self.attempt = self.client = self.queue = None

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
        if self.relay is not None:
            self.relay.close_now()

    def release(self):
        if self.released or self.handed_to_relay:
            return
        self.released = True
        if self.debugging:
            self.debug("close mail connection: fd:%d" % self.client.fd)
        for timer in (self.timer, self.write_timer, self.pause_timer):
            if timer is not None:
                timer.close()
        self.timer = self.write_timer = self.pause_timer = None
        self.expiry = self.handshake_then = self.pause_then = None  # bound methods of this session
        # The gate and the backend login hold callbacks bound to this session: dropped with them.
        gate, self.gate = self.gate, None
        if gate is not None:
            gate.cancel()
        if self.resolving is not None and self.resolving is not gevent.getcurrent():
            self.resolving.kill(block=False)
        # The backend closes after the client's last reply, which has been written by now.
        self.client.close()
        backend, self.backend = self.backend, None
        if backend is not None:
            backend.cancel()
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
    if listen.family == _socket.AF_UNIX:
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
