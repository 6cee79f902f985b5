"""IMAP backend login (spec 4.3): greeting, then LOGIN with the credentials only as literals.

Literals keep the login and password out of any quoting rules and out of the command line itself, so
a password with spaces, quotes or backslashes reaches the backend byte for byte. They are always
synchronizing: the backend answers each with a "+" continuation before the next part is sent.
"""

import enum
from typing import List

from .common import UpstreamLogin, line_end

SENDING_LOGIN = "sending LOGIN command to upstream"
SENDING_USER = "sending user name to upstream"
SENDING_PASSWORD = "sending password to upstream"


class _State(enum.Enum):
    GREETING = "greeting"
    LOGIN = "login"  # LOGIN {n} sent, waiting for "+"
    USER = "user"  # <login> {m} sent, waiting for "+"
    PASSWORD = "password"  # <password> sent, waiting for "<tag> OK"


class ImapUpstreamLogin(UpstreamLogin):
    def __init__(
        self,
        login: bytes,
        password: bytes,
        tag: bytes,
        proxy_buffer: int = 4096,
        pass_error_message: bool = False,
    ):
        super().__init__(proxy_buffer, pass_error_message)
        self._login = login
        self._password = password
        # A tag never contains a space; accept it with or without the separator the client used.
        self._tag = tag.rstrip(b" ")
        self._state = _State.GREETING

    def _response_end(self, buffer: bytes) -> int:
        end = line_end(buffer, 0)
        if end < 0 or self._state is not _State.PASSWORD or not buffer.startswith(b"* "):
            return end
        # One untagged line (a CAPABILITY, typically) may precede the tagged reply; the tagged line
        # is then judged on its own, and needs its own 4 bytes.
        return line_end(buffer, end)

    def _on_response(self, response: bytes, rest: bytes) -> List[object]:
        state = self._state
        if state is _State.GREETING:
            if not response.startswith(b"* OK"):
                return self._invalid(response[:-2], response)
            self._state = _State.LOGIN
            line = b"%s LOGIN {%d}\r\n" % (self._tag, len(self._login))
            return self._step(SENDING_LOGIN, line)
        if state is _State.LOGIN:
            if not response.startswith(b"+"):
                return self._invalid(response[:-2], response)
            self._state = _State.USER
            return self._step(SENDING_USER, b"%s {%d}\r\n" % (self._login, len(self._password)))
        if state is _State.USER:
            if not response.startswith(b"+"):
                return self._invalid(response[:-2], response)
            self._state = _State.PASSWORD
            return self._step(SENDING_PASSWORD, self._password + b"\r\n")
        tagged = response
        if response.startswith(b"* "):
            tagged = response[line_end(response, 0):]
        if not tagged.startswith(self._tag + b" OK"):
            # The log shows only the line that was judged; the client, with pass_error_message,
            # gets everything the backend said.
            return self._invalid(tagged[:-2], response)
        return self._logged_in(response, rest)
