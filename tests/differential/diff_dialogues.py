"""Seeded random client dialogues for the differential fuzzer, one generator per protocol.

``dialogue(seed, index)`` depends on nothing but its two arguments (its own ``random.Random``), so one
dialogue of a failed run is replayed alone with the same seed and index.

A dialogue is a list of commands, each the bytes of one client line (with its literals) or a function of
what the server sent so far (APOP and CRAM-MD5 digests need the salt), then packed into writes: several
commands in one write (pipelining), one command cut into several writes at random offsets, synchronising
literals sent after their ``+ OK`` or pipelined. What is drawn:

- valid and invalid commands: known verbs with wrong argument counts, unknown verbs, verbs of the
  authenticated state, case variations, extra spaces, a leading space, empty lines, bare LF for CRLF, a CR
  inside a line, lines around and beyond the client buffer, NUL and 8-bit bytes;
- IMAP tags (valid, 32 and 33 characters, bad characters, empty), atoms, quoted strings with escapes
  (and unterminated ones), synchronising and non-synchronising literals (right, short, empty, without
  digits, followed by garbage);
- SASL: PLAIN, LOGIN, CRAM-MD5, EXTERNAL and unknown mechanisms, with and without initial responses,
  good and bad base64, payloads without their NULs, ``*`` cancels, empty responses, extra tokens;
- logins that Dovecot or Postfix accept, ones the auth server refuses (with and without Auth-Wait, with
  an error code, with a broken reply), and one the auth server accepts but Dovecot refuses;
- SMTP's unauthenticated relay (MAIL, RCPT) where ``smtp_auth none`` allows it.

A login meant to succeed ends the dialogue: at most one command and a LOGOUT or QUIT follow, for the
backend. Logins and the auth server's verdicts are picked by the login name (diff_harness.FuzzAuthServer).
"""

import base64
import hashlib
import hmac
import random
from dataclasses import dataclass, field
from typing import List

from diff_harness import (AUTH_ONLY, BROKEN_PREFIX, BUFFER, CODED_PREFIX, LOGIN_PATIENCE, METHODS, PROTOCOL,
                          SERVERS, WAIT_PREFIX, Write, brief, salt_in)
from support.backends import USERS as DOVECOT_USERS

USERS = dict(DOVECOT_USERS, **AUTH_ONLY)
CRLF = b"\r\n"


@dataclass
class Command:
    data: object  # bytes, or a function of the bytes received so far
    label: str
    patience: float = 0.0  # LOGIN_PATIENCE when it may start a login
    sync: tuple = ()  # offsets just after a synchronising literal's "{n}" CRLF


@dataclass
class Dialogue:
    seed: str
    index: int
    server: str
    commands: List[Command] = field(default_factory=list)
    writes: List[Write] = field(default_factory=list)

    @property
    def protocol(self):
        return PROTOCOL[self.server]

    def describe(self) -> str:
        lines = ["dialogue %d of seed %s on server %r (%s):" % (self.index, self.seed, self.server,
                                                                 self.protocol)]
        lines += ["  command %-24s %s" % (c.label, brief(c.data) if isinstance(c.data, bytes) else "<digest>")
                  for c in self.commands]
        lines += ["  write %s cut at %s" % (brief(w.data) if isinstance(w.data, bytes) else "<digest>",
                                           ["%.3f" % cut for cut in w.cuts])
                  for w in self.writes]
        return "\n".join(lines)


# --- small pieces -------------------------------------------------------------------------------------


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def case(rng, word: bytes) -> bytes:
    roll = rng.random()
    if roll < 0.6:
        return word
    if roll < 0.8:
        return word.lower()
    return bytes(c ^ 0x20 if (0x41 <= c <= 0x5A or 0x61 <= c <= 0x7A) and rng.random() < 0.5 else c
                 for c in word)


def eol(rng) -> bytes:
    return CRLF if rng.random() < 0.85 else b"\n"


def spaces(rng) -> bytes:
    return b" " if rng.random() < 0.9 else b"  "


