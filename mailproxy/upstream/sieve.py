"""ManageSieve backend login (RFC 5804): the capability greeting, then one AUTHENTICATE "PLAIN".

The backend greets with its capability response, closed by an OK line. The proxy answers with the
credentials as a PLAIN initial response, which takes a single round trip and needs no quoting beyond
base64 (a password with quotes, backslashes or NULs survives). The backend's OK line, which may carry a
response code such as (SASL ...) or a new CAPABILITY list, is what the client gets as the answer to its
own AUTHENTICATE.

A ManageSieve response is one or more lines, the last starting with OK, NO or BYE; any line may end in
a literal ``{n}`` whose n bytes (CRLFs included) belong to that line.
"""

import base64
import re
from typing import List

from .common import SENDING_STARTTLS, UpstreamLogin

SENDING_AUTHENTICATE = "sending AUTHENTICATE to upstream"
_LITERAL_AT_END = re.compile(rb"\{(\d{1,9})\+?\}$")
_VERDICTS = (b"OK", b"NO", b"BYE")


class _State:
    """The login's steps. Plain strings, not an Enum: CPython 3.11 reads an Enum member off its class
    through EnumType's __getattr__ hook, 1,100 instructions a read (callgrind), and a step is read
    several times a response."""

    GREETING = "greeting"  # capability response, want OK
    STARTTLS = "starttls"  # proxy_starttls: STARTTLS sent, want OK
    TLS_GREETING = "tls greeting"  # capabilities re-sent after the handshake (RFC 5804 2.2), want OK
    AUTHENTICATE = "authenticate"  # AUTHENTICATE sent, want OK


def response_end(buffer: bytes) -> int:
    """Index just past the verdict line (OK/NO/BYE) of the first complete response, or -1."""
    return _scan(buffer)[1]


def verdict_line(response: bytes) -> bytes:
    """The verdict line of a complete response (literal included), without its final CRLF."""
    return response[_scan(response)[0]:-2]


def _scan(buffer: bytes):
    """(start, end) of the first verdict line, or (-1, -1) while the response is incomplete."""
    pos = 0
    line_start = 0
    while True:
        crlf = buffer.find(b"\r\n", pos)
        if crlf < 0:
            return -1, -1
        literal = _LITERAL_AT_END.search(buffer, pos, crlf)
        if literal is not None:
            # The literal's bytes may hold CRLFs of their own: skip them, the line goes on after.
            pos = crlf + 2 + int(literal.group(1))
            if pos > len(buffer):
                return -1, -1
            continue
        end = crlf + 2
        if verdict(buffer[line_start:end]) is not None:
            return line_start, end
        pos = line_start = end


def verdict(line: bytes):
    """b"OK", b"NO" or b"BYE" when the line is one, else None."""
    word = line.split(None, 1)[0].upper() if line.strip() else b""
    if word.startswith(b"(") or word.startswith(b'"'):
        return None
    for name in _VERDICTS:
        # "OK" alone, "OK (code)", "OK \"text\"", as RFC 5804 4 allows.
        if word == name or (word.startswith(name) and word[len(name):len(name) + 1] in (b"(", b'"')):
            return name
    return None


class SieveUpstreamLogin(UpstreamLogin):
    def __init__(
        self,
        login: bytes,
        password: bytes,
        proxy_buffer: int = 4096,
        pass_error_message: bool = False,
        starttls: bool = False,
    ):
        super().__init__(proxy_buffer, pass_error_message)
        self._credentials = base64.b64encode(b"\0" + login + b"\0" + password)
        self._starttls = starttls
        self._state = _State.GREETING

    def _response_end(self, buffer: bytes) -> int:
        return response_end(buffer)

    def _on_response(self, response: bytes, rest: bytes) -> List[object]:
        line = verdict_line(response)
        if verdict(line) != b"OK":
            return self._invalid(line, response)
        state = self._state
        if state is _State.GREETING and self._starttls:
            self._state = _State.STARTTLS
            return self._step(SENDING_STARTTLS, b"STARTTLS\r\n")
        if state is _State.STARTTLS:
            self._state = _State.TLS_GREETING
            return self._start_tls()
        if state in (_State.GREETING, _State.TLS_GREETING):
            self._state = _State.AUTHENTICATE
            return self._step(SENDING_AUTHENTICATE, b'AUTHENTICATE "PLAIN" "%s"\r\n' % self._credentials)
        return self._logged_in(response, rest)
