"""The IMAP command tokenizer (spec 2.1), a pure function over the bytes of one buffered command.

``parse_line`` always starts at the head of the buffer and scans at most ``limit`` bytes, so the answer
depends only on those bytes and on what the command before left open: feeding a command whole or byte by
byte gives the same result. The machine only calls it again when something that can change the answer
arrived (an LF, or the rest of a literal), which keeps the rescanning linear in practice.

Two states of nginx's parser outlive a line, and the tokenizer keeps both, as the bytes on the wire
depend on them. A quoted string that a line end cuts leaves nginx "inside quotes" for the commands that
follow until a quote closes it or a line fails to parse (spec 2.1's quirk): there a space does not end an
argument and a backslash escapes, even in one that did not start with a quote. And a line inside an
AUTHENTICATE exchange is read from its first byte as one argument, quotes and braces as plain data.
"""

import re

from .common import Kind, Parsed

LF = 0x0A
CR = 0x0D
SP = 0x20
QUOTE = 0x22
BACKSLASH = 0x5C
OPEN_BRACE = 0x7B
CLOSE_BRACE = 0x7D
PLUS = 0x2B
OPEN_PAREN = 0x28
CLOSE_PAREN = 0x29

MAX_TAG = 32
MAX_ARGS = 3
TAG_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._")
DIGITS = frozenset(b"0123456789")
VERBS = frozenset((b"NOOP", b"CAPABILITY", b"LOGOUT", b"STARTTLS", b"LOGIN", b"AUTHENTICATE"))
ID = b"ID"  # RFC 2971, only with imap_client_id (ours)
VERBS_WITH_ID = VERBS | {ID}
# The tokenizer's scans, each one regular-expression match instead of a Python loop a byte (a LOGIN line
# cost 36,000 instructions so; callgrind): a tag of up to MAX_TAG TAG_CHARS, the spaces and letters of a
# verb, an atom up to SP, CR or LF.
_TAG = re.compile(rb"[A-Za-z0-9\-._]{0,%d}" % MAX_TAG)
_VERB = re.compile(rb" *([A-Za-z]*)")
_ATOM = re.compile(rb"[^ \r\n]*")
# A whole line as most clients write every command: tag, spaces, a word of letters, up to MAX_ARGS atoms
# (an argument that starts with neither a quote nor a brace: up to SP, CR or LF), the line end. Such a line
# needs none of _parse's states; read at one go, a LOGIN line costs 15,000 instructions instead of 31,000.
_SIMPLE = re.compile(rb"(%s) +([A-Za-z]+)((?: +[^ \r\n\"{][^ \r\n]*){0,%d}) *\r?\n"
                     % (_TAG.pattern, MAX_ARGS))
_COMPLETE = Kind.COMPLETE


def parse_line(buf: bytes, limit: int, continuation: bool, client_id: bool = False,
               quote_open: bool = False) -> Parsed:
    """Parse the command at the head of ``buf``; a continuation line has no tag or verb, only arguments.

    ``client_id`` (imap_client_id, ours) makes ``ID`` a command: its args are the strings of its list in
    order, NIL as None (``ID NIL`` gives none). ``quote_open``: the previous command left a quoted string
    open; the result's ``quote_open`` says whether this one does.
    """
    window = bytes(buf[:limit])
    if not (continuation or quote_open):
        simple = _SIMPLE.match(window)
        if simple is not None:
            verb = simple.group(2).upper()
            if verb in VERBS:
                tag, _, args = simple.groups()
                return Parsed(_COMPLETE, tag, verb, list(filter(None, args.split(b" "))), simple.end())
    return _parse(window, limit, continuation, client_id, quote_open)


