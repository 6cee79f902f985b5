"""SMTP backend login (spec 4.4): HELO/EHLO, XCLIENT, the client's HELO, then MAIL+RCPT or AUTH.

Each step is sent only after the previous reply was accepted; a reply is judged on the code of its
first line once its last line (code followed by anything but "-") has arrived.
"""

import base64
from typing import List

from .common import READING, SENDING_STARTTLS, Send, UpstreamLogin, line_end

SENDING_HELO = "sending HELO/EHLO to upstream"
SENDING_XCLIENT = "sending XCLIENT to upstream"
SENDING_CLIENT_HELO = "sending client HELO/EHLO to upstream"
SENDING_AUTH = "sending AUTH to upstream"
SENDING_MAIL = "sending MAIL FROM to upstream"
SENDING_RCPT = "sending RCPT TO to upstream"

AUTH_OK = b"235 2.0.0 OK\r\n"

# xtext (RFC 1891): '+', '=' and everything outside printable ASCII become "+XX".
_XTEXT_PLAIN = frozenset(range(0x21, 0x7F)) - {ord("+"), ord("=")}


def xtext(value: bytes) -> bytes:
    return b"".join(
        bytes((byte,)) if byte in _XTEXT_PLAIN else b"+%02X" % byte for byte in value
    )


def xclient_addr(client_addr: str) -> str:
    # Postfix wants IPv6 literals tagged as such (RFC 5321 address literal form).
    if ":" in client_addr and not client_addr.startswith(("unix:", "IPV6:")):
        return "IPV6:" + client_addr
    return client_addr


class _State:
    """The login's steps. Plain strings, not an Enum: CPython 3.11 reads an Enum member off its class
    through EnumType's __getattr__ hook, 1,100 instructions a read (callgrind), and a step is read
    several times a response."""

    GREETING = "greeting"  # want 220
    TLS_EHLO = "tls_ehlo"  # proxy_starttls: EHLO before STARTTLS sent, want 250
    STARTTLS = "starttls"  # want 220
    HELO = "helo"  # our HELO/EHLO sent, want 250
    XCLIENT = "xclient"  # want 220 or 250
    CLIENT_HELO = "client_helo"  # want 250
    MAIL = "mail"  # want 250
    RCPT = "rcpt"  # any reply ends the login
    AUTH = "auth"  # want 235
    AUTH_LOGIN = "auth_login"  # AUTH LOGIN sent (ours), want 334
    AUTH_USER = "auth_user"  # base64 user name sent, want 334


_EXPECTED = {
    _State.GREETING: (b"220",),
    _State.TLS_EHLO: (b"250",),
    _State.STARTTLS: (b"220",),
    _State.HELO: (b"250",),
    _State.XCLIENT: (b"220", b"250"),
    _State.CLIENT_HELO: (b"250",),
    _State.MAIL: (b"250",),
    _State.AUTH: (b"235",),
    _State.AUTH_LOGIN: (b"334",),
    _State.AUTH_USER: (b"334",),
}


def _with_crlf(command: bytes) -> bytes:
    # The client machine hands over MAIL/RCPT as the client wrote them; a bare-LF or stripped line
    # still has to reach the backend as one CRLF-terminated command.
    return command if command.endswith(b"\n") else command + b"\r\n"