def odd_bytes(rng, length=None) -> bytes:
    """Bytes a client should not send: NUL, 8-bit, control characters, quotes, braces."""
    pool = b"\x00\x01\x7f\x80\xc3\xa9\xff\t\"{}()%*\\+"
    length = length or rng.randint(1, 6)
    return bytes(rng.choice(pool) for _ in range(length))


def word(rng) -> bytes:
    return rng.choice([b"x", b"INBOX", b"alice", b"1", b"()", b"NIL", b"\"a", b"a\"b", b"%", b"*",
                       b"\xc3\xa9t\xc3\xa9", b"a\x00b", odd_bytes(rng)])


def credentials(rng, protocol):
    """(login, password, patience, outcome): outcome "ok" (the backend logs in), "closed" (the
    session ends), "wait" (refused with Auth-Wait: the session goes on)."""
    roll = rng.random()
    if roll < 0.32:
        user = rng.choice(["alice", "bob"])
        return user.encode(), USERS[user].encode(), LOGIN_PATIENCE, "ok"
    if roll < 0.42:
        return b"mallory", b"mallory-pw", LOGIN_PATIENCE, "ok" if protocol == "smtp" else "closed"
    if roll < 0.55:
        return b"alice", rng.choice([b"wrong", b"", b"alice-secret ", b"ALICE-SECRET"]), LOGIN_PATIENCE, "closed"
    if roll < 0.72:
        user = (WAIT_PREFIX + rng.choice(["", "poke", "1"])).encode()
        return user, rng.choice([b"x", b"p w"]), LOGIN_PATIENCE, "wait"
    if roll < 0.78:
        return BROKEN_PREFIX.encode(), b"x", LOGIN_PATIENCE, "closed"
    if roll < 0.84:
        return CODED_PREFIX.encode(), b"x", LOGIN_PATIENCE, "closed"
    user = rng.choice([b"nobody", b"al ice", b"a%b", b"\xc3\xa9", b"a\x00b", b"x" * 70, odd_bytes(rng)])
    return user, rng.choice([b"x", b"p\x00w", b"\xff"]), LOGIN_PATIENCE, "closed"


def ends(rng, outcome):
    """Whether a login ends the dialogue: one meant to succeed always does (at most the backend's reply
    to one command and a LOGOUT or QUIT follow); one the session does not survive mostly does, the rest
    of the time the client goes on talking into the close."""
    if outcome == "ok" or (outcome == "closed" and rng.random() < 0.8):
        return outcome
    return None


def cram_digest(user: bytes, password: bytes, prefix: bytes, suffix: bytes):
    """A CRAM-MD5 response computed from the challenge this side received."""

    def respond(received):
        digest = hmac.new(password, salt_in(received), hashlib.md5).hexdigest().encode()
        return prefix + b64(user + b" " + digest) + suffix

    return respond


def apop_digest(user: bytes, password: bytes, verb: bytes, suffix: bytes):
    def respond(received):
        return verb + b" " + user + b" " + hashlib.md5(salt_in(received) + password).hexdigest().encode() + suffix

    return respond


def long_line(rng, server, head: bytes, tail: bytes) -> bytes:
    """A line whose length is around the server's client buffer (``head`` + filler + ``tail``)."""
    size = BUFFER[server]
    length = rng.choice([size - 2, size - 1, size, size + 1, size + rng.randint(2, 300), rng.randint(20, size)])
    filler = max(0, length - len(head) - len(tail))
    if rng.random() < 0.8:
        return head + b"x" * filler + tail
    return head + bytes(rng.choice(b"ab \t\x80") for _ in range(filler)) + tail


# --- SASL, shared ------------------------------------------------------------------------------------


