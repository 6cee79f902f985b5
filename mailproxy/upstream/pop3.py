"""POP3 backend login (spec 4.2): greeting, USER, PASS, each answered by "+OK".

The backend's greeting may carry an APOP timestamp; it is ignored, because the proxy always logs in
with the clear-text password the auth server handed back, whatever method the client used.
"""

import enum
from typing import List

from .common import UpstreamLogin

SENDING_USER = "sending user name to upstream"
SENDING_PASSWORD = "sending password to upstream"


class _State(enum.Enum):
    GREETING = "greeting"
    USER = "user"  # USER sent
    PASS = "pass"  # PASS sent


class Pop3UpstreamLogin(UpstreamLogin):
    def __init__(
        self,
        login: bytes,
        password: bytes,
        proxy_buffer: int = 4096,
        pass_error_message: bool = False,
    ):
        super().__init__(proxy_buffer, pass_error_message)
        self._login = login
        self._password = password
        self._state = _State.GREETING

    def _on_response(self, response: bytes, rest: bytes) -> List[object]:
        if not response.startswith(b"+OK"):
            return self._invalid(response[:-2], response)
        if self._state is _State.GREETING:
            self._state = _State.USER
            # Sent raw, as nginx does: POP3 has no quoting, and the auth server vouched for the login.
            return self._step(SENDING_USER, b"USER " + self._login + b"\r\n")
        if self._state is _State.USER:
            self._state = _State.PASS
            return self._step(SENDING_PASSWORD, b"PASS " + self._password + b"\r\n")
        return self._logged_in(response, rest)