def _parse(window: bytes, limit: int, continuation: bool, client_id: bool, quote_open: bool) -> Parsed:
    """parse_line's answer for any line; parse_line answers the commonest lines itself (_SIMPLE)."""
    result = Parsed(_COMPLETE, quote_open=quote_open)
    if continuation:
        # nginx reads the response from the line's first byte, up to SP, CR or LF (or, inside quotes, up
        # to a quote or the line end); further arguments follow as in a command.
        try:
            index = _word(window, 0, result)
        except _Bad as bad:
            return _invalid(window, bad.index, result)
        if index < 0:
            return _incomplete(result)
        return _arguments(window, index, result, limit)
    index = _tag(window, result)
    if index is None:
        return _invalid(window, 0, result)
    if index < 0:
        return _incomplete(result)
    index = _verb(window, index + 1, result, VERBS_WITH_ID if client_id else VERBS)
    if index is None:
        return _invalid(window, 0, result)
    if index < 0:
        return _incomplete(result)
    if result.verb == ID:
        return _id_arguments(window, index, result, limit)
    return _arguments(window, index, result, limit)


def _tag(window: bytes, result: Parsed):
    """Index of the SP that ends the tag, -1 to wait, None for a parse error."""
    index = _TAG.match(window).end()
    if index == len(window):
        return -1
    if window[index] != SP:
        return None  # not a tag byte, or a 33rd one
    # A line starting with SP has an empty tag; its replies then start with that lone SP.
    result.tag = window[:index]
    return index


def _verb(window: bytes, index: int, result: Parsed, verbs=VERBS):
    """Index just past a known command word (at its SP, CR or LF), -1 to wait, None for a parse error
    (an unknown word too: ID, ENABLE and the rest are parse errors before login, as in nginx; ID is
    in ``verbs`` only with imap_client_id)."""
    match = _VERB.match(window, index)
    index = match.end()
    if index == len(window):
        return -1
    verb = match.group(1).upper()
    if window[index] not in (SP, CR, LF) or verb not in verbs:
        return None
    result.verb = verb
    return index


def _arguments(window: bytes, index: int, result: Parsed, limit: int) -> Parsed:
    length = len(window)
    args = result.args
    while True:
        while index < length and window[index] == SP:
            index += 1
        if index == length:
            return _incomplete(result)
        byte = window[index]
        if byte == CR:
            if index + 1 == length:
                return _incomplete(result)
            if window[index + 1] != LF:
                return _invalid(window, index + 1, result)
            result.end = index + 2
            return result
        if byte == LF:
            result.end = index + 1
            return result
        if len(args) == MAX_ARGS:
            return _invalid(window, index, result)
        try:
            if byte == QUOTE:
                result.quote_open = True
                index = _word(window, index + 1, result)
            elif byte == OPEN_BRACE:
                index = _literal(window, index + 1, result, limit)
            else:
                index = _word(window, index, result)
        except _Bad as bad:
            return _invalid(window, bad.index, result)
        if index < 0:
            return _incomplete(result)


def _id_arguments(window: bytes, index: int, result: Parsed, limit: int) -> Parsed:
    """RFC 2971: ``ID NIL`` or ``ID (string nstring ...)``, then the line end; strings quoted or literal."""
    length = len(window)
    index = _skip_spaces(window, index)
    if index == length:
        return _incomplete(result)
    try:
        if window[index] == OPEN_PAREN:
            index += 1
            while True:
                index = _skip_spaces(window, index)
                if index == length:
                    return _incomplete(result)
                byte = window[index]
                if byte == CLOSE_PAREN:
                    index += 1
                    break
                if byte == QUOTE:
                    index, closed = _quoted(window, index + 1, result.args)
                    if index >= 0 and not closed:
                        raise _Bad(index)  # a string cut by the line end: the list never closes
                    result.quote_open = False
                elif byte == OPEN_BRACE:
                    index = _literal(window, index + 1, result, limit, (SP, CR, LF, CLOSE_PAREN))
                else:
                    index = _nil(window, index, (SP, CR, LF, CLOSE_PAREN))
                    result.args.append(None)
                if index < 0:
                    return _incomplete(result)
        else:
            index = _nil(window, index, (SP, CR, LF))
            if index < 0:
                return _incomplete(result)
    except _Bad as bad:
        return _invalid(window, bad.index, result)
    index = _skip_spaces(window, index)
    if index == length or (window[index] == CR and index + 1 == length):
        return _incomplete(result)
    if window[index] == LF:
        result.end = index + 1
        return result
    if window[index] == CR and window[index + 1] == LF:
        result.end = index + 2
        return result
    return _invalid(window, index, result)