def sasl_responses(rng, protocol, server, mechanism, response_eol):
    """The AUTH(ENTICATE) argument list and the continuation lines for one exchange.

    Returns (the mechanism word and any initial response, to follow the verb; the continuation lines as
    Commands; the outcome as credentials() words it, or "rejected"; the patience for the login)."""
    user, password, patience, outcome = credentials(rng, protocol)
    methods = METHODS[server]
    word_ = case(rng, mechanism.encode())

    def bad_base64():
        return rng.choice([b"!!!", b"a", b"YQ", b"*", b"", b"=", b"YWJj ZGVm", b"YWJj=!!", b"Y W", b"YWJj\x00",
                           b"\xff\xfe", b"YWJjZA==YQ", b"*"])

    if mechanism == "PLAIN":
        authz = rng.choice([b"", b"", user, b"someone"])
        roll = rng.random()
        if roll < 0.65:
            payload = b64(authz + b"\0" + user + b"\0" + password)
        elif roll < 0.75:
            payload = b64(user)  # no NUL at all
            outcome = "rejected"
        elif roll < 0.85:
            payload = b64(b"\0" + user)  # no second NUL
            outcome = "rejected"
        else:
            payload = bad_base64()
            outcome = "rejected"
        if rng.random() < 0.4 and payload:
            return word_ + b" " + payload, [], outcome, patience
        return word_, [Command(payload + response_eol(), "PLAIN response", patience)], outcome, patience
    if mechanism == "LOGIN":
        good_user = b64(user) if rng.random() < 0.85 else bad_base64()
        good_pass = b64(password) if rng.random() < 0.85 else bad_base64()
        if good_user != b64(user) or good_pass != b64(password):
            outcome = "rejected"
        if rng.random() < 0.35 and good_user:
            return (word_ + b" " + good_user,
                    [Command(good_pass + response_eol(), "LOGIN password", patience)], outcome, patience)
        return word_, [Command(good_user + response_eol(), "LOGIN user name"),
                       Command(good_pass + response_eol(), "LOGIN password", patience)], outcome, patience
    if mechanism == "CRAM-MD5":
        if "cram-md5" not in methods:
            outcome = "rejected"
        roll = rng.random()
        if rng.random() < 0.1:
            return word_ + b" " + b64(user), [], "rejected", 0.0  # CRAM-MD5 takes no initial response
        if roll < 0.6 and user.decode("latin-1") in USERS and outcome != "rejected":
            respond = cram_digest(user, password, b"", response_eol())
            return word_, [Command(respond, "CRAM-MD5 digest", patience)], outcome, patience
        if roll < 0.8:
            digest = b64(user + b" " + b"0123456789abcdef" * 2)
            return word_, [Command(digest + response_eol(), "CRAM-MD5 wrong digest", patience)], outcome, patience
        short = b64(user + rng.choice([b" 1234", b"", b" " + b"a" * 33]))
        bad = rng.choice([short, bad_base64()])
        return word_, [Command(bad + response_eol(), "CRAM-MD5 bad")], "rejected", 0.0
    if mechanism == "EXTERNAL":
        if "external" not in methods:
            outcome = "rejected"
        login = b64(user) if rng.random() < 0.8 else bad_base64()
        if rng.random() < 0.45 and login:
            return word_ + b" " + login, [], outcome, patience
        return word_, [Command(login + response_eol(), "EXTERNAL response", patience)], outcome, patience
    # Unknown, or known to mailproxy only with its method enabled (spec 9.3)
    extra = rng.choice([b"", b" " + b64(b"x"), b" a b"])
    return word_ + extra, [], "rejected", 0.0


def mechanism(rng):
    return rng.choice(["PLAIN", "PLAIN", "LOGIN", "LOGIN", "CRAM-MD5", "CRAM-MD5", "EXTERNAL", "EXTERNAL",
                       "XOAUTH2", "OAUTHBEARER", "FOO", "DIGEST-MD5", "ANONYMOUS"])


# --- IMAP -----------------------------------------------------------------------------------------


TAG_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._"


def imap_tag(rng) -> bytes:
    roll = rng.random()
    if roll < 0.8:
        return bytes(rng.choice(TAG_CHARS) for _ in range(rng.randint(1, 6)))
    return rng.choice([b"A" * 32, b"B" * 33, b"a$", b"a*", b"+", b"*", b"", b"a\x00", b"\xc3\xa9", b"a(b",
                       b"t" * 31 + b"."])


