"""Recorded dialogues of the four client machines (IMAP, POP3, SMTP, ManageSieve): a regression net for
changes that must leave every byte on the wire alone.

For each protocol a seeded ``random.Random`` plays many short dialogues against the machine under a range
of configurations (auth methods, starttls off/on/only, small client buffers, max_errors, max_commands,
imap_client_id, SMTP capabilities and method none, implicit TLS): well-formed and malformed commands,
quoted strings and literals, SASL exchanges with good and bad base64, pipelined lines, data cut at random
points, raw bytes, and the session's events the way the session sends them (``auth_failed`` with and
without Auth-Wait and Auth-Error-SASL while an attempt is pending, ``tls_established`` after a
``StartTLS``, EOF, SMTP's early input). Each step records the actions and what the session can see of the
machine afterwards (state, reading, awaiting_auth, closed, login, tls, trailing_data), all as plain JSON.

The corpus lives in ``transcripts/<protocol>.json.gz``; ``test_transcripts.py`` replays every dialogue
and compares each step exactly. The events were chosen from the machine's state while recording (a SASL
response when it waits for one, ``auth_failed`` while an attempt is pending); the replay feeds the same
events whatever the machine does now, so any changed answer or state shows. The corpus was first recorded
from the machines of dbe9485, before issue 26 gave them one shape (their AUTH_ERROR_SASL and STARTTLS
states are recorded under today's names, SASL_ERROR and STARTING_TLS). To record anew (only when a change
of the bytes is intended, and then say so in the commit), from the repository root::

    python -m tests.protocol.transcripts --write

``python -m tests.protocol.transcripts`` without ``--write`` checks the stored corpus against a fresh
recording and reports the first difference.

CRAM-MD5 and APOP salts are random in the machines; recording and replay fix them (``fixed_salt``).
"""

import base64
import contextlib
import dataclasses
import gzip
import importlib
import json
import os
import random
import sys
import types

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "transcripts")
PROTOCOLS = ("imap", "pop3", "smtp", "sieve")
# Dialogues per protocol; the four files together stay under 400 KB.
DIALOGUES = 800
SEED = 26
SALT = b"<1896.697170952@mail.example>\r\n"


def package(name="mailproxy.protocol"):
    """The machine modules of ``name`` (another package of the same layout can be replayed too)."""
    return types.SimpleNamespace(**{
        module: importlib.import_module(name + "." + module)
        for module in ("common", "sasl", "imap", "pop3", "smtp", "sieve")
    })


@contextlib.contextmanager
def fixed_salt(modules):
    """APOP and CRAM-MD5 challenges carry a random salt: one fixed salt makes dialogues repeatable."""
    sasl = modules.sasl
    saved = sasl.make_salt
    sasl.make_salt = lambda server_name: SALT
    try:
        yield
    finally:
        sasl.make_salt = saved


# --- building machines --------------------------------------------------------------------------------


def build_config(modules, protocol, settings):
    """A config from the JSON-able ``build()`` arguments stored with each dialogue."""
    settings = dict(settings)
    if protocol == "imap":
        return modules.imap.ImapConfig.build(**settings)
    if protocol == "pop3":
        settings["methods"] = frozenset(settings["methods"])
        return modules.pop3.Pop3Config.build(**settings)
    if protocol == "smtp":
        settings["auth_methods"] = frozenset(settings["auth_methods"])
        return modules.smtp.SmtpConfig.build(**settings)
    return modules.sieve.SieveConfig.build(**settings)


def make_machine(modules, protocol, settings, tls):
    config = build_config(modules, protocol, settings)
    machine_class = {
        "imap": modules.imap.ImapMachine, "pop3": modules.pop3.Pop3Machine,
        "smtp": modules.smtp.SmtpMachine, "sieve": modules.sieve.SieveMachine,
    }[protocol]
    return machine_class(config, tls=tls)


# --- what is recorded ---------------------------------------------------------------------------------


def text(data: bytes) -> str:
    return data.decode("latin-1")


