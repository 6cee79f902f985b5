"""The backend side of a session: from the auth server's OK to a logged-in backend socket.

The session hands over what the client said (AuthAttempt) and what the auth server decided (AuthOk);
this module connects to the backend, writes the PROXY header, brings up TLS towards it and runs the
sans-IO login machine of mailproxy/upstream/ on the socket, under one `timeout` deadline armed at the
connect. The session keeps the client: it turns a failure into the protocol's reply and hands a
logged-in backend to the relay.
"""

import os
import socket
import time

from mailproxy import netio, proxy_protocol
from mailproxy.tls import upstream as upstream_tls
from mailproxy.upstream import imap as upstream_imap
from mailproxy.upstream import pop3 as upstream_pop3
from mailproxy.upstream import sieve as upstream_sieve
from mailproxy.upstream import smtp as upstream_smtp
from mailproxy.upstream.common import READING, Failed, LoggedIn, LogPhase, Send, StartTLS

_READ_SIZE = 16384

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
    After ``run``, returned or raised, ``sock`` is the backend socket (None when the connect or a
    TLS handshake failed; the session closes it with the client, after the client's last reply)
    and ``action`` the `while` text the login reached.

    ``debug(text)``, given when the session's error_log is at debug, writes its debug lines: connect,
    every read and send by size (a send carries the password: never its bytes), each login phase.
    """

    __slots__ = ("server", "client_sock", "client_ip", "client_port", "client_host", "log", "metrics",
                 "action", "sock", "tls", "deadline", "debug")

    def __init__(self, server, client_sock, client_ip, client_port, client_host, log, metrics, debug=None):
        self.debug = debug
        self.server = server
        self.client_sock = client_sock
        self.client_ip = client_ip
        self.client_port = client_port
        self.client_host = client_host
        self.log = log
        self.metrics = metrics
        self.action = CONNECTING
        self.sock = None
        self.tls = False

    def run(self, attempt, ok, login):
        """Log in as ``login``; returns the machine's LoggedIn (the reply for the client and the
        backend bytes behind it) or raises BackendLoginFailed."""
        server = self.server
        password = ok.password if ok.password is not None else attempt.password
        self.action = CONNECTING
        self.deadline = began = time.monotonic()
        self.deadline += server.timeout
        try:
            self.sock = netio.connect_ip(ok.addr, ok.port, server.timeout)
        except socket.timeout:
            self.timed_out()
        except OSError as exc:
            self.fail("error", "connect() to %s failed (%s)" % (ok.upstream_text, _error_text(exc)))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.debug:
            self.debug("connect to %s, fd:%d" % (ok.upstream_text, self.sock.fileno()))
        connected_at = time.monotonic()
        self.metrics.connect_seconds.observe(connected_at - began)
        if server.proxy_protocol != "off":
            self.action = SENDING_PROXY_HEADER
            self.send(self.proxy_header())
        tls_mode = upstream_tls.wanted(server, ok.ssl_upstream)
        if tls_mode == "ssl":
            self.handshake(ok)
        machine = self.login_machine(attempt, ok, login, password, starttls=tls_mode == "starttls")
        self.action = READING
        while True:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                self.timed_out()
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(_READ_SIZE)
            except socket.timeout:
                self.timed_out()
            except OSError as exc:
                self.fail("error", "recv() failed (%s)" % _error_text(exc))
            if self.debug:
                self.debug("mail proxy recv: fd:%d %d of %d" % (self.sock.fileno(), len(data), _READ_SIZE))
            for action in machine.receive_data(data):
                if isinstance(action, Send):
                    self.send(action.data)
                elif isinstance(action, LogPhase):
                    self.action = action.action
                    if self.debug:
                        self.debug("mail proxy " + action.action)
                elif isinstance(action, StartTLS):
                    self.handshake(ok)
                elif isinstance(action, Failed):
                    self.fail(action.level, action.log_message, action.client_reply)
                elif isinstance(action, LoggedIn):
                    if self.debug:
                        self.debug("mail proxy logged in to %s" % ok.upstream_text)
                    self.metrics.login_seconds.observe(time.monotonic() - connected_at)
                    if self.tls:
                        upstream_tls.remember(server, self.sock, ok.addr, ok.port)
                    return action

    def handshake(self, ok):
        """proxy_ssl / proxy_starttls / Auth-SSL-Upstream (ours): TLS on the backend socket."""
        action, self.action = self.action, upstream_tls.HANDSHAKING
        sock, self.sock = self.sock, None  # the SSL socket takes over the descriptor
        try:
            self.sock = upstream_tls.handshake(self.server, sock, ok.addr, ok.port, self.deadline)
        except upstream_tls.HandshakeFailed as exc:
            sock.close()
            self.fail(exc.level, exc.message)
        self.tls = True
        if self.debug:
            self.debug("upstream SSL handshake done: %s" % self.sock.version())
        if self.sock.session_reused:
            self.log(self.action, "debug", "upstream SSL session reused")
        self.action = action

    def login_machine(self, attempt, ok, login, password, starttls):
        server = self.server
        buffer = server.proxy_buffer
        passes = server.proxy_pass_error_message
        if server.protocol == "imap":
            return upstream_imap.ImapUpstreamLogin(
                login=login, password=password, tag=attempt.tag,
                proxy_buffer=buffer, pass_error_message=passes, client_id=self.client_id(),
                starttls=starttls, client_fields=attempt.imap_id,
            )
        if server.protocol == "pop3":
            return upstream_pop3.Pop3UpstreamLogin(
                login=login, password=password, proxy_buffer=buffer, pass_error_message=passes,
                client_id=self.client_id(), starttls=starttls,
            )
        if server.protocol == "sieve":
            return upstream_sieve.SieveUpstreamLogin(
                login=login, password=password, proxy_buffer=buffer, pass_error_message=passes,
                starttls=starttls,
            )
        return upstream_smtp.SmtpUpstreamLogin(
            server_name=server.server_name, login=login, password=password,
            method=attempt.method, helo=attempt.helo, esmtp=attempt.esmtp,
            mail_from=attempt.mail_from, rcpt_to=attempt.rcpt_to,
            client_addr=self.client_ip, client_host=self.client_host,
            xclient=server.xclient,
            # Auth-Method from the auth server (ours) overrides proxy_smtp_auth for this login.
            smtp_auth=ok.smtp_auth if ok.smtp_auth is not None else server.proxy_smtp_auth,
            proxy_buffer=buffer, pass_error_message=passes, starttls=starttls,
        )

    def client_id(self):
        """proxy_client_id (ours): (client ip, port, local ip, port) for Dovecot's ID / XCLIENT, or None."""
        if not self.server.proxy_client_id or self.client_ip == "unix:":
            return None
        local = self.client_sock.getsockname()
        return (self.client_ip, self.client_port, local[0], local[1])

    def proxy_header(self):
        local = self.client_sock.getsockname()
        family = self.client_sock.family
        if family == socket.AF_UNIX:
            return proxy_protocol.header(self.server.proxy_protocol, None, None, None, None, family)
        return proxy_protocol.header(self.server.proxy_protocol, self.client_ip, self.client_port, local[0],
                                     local[1], family)

    def send(self, data):
        self.sock.settimeout(max(0.001, self.deadline - time.monotonic()))
        try:
            netio.send_all(self.sock, data)
        except socket.timeout:
            self.timed_out()
        except OSError as exc:
            self.fail("error", "send() failed (%s)" % _error_text(exc))
        if self.debug:
            self.debug("mail proxy send: fd:%d %d bytes" % (self.sock.fileno(), len(data)))

    def timed_out(self):
        self.log(self.action, "info", "upstream timed out (110: Connection timed out)")
        raise BackendLoginFailed(timed_out=True)

    def fail(self, level, message, client_reply=None):
        self.log(self.action, level, message)
        raise BackendLoginFailed(client_reply)


def _error_text(exc):
    return "%d: %s" % (exc.errno or 0, os.strerror(exc.errno or 0))