def imap_string(rng, value: bytes, sync: list, offset: int) -> bytes:
    """One IMAP argument holding ``value``: atom, quoted string or literal (sync offsets recorded)."""
    roll = rng.random()
    plain = value and not any(c in value for c in b" \r\n\"{") and rng.random() < 0.9
    if roll < 0.35 and plain:
        return value
    if roll < 0.7:
        out = bytearray(b'"')
        for byte in value:
            if byte in b'"\\' or rng.random() < 0.08:
                out += b"\\"
            out.append(byte)
        if rng.random() < 0.04:
            return bytes(out)  # unterminated: the line end closes it
        return bytes(out) + b'"'
    if roll < 0.85:
        head = b"{%d}" % len(value) + (CRLF if rng.random() < 0.9 else b"\n")
        sync.append(offset + len(head))
        return head + value
    return b"{%d+}" % len(value) + CRLF + value


def imap_odd_literal(rng, sync: list, offset: int) -> bytes:
    """Literals nginx 1.22 and newer versions read differently, and plain mistakes."""
    choice = rng.randrange(8)
    if choice == 0:
        head = b"{0}\r\n"
        sync.append(offset + len(head))
        return head
    if choice == 1:
        return b"{}\r\n"
    if choice == 2:
        head = b"{3}\r\n"
        sync.append(offset + len(head))
        return head + b"abcd"  # one byte too many: the literal is followed by garbage
    if choice == 3:
        return b"{2+}\r\nab" + rng.choice([b"c", b"", b" x"])
    if choice == 4:
        return b"{ 3}\r\nabc"
    if choice == 5:
        return b"{3x}\r\nabc"
    if choice == 6:
        head = b"{%d}\r\n" % rng.choice([200, 5000, 99999999999])
        sync.append(offset + len(head))
        return head + b"abc"
    return b"{0+}\r\n"


def imap_response(rng, command: Command) -> Command:
    """An AUTHENTICATE continuation line as IMAP arguments may also carry it: quoted, a literal, with
    more tokens after it."""
    if callable(command.data) or rng.random() > 0.15:
        return command
    line = command.data
    body, end = (line[:-2], CRLF) if line.endswith(CRLF) else (line[:-1], b"\n")
    sync = []
    form = rng.choice(["quoted", "literal", "tokens"])
    if form == "quoted":
        data = b'"' + body + b'"' + end
    elif form == "literal":
        head = b"{%d}\r\n" % len(body)
        sync.append(len(head))
        data = head + body + end
    else:
        data = body + b" " + word(rng) + end
    return Command(data, command.label + " (%s)" % form, command.patience, tuple(sync))