def plain(value):
    """A JSON-able form of an action field."""
    if isinstance(value, bytes):
        return text(value)
    if isinstance(value, (tuple, list)):
        return [plain(item) for item in value]
    if isinstance(value, frozenset):
        return sorted(value)
    return value


def encode_action(modules, action):
    common = modules.common
    kind = type(action)
    if kind is common.Send:
        return ["send", text(action.data)]
    if kind is common.Close:
        return ["close"]
    if kind is common.StartTLS:
        return ["starttls"]
    if kind is common.Log:
        return ["log", action.level, action.message]
    if kind is common.Authenticate:
        request = action.request
        return ["authenticate", {f.name: plain(getattr(request, f.name)) for f in dataclasses.fields(request)}]
    raise AssertionError("not an action: %r" % (action,))


def status(machine):
    """What the session and the tests can see of a machine between two steps."""
    return [machine.state.name, machine.reading, machine.awaiting_auth, machine.closed, text(machine.login),
            machine.tls, text(machine.trailing_data())]


def run_event(modules, machine, event):
    kind = event[0]
    if kind == "data":
        return machine.receive_data(event[1].encode("latin-1"))
    if kind == "eof":
        return machine.receive_data(b"")
    if kind == "greeting":
        return machine.greeting()
    if kind == "early":
        return machine.early_input(event[1].encode("latin-1"))
    if kind == "tls":
        return machine.tls_established()
    if kind == "fail":
        _, reason, wait, error_code, sasl_error = event
        return machine.auth_failed(reason, wait, error_code=error_code, sasl_error=sasl_error)
    raise AssertionError("unknown event %r" % (event,))


def step(modules, machine, event):
    return [[encode_action(modules, action) for action in run_event(modules, machine, event)], status(machine)]


def replay(modules, dialogue):
    """The recorded steps of ``dialogue`` as the machines in ``modules`` give them now."""
    with fixed_salt(modules):
        machine = make_machine(modules, dialogue["protocol"], dialogue["config"], dialogue["tls"])
        return [step(modules, machine, event) for event in dialogue["events"]]


# --- what a client says -------------------------------------------------------------------------------

USERS = [b"alice", b"alice", b"bob@example.org", b"u", b"", b"a b", b"\xc3\xa9l\xc3\xa8ve", b'q"x', b"x" * 40]
PASSWORDS = [b"secret", b"secret", b"", b"p w", b"pa\\ss", b"\x01\x02", b"y" * 30]
TOKENS = [b"ya29.token", b"ya29.token", b"", b"t k"]
GARBAGE_B64 = [b"@@@", b"a", b"AQ==", b"", b"=", b"*", b"dXNlcg", b"dXNlcg==junk", b"Zm9v YmFy", b"a===",
               b"AAAA", b"\xff\xfe", b"Zm9v\tYmFy", b"dQ==", b"eA=="]
MECHANISMS = [b"PLAIN", b"PLAIN", b"LOGIN", b"CRAM-MD5", b"EXTERNAL", b"XOAUTH2", b"OAUTHBEARER"]
ODD_MECHANISMS = [b"plain", b"login", b"Cram-Md5", b"xoauth2", b"DIGEST-MD5", b"GSSAPI", b"", b"PLAINX"]
ODD_ENDS = [b"\n", b"\n", b"\r", b"", b"\r\r\n", b" \r\n", b"\n\r\n", b"\t\r\n"]


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


