"""IMAP backend login (spec 4.3): greeting, then LOGIN with the credentials only as literals.

Literals keep the login and password out of any quoting rules and out of the command line itself, so
a password with spaces, quotes or backslashes reaches the backend byte for byte. They are always
synchronizing: the backend answers each with a "+" continuation before the next part is sent.
"""

import re
from typing import List

from .common import SENDING_STARTTLS, UpstreamLogin, line_end

SENDING_LOGIN = "sending LOGIN command to upstream"
SENDING_USER = "sending user name to upstream"
SENDING_PASSWORD = "sending password to upstream"
SENDING_ID = "sending ID to upstream"


def id_command(tag: bytes, client_id=None, client_fields=()) -> bytes:
    """One ``ID (...)``: the client's own fields (imap_client_id) then, with proxy_client_id, Dovecot's
    fields naming the real client, which a backend that trusts the proxy (login_trusted_networks) logs
    and applies its rules to instead of the proxy's address."""
    parts = []
    for name, value in client_fields:
        parts.append(_quoted(name) + b" " + (b"NIL" if value is None else _quoted(value)))
    if client_id is not None:
        client_ip, client_port, local_ip, local_port = client_id
        fields = (("x-originating-ip", client_ip), ("x-originating-port", client_port),
                  ("x-connected-ip", local_ip), ("x-connected-port", local_port))
        # Addresses and ports never hold quotes or backslashes, so plain quoted strings are enough.
        parts.extend(('"%s" "%s"' % (name, value)).encode("ascii") for name, value in fields)
    return b"%s ID (%s)\r\n" % (tag, b" ".join(parts))


def forwardable_id_name(name: bytes) -> bool:
    """Whether a client's ID field may reach the backend. Dovecot trusts x-* fields (x-originating-ip,
    x-session-id, x-forward-*...) from the proxy's address, so a client's own would pass for the proxy's
    word. The name is judged as it would be sent: a control byte would be dropped on the way
    ("x\\x01-originating-ip" becomes "x-originating-ip"), so a name holding one, or any byte a field name
    has no use for (non-ASCII), is dropped whole rather than cleaned."""
    if _UNSENDABLE_NAME.search(name) is not None:
        return False
    return not name.strip().lower().startswith(b"x-")


_UNSENDABLE_NAME = re.compile(rb"[\x00-\x1f\x7f-\xff]")


def _quoted(value: bytes) -> bytes:
    """A quoted string for any client bytes: quote and backslash escaped, line breaks and other control
    bytes (which a quoted string cannot carry) dropped; 8-bit bytes pass, as Dovecot reads them."""
    value = value.translate(None, _CONTROLS)
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


_CONTROLS = bytes(range(0x20)) + b"\x7f"


class _State:
    """The login's steps. Plain strings, not an Enum: CPython 3.11 reads an Enum member off its class
    through EnumType's __getattr__ hook, 1,100 instructions a read (callgrind), and a step is read
    several times a response."""

    GREETING = "greeting"
    STARTTLS = "starttls"  # proxy_starttls: "<tag> STARTTLS" sent, waiting for "<tag> OK"
    ID = "id"  # proxy_client_id: "<tag> ID (...)" sent, waiting for any tagged reply
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
        starttls: bool = False,
        client_id=None,
        client_fields=(),
    ):
        super().__init__(proxy_buffer, pass_error_message)
        self._login = login
        self._password = password
        self._starttls = starttls
        # proxy_client_id (ours): (client ip, client port, local ip, local port), named before LOGIN
        self._client_id = client_id
        # imap_client_id (ours): the client's ID fields ((name, value | None), ...), told before LOGIN
        self._client_fields = (tuple(field for field in client_fields if forwardable_id_name(field[0]))
                               if client_fields else ())
        # A tag never contains a space; accept it with or without the separator the client used.
        self._tag = tag.rstrip(b" ")
        self._state = _State.GREETING

    def _response_end(self, buffer: bytes) -> int:
        end = line_end(buffer, 0)
        if self._state in (_State.STARTTLS, _State.ID):
            # Untagged lines before the tagged STARTTLS reply are read past; only the tagged line counts.
            start = 0
            while end > 0 and buffer.startswith(b"* ", start):
                start = end
                end = line_end(buffer, start)
            return end
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
            if self._starttls:
                self._state = _State.STARTTLS
                return self._step(SENDING_STARTTLS, b"%s STARTTLS\r\n" % self._tag)
            return self._send_login()
        if state is _State.STARTTLS:
            tagged = response.rsplit(b"\r\n", 2)[-2] + b"\r\n"
            if not tagged.startswith(self._tag + b" OK"):
                return self._invalid(tagged[:-2], response)
            return self._start_tls() + self._send_login()
        if state is _State.ID:
            # The ID is advice: a backend that refuses it (BAD, NO) still gets the login.
            self._client_id, self._client_fields = None, ()
            return self._send_login()
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

    def _send_login(self) -> List[object]:
        if self._client_id is not None or self._client_fields:
            self._state = _State.ID
            return self._step(SENDING_ID, id_command(self._tag, self._client_id, self._client_fields))
        self._state = _State.LOGIN
        return self._step(SENDING_LOGIN, b"%s LOGIN {%d}\r\n" % (self._tag, len(self._login)))