def imap_commands(rng, server) -> List[Command]:
    commands = []
    methods = METHODS[server]
    count = rng.choice([1, 2, 3, 3, 4, 5, 6, 8, 10])
    finished = None
    for _ in range(count):
        if finished:
            break
        tag = imap_tag(rng)
        sp = spaces(rng)
        head = tag + sp
        end = eol(rng)
        roll = rng.random()
        if roll < 0.12:
            extra = rng.choice([b"", b"", b" x", b" \"y z\"", b" {1+}\r\nq"])
            commands.append(Command(head + case(rng, b"NOOP") + extra + end, "NOOP"))
        elif roll < 0.2:
            commands.append(Command(head + case(rng, b"CAPABILITY") + end, "CAPABILITY"))
        elif roll < 0.22:
            commands.append(Command(head + case(rng, b"STARTTLS") + end, "STARTTLS"))
        elif roll < 0.45:
            user, password, patience, outcome = credentials(rng, "imap")
            sync = []
            line = head + case(rng, b"LOGIN") + b" "
            args = rng.choice([2, 2, 2, 2, 2, 0, 1, 3])
            values = [user, password, b"extra"][:args]
            for number, value in enumerate(values):
                if number:
                    line += spaces(rng)
                line += imap_string(rng, value, sync, len(line))
            if args != 2 or not user:
                outcome = "rejected"
            commands.append(Command(line + end, "LOGIN %s" % outcome, patience, tuple(sync)))
            finished = ends(rng, outcome)
        elif roll < 0.65:
            mech = mechanism(rng)
            argument, responses, outcome, patience = sasl_responses(rng, "imap", server, mech, lambda: eol(rng))
            first_patience = patience if not responses else 0.0
            commands.append(Command(head + case(rng, b"AUTHENTICATE") + b" " + argument + end,
                                    "AUTHENTICATE " + mech, first_patience))
            if mech in ("CRAM-MD5", "EXTERNAL") and mech.lower() not in methods:
                responses = []  # refused at once; the lines would only be more commands
            commands += [imap_response(rng, response) for response in responses]
            finished = ends(rng, outcome)
        elif roll < 0.72:
            verb = rng.choice([b"ID NIL", b"SELECT INBOX", b"ENABLE UTF8=ACCEPT", b"NOOP1", b"LOGINX a b",
                               b"XYZZY", b"LIST \"\" *", b"ID (\"name\" \"x\")", b"AUTHENTICATE", b"LOGOUTX"])
            commands.append(Command(head + case(rng, verb) + end, "unknown verb"))
        elif roll < 0.8:
            line = rng.choice([
                b"", tag, tag + b" ", b" NOOP", b" ", tag + b" NO\rOP", tag + b" NOOP\r", odd_bytes(rng),
                tag + b" " + odd_bytes(rng), tag + b" NOOP a b c d", tag + b" LOGIN a b c d",
                tag + b" LOGIN \"a\\\r\n", tag + b" NOOP \"unterminated",
            ])
            commands.append(Command(line + end, "garbage line"))
        elif roll < 0.87:
            sync = []
            line = head + case(rng, rng.choice([b"LOGIN", b"NOOP", b"FOO"])) + b" "
            line += imap_odd_literal(rng, sync, len(line))
            if rng.random() < 0.6:
                line += b" " + imap_string(rng, word(rng), sync, len(line) + 1)
            commands.append(Command(line + end, "odd literal", LOGIN_PATIENCE, tuple(sync)))
        elif roll < 0.92:
            commands.append(Command(long_line(rng, server, head + b"NOOP ", rng.choice([end, b""])), "long line"))
        else:
            sync = []
            line = head + case(rng, rng.choice([b"NOOP", b"LOGIN"])) + b" "
            for number in range(rng.randint(1, 4)):
                separator = b" " if number else b""
                line += separator + imap_string(rng, word(rng), sync, len(line) + len(separator))
            commands.append(Command(line + end, "arguments", LOGIN_PATIENCE, tuple(sync)))
    if finished == "ok" and rng.random() < 0.4:
        verb = rng.choice([b"NOOP", b"CAPABILITY", b"SELECT INBOX"])
        commands.append(Command(b"b " + verb + CRLF, "for the backend"))
    if rng.random() < 0.85:
        commands.append(Command(b"z " + case(rng, b"LOGOUT") + CRLF, "LOGOUT"))
    return commands


# --- POP3 -----------------------------------------------------------------------------------------