class Client:
    """A client of one dialogue: mostly well behaved, wrong in some way with probability ``chaos``."""

    def __init__(self, rng, protocol, chaos):
        self.rng = rng
        self.protocol = protocol
        self.chaos = chaos

    def odd(self, weight=1.0) -> bool:
        return self.rng.random() < self.chaos * weight

    def pick(self, usual, odd, weight=1.0):
        return self.rng.choice(odd if self.odd(weight) else usual)

    def end(self) -> bytes:
        return self.rng.choice(ODD_ENDS) if self.odd(0.5) else b"\r\n"

    def mechanism(self) -> bytes:
        return self.pick(MECHANISMS, ODD_MECHANISMS, 0.5)

    def payload(self, method):
        """A base64 response for ``method`` ("login-user", "login-password" for the two LOGIN steps),
        well formed unless odd: broken in one of the ways nginx names, or garbage."""
        rng = self.rng
        if self.odd(0.6):
            return rng.choice(GARBAGE_B64)
        odd = self.odd()
        user, password, token = rng.choice(USERS), rng.choice(PASSWORDS), rng.choice(TOKENS)
        if method == "plain":
            decoded = rng.choice([user + b"\0" + password, user, b"\0\0"] if odd else
                                 [b"\0" + user + b"\0" + password, b"authz\0" + user + b"\0" + password])
        elif method in ("login", "login-user", "external"):
            decoded = user
        elif method == "login-password":
            decoded = password
        elif method == "cram-md5":
            decoded = rng.choice([user + b" " + b"f" * 31, user, b" " + b"a" * 32, user + b"  " + b"b" * 32]
                                 if odd else [user + b" " + b"0123456789abcdef" * 2])
        elif method == "xoauth2":
            decoded = rng.choice([b"user=" + user + b"\x01auth=Bearer " + token + b"\x01",
                                  b"usr=" + user + b"\x01auth=Bearer x\x01\x01", b"user=" + user] if odd else
                                 [b"user=" + user + b"\x01auth=Bearer " + token + b"\x01\x01",
                                  b"USER=" + user + b"\x01AUTH=bearer " + token + b"\x01\x01"])
        elif method == "oauthbearer":
            decoded = rng.choice([b"n,a=x=ZZ,\x01auth=Bearer t\x01\x01", b"n,,\x01auth=Bearer t\x01\x01",
                                  b"n,a=" + user + b",\x01host=x\x01\x01", b"n,a=u"] if odd else
                                 [b"n,a=" + user + b",\x01auth=Bearer " + token + b"\x01\x01",
                                  b"n,a=al=2Cice=3D,\x01auth=Bearer t\x01\x01",
                                  b"y,A=" + user + b",\x01AUTH=BEARER " + token + b"\x01\x01"])
        else:
            decoded = user
        encoded = b64(decoded)
        if self.odd(0.5):
            encoded = rng.choice([encoded.rstrip(b"="), encoded + b"=trailing", encoded[:-1] + b"!"])
        return encoded

    def raw(self) -> bytes:
        """Bytes no client should send: random, or a soup of protocol words."""
        rng = self.rng
        if rng.random() < 0.5:
            return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
        words = [b"{3}", b"{2+}", b"{0}", b'"', b"\\", b"\r", b"\n", b"\r\n", b"\x00", b"*", b"(", b")", b"NIL",
                 b"AUTH", b"LOGIN", b"PLAIN", b"AQ==", b"x" * 50, b" ", b"=", b"+}", b"\xff"]
        return b" ".join(rng.choice(words) for _ in range(rng.randrange(1, 12)))

    def joiner(self) -> bytes:
        return self.pick([b" "], [b"  ", b"\t"], 0.3)

    def line(self, state_name: str) -> bytes:
        """A SASL response when the machine waits for one, else a command (or, rarely, raw bytes)."""
        if in_exchange(state_name) and not self.odd(0.3):
            method = {"AUTH_LOGIN_USERNAME": "login-user", "AUTH_LOGIN_PASSWORD": "login-password",
                      "SASL_ERROR": "dummy"}.get(state_name, state_name[5:].lower().replace("_", "-"))
            return getattr(self, self.protocol + "_response")(method)
        if self.odd(0.15):
            return self.raw()
        return getattr(self, self.protocol + "_command")()

    # -- IMAP ---------------------------------------------------------------------------------------

    def imap_string(self, value: bytes) -> bytes:
        """An atom, a quoted string or a literal (synchronising or not), as the client likes."""
        rng = self.rng
        roll = rng.random()
        if self.odd(0.3):
            return rng.choice([b'"' + value, b"{%d}\r\n" % (len(value) + 1) + value, b"{99999999999}\r\n",
                               b"{%d+}\r\n" % max(len(value) - 1, 0) + value, b"{}\r\n", b"{3x}\r\nabc"])
        if roll < 0.4 and value and not any(byte in value for byte in b' \r\n"{(\\%*'):
            return value
        if roll < 0.75 and not any(byte in value for byte in b"\r\n"):
            return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
        return b"{%d%s}\r\n" % (len(value), rng.choice([b"", b"+"])) + value

    def imap_command(self) -> bytes:
        rng = self.rng
        tag = self.pick([b"a", b"A1", b"t.2", b"1"], [b"", b"*", b"x" * 33, b"a+b", b"a\x00", b"a\"b"], 0.5)
        verb = self.pick([b"NOOP", b"CAPABILITY", b"CAPABILITY", b"LOGOUT", b"STARTTLS", b"LOGIN", b"LOGIN",
                          b"LOGIN", b"AUTHENTICATE", b"AUTHENTICATE", b"AUTHENTICATE", b"ID", b"noop",
                          b"Login"], [b"SELECT", b"ENABLE", b"", b"CAPABILITYX", b"LOG IN"], 0.5)
        args = []
        if verb.upper() == b"LOGIN":
            count = self.pick([2], [0, 1, 3], 0.5)
            values = [rng.choice(USERS), rng.choice(PASSWORDS), b"extra"]
            args = [self.imap_string(value) for value in values[:count]]
        elif verb.upper() == b"AUTHENTICATE":
            mech = self.mechanism()
            args = [mech]
            if rng.random() < 0.4:
                args.append(self.payload(mech.decode().lower()))
            if self.odd(0.2):
                args.append(b"more")
        elif verb == b"ID":
            if self.odd(0.5):
                args = [rng.choice([b"NILL", b"()", b"( )", b'("a")', b"(NIL NIL)", b'"x"', b'("a" "b"', b"(x y)",
                                    b"(NIL {1}\r\nx)", b"(" + b'"a" "b" ' * 31 + b")", b'("n" "' + b"v" * 1030 + b'")'])]
            elif rng.random() < 0.2:
                args = [rng.choice([b"NIL", b"nil"])]
            else:
                pairs = []
                for _ in range(rng.choice([0, 1, 2, 3])):
                    pairs.append(self.imap_string(rng.choice([b"name", b"version", b"x" * 20])))
                    pairs.append(b"NIL" if rng.random() < 0.2 else self.imap_string(
                        rng.choice([b"Thunderbird", b"115.0", b""])))
                args = [b"(" + b" ".join(pairs) + b")"]
        elif self.odd(0.3):
            args = [self.imap_string(rng.choice(USERS))]
        return self.joiner().join([tag, verb] + args) + self.end()

    def imap_response(self, method) -> bytes:
        rng = self.rng
        if self.odd(0.5):
            response = rng.choice([b"*", b" ", b"AQ== AQ==", b"a b c d", self.imap_string(self.payload(method))])
        elif method == "dummy":
            response = rng.choice([b"AQ==", b"", b"AQ==AQ=="])
        else:
            response = self.payload(method)
        return response + self.end()

    # -- POP3 ---------------------------------------------------------------------------------------

    def pop3_command(self) -> bytes:
        rng = self.rng
        verb = self.pick([b"USER", b"USER", b"PASS", b"PASS", b"APOP", b"AUTH", b"AUTH", b"AUTH", b"CAPA", b"NOOP",
                          b"STLS", b"QUIT", b"user", b"Auth"], [b"STAT", b"RETR", b"", b"USERX", b"TOP", b"US ER"],
                         0.5)
        upper = verb.upper()
        if upper in (b"USER", b"PASS"):
            args = [] if self.odd(0.3) else [rng.choice(USERS if upper == b"USER" else PASSWORDS)]
        elif upper == b"APOP":
            args = [rng.choice(USERS) or b"u", b"0123456789abcdef" * 2][: self.pick([2], [1, 3], 0.5)]
        elif upper == b"AUTH":
            args = []
            if not self.odd(0.3):
                mech = self.mechanism()
                args = [mech]
                if rng.random() < 0.4:
                    args.append(self.payload(mech.decode().lower()))
                if self.odd(0.2):
                    args += [b"x", b"y"]
        else:
            args = [b"x"] * (rng.choice([1, 4]) if self.odd(0.3) else 0)
        return self.joiner().join([verb] + args) + self.end()

    def pop3_response(self, method) -> bytes:
        rng = self.rng
        if self.odd(0.5):
            response = rng.choice([b"*", b"", b" AQ==", b"AQ== x", b"a b c d", b"AQ==  "])
        elif method == "dummy":
            response = rng.choice([b"AQ==", b"", b"AQ==AQ=="])
        else:
            response = self.payload(method)
        return response + self.end()

    # -- SMTP ---------------------------------------------------------------------------------------

    def smtp_command(self) -> bytes:
        rng = self.rng
        verb = self.pick([b"HELO", b"EHLO", b"EHLO", b"MAIL", b"MAIL", b"RCPT", b"RCPT", b"RSET", b"NOOP", b"QUIT",
                          b"STARTTLS", b"AUTH", b"AUTH", b"AUTH", b"AUTH", b"ehlo", b"Mail"],
                         [b"VRFY", b"EXPN", b"HELP", b"DATA", b"", b"BDAT", b"MAIL:"], 0.5)
        upper = verb.upper()
        if upper in (b"HELO", b"EHLO"):
            args = [rng.choice([b"", b"a\x00b", b"two words"])] if self.odd(0.3) else [
                rng.choice([b"client.example", b"[192.0.2.1]"])]
        elif upper == b"MAIL":
            args = rng.choice([[], [b"FROM:<x\x00y>"], [b"FROM:", b"<b@example.org>"]]) if self.odd(0.3) else \
                rng.choice([[b"FROM:<a@example.org>"], [b"FROM:<>", b"SIZE=100"]])
        elif upper == b"RCPT":
            args = [] if self.odd(0.3) else rng.choice([[b"TO:<b@example.org>"],
                                                         [b"TO:<c@example.org>", b"NOTIFY=NEVER"]])
        elif upper == b"AUTH":
            args = []
            if not self.odd(0.3):
                mech = self.mechanism()
                args = [mech]
                if rng.random() < 0.45:
                    args.append(self.payload(mech.decode().lower()))
                if self.odd(0.2):
                    args += [b"x", b"y"]
        else:
            args = [b"x"] * (rng.choice([1, 11, 12]) if self.odd(0.3) else 0)
        return self.joiner().join([verb] + args) + self.end()

    def smtp_response(self, method) -> bytes:
        return self.pop3_response(method)

    # -- ManageSieve --------------------------------------------------------------------------------

    def sieve_string(self, value: bytes) -> bytes:
        rng = self.rng
        if self.odd(0.3):
            return rng.choice([b'"bad\\escape"', b'"' + value, b"{%d+}\r\n" % (len(value) + 1) + value,
                               b"{99999999999}\r\n", b"{}\r\n", b'"a\r\n"', value or b"x"])
        if rng.random() < 0.6 and not any(byte in value for byte in b"\r\n"):
            return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
        return b"{%d%s}%s" % (len(value), rng.choice([b"", b"+"]), rng.choice([b"\r\n", b"\r\n", b"\n"])) + value

    def sieve_command(self) -> bytes:
        rng = self.rng
        verb = self.pick([b"NOOP", b"CAPABILITY", b"LOGOUT", b"STARTTLS", b"AUTHENTICATE", b"AUTHENTICATE",
                          b"AUTHENTICATE", b"authenticate", b"Logout"],
                         [b"HAVESPACE", b"PUTSCRIPT", b"", b"NOOP1", b"LISTSCRIPTS"], 0.5)
        upper = verb.upper()
        args = []
        if upper == b"AUTHENTICATE":
            args = [self.sieve_string(self.mechanism())]
            if rng.random() < 0.45:
                args.append(self.sieve_string(self.payload(sasl_name(args[0]))))
            if self.odd(0.2):
                args += [b'"x"', b'"y"']
        elif upper == b"NOOP":
            args = [self.sieve_string(b"tag")] * (rng.choice([1, 2]) if self.odd(0.5) else rng.choice([0, 1]))
        elif upper == b"PUTSCRIPT":
            args = [self.sieve_string(b"name"), self.sieve_string(b"keep;\r\n")]
        elif self.odd(0.3):
            args = [self.sieve_string(b"arg")]
        return self.joiner().join([verb] + args) + self.end()

    def sieve_response(self, method) -> bytes:
        rng = self.rng
        if self.odd(0.5):
            response = rng.choice([b'"*"', b"*", b"", b'"a" "b"', b'"a" "b" "c" "d"', b"{2+}\r\nAQ", b'"unterminated'])
        elif method == "dummy":
            response = rng.choice([b'"AQ=="', b'""', b"{4+}\r\nAQ=="])
        else:
            response = self.sieve_string(self.payload(method))
        return response + self.end()


