"""What the client-facing machines hand to the session.

The machines never touch a socket: every step ends in a list of actions that the session carries out in
order. Keeping them plain frozen dataclasses lets tests compare whole transcripts with ``==``.
"""

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Send:
    """Bytes for the client, written completely before the next action runs."""

    data: bytes


@dataclass(frozen=True)
class Close:
    """Close the client connection once everything before it was written."""


@dataclass(frozen=True)
class Log:
    """A line for the error log; the session adds nginx's context suffix."""

    level: str
    message: str


@dataclass(frozen=True)
class StartTLS:
    """Start the TLS handshake on the client connection (the reply was sent just before)."""


@dataclass(frozen=True)
class AuthAttempt:
    """One login the client asked for, as the auth_http request needs it."""

    method: str  # plain, apop, cram-md5, external, none, xoauth2, oauthbearer
    login: bytes
    password: bytes
    attempt: int  # Auth-Login-Attempt: client attempts in this session, from 1
    salt: Optional[bytes] = None  # "<R.T@S>\r\n" for apop and cram-md5
    tag: bytes = b""  # IMAP: the tag the backend login answers under
    helo: bytes = b""  # SMTP: client's HELO/EHLO argument
    esmtp: bool = False  # SMTP: the client used EHLO at least once
    mail_from: bytes = b""  # SMTP: raw MAIL command (method none)
    rcpt_to: bytes = b""  # SMTP: raw RCPT command (method none)
    imap_id: tuple = ()  # IMAP with imap_client_id (ours): the client's ID ((name, value | None), ...)


@dataclass(frozen=True)
class Authenticate:
    """Ask the auth server; the machine reads nothing until the session reports back."""

    request: AuthAttempt


Action = object  # any of the dataclasses above

# Log texts that more than one protocol writes.
TOO_MANY_INVALID = "client sent too many invalid commands"
TOO_MANY_COMMANDS = "client sent too many commands"


# Commands whose arguments carry credentials: nginx dumps them raw into the log, we never do.
_SECRET_VERBS = (b"LOGIN", b"AUTHENTICATE", b"AUTH", b"PASS", b"APOP")


def escape_for_log(data: bytes) -> str:
    """Control bytes, quotes, backslashes and non-ASCII as \\xNN, so one log line stays one line."""
    out = []
    for byte in data:
        if 0x20 <= byte < 0x7F and byte not in (0x22, 0x5C):
            out.append(chr(byte))
        else:
            out.append("\\x%02X" % byte)
    return "".join(out)


def redact_command(line: bytes) -> bytes:
    """Keep the tag and verb of a credential-bearing line and drop what follows them."""
    words = line.split(None, 2)
    for keep in (1, 2):
        if len(words) > keep - 1 and words[keep - 1].upper() in _SECRET_VERBS:
            if len(words) > keep:
                return b" ".join(words[:keep]) + b" ..."
    return line


def auth_server_text(text) -> bytes:
    """Auth server texts reach the machines as latin-1-decoded header values: back to their bytes."""
    return text if isinstance(text, bytes) else text.encode("latin-1", "replace")


def login_failed(text: bytes) -> Log:
    """nginx's info line for a refused login; the auth server's text is escaped like any log input."""
    return Log("info", 'client login failed: "%s"' % escape_for_log(text))


def too_long(buffer: bytes) -> str:
    return 'client sent too long command "%s"' % escape_for_log(redact_command(buffer))
