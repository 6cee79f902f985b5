"""Reading the two byte streams of a dialogue where they part: the helpers the DELIBERATE and PENDING
entries of test_differential_nginx.py use to recognise their own pattern, and nothing wider.

``Divergence`` holds a dialogue, both transcripts (masked), both sessions' error-log records and the
offset of the line where the streams stop agreeing; its methods name the client line being answered
there, nginx's "too long command" buffer, and so on.
"""

import re
from dataclasses import dataclass, field
from typing import List, Optional

from diff_harness import BUFFER, PROTOCOL

INVALID = {
    "pop3": b"-ERR invalid command\r\n",
    "smtp": b"500 5.5.1 Invalid command\r\n",
    "imap": b"BAD invalid command\r\n",  # after "<tag> " or "* "
}
POP3_MULTILINE = (b"+OK Capability list follows", b"+OK methods supported:")
LITERAL_HEAD = re.compile(rb"\{(\d*)(\+?)\}\r?\n$")


# --- error logs: records, not lines ----------------------------------------------------------------

_RECORD = re.compile(rb"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d \[\w+\] \d+#\d+: ", re.M)
_CONNECTED = re.compile(rb"^\*(\d+) client ([\d.]+):(\d+) connected to ")


def session_records(log: bytes, client_ip: str, client_port: int) -> List[bytes]:
    """The records one session wrote (its *N lines), found by the client's address and port in its first
    line (each dialogue has an address of its own, and another's may use the same port).

    nginx writes client bytes raw, so one record may span several physical lines: records are cut at
    the timestamp that starts each, and kept as bytes."""
    heads = list(_RECORD.finditer(log))
    ends = [head.start() for head in heads[1:]] + [len(log)]
    records = [log[head.end():end] for head, end in zip(heads, ends)]
    number = None
    for record in records:
        match = _CONNECTED.match(record)
        if match and int(match.group(3)) == client_port and match.group(2) == client_ip.encode():
            number = match.group(1)
    if number is None:
        return []
    marker = b"*" + number + b" "
    return [record.rstrip(b"\n") for record in records if record.startswith(marker)]


def quoted_in(records, prefix: bytes) -> List[bytes]:
    """The raw texts nginx quoted after ``prefix`` (``client sent too long command "``), in order; a
    record nginx cut at its line limit has no closing quote and gives what there is."""
    found = []
    for record in records:
        start = record.find(prefix)
        if start < 0:
            continue
        text = record[start + len(prefix):]
        end = text.rfind(b'" while ')
        found.append(text if end < 0 else text[:end])
    return found


# --- client bytes -------------------------------------------------------------------------------------


def client_lines(sent: bytes) -> List[bytes]:
    """Client bytes cut after each LF, and only there (POP3, SMTP: a line is one command or response)."""
    return re.findall(rb"[^\n]*\n|[^\n]+$", sent)


@dataclass
class ImapCommand:
    data: bytes
    tag: Optional[bytes]  # None: a line without a space, which both answer untagged ("* BAD")
    literals: list = field(default_factory=list)  # (count text, plus, data, byte after it or b"")
    start: int = 0  # offset in the client's bytes


_IMAP_COMMAND = re.compile(
    rb"(?i)[A-Za-z0-9._-]{0,32} +(?:NOOP|CAPABILITY|LOGOUT|STARTTLS|LOGIN|AUTHENTICATE)[ \r\n]")


def imap_commands(sent: bytes) -> List[ImapCommand]:
    """Client bytes cut into IMAP commands, literals followed as RFC 3501 reads them: a line ending in
    ``{n}``/``{n+}`` goes on after n bytes (an empty count reads as none), unless its tag or command word
    is already wrong (the line is then refused up to its LF)."""
    commands = []
    index = 0
    while index < len(sent):
        start = index
        literals = []
        while True:
            end = sent.find(b"\n", index)
            if end < 0:
                index = len(sent)
                break
            line = sent[index:end + 1]
            index = end + 1
            match = LITERAL_HEAD.search(line)
            if not match or not _IMAP_COMMAND.match(sent, start):
                break
            size = int(match.group(1)) if match.group(1) else 0
            data = sent[index:index + size]
            index += size
            literals.append((match.group(1), match.group(2), data, sent[index:index + 1]))
        data = sent[start:index]
        # A line with no space has no tag: its reply is untagged, and an empty tag (a line that starts
        # with a space) is another command's.
        tag = data.split(b" ", 1)[0] if b" " in data.split(b"\n", 1)[0] else None
        commands.append(ImapCommand(data, tag, literals, start))
    return commands


# --- server replies -----------------------------------------------------------------------------------


def split_replies(protocol: str, data: bytes) -> List[bytes]:
    """The complete replies in ``data`` after the greeting (POP3, SMTP): each answers one client line."""
    found, current, multiline = [], b"", False
    for line in re.findall(rb"[^\n]*\n", data):
        current += line
        bare = line.rstrip(b"\r\n")
        if protocol == "smtp":
            done = bare[3:4] != b"-"
        elif multiline:
            done = bare == b"."
        else:
            multiline = bare.startswith(POP3_MULTILINE)
            done = not multiline
        if done:
            found.append(current)
            current, multiline = b"", False
    return found[1:]


def replies(protocol: str, data: bytes) -> int:
    return len(split_replies(protocol, data))