def sasl_name(quoted: bytes) -> str:
    return quoted.strip(b'"').decode("latin-1").lower()


def in_exchange(state_name: str) -> bool:
    """True while the machine reads a SASL response rather than a command."""
    return state_name.startswith("AUTH_") or state_name == "SASL_ERROR"


# --- configurations -----------------------------------------------------------------------------------

ALL = ["plain", "login", "cram-md5", "external", "xoauth2", "oauthbearer"]


def methods(rng, choices=ALL, extra=()):
    roll = rng.random()
    if roll < 0.4:
        return sorted(set(choices) | set(extra))
    if roll < 0.55:
        return ["plain"]
    return sorted(rng.sample(list(choices) + list(extra), rng.randrange(0, len(choices) + len(extra) + 1)))


def common_settings(rng, buffers):
    return {
        "starttls": rng.choice(["off", "on", "only"]),
        "client_buffer": rng.choice(buffers),
        "max_errors": rng.choice([0, 1, 2, 3, 5, 5, 5, 10, 10]),
        "max_commands": rng.choice([0, 2, 6, 1000, 1000, 1000, 1000, 1000]),
    }


def imap_config(rng):
    settings = common_settings(rng, [16, 40, 64, 128, 4096, 4096, 4096])
    settings.update(auth_methods=methods(rng), server_name=rng.choice(["localhost", "mail.example"]),
                    client_id=rng.random() < 0.5)
    if rng.random() < 0.3:
        settings["capabilities"] = rng.choice([["IMAP4rev1"], ["IMAP4rev1", "SASL-IR", "ID"], []])
    return settings


