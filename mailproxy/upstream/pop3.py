"""POP3 backend login (spec 4.2): greeting, USER, PASS, each answered by "+OK".

The backend's greeting may carry an APOP timestamp; it is ignored, because the proxy always logs in
with the clear-text password the auth server handed back, whatever method the client used.
"""

from typing import List

from .common import SENDING_STARTTLS, UpstreamLogin, line_end

SENDING_USER = "sending user name to upstream"
SENDING_PASSWORD = "sending password to upstream"
SENDING_CAPA = "sending CAPA to upstream"
SENDING_XCLIENT = "sending XCLIENT to upstream"


class _State:
    """The login's steps. Plain strings, not an Enum: CPython 3.11 reads an Enum member off its class
    through EnumType's __getattr__ hook, 1,100 instructions a read (callgrind), and a step is read
    several times a response."""

    GREETING = "greeting"
    STLS = "stls"  # proxy_starttls: STLS sent
    CAPA = "capa"  # proxy_client_id: CAPA sent, looking for XCLIENT
    XCLIENT = "xclient"  # proxy_client_id: XCLIENT sent
    USER = "user"  # USER sent
    PASS = "pass"  # PASS sent


class Pop3UpstreamLogin(UpstreamLogin):
    def __init__(
        self,
        login: bytes,
        password: bytes,
        proxy_buffer: int = 4096,
        pass_error_message: bool = False,
        starttls: bool = False,
        client_id=None,
    ):
        super().__init__(proxy_buffer, pass_error_message)
        self._login = login
        self._password = password
        self._starttls = starttls
        # proxy_client_id (ours): (client ip, client port, local ip, local port) for XCLIENT
        self._client_id = client_id
        self._xclient_offered = False
        self._state = _State.GREETING

    def _response_end(self, buffer: bytes) -> int:
        if self._state is _State.CAPA and buffer.startswith(b"+OK"):
            # A multi-line reply: it ends with a line holding a single dot.
            if buffer.startswith(b".\r\n", line_end(buffer, 0)):
                return line_end(buffer, 0) + 3
            found = buffer.find(b"\r\n.\r\n")
            return -1 if found < 0 else found + 5
        return line_end(buffer, 0)

    def _on_response(self, response: bytes, rest: bytes) -> List[object]:
        if self._state is _State.GREETING and b"[XCLIENT]" in response:
            # Dovecot offers XCLIENT to trusted networks as a response code in its greeting.
            self._xclient_offered = True
        if self._state is _State.CAPA:
            # Only a backend that offers XCLIENT to us is told; others answer CAPA without it.
            lines = response.split(b"\r\n")[1:] if response.startswith(b"+OK") else []
            if any(line.split(b" ", 1)[0].upper() == b"XCLIENT" for line in lines):
                return self._send_xclient()
            return self._send_user()
        if self._state is _State.XCLIENT:
            # Advice only: a refusal still leaves the login to do.
            return self._send_user()
        if not response.startswith(b"+OK"):
            return self._invalid(response[:-2], response)
        if self._state is _State.GREETING and self._starttls:
            self._state = _State.STLS
            return self._step(SENDING_STARTTLS, b"STLS\r\n")
        if self._state in (_State.GREETING, _State.STLS):
            tls = self._start_tls() if self._state is _State.STLS else []
            if self._client_id is not None and self._xclient_offered:
                return tls + self._send_xclient()
            if self._client_id is not None:
                self._state = _State.CAPA
                return tls + self._step(SENDING_CAPA, b"CAPA\r\n")
            return tls + self._send_user()
        if self._state is _State.USER:
            self._state = _State.PASS
            return self._step(SENDING_PASSWORD, b"PASS " + self._password + b"\r\n")
        return self._logged_in(response, rest)

    def _send_user(self) -> List[object]:
        self._state = _State.USER
        # POP3 has no quoting: a CR, LF or NUL (SASL PLAIN/LOGIN can carry them) would end the line and
        # inject commands into the user's backend session, so such credentials are never sent.
        if any(byte in value for value in (self._login, self._password) for byte in b"\r\n\0"):
            return self._fail("error", "login or password contains CR, LF or NUL, not sent to upstream", None)
        # Sent raw otherwise, as nginx does; the auth server vouched for the login.
        return self._step(SENDING_USER, b"USER " + self._login + b"\r\n")

    def _send_xclient(self) -> List[object]:
        self._state = _State.XCLIENT
        ip, port = self._client_id[0], self._client_id[1]
        return self._step(SENDING_XCLIENT, b"XCLIENT ADDR=%s PORT=%d\r\n" % (ip.encode("ascii"), port))