def _skip_spaces(window: bytes, index: int) -> int:
    while index < len(window) and window[index] == SP:
        index += 1
    return index


def _nil(window: bytes, index: int, ends) -> int:
    """The index after the atom NIL (any case), -1 to wait; any other atom is a parse error."""
    start = index
    while index < len(window) and window[index] not in ends:
        index += 1
    if index == len(window):
        return -1
    if window[start:index].upper() != b"NIL":
        raise _Bad(start)
    return index


def _word(window: bytes, index: int, result: Parsed) -> int:
    """An argument that is not a literal: inside quotes (after an opening quote, or while one is left
    open) up to the closing quote or the line end, else an atom up to SP, CR or LF, where a quote is
    just data, as nginx reads it. The index after it, or -1 to wait."""
    if result.quote_open:
        index, closed = _quoted(window, index, result.args)
        if closed:
            result.quote_open = False
        return index
    end = _ATOM.match(window, index).end()
    if end == len(window):
        return -1
    result.args.append(window[index:end])
    return end


def _quoted(window: bytes, index: int, args: list):
    """Read a quoted string (opening quote already passed): (the index after it, or -1 to wait; whether
    a closing quote ended it)."""
    out = bytearray()
    length = len(window)
    while index < length:
        byte = window[index]
        if byte == QUOTE:
            args.append(bytes(out))
            return index + 1, True
        if byte in (CR, LF):
            # An unterminated string ends with its line, as nginx reads it; the line end stays unread.
            args.append(bytes(out))
            return index, False
        if byte == BACKSLASH:
            if index + 1 == length:
                return -1, False
            if window[index + 1] in (CR, LF):
                raise _Bad(index + 1)
            index += 1
            byte = window[index]
        out.append(byte)
        index += 1
    return -1, False


def _literal(window: bytes, index: int, result: Parsed, limit: int, ends=(SP, CR, LF)):
    """Read ``{n}``/``{n+}`` CRLF and n bytes: the index after them, or -1 to wait (for a literal that
    can never fit, until the buffer is full and the command too long)."""
    length = len(window)
    start = index
    size = 0
    while index < length and window[index] in DIGITS:
        # Stop growing past the buffer size: the literal is refused anyway, and a client-chosen
        # ten-thousand-digit count must not cost a bignum.
        if size <= limit:
            size = size * 10 + window[index] - 0x30
        index += 1
    if index == length:
        return -1
    if index == start:
        raise _Bad(index)
    sync = True
    if window[index] == PLUS:
        sync = False
        index += 1
        if index == length:
            return -1
    if window[index] != CLOSE_BRACE:
        raise _Bad(index)
    index += 1
    if index < length and window[index] == CR:
        index += 1
    if index == length:
        return -1
    if window[index] != LF:
        raise _Bad(index)
    data_start = index + 1
    if sync:
        result.sync_literals += 1
    data_end = data_start + size
    if data_end + 1 > limit:
        # Cannot fit, but nginx still says "+ OK" and ends it as "too long" once the buffer is full;
        # the buffer is bounded, so waiting costs nothing.
        result.wait_for = limit
        return -1
    if data_end > length:
        result.wait_for = data_end
        return -1
    result.args.append(window[data_start:data_end])
    if data_end == length:
        return -1
    if window[data_end] not in ends:
        raise _Bad(data_end)
    return data_end


class _Bad(Exception):
    """A parse error inside an argument; skipping to LF starts at ``index``, not inside literal data."""

    def __init__(self, index: int):
        super().__init__(index)
        self.index = index


def _incomplete(result: Parsed) -> Parsed:
    result.kind = Kind.INCOMPLETE
    return result


def _invalid(window: bytes, index: int, result: Parsed) -> Parsed:
    newline = window.find(b"\n", index)
    if newline < 0:
        return _incomplete(result)
    result.kind = Kind.INVALID
    result.quote_open = False  # nginx's parse error clears what was left open
    result.end = newline + 1
    line_end = newline - 1 if newline > 0 and window[newline - 1] == CR else newline
    # A line announcing a non-synchronising literal cannot be resynchronised: the literal's bytes would
    # be read as commands.
    result.close = newline > 4 and window[line_end - 2 : line_end] == b"+}"
    return result