def pop3_config(rng):
    settings = common_settings(rng, [16, 40, 128, 128, 128, 512])
    settings.update(methods=methods(rng, ALL, ["apop"]), server_name=rng.choice(["localhost", "mail.example"]))
    if rng.random() < 0.3:
        settings["capabilities"] = rng.choice([["TOP", "USER"], [], ["user", "X-THING"]])
    return settings


def smtp_config(rng):
    settings = common_settings(rng, [16, 64, 512, 4096, 4096])
    settings.update(auth_methods=methods(rng, ALL, ["none"]), server_name=rng.choice(["localhost", "mx.example"]),
                    capabilities=rng.choice([[], ["PIPELINING", "SIZE 10240000"], ["8BITMIME"]]),
                    greeting_delay=rng.choice([0.0, 0.0, 1.5]))
    return settings


def sieve_config(rng):
    settings = common_settings(rng, [16, 64, 256, 4096, 4096])
    settings.update(auth_methods=methods(rng, ["plain", "login", "xoauth2", "oauthbearer"]),
                    extensions=rng.choice([[], ["fileinto", "vacation"], ["fileinto", "NOTIFY=mailto",
                                                                            "MAXREDIRECTS=4"]]))
    return settings


CONFIGS = {"imap": imap_config, "pop3": pop3_config, "smtp": smtp_config, "sieve": sieve_config}