def pop3_commands(rng, server) -> List[Command]:
    commands = []
    count = rng.choice([1, 2, 3, 3, 4, 5, 6, 8, 10])
    finished = None
    methods = METHODS[server]
    for _ in range(count):
        if finished:
            break
        end = eol(rng)
        roll = rng.random()
        if roll < 0.3:
            user, password, patience, outcome = credentials(rng, "pop3")
            lead = rng.choice([b" ", b" ", b" ", b"  "])
            trail = rng.choice([b"", b"", b"", b" "])
            if rng.random() < 0.1:
                commands.append(Command(case(rng, b"USER") + end, "USER without name"))
            else:
                commands.append(Command(case(rng, b"USER") + lead + user + trail + end, "USER"))
            if rng.random() < 0.2:
                commands.append(Command(case(rng, rng.choice([b"NOOP", b"CAPA", b"STAT"])) + end, "between"))
            if rng.random() < 0.1:
                commands.append(Command(case(rng, b"PASS") + end, "PASS without password"))
            commands.append(Command(case(rng, b"PASS") + b" " + password + trail + end, "PASS %s" % outcome,
                                    patience))
            finished = ends(rng, outcome)
        elif roll < 0.38:
            user, password, patience, outcome = credentials(rng, "pop3")
            verb = case(rng, b"APOP")
            if "apop" in methods and user.decode("latin-1") in USERS and rng.random() < 0.7:
                commands.append(Command(apop_digest(user, password, verb, end), "APOP digest", patience))
            else:
                argument = rng.choice([b" " + user + b" " + b"0123456789abcdef" * 2, b" " + user, b"",
                                       b" " + user + b" abc def"])
                commands.append(Command(verb + argument + end, "APOP", patience))
            finished = ends(rng, outcome) if "apop" in methods else None
        elif roll < 0.58:
            if rng.random() < 0.12:
                commands.append(Command(case(rng, b"AUTH") + end, "AUTH (list)"))
                continue
            mech = mechanism(rng)
            argument, responses, outcome, patience = sasl_responses(rng, "pop3", server, mech, lambda: eol(rng))
            first_patience = patience if not responses else 0.0
            commands.append(Command(case(rng, b"AUTH") + b" " + argument + end, "AUTH " + mech, first_patience))
            if mech in ("CRAM-MD5", "EXTERNAL") and mech.lower() not in methods:
                responses = []
            commands += responses
            finished = ends(rng, outcome)
        elif roll < 0.68:
            verb = rng.choice([b"CAPA", b"NOOP", b"STLS", b"CAPA x", b"NOOP a b c", b"NOOP a b c d"])
            commands.append(Command(case(rng, verb) + end, "simple"))
        elif roll < 0.76:
            verb = rng.choice([b"STAT", b"LIST", b"RETR 1", b"DELE 1", b"TOP 1 1", b"UIDL", b"RSET", b"NOO",
                               b"NOOPS", b"XYZW", b"USERS a", b"QUITX"])
            commands.append(Command(case(rng, verb) + end, "unknown verb"))
        elif roll < 0.86:
            line = rng.choice([b"", b" NOOP", b" ", b"NO\rOP", b"NOOP\r", odd_bytes(rng),
                               b"USER " + odd_bytes(rng),
                               b"\x00NOOP", b"CAPA\x00", b"NOOP\t", b"N\xc3\xa9OP"])
            commands.append(Command(line + end, "garbage line"))
        else:
            head = rng.choice([b"NOOP ", b"USER ", b"AUTH PLAIN ", b"PASS "])
            commands.append(Command(long_line(rng, server, head, rng.choice([end, b""])), "long line"))
    if finished == "ok" and rng.random() < 0.4:
        commands.append(Command(rng.choice([b"STAT", b"NOOP", b"UIDL"]) + CRLF, "for the backend"))
    if rng.random() < 0.85:
        commands.append(Command(case(rng, b"QUIT") + CRLF, "QUIT"))
    return commands


# --- SMTP -----------------------------------------------------------------------------------------