def first_line(data: bytes) -> bytes:
    return data[:data.find(b"\n") + 1] if b"\n" in data else data


def at_command_end(data: bytes, protocol: str) -> bool:
    """Whether ``data`` ends where a command ends (a line end that announces no IMAP literal)."""
    if not data.endswith(b"\n"):
        return False
    return protocol != "imap" or not LITERAL_HEAD.search(data[data.rfind(b"\n", 0, len(data) - 1) + 1:])


def fills_at_command_end(pieces, size: int, protocol: str) -> bool:
    """nginx 1.22's reads, one per write: whether one filled the buffer to its last byte exactly at the
    end of a command while more of that write waited (spec 9.9 b). nginx empties its buffer only when
    everything read was answered; then it answers what it holds and reads nothing more until the client
    sends again."""
    held = b""
    for piece in pieces:
        taken, left = piece[:size - len(held)], piece[size - len(held):]
        held += taken
        if left and len(held) == size and at_command_end(held, protocol):
            return True
        if at_command_end(held, protocol):
            held = b""
        elif len(held) == size:
            return False  # too long: not this
    return False


def complete_part(buffer: bytes, protocol: str) -> int:
    """How many leading bytes of nginx's logged buffer are whole commands (0: none)."""
    if protocol != "imap":
        return buffer.rfind(b"\n") + 1
    done = 0
    for command in imap_commands(buffer):
        if not at_command_end(command.data, protocol) or any(len(data) < int(count or 0)
                                                             for count, _, data, _ in command.literals):
            break
        done += len(command.data)
    return done


@dataclass
class Divergence:
    item: object  # the Dialogue
    pieces: List[bytes]  # what the client sent to nginx, write by write
    nginx: bytes  # nginx's masked bytes (rewritten by the entries explained so far)
    ours: bytes
    nginx_closed: bool
    ours_closed: bool
    nginx_log: List[bytes]
    ours_log: List[bytes]

    @property
    def sent(self) -> bytes:
        return b"".join(self.pieces)

    @property
    def protocol(self) -> str:
        return PROTOCOL[self.item.server]

    @property
    def buffer(self) -> int:
        return BUFFER[self.item.server]

    @property
    def at(self) -> int:
        """Start of the first line where the two streams differ (their length when they agree)."""
        index = 0
        limit = min(len(self.nginx), len(self.ours))
        while index < limit and self.nginx[index] == self.ours[index]:
            index += 1
        if index == limit and len(self.nginx) == len(self.ours):
            return index  # the same bytes: only the close differs
        return self.nginx.rfind(b"\n", 0, index) + 1

    @property
    def nginx_rest(self) -> bytes:
        return self.nginx[self.at:]

    @property
    def ours_rest(self) -> bytes:
        return self.ours[self.at:]

    @property
    def before(self) -> bytes:
        return self.nginx[:self.at]

    def answered_line(self) -> bytes:
        """POP3/SMTP: the client line the first differing reply answers (each line draws one reply)."""
        lines = client_lines(self.sent)
        index = replies(self.protocol, self.before)
        return lines[index] if 0 <= index < len(lines) else b""

    def imap_command(self, tag: bytes, answered: bool = False):
        """IMAP: the client command with this tag that the differing reply answers: the first one whose
        tagged reply is not in the agreed part yet; with ``answered``, the last one whose reply is."""
        found = [command for command in imap_commands(self.sent) if command.tag == tag]
        count = len(re.findall(rb"(?m)^%s (?:OK|NO|BAD) " % re.escape(tag), self.before))
        count -= 1 if answered else 0
        return found[count] if 0 <= count < len(found) else None

    def too_long_buffer(self):
        """The latest of ``too_long_buffers()``, or None."""
        found = self.too_long_buffers()
        return found[0] if found else None

    def too_long_buffers(self):
        """nginx's whole buffer when it found a command too long, every place it can start, the latest
        first (lines alike at their start give several): found in what the client sent
        by the start of what nginx logged. The logged text itself will not do: the log line stops at 2048
        bytes, a refused MAIL turns CR and LF into '_' in the buffer, and IMAP quoted strings are
        unescaped in place (the bytes of a quoted string with a backslash shift); a full buffer is
        ``buffer`` bytes long."""
        found = quoted_in(self.nginx_log, b'client sent too long command "')
        if not found:
            return []
        prefix = re.split(rb'["\\]', found[0][:200], 1)[0]  # nginx unescapes quoted strings in place
        if not prefix:
            return []
        pattern = b"".join(rb"[_\r\n]" if byte == 0x5F else re.escape(bytes([byte])) for byte in prefix)
        starts = [match.start() for match in re.finditer(pattern, self.sent)
                  if match.start() + self.buffer <= len(self.sent)]
        return [self.sent[start:start + self.buffer] for start in reversed(starts)]

    def tag_at(self):
        """IMAP: the tag of the first differing tagged reply, mailproxy's or else nginx's."""
        for rest in (self.ours_rest, self.nginx_rest):
            match = re.match(rb"([^ \r\n]*) (?:OK|NO|BAD) ", rest)
            if match:
                return match.group(1)
        return None

    def tag_of_ours(self):
        """IMAP: the tag of mailproxy's first differing line when it is ``<tag> BAD invalid command``."""
        match = re.match(rb"([^ \r\n]*) BAD invalid command\r\n", self.ours_rest)
        return match.group(1) if match else None