# --- dialogues ----------------------------------------------------------------------------------------


def client_bytes(client, machine):
    """One to four pipelined lines, the first a SASL response when the machine waits for one."""
    lines = [client.line(machine.state.name)]
    for _ in range(client.rng.choice([0, 0, 0, 0, 1, 1, 2, 3])):
        lines.append(client.line("START"))
    return b"".join(lines)


def cut(rng, data: bytes):
    """``data`` in the pieces one or more reads might bring."""
    if len(data) < 2 or rng.random() < 0.6:
        return [data]
    if rng.random() < 0.15:
        return [data[i : i + 1] for i in range(len(data))]
    points = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randrange(1, 4))))
    return [data[a:b] for a, b in zip([0] + points, points + [len(data)])]


def failure(rng, protocol):
    reason = rng.choice(["Invalid login or password", "x", "", "Temporary \"failure\"", "caf\xe9",
                         "bad\r\nline"])
    error_code = rng.choice([None, None, "535 5.7.8", "454 4.7.0"]) if protocol == "smtp" else None
    sasl_error = rng.choice([None, "eyJzdGF0dXMiOiI0MDEifQ==", "eyJzdGF0dXMiOiI0MDEifQ==", ""])
    return ["fail", reason, rng.random() < 0.7, error_code, sasl_error]