class SmtpUpstreamLogin(UpstreamLogin):
    def __init__(
        self,
        server_name: str,
        login: bytes,
        password: bytes,
        method: str,
        helo: bytes = b"",
        esmtp: bool = False,
        mail_from: bytes = b"",
        rcpt_to: bytes = b"",
        client_addr: str = "",
        client_host: str = "[UNAVAILABLE]",
        xclient: bool = True,
        smtp_auth: bool = False,
        proxy_buffer: int = 4096,
        pass_error_message: bool = False,
        starttls: bool = False,
    ):
        super().__init__(proxy_buffer, pass_error_message)
        self._starttls = starttls
        self._server_name = server_name.encode("ascii")
        self._login = login
        self._password = password
        self._none = method == "none"
        self._helo = helo
        self._esmtp = esmtp
        self._mail_from = mail_from
        self._rcpt_to = rcpt_to
        self._client_addr = xclient_addr(client_addr)
        self._client_host = client_host
        self._xclient = xclient
        # False/"none": no AUTH; True (nginx's on) and "plain": AUTH PLAIN; "login": AUTH LOGIN (ours).
        self._smtp_auth = "plain" if smtp_auth is True else (smtp_auth if smtp_auth not in ("none", None) else False)
        self._state = _State.GREETING

    def xclient_line(self) -> bytes:
        line = b"XCLIENT ADDR=" + self._client_addr.encode("ascii")
        if self._login and not self._smtp_auth:
            line += b" LOGIN=" + xtext(self._login)
        # NAME is already a checked host name or a bracketed placeholder (spec 5), never encoded.
        return line + b" NAME=" + self._client_host.encode("ascii") + b"\r\n"

    def _response_end(self, buffer: bytes) -> int:
        start = 0
        while True:
            end = line_end(buffer, start)
            if end < 0:
                return -1
            if buffer[start + 3 : start + 4] != b"-":
                return end
            start = end

    def _on_response(self, response: bytes, rest: bytes) -> List[object]:
        state = self._state
        if state is _State.RCPT:
            # The RCPT reply is the client's, whatever it says; a refusal does not end the session.
            return self._logged_in(response, rest)
        if response[:3] not in _EXPECTED[state]:
            return self._invalid(response[:-2], response)
        if state is _State.GREETING and self._starttls:
            # STARTTLS is an ESMTP extension, so this first greeting is always EHLO; the one after the
            # handshake follows nginx's rule (RFC 3207 makes the server forget the first).
            self._state = _State.TLS_EHLO
            return self._step(SENDING_HELO, b"EHLO %s\r\n" % self._server_name)
        if state is _State.TLS_EHLO:
            self._state = _State.STARTTLS
            return self._step(SENDING_STARTTLS, b"STARTTLS\r\n")
        if state in (_State.GREETING, _State.STARTTLS):
            tls = self._start_tls() if state is _State.STARTTLS else []
            self._state = _State.HELO
            verb = b"EHLO" if self._esmtp or self._xclient else b"HELO"
            return tls + self._step(SENDING_HELO, b"%s %s\r\n" % (verb, self._server_name))
        if state is _State.HELO and self._xclient:
            self._state = _State.XCLIENT
            return self._step(SENDING_XCLIENT, self.xclient_line())
        if state is _State.XCLIENT and self._helo:
            self._state = _State.CLIENT_HELO
            verb = b"EHLO" if self._esmtp else b"HELO"
            return self._step(SENDING_CLIENT_HELO, b"%s %s\r\n" % (verb, self._helo))
        if state is _State.MAIL:
            self._state = _State.RCPT
            return self._step(SENDING_RCPT, _with_crlf(self._rcpt_to))
        if state is _State.AUTH:
            return self._logged_in(AUTH_OK, rest)
        if state is _State.AUTH_LOGIN:
            self._state = _State.AUTH_USER
            return self._auth_line(base64.b64encode(self._login))
        if state is _State.AUTH_USER:
            self._state = _State.AUTH
            return self._auth_line(base64.b64encode(self._password))
        return self._after_greetings(rest)

    def _after_greetings(self, rest: bytes) -> List[object]:
        """HELO (and XCLIENT, client HELO) done: envelope, AUTH, or straight to the relay."""
        if self._none:
            self._state = _State.MAIL
            return self._step(SENDING_MAIL, _with_crlf(self._mail_from))
        if not self._smtp_auth:
            return self._logged_in(AUTH_OK, rest)
        actions = self._phase(SENDING_AUTH)
        if not self._password:
            return actions + self._fail("error", "no password available", None)
        if self._smtp_auth == "login":
            self._state = _State.AUTH_LOGIN
            return actions + [Send(b"AUTH LOGIN\r\n")] + self._phase(READING)
        self._state = _State.AUTH
        payload = base64.b64encode(b"\0" + self._login + b"\0" + self._password)
        return actions + [Send(b"AUTH PLAIN " + payload + b"\r\n")] + self._phase(READING)

    def _auth_line(self, payload: bytes) -> List[object]:
        return self._phase(SENDING_AUTH) + [Send(payload + b"\r\n")] + self._phase(READING)

