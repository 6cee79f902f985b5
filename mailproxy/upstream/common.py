"""What the backend-login machines hand to the session, and the response reader they share.

A backend login is its own sans-IO machine (spec 4.2-4.5): bytes from the backend go in, and out come
the commands to write (`Send`), the `while <action>` text that now applies (`LogPhase`), and exactly one
verdict, `LoggedIn` or `Failed`. mailproxy/backend_login.py owns the socket, the `timeout` deadline
and the PROXY header; the machine owns every byte of the dialogue.
"""

from typing import List, Optional

from mailproxy.log import escape_bytes
from mailproxy.protocol.common import Send, StartTLS, value_class

__all__ = [
    "Send",
    "StartTLS",
    "LogPhase",
    "LoggedIn",
    "Failed",
    "UpstreamLogin",
    "READING",
    "PREMATURE_EOF",
]

# Log actions (spec 6.2); the session puts them behind "while".
READING = "reading response from upstream"
# proxy_starttls (ours): the session handshakes on the backend socket when it meets StartTLS, then
# carries on with the actions after it, which already belong to the encrypted dialogue.
SENDING_STARTTLS = "sending STARTTLS to upstream"

# nginx ends the login silently on a backend EOF (recv() of 0 logs nothing); an operator is better
# served by one line saying why the client got the internal-error reply.
PREMATURE_EOF = "upstream prematurely closed connection"

CRLF = b"\r\n"


@value_class
class LogPhase:
    """From now on, log lines about this session end in ``while <action>``."""

    action: str


@value_class
class LoggedIn:
    """The backend accepted the login; the relay starts.

    ``client_reply`` answers the client's login command; ``backend_pending`` are backend bytes that
    followed that reply and belong to the relay, sent to the client right after it.
    """

    client_reply: bytes
    backend_pending: bytes


@value_class
class Failed:
    """The login is over; log ``log_message`` at ``level``, answer the client, close both sides.

    ``client_reply`` None means the protocol's internal-error line; otherwise the bytes to send
    verbatim (the backend's own error under ``proxy_pass_error_message on``).
    """

    level: str
    log_message: str
    client_reply: Optional[bytes]


# One LogPhase per action text (the machines' own constants), shared: it is never changed.
_PHASES = {}


def _log_phase(action: str) -> LogPhase:
    phase = _PHASES.get(action)
    if phase is None:
        phase = _PHASES[action] = LogPhase(action)
    return phase


def line_end(buffer: bytes, start: int, minimum: int = 4) -> int:
    """Index just past the first CRLF that closes a line of at least ``minimum`` bytes from ``start``,
    or -1.

    nginx evaluates a reply only once at least 4 bytes are buffered and they end in CRLF, so a 3-byte
    "+\\r\\n" is not yet a reply: it waits for more and reads both together.
    """
    pos = start
    while True:
        found = buffer.find(CRLF, pos)
        if found < 0:
            return -1
        end = found + 2
        if end - start >= minimum:
            return end
        pos = found + 1


class UpstreamLogin:
    """Shared reader: collects one response at a time within ``proxy_buffer`` and dispatches it.

    Subclasses define ``_response_end`` (where the response for the current step ends) and
    ``_on_response`` (what to do with it). A response that does not fit ``proxy_buffer`` is a
    failure, as nginx never grows that buffer.
    """

    def __init__(self, proxy_buffer: int, pass_error_message: bool):
        if proxy_buffer < 4:
            raise ValueError("proxy_buffer must hold at least one 4-byte reply")
        self._proxy_buffer = proxy_buffer
        self._pass_error_message = pass_error_message
        self._buffer = b""
        self._finished = False
        self.phase = READING

    @property
    def finished(self) -> bool:
        return self._finished

    def receive_data(self, data: bytes) -> List[object]:
        if self._finished:
            raise RuntimeError("backend login already finished; the relay owns further bytes")
        if not data:
            return self._fail("error", PREMATURE_EOF, None)
        self._buffer += data
        actions: List[object] = []
        while not self._finished:
            end = self._response_end(self._buffer)
            if end < 0:
                if len(self._buffer) >= self._proxy_buffer:
                    actions += self._too_long()
                break
            if end > self._proxy_buffer:
                actions += self._too_long()
                break
            response, rest = self._buffer[:end], self._buffer[end:]
            # Bytes behind a response arrived before the backend could have read our next command:
            # they are unsolicited and dropped, as nginx resets its buffer after every step. Only the
            # final step keeps them, for the relay.
            self._buffer = b""
            actions += self._on_response(response, rest)
            if not self._finished:
                break
        return actions

    # -- helpers for subclasses -------------------------------------------------------------

    def _response_end(self, buffer: bytes) -> int:
        return line_end(buffer, 0)

    def _on_response(self, response: bytes, rest: bytes) -> List[object]:
        raise NotImplementedError

    def _phase(self, action: str) -> List[object]:
        self.phase = action
        return [_log_phase(action)]

    def _step(self, action: str, line: bytes) -> List[object]:
        # The sending action covers the write only (a send() error names it); once the command is
        # out, nginx is back to "reading response from upstream" for whatever the backend answers.
        self.phase = READING
        return [_log_phase(action), Send(line), _log_phase(READING)]

    def _fail(self, level: str, message: str, reply: Optional[bytes]) -> List[object]:
        self._finished = True
        self._buffer = b""
        return [Failed(level, message, reply)]

    def _invalid(self, shown: bytes, whole: bytes) -> List[object]:
        """The backend refused or said something unexpected (spec 4.5).

        ``shown`` is the part nginx logs (without the final CRLF), ``whole`` what the client gets
        when ``proxy_pass_error_message`` is on.
        """
        message = 'upstream sent invalid response: "%s"' % escape_bytes(shown, quoted=False)
        if self._pass_error_message:
            return self._fail("info", message, whole)
        return self._fail("error", message, None)

    def _too_long(self) -> List[object]:
        data = self._buffer[: self._proxy_buffer]
        # nginx terminates the full buffer in place, over its last byte, before printing it.
        message = 'upstream sent too long response line: "%s"' % escape_bytes(data[:-1], quoted=False)
        return self._fail("error", message, None)

    def _start_tls(self) -> List[object]:
        # Whatever followed the "go ahead" reply came before the handshake, in the clear: it was
        # dropped with the buffer (receive_data), so nothing injected there reaches the login.
        return [StartTLS()]

    def _logged_in(self, reply: bytes, rest: bytes) -> List[object]:
        self._finished = True
        return [LoggedIn(reply, rest)]