def smtp_commands(rng, server) -> List[Command]:
    commands = []
    count = rng.choice([1, 2, 3, 3, 4, 5, 6, 8, 10])
    finished = None
    methods = METHODS[server]
    for _ in range(count):
        if finished:
            break
        end = eol(rng)
        roll = rng.random()
        if roll < 0.15:
            verb = case(rng, rng.choice([b"HELO", b"EHLO"]))
            argument = rng.choice([b" client.test", b" client.test", b"", b" a b", b"  spaced.test  ",
                                   b" " + odd_bytes(rng), b" [127.0.0.1]"])
            commands.append(Command(verb + argument + end, "HELO/EHLO"))
        elif roll < 0.38:
            mech = mechanism(rng)
            if rng.random() < 0.06:
                commands.append(Command(case(rng, b"AUTH") + end, "AUTH without mechanism"))
                continue
            argument, responses, outcome, patience = sasl_responses(rng, "smtp", server, mech, lambda: eol(rng))
            first_patience = patience if not responses else 0.0
            commands.append(Command(case(rng, b"AUTH") + b" " + argument + end, "AUTH " + mech, first_patience))
            if mech in ("CRAM-MD5", "EXTERNAL") and mech.lower() not in methods:
                responses = []
            commands += responses
            finished = ends(rng, outcome)
        elif roll < 0.5:
            sender = rng.choice([b"<x@sender.test>", b"<>", b"<x@sender.test> SIZE=100", b"", b"<a\x00b@x>",
                                 b"<x@sender.test>  BODY=8BITMIME "])
            commands.append(Command(case(rng, b"MAIL") + b" " + case(rng, b"FROM:") + sender + end, "MAIL"))
            if rng.random() < 0.7:
                rcpt = rng.choice([b"<alice@example.test>", b"<bob@example.test>", b"<nobody@example.test>",
                                   b"", b"<alice@example.test> NOTIFY=NEVER"])
                relay = "none" in methods and bool(sender) and b"\x00" not in sender and bool(rcpt)
                commands.append(Command(case(rng, b"RCPT") + b" " + case(rng, b"TO:") + rcpt + end,
                                        "RCPT", LOGIN_PATIENCE if relay else 0.0))
                finished = "ok" if relay else None
        elif roll < 0.6:
            verb = rng.choice([b"NOOP", b"RSET", b"VRFY alice", b"EXPN list", b"HELP", b"STARTTLS", b"NOOP x y",
                               b"RCPT TO:<a@b.test>", b"RSET " + b"a " * 11, b"NOOP " + b"a " * 12])
            commands.append(Command(case(rng, verb) + end, "simple"))
        elif roll < 0.7:
            verb = rng.choice([b"DATA", b"BDAT 10 LAST", b"ETRN x", b"XYZ", b"HELOX a", b"STARTTLSX", b"QUI",
                               b"TURN", b"XCLIENT ADDR=1.2.3.4"])
            commands.append(Command(case(rng, verb) + end, "unknown verb"))
        elif roll < 0.82:
            line = rng.choice([b"", b" NOOP", b" ", b"NO\rOP", b"NOOP\r", odd_bytes(rng),
                               b"HELO " + odd_bytes(rng),
                               b"\x00NOOP", b"NOOP\x00", b"NOOP\t", b"N\xc3\xa9OP", b"EHLO a\x00b"])
            commands.append(Command(line + end, "garbage line"))
        else:
            head = rng.choice([b"NOOP ", b"HELO ", b"MAIL FROM:<", b"AUTH PLAIN "])
            commands.append(Command(long_line(rng, server, head, rng.choice([end, b""])), "long line"))
    if finished == "ok" and rng.random() < 0.4:
        verb = rng.choice([b"NOOP", b"RSET", b"EHLO later.test", b"MAIL FROM:<y@sender.test>"])
        commands.append(Command(verb + CRLF, "for the backend"))
    if rng.random() < 0.85:
        commands.append(Command(case(rng, b"QUIT") + CRLF, "QUIT"))
    return commands


GENERATORS = {"imap": imap_commands, "pop3": pop3_commands, "smtp": smtp_commands}


# --- packing into writes ----------------------------------------------------------------------------


def pack(rng, commands: List[Command]) -> List[Write]:
    """Group commands into writes (pipelining), split some at their synchronising literals (the client
    waits for "+ OK") and cut some at random offsets."""
    pipelining = rng.choice([0.0, 0.0, 0.3, 0.6, 0.9])
    cutting = rng.choice([0.0, 0.15, 0.4])
    writes = []
    current = None
    for command in commands:
        if callable(command.data):
            cuts = tuple(sorted(rng.random() for _ in range(rng.randint(1, 2)))) if rng.random() < cutting else ()
            writes.append(Write(command.data, cuts, command.patience, command.label))
            current = None
            continue
        data = command.data
        splits = [offset for offset in command.sync if rng.random() < 0.75]
        segments = [data[a:b] for a, b in zip([0] + splits, splits + [len(data)])]
        for number, segment in enumerate(segments):
            if current is None or number > 0 or rng.random() >= pipelining:
                current = Write(b"", (), 0.0, command.label)
                writes.append(current)
            current.data += segment
            current.patience = max(current.patience, command.patience)
    for write in writes:
        if isinstance(write.data, bytes) and len(write.data) > 1 and rng.random() < cutting:
            write.cuts = tuple(sorted(rng.random() for _ in range(rng.randint(1, 3))))
    return writes


def dialogue(seed, index: int) -> Dialogue:
    rng = random.Random("%s/%d" % (seed, index))
    server = rng.choice(sorted(SERVERS))
    result = Dialogue(str(seed), index, server)
    result.commands = GENERATORS[PROTOCOL[server]](rng, server)
    result.writes = pack(rng, result.commands)
    return result

