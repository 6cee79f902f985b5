"""The backend side of a session: from the auth server's OK to a logged-in backend socket.

The session hands over what the client said (AuthAttempt) and what the auth server decided (AuthOk);
this module connects to the backend, writes the PROXY header, brings up TLS towards it and runs the
sans-IO login machine of mailproxy/upstream/ on the socket, under one `timeout` timer armed at the
connect. Every step is a callback on the worker's loop (events.py): one non-blocking connect (events.connect:
a connection up at once goes on at once, another is waited for and read from SO_ERROR), TCP_NODELAY set
once. The session keeps the client: it turns a failure into the protocol's
reply and hands a logged-in backend to the relay.
"""

import time
from collections import deque

import _socket

from mailproxy import proxy_protocol
from mailproxy.events import IN_PROGRESS, READ, WRITE, Connection, connect
from mailproxy.log import errno_text
from mailproxy.protocols import PROTOCOLS, BackendLoginFacts
from mailproxy.tls import upstream as upstream_tls
from mailproxy.upstream.common import READING, Failed, LoggedIn, LogPhase, Send, StartTLS

_READ_SIZE = 16384

# Queued behind the PROXY header and an implicit TLS handshake: from here the login machine talks.
_MACHINE_READS = object()

CONNECTING = "connecting to upstream"
SENDING_PROXY_HEADER = "sending PROXY protocol header to upstream"


class BackendLoginFailed(Exception):
    """The backend login is over and its log line written.

    ``client_reply`` None means the protocol's internal-error line, otherwise the bytes to send the
    client verbatim; ``timed_out``: the backend missed the `timeout` deadline.
    """

    def __init__(self, client_reply=None, timed_out=False):
        super().__init__()
        self.client_reply = client_reply
        self.timed_out = timed_out


