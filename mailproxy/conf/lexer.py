"""nginx configuration syntax: words, quotes, escapes, comments, and where each statement ends.

The reader is a generator of statements rather than a tree builder so that the loader can act on each
directive as soon as it is complete: nginx reports the first error in file order, and a syntax error
late in a file must not hide a semantic error earlier on.
"""

from dataclasses import dataclass

SPACE = " \t\r\n"
# What a backslash turns into inside a word; any other escaped byte keeps its backslash, as in nginx.
ESCAPES = {'"': '"', "'": "'", "\\": "\\", "t": "\t", "r": "\r", "n": "\n"}

END_BLOCK_END = "}"
END_FILE = ""


class ConfigError(Exception):
    """A fatal configuration error; str() is the text nginx prints after `nginx: [emerg] `."""


@dataclass(frozen=True)
class Statement:
    """One directive with its arguments, or a bare block end / end of file (args empty).

    `line` is the line on which the terminator was read, which is the line nginx names in messages.
    """

    args: tuple
    file: str
    line: int
    end: str

    @property
    def where(self):
        return location(self.file, self.line)


def location(file, line):
    """The ` in file:line` suffix nginx appends to directive-level messages."""
    if file is None:
        return " in command line"
    return " in %s:%d" % (file, line)


def _unescape(raw):
    out = []
    i = 0
    while i < len(raw):
        ch = raw[i]
        if ch == "\\" and i + 1 < len(raw):
            nxt = raw[i + 1]
            if nxt in ESCAPES:
                out.append(ESCAPES[nxt])
            else:
                out.append(ch + nxt)
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def statements(text, file):
    """Yield Statements from `text`; `file` None means the -g command line.

    Raises ConfigError with nginx's wording for unbalanced or malformed input. A block end is yielded as
    a Statement with no args and end "}"; the end of input as one with end "" (EOF).
    """
    args = []
    line = 1
    i = 0
    n = len(text)
    while True:
        # Between words: skip blanks and comments, act on terminators.
        while i < n and text[i] in SPACE:
            if text[i] == "\n":
                line += 1
            i += 1
        if i >= n:
            if args:
                if file is None:
                    raise ConfigError('unexpected end of parameter, expecting ";"' + location(file, line))
                raise ConfigError('unexpected end of file, expecting ";" or "}"' + location(file, line))
            yield Statement((), file, line, END_FILE)
            return
        ch = text[i]
        if ch == ";" or ch == "{":
            i += 1
            if not args:
                raise ConfigError('unexpected "%s"' % ch + location(file, line))
            yield Statement(tuple(args), file, line, ch)
            args = []
            continue
        if ch == "}":
            i += 1
            if args:
                raise ConfigError('unexpected "}"' + location(file, line))
            yield Statement((), file, line, END_BLOCK_END)
            continue
        if ch == "#":
            while i < n and text[i] != "\n":
                i += 1
            continue
        if ch == '"' or ch == "'":
            quote = ch
            i += 1
            start = i
            while True:
                if i >= n:
                    if file is None:
                        raise ConfigError('unexpected end of parameter, expecting ";"' + location(file, line))
                    raise ConfigError('unexpected end of file, expecting ";" or "}"' + location(file, line))
                c = text[i]
                if c == "\\" and i + 1 < n:
                    if text[i + 1] == "\n":
                        line += 1
                    i += 2
                    continue
                if c == "\n":
                    line += 1
                if c == quote:
                    break
                i += 1
            args.append(_unescape(text[start:i]))
            i += 1
            # A closing quote must be followed by a separator; nginx does not glue words together.
            if i < n and text[i] not in SPACE and text[i] not in ";{":
                raise ConfigError('unexpected "%s"' % text[i] + location(file, line))
            continue
        start = i
        while i < n:
            c = text[i]
            if c == "\\" and i + 1 < n:
                if text[i + 1] == "\n":
                    line += 1
                i += 2
                continue
            if c == "{" and i > start and text[i - 1] == "$":
                # `${name}` is a variable reference in nginx, not a block start.
                i += 1
                continue
            if c in SPACE or c == ";" or c == "{":
                break
            i += 1
        args.append(_unescape(text[start:i]))