def dialogue(rng, modules, protocol):
    settings = CONFIGS[protocol](rng)
    tls = rng.random() < 0.15
    record = {"protocol": protocol, "config": settings, "tls": tls, "events": [], "steps": []}
    machine = make_machine(modules, protocol, settings, tls)
    client = Client(rng, protocol, rng.choice([0.0, 0.05, 0.1, 0.2, 0.4]))

    def play(event):
        record["events"].append(event)
        result = step(modules, machine, event)
        record["steps"].append(result)
        return result

    if protocol == "smtp" and rng.random() < 0.05:
        play(["early", text(client_bytes(client, machine))])
    else:
        play(["greeting"])
    starttls = False
    for _ in range(rng.randrange(2, 30)):
        if machine.closed:
            if rng.random() < 0.8:
                break
            play(rng.choice([["data", "a NOOP\r\n"], ["eof"], failure(rng, protocol)]))
            break
        roll = rng.random()
        if starttls and roll < 0.9:
            play(["tls"])
            starttls = False
            continue
        if machine.awaiting_auth and roll < 0.8:
            play(failure(rng, protocol))
            continue
        if roll < 0.02:
            play(["eof"])
            continue
        data = client.raw() if roll < 0.04 else client_bytes(client, machine)
        for piece in cut(rng, data):
            if machine.closed:
                break
            actions, _ = play(["data", text(piece)])
            starttls = starttls or ["starttls"] in actions
    return record


def record(modules, protocol, count=DIALOGUES, seed=SEED):
    rng = random.Random("%s-%s" % (seed, protocol))
    with fixed_salt(modules):
        return [dialogue(rng, modules, protocol) for _ in range(count)]


def path(protocol):
    return os.path.join(CORPUS, protocol + ".json.gz")


def load(protocol):
    with gzip.open(path(protocol), "rt", encoding="utf-8") as handle:
        return json.load(handle)


def write(protocol, dialogues):
    os.makedirs(CORPUS, exist_ok=True)
    data = json.dumps(dialogues, separators=(",", ":"), ensure_ascii=True).encode()
    # mtime=0: the same recording gives the same file.
    with open(path(protocol), "wb") as handle:
        with gzip.GzipFile(fileobj=handle, mode="wb", compresslevel=9, mtime=0) as compressed:
            compressed.write(data)


def main(argv):
    modules = package()
    for protocol in PROTOCOLS:
        fresh = record(modules, protocol)
        steps = sum(len(d["steps"]) for d in fresh)
        if "--write" in argv:
            write(protocol, fresh)
            print("%s: %d dialogues, %d steps, %d bytes" % (protocol, len(fresh), steps,
                                                            os.path.getsize(path(protocol))))
            continue
        stored = load(protocol)
        for index, (old, new) in enumerate(zip(stored, fresh)):
            if old != new:
                print("%s: dialogue %d differs" % (protocol, index))
                break
        else:
            print("%s: %d dialogues as stored" % (protocol, len(stored)))


if __name__ == "__main__":
    main(sys.argv[1:])