class BackendLogin:
    """One login to the backend the auth server named.

    ``log(action, level, message)`` writes the session's line ``while <action>``: the session's
    suffix names the client, which this side never sees except for its address and identity.
    ``on_done(result)`` runs once, from the loop: the machine's LoggedIn (the reply for the client and
    the backend bytes behind it) or a BackendLoginFailed whose log line is written. Then ``conn`` is the
    backend connection (None when the connect or a TLS handshake failed; on a failure the session closes
    it with the client, after the client's last reply), ``tls`` whether TLS runs on it, and ``action`` the
    `while` text the login reached. ``cancel()`` stops a login whose session ended first. Every callback
    runs through ``guard(step)``, the session's own (a bug in a step is the session's bug).

    ``debug(text)``, given when the session's error_log is at debug, writes its debug lines: connect,
    every read and send by size (a send carries the password: never its bytes), each login phase.
    """

    __slots__ = ("server", "loop", "client_sock", "client_ip", "client_port", "client_host", "log", "metrics",
                 "guard", "debug", "action", "conn", "tls", "timer", "ok", "facts", "machine", "actions", "unsent",
                 "began", "connected_at", "handshake", "after_handshake", "on_done")

    def __init__(self, server, loop, client_sock, client_ip, client_port, client_host, log, metrics, guard,
                 debug=None):
        self.server = server
        self.guard = guard  # guard(step, *args) runs each callback: the session's, a bug ends only it
        self.loop = loop
        self.client_sock = client_sock
        self.client_ip = client_ip
        self.client_port = client_port
        self.client_host = client_host
        self.log = log
        self.metrics = metrics
        self.debug = debug
        self.action = CONNECTING
        self.conn = None
        self.tls = False
        self.timer = None
        self.machine = None
        self.handshake = None
        self.unsent = None
        self.on_done = None

    def start(self, attempt, ok, login, on_done):
        """Connect and log in as ``login``."""
        server = self.server
        self.ok = ok
        self.on_done = on_done
        self.facts = (attempt, login, ok.password if ok.password is not None else attempt.password)
        self.began = time.monotonic()
        self.timer = self.loop.timer(server.timeout)
        self.timer.start(self.guard, self._timed_out)
        self.action = CONNECTING
        sock = _socket.socket(ok.family, _socket.SOCK_STREAM | _socket.SOCK_NONBLOCK)
        self.conn = Connection(self.loop, sock)
        sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
        code = connect(sock, (ok.addr, ok.port))
        if code == 0:
            self._connected()
        elif code in IN_PROGRESS:
            self.conn.wait(WRITE, self.guard, self._connect_done)
        else:
            self._connect_failed(code)

    def cancel(self):
        self.on_done = None
        self._stop()
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    # --- the steps, each a callback -------------------------------------------------------------------

    def _connect_done(self):
        code = self.conn.sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_ERROR)
        if code:
            self._connect_failed(code)
        else:
            self._connected()

    def _connect_failed(self, code):
        self.conn.close()
        self.conn = None
        self._fail("error", "connect() to %s failed %s" % (self.ok.upstream_text, errno_text(code)))

    def _connected(self):
        server = self.server
        if self.debug:
            self.debug("connect to %s, fd:%d" % (self.ok.upstream_text, self.conn.fd))
        self.connected_at = time.monotonic()
        self.metrics.connect_seconds.observe(self.connected_at - self.began)
        attempt, login, password = self.facts
        tls_mode = upstream_tls.wanted(server, self.ok.ssl_upstream)
        # Positional: a class called with keywords has them packed into a dict and unpacked again.
        self.machine = PROTOCOLS[server.protocol].backend_login(server, BackendLoginFacts(
            login, password, attempt, self.ok, self.client_ip, self.client_host, self._client_id(),
            tls_mode == "starttls"))
        self.actions = deque()
        if server.proxy_protocol != "off":
            self.action = SENDING_PROXY_HEADER
            self.actions.append(Send(self._proxy_header()))
        if tls_mode == "ssl":
            self.actions.append(StartTLS())
        self.actions.append(_MACHINE_READS)
        self._resume()

    def _resume(self):
        """Carry out the machine's actions in order; a send that must wait resumes here once written."""
        actions = self.actions
        while actions:
            action = actions.popleft()
            kind = type(action)
            if kind is Send:
                if not self._send(action.data):
                    return
            elif kind is LogPhase:
                self.action = action.action
                if self.debug:
                    self.debug("mail proxy " + action.action)
            elif action is _MACHINE_READS:
                self.action = READING
            elif kind is StartTLS:
                self._start_tls()
                return
            elif kind is Failed:
                self._fail(action.level, action.log_message, action.client_reply)
                return
            elif kind is LoggedIn:
                self._logged_in(action)
                return
            else:
                raise TypeError("unknown action %r" % (action,))
        self.conn.wait(READ, self.guard, self._read)

    def _read(self):
        if self.on_done is None or self.unsent is not None:
            return  # queued for decrypted bytes, but the login ended or a write waits first
        conn = self.conn
        try:
            data = conn.recv(_READ_SIZE)
        except OSError as exc:
            self._fail("error", "recv() failed %s" % errno_text(exc.errno or 0))
            return
        if data is None:
            conn.wait(conn.want, self.guard, self._read)
            return
        if self.debug:
            self.debug("mail proxy recv: fd:%d %d of %d" % (conn.fd, len(data), _READ_SIZE))
        self.actions.extend(self.machine.receive_data(data))
        self._resume()
        if self.on_done is not None and conn.pending():
            # Decrypted bytes wait inside OpenSSL: no socket event will say so.
            self.loop.run_callback(self.guard, self._read)

    def _send(self, data):
        """Write ``data``; False when the rest waits for the socket (``_flush`` resumes)."""
        conn = self.conn
        try:
            sent = conn.send(data)
        except OSError as exc:
            self._fail("error", "send() failed %s" % errno_text(exc.errno or 0))
            return False
        if sent < len(data):
            self.unsent = data[sent:]
            conn.wait(conn.want, self.guard, self._flush)
            return False
        if self.debug:
            self.debug("mail proxy send: fd:%d %d bytes" % (conn.fd, len(data)))
        return True

    def _flush(self):
        if self._send(self.unsent):
            self.unsent = None
            self._resume()

    def _start_tls(self):
        """proxy_ssl / proxy_starttls / Auth-SSL-Upstream (ours): TLS on the backend socket."""
        self.after_handshake, self.action = self.action, upstream_tls.HANDSHAKING
        conn = self.conn
        try:
            self.handshake = upstream_tls.Handshake(self.server, conn.sock, self.ok.addr, self.ok.port)
        except OSError as exc:
            self._fail("error", "SSL_do_handshake() failed %s" % errno_text(exc.errno or 0))
            return
        conn.sock = self.handshake.sock  # the SSL socket owns the descriptor now
        self._handshake_step()

    def _handshake_step(self):
        try:
            want = self.handshake.step()
        except upstream_tls.HandshakeFailed as exc:
            self.conn.close()
            self.conn = None
            self._fail(exc.level, exc.message)
            return
        if want is not None:
            self.conn.wait(want, self.guard, self._handshake_step)
            return
        self.conn.use_tls(self.handshake.sock)
        self.tls = True
        if self.debug:
            self.debug("upstream SSL handshake done: %s" % self.conn.sock.version())
        if self.conn.sock.session_reused:
            self.log(self.action, "debug", "upstream SSL session reused")
        self.action = self.after_handshake
        self._resume()

    def _logged_in(self, logged_in):
        if self.debug:
            self.debug("mail proxy logged in to %s" % self.ok.upstream_text)
        self.metrics.login_seconds.observe(time.monotonic() - self.connected_at)
        if self.tls:
            upstream_tls.remember(self.server, self.conn.sock, self.ok.addr, self.ok.port)
        self._done(logged_in)

    # --- endings ---------------------------------------------------------------------------------------

    def _client_id(self):
        """proxy_client_id (ours): (client ip, port, local ip, port) for Dovecot's ID / XCLIENT, or None."""
        if not self.server.proxy_client_id or self.client_ip == "unix:":
            return None
        local = self.client_sock.getsockname()
        return (self.client_ip, self.client_port, local[0], local[1])

    def _proxy_header(self):
        family = self.client_sock.family
        if family == _socket.AF_UNIX:
            return proxy_protocol.header(self.server.proxy_protocol, None, None, None, None, family)
        local = self.client_sock.getsockname()
        return proxy_protocol.header(self.server.proxy_protocol, self.client_ip, self.client_port, local[0],
                                     local[1], family)

    def _timed_out(self):
        self.log(self.action, "info", "upstream timed out (110: Connection timed out)")
        self._done(BackendLoginFailed(timed_out=True))

    def _fail(self, level, message, client_reply=None):
        self.log(self.action, level, message)
        self._done(BackendLoginFailed(client_reply))

    def _stop(self):
        if self.timer is not None:
            self.timer.close()
            self.timer = None
        if self.conn is not None:
            self.conn.stop()

    def _done(self, result):
        self._stop()
        on_done, self.on_done = self.on_done, None
        if on_done is not None:
            on_done(result)

