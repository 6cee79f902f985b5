"""Issue 26, item 8: a differential fuzzer against Debian's nginx.

Random but well-formed client dialogues (diff_dialogues.py: commands, literals, SASL, logins, cuts,
pipelining, bad input) go to Debian's nginx 1.22 and to mailproxy, which run one ``mail {}`` block, ask one
auth server and log in to one Dovecot and one Postfix (diff_harness.py). Everything each proxy sends back,
up to its close or a settle point, is compared byte for byte after masking what two servers cannot share
(Transcript.masked: the salt, digests made from it, Dovecot's timings); so are the auth requests each
proxy sent for the dialogue (the salt and the APOP/CRAM-MD5 digest masked).

A difference is explained by one entry of ``DELIBERATE`` (mailproxy chooses otherwise on purpose, with the
reason) or of ``PENDING`` (mailproxy is wrong in a module being refactored elsewhere: the entry holds the
repro, nginx's bytes and the proposed fix, and test_pending_still_differs replays it: an expected failure
until the fix, then a failure saying to remove the entry), or the test fails with the seed, the dialogue's
index, its commands and writes, both byte streams and both sessions' log lines. An entry recognises its own
pattern at the first differing line (with the error logs' help) and nothing else; it then either rewrites
nginx's bytes from there as mailproxy's, and the comparison goes on, or says the sessions part for good.

    MAILPROXY_DIFF_DIALOGUES=N   dialogues to play (default 300: 50 s on two busy cores, startup included)
    MAILPROXY_DIFF_SEED=S        the seed (default: random, CI_SEED under CI=true; printed on failure)
    MAILPROXY_DIFF_ONLY=I[,J]    replay only these dialogue indexes of the seed
    MAILPROXY_DIFF_REPORT=FILE   write every unexplained difference there in full (the failure shows 3)
"""

import os
import random
import re
import shutil
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import pytest

from diff_dialogues import Dialogue, dialogue
from diff_harness import (AUTH_ONLY, METHODS, SERVERS, FuzzAuthServer, Write, brief, mail_block,
                          normalise_request, play, source_address)
from diff_streams import (INVALID, Divergence, client_lines, complete_part, fills_at_command_end, first_line,
                          imap_commands, quoted_in, replies, session_records, split_replies)
from support import nginxref
from support.backends import DOVECOT, POSTFIX, USERS, Dovecot, Postfix, require
from support.harness import MasterProcess, free_port, missing

DEFAULT_DIALOGUES = 300
PARALLEL = 8  # dialogues in flight at once: the client mostly waits for silence
SHOWN = 3  # differences printed in full on failure


@pytest.fixture(scope="module")
def backends():
    """One Dovecot and one Postfix for both proxies (tools/localmail.py, stopped by pid)."""
    require(DOVECOT)
    require(POSTFIX)
    dovecot = Dovecot().start()
    try:
        postfix = Postfix().start()
        try:
            yield dovecot, postfix
        finally:
            postfix.stop()
    finally:
        dovecot.stop()


@pytest.fixture(scope="module")
def proxies(backends):
    if not nginxref.available():
        missing("Debian's nginx with the mail module (nginx-light, libnginx-mod-mail)")
    dovecot, postfix = backends
    users = dict(USERS, **AUTH_ONLY)
    routes = {"imap": ("127.0.0.1", dovecot.imap_port), "pop3": ("127.0.0.1", dovecot.pop3_port),
              "smtp": ("127.0.0.1", postfix.smtp_port)}
    auth = FuzzAuthServer(users, routes)
    ports = {side: {name: free_port() for name in SERVERS} for side in ("nginx", "ours")}
    prefix = tempfile.mkdtemp(prefix="mpdiff-")
    master = MasterProcess(
        prefix,
        "worker_processes 1;\nerror_log logs/error.log info;\nevents { worker_connections 512; }\n"
        "mail {\n%s}\n" % mail_block(ports["ours"], auth.url),
        None,
        None,
    )
    nginx = nginxref.NginxMail(mail_block(ports["nginx"], auth.url), ports["nginx"].values())
    try:
        with nginx:
            master.start()
            yield Proxies(ports, nginx, master, auth)
            log = master.error_log()
            assert "[alert]" not in log, log
    finally:
        master.kill_leftovers()
        auth.close()
        shutil.rmtree(prefix, ignore_errors=True)


class Proxies:
    def __init__(self, ports, nginx, master, auth):
        self.ports = ports
        self.auth = auth
        self.nginx = nginx
        self.master = master

    def run(self, item):
        """Both transcripts of one dialogue: nginx first, then mailproxy paced by nginx's replies."""
        source = source_address(item.index)
        theirs = play(self.ports["nginx"][item.server], item.writes, source, self.auth)
        ours = play(self.ports["ours"][item.server], item.writes, source, self.auth, want=theirs)
        return theirs, ours

    def requests(self, item, theirs, ours):
        """The auth requests each proxy sent for this dialogue (masked), found by its client address."""
        source = source_address(item.index)
        return [[normalise_request(raw) for raw in self.auth.requests_from(source, t.started, t.ended)]
                for t in (theirs, ours)]

    def logs(self, theirs, ours):
        """Each session's error-log records, as bytes (nginx writes client bytes raw)."""
        with open(os.path.join(self.nginx.prefix, "logs", "error.log"), "rb") as handle:
            nginx_log = handle.read()
        with open(self.master.log_path, "rb") as handle:
            ours_log = handle.read()
        return (session_records(nginx_log, theirs.ip, theirs.port),
                session_records(ours_log, ours.ip, ours.port))


# --- the comparison ---------------------------------------------------------------------------------

REST = "the rest"  # an entry's verdict when the two sessions part for good: nothing after it is compared


@dataclass
class Entry:
    """One explained difference. ``explains(d)`` looks at the first differing line of a Divergence and
    answers None (not this one), REST, or the bytes nginx would have sent from there on had it behaved as
    mailproxy does at that point (the comparison then goes on with them)."""

    name: str
    reason: str
    explains: Callable = None
    # For the auth requests instead: request(nginx's, mailproxy's, client bytes) gives nginx's request
    # rewritten as mailproxy would have sent it, or None.
    request: Callable = None
    repro: tuple = ()  # PENDING: (server, writes, nginx's bytes, mailproxy's bytes), replayed below


def _invalid_reply(d):
    if d.protocol == "imap":
        return re.fullmatch(rb"[^\r\n]* ?BAD invalid command\r\n", first_line(d.nginx_rest)) is not None
    return first_line(d.nginx_rest) == INVALID[d.protocol]


def compaction(d):
    """nginx logged 'too long command' for a buffer that begins with commands it had answered, and the
    one that did not fit would fit alone: mailproxy, which compacts, takes it."""
    if not d.nginx_closed or not (d.nginx_rest == b"" or _invalid_reply(d)):
        return None
    if d.nginx_rest and len(d.nginx_rest) != len(first_line(d.nginx_rest)):
        return None
    differs = d.ours_rest != d.nginx_rest or not d.ours_closed  # or only nginx closed
    # Lines alike at their start (two long AUTH PLAIN lines) leave several places nginx's buffer can
    # begin: one that begins with whole commands is enough.
    done = any(complete_part(held, d.protocol) > 0 for held in d.too_long_buffers())
    return REST if done and differs else None


def filled_exactly(d):
    """nginx stopped answering and reading (it stays open and silent) after a read that filled its buffer
    exactly at a command's end while the write went on; mailproxy reads on."""
    if d.nginx_rest or d.nginx_closed or not d.ours_rest:
        return None
    return REST if fills_at_command_end(d.pieces, d.buffer, d.protocol) else None


def rejected_mail_rewrites_buffer(d):
    """nginx's info line for a MAIL refused without smtp_auth none turns every CR and LF of its whole
    buffer into '_', so commands pipelined behind that MAIL lose their line ends, and what nginx does
    from then on is its own. Explained from the first such MAIL on, whatever the divergence."""
    if d.protocol != "smtp":
        return None
    logged = quoted_in(d.nginx_log, b'client was rejected: "')
    lines = client_lines(d.sent)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    refusals = [match.start() for match in re.finditer(rb"(?m)^530 5\.7\.1 Authentication required\r$", d.before)]
    ends = [0]
    for piece in d.pieces:
        ends.append(ends[-1] + len(piece))
    for text, start in zip(logged, refusals):
        index = replies("smtp", d.before[:start])  # the MAIL line this 530 answers
        if index >= len(lines):
            return None
        after = offsets[index + 1]  # where the bytes behind that MAIL line start
        mangled = lines[index].replace(b"\r", b"_").replace(b"\n", b"_")
        found = text.find(mangled)
        if found >= 0:
            behind = d.sent[after:after + len(text) - found - len(mangled)]
        else:
            # The log line stops at 2048 bytes, inside this MAIL line: nginx had read the rest of the
            # write that brought the line's end (it reads a whole write when it has room).
            behind = d.sent[after:min(end for end in ends if end >= after)]
        if re.search(rb"[\r\n]", behind[:d.buffer]):
            return REST
    return None


def unsafe_helo_in_request(theirs, ours, sent):
    """The request-side of unsafe-smtp-argument: nginx's Auth-SMTP-Helo carries the NUL mailproxy
    refused; mailproxy's carries the HELO it had before (or none)."""
    pattern = rb"\r\nAuth-SMTP-Helo: ([^\r\n]*)\r\n"
    nginx_helo, our_helo = re.search(pattern, theirs), re.search(pattern, ours)
    if nginx_helo is None or our_helo is None or b"\0" not in nginx_helo.group(1):
        return None
    return theirs[:nginx_helo.start(1)] + our_helo.group(1) + theirs[nginx_helo.end(1):]


def unsafe_smtp_argument(d):
    """HELO, EHLO, MAIL or RCPT carrying a NUL: mailproxy answers 501 (the bytes would reach an auth
    request header and the backend's commands); nginx takes them. A HELO's NUL shows again when nginx
    logs in to the backend with it, which refuses (451, or its own 501 with proxy_pass_error_message)."""
    reply = b"501 5.5.4 Invalid argument\r\n"
    if d.protocol != "smtp":
        return None
    if first_line(d.nginx_rest)[:4] in (b"451 ", b"501 ") and not d.ours_rest.startswith(reply):
        answered = zip(client_lines(d.sent), split_replies("smtp", d.before))
        if any(line[:4].upper() in (b"HELO", b"EHLO") and b"\0" in line and got == reply
               for line, got in answered):
            return REST
    if not d.ours_rest.startswith(reply) or d.nginx_rest.startswith(reply):
        return None
    line = d.answered_line()
    verb = line[:4].upper()
    if b"\0" not in line or verb not in (b"HELO", b"EHLO", b"MAIL", b"RCPT"):
        return None
    if verb in (b"HELO", b"EHLO"):
        # nginx's 250 reply (one line, or EHLO's several) becomes ours; the session goes on alike.
        rest = d.nginx_rest
        end = 0
        while rest[end:end + 4] == b"250-":
            end = rest.index(b"\n", end) + 1
        if rest[end:end + 4] != b"250 ":
            return None
        return reply + rest[rest.index(b"\n", end) + 1:]
    return REST


def external_without_external(d):
    """AUTH(ENTICATE) EXTERNAL with an initial response while imap_auth/pop3_auth/smtp_auth lacks
    external: nginx asks the auth server anyway, mailproxy refuses it (spec 9.11, 9.13)."""
    if "external" in METHODS[d.item.server]:
        return None
    if d.protocol == "imap":
        tag = d.tag_of_ours()
        command = d.imap_command(tag) if tag is not None else None
        hit = command is not None and re.match(rb"(?i)[^ ]* +AUTHENTICATE +EXTERNAL +[^ \r\n]", command.data)
    else:
        hit = (d.ours_rest.startswith(INVALID[d.protocol])
               and re.match(rb"(?i)AUTH +EXTERNAL +[^ \r\n]", d.answered_line()))
    return REST if hit and first_line(d.nginx_rest) != first_line(d.ours_rest) else None


def stale_tag(d):
    """A line that fails before its tag is complete, right after a refused login that kept the session
    (Auth-Wait): nginx prefixes its BAD with len(old tag) + 1 stale buffer bytes, mailproxy with '* '
    (spec 9.10, 9.13). The sessions go on alike."""
    bad = b"BAD invalid command\r\n"
    if d.protocol != "imap" or not d.ours_rest.startswith(b"* " + bad):
        return None
    last = d.before[d.before.rfind(b"\n", 0, len(d.before) - 1) + 1:]
    match = re.match(rb"([^ \r\n]*) NO ", last)
    if match is None:
        return None
    stale = len(match.group(1)) + 1
    if d.nginx_rest[stale:stale + len(bad)] != bad:
        return None
    return b"* " + bad + d.nginx_rest[stale + len(bad):]


def zero_literal_in_request(theirs, ours, sent):
    """The request-side of zero-literal: nginx 1.22 sends the byte after {0} CRLF as the value."""
    if not re.search(rb"\{0\+?\}\r?\n", sent):
        return None
    for header in (b"Auth-User", b"Auth-Pass"):
        pattern = rb"\r\n%s: ([^\r\n]*)\r\n" % header
        nginx_value, our_value = re.search(pattern, theirs), re.search(pattern, ours)
        if nginx_value and our_value and our_value.group(1) == b"" and re.fullmatch(rb"%[0-9A-F]{2}|[^%]",
                                                                                     nginx_value.group(1)):
            return theirs[:nginx_value.start(1)] + theirs[nginx_value.end(1):]
    return None


def literal(kind):
    """IMAP literals nginx 1.22 reads otherwise than the newer nginx mailproxy follows (spec 2.1): the
    command's replies differ, or (when both refuse it) only the error count does, and mailproxy closes
    for max_errors while nginx goes on."""

    def odd(command):
        for count, _, data, after in command.literals if command else ():
            if kind == "zero" and count == b"0":
                return True
            if kind == "empty" and count == b"":
                return True
            if kind == "garbage" and count not in (b"", b"0") and after not in (b"", b" ", b"\r", b"\n"):
                return True
        return False

    def explains(d):
        if d.protocol != "imap":
            return None
        tag = d.tag_at()
        if tag is not None and odd(d.imap_command(tag)):
            return REST
        # nginx 1.22's reading of the literal swallowed the commands after it: the difference shows at
        # the first one, right after the odd command's reply.
        last = re.findall(rb"(?m)^([^ \r\n]*) (?:OK|NO|BAD) [^\r\n]*\r$", d.before)
        if last and odd(d.imap_command(last[-1], answered=True)):
            return REST
        if d.ours_closed and not d.ours_rest and d.nginx_rest:
            answered = re.findall(rb"(?m)^([^ \r\n]*) BAD invalid command\r$", d.before)
            if any(odd(command) for command in imap_commands(d.sent) if command.tag in answered):
                return REST
        return None

    return explains


def salt_for_apop_and_cram_only(theirs, ours, sent):
    """nginx 1.22 sends Auth-Salt (the POP3 greeting's, with its CRLF) for other methods too."""
    method = re.search(rb"\r\nAuth-Method: ([^\r]*)\r\n", theirs)
    if method is None or method.group(1) in (b"apop", b"cram-md5"):
        return None
    rewritten = re.sub(rb"\r\nAuth-Salt: [^\r]*\r\n", b"\r\n", theirs, count=1)
    return rewritten if rewritten != theirs else None


def none_without_stale_credentials(theirs, ours, sent):
    """Auth-Method none after an earlier refused login: nginx 1.22 repeats that login's Auth-User and
    Auth-Pass."""
    if b"\r\nAuth-Method: none\r\n" not in theirs:
        return None
    rewritten = re.sub(rb"\r\nAuth-User: [^\r]*\r\nAuth-Pass: [^\r]*\r\n", b"\r\nAuth-User: \r\nAuth-Pass: \r\n",
                       theirs, count=1)
    return rewritten if rewritten != theirs else None


def external_without_password(theirs, ours, sent):
    """nginx sends Auth-Pass with EXTERNAL when an earlier attempt of the session set a password."""
    if b"\r\nAuth-Method: external\r\n" not in theirs:
        return None
    rewritten = re.sub(rb"\r\nAuth-Pass: [^\r]+\r\n", b"\r\nAuth-Pass: \r\n", theirs, count=1)
    return rewritten if rewritten != theirs else None


# Differences mailproxy makes on purpose. Each entry recognises its own pattern at the first differing
# line and nothing else; the reason says why mailproxy does not copy nginx 1.22.
DELIBERATE = [
    Entry("compaction", "nginx 1.22 never compacts its client buffer, so short commands pipelined past its "
          "end make a 'too long command'; mailproxy compacts after each line and refuses only a command that "
          "alone does not fit (spec 2.0.3, 9.9 a, 9.13)", compaction),
    Entry("buffer-filled-exactly", "a read that fills nginx's buffer exactly at a command's end leaves the rest "
          "of the client's write unread until the client sends again (nginx 1.22; freenginx reads on, and so "
          "does mailproxy: spec 9.9 b)", filled_exactly),
    Entry("rejected-mail-rewrites-buffer", "nginx at log level info or debug logs a refused MAIL by "
          "rewriting CR and LF to '_' in its whole buffer, so pipelined commands behind it lose their line "
          "ends; at the default level it does not, and mailproxy's answers never depend on its log level",
          rejected_mail_rewrites_buffer),
    Entry("unsafe-smtp-argument", "a NUL in HELO/EHLO/MAIL/RCPT arguments would reach Auth-SMTP-* headers and "
          "the backend's commands: mailproxy answers 501 5.5.4 (mailproxy/protocol/smtp.py, _UNSAFE)",
          unsafe_smtp_argument, unsafe_helo_in_request),
    Entry("external-ir-not-enabled", "EXTERNAL with an initial response is refused unless the method is "
          "enabled, as freenginx does (spec 9.11, 9.13)", external_without_external),
    Entry("stale-imap-tag", "no stale tag prefix after a refused login kept by Auth-Wait (spec 9.10, 9.13)",
          stale_tag),
    Entry("zero-literal", "{0} is an empty literal; nginx 1.22 takes the byte after its CRLF as a 1-byte "
          "literal (spec 2.1)", literal("zero"), zero_literal_in_request),
    Entry("literal-without-digits", "a literal count needs digits (nginx 1.29.6); 1.22 reads {} as {0}",
          literal("empty")),
    Entry("literal-garbage-after", "after a literal only SP, CR or LF may follow (nginx 1.29.6, spec 2.1)",
          literal("garbage")),
    # The auth requests
    Entry("auth-salt-for-apop-and-cram-md5-only", "Auth-Salt goes with apop and cram-md5 only, so that "
          "EXTERNAL and OAuth logins need no Auth-Pass (spec 3.2, 9.5, 9.13)",
          request=salt_for_apop_and_cram_only),
    Entry("external-without-stale-password", "EXTERNAL never carries the password of an earlier attempt "
          "(freenginx, spec 9.11, 9.13)", request=external_without_password),
    Entry("no-stale-credentials-with-none", "Auth-Method none carries no login or password from an earlier "
          "refused attempt (nginx after 1.22: 'Mail: reset stale auth credentials with smtp_auth none', "
          "9c02c84a7; spec 2.3.5)", request=none_without_stale_credentials),
]

# Differences where mailproxy is wrong and a fix is still to come: each entry says what nginx does and
# what mailproxy should do, and test_pending_still_differs replays its repro, so a fix shows up as a failure
# saying to remove the entry. Empty: the two this fuzzer found (an AUTHENTICATE continuation line read as
# an IMAP string; a quoted string left open by its line end) are fixed, with unit tests in
# tests/protocol/test_imap.py.
PENDING = []


def classify(item, theirs, ours, proxies):
    """[] when both agree; else the names of the entries that explain every difference (REST last when
    the sessions parted for good), or None."""
    if theirs.masked == ours.masked and bool(theirs.closed) == bool(ours.closed):
        return []
    nginx_log, ours_log = proxies.logs(theirs, ours)
    d = Divergence(item, [sent for sent, _ in theirs.steps], theirs.masked, ours.masked,
                   bool(theirs.closed), bool(ours.closed), nginx_log, ours_log)
    names = []
    for _ in range(20):
        if d.nginx == d.ours and d.nginx_closed == d.ours_closed:
            return names
        for entry in DELIBERATE + PENDING:
            verdict = entry.explains(d) if entry.explains else None
            if verdict is REST:
                return names + [entry.name, REST]
            if verdict is not None:
                names.append(entry.name)
                d.nginx = d.before + verdict
                break
        else:
            return None
    return None


def compare_requests(theirs, ours, sent):
    """[] when both proxies sent the same auth requests; else the entries explaining each difference,
    or None."""
    if len(theirs) != len(ours):
        return None
    names = []
    for nginx_request, our_request in zip(theirs, ours):
        for _ in range(5):
            if nginx_request == our_request:
                break
            for entry in DELIBERATE + PENDING:
                rewritten = entry.request(nginx_request, our_request, sent) if entry.request else None
                if rewritten is not None:
                    names.append(entry.name)
                    nginx_request = rewritten
                    break
            else:
                return None
        if nginx_request != our_request:
            return None
    return names


def show(item, theirs, ours, proxies, requests=None):
    nginx_log, our_log = proxies.logs(theirs, ours)
    parts = [item.describe()]
    if requests:
        parts.append("the auth requests differ:")
        for name, sent in zip(("nginx", "mailproxy"), requests):
            parts += ["  %s: %s" % (name, brief(raw)) for raw in sent]
    for name, transcript, log in (("nginx", theirs, nginx_log), ("mailproxy", ours, our_log)):
        parts.append("%s (%s):" % (name, transcript.closed or "open"))
        parts.append("  greeting %s" % brief(transcript.greeting))
        parts += ["  C: %s\n  S: %s" % (brief(sent), brief(got)) for sent, got in transcript.steps]
        parts.append("  received (masked): %s" % brief(transcript.masked))
        parts += ["  log: %s" % brief(record)[1:-1] for record in log]
    return "\n".join(parts)


# Under CI a fixed seed, so that a submission's result can be reproduced; elsewhere a new one each run,
# which is how the classifier meets new patterns (the seed is printed with any difference).
CI_SEED = "4444"


def _seed():
    if os.environ.get("MAILPROXY_DIFF_SEED"):
        return os.environ["MAILPROXY_DIFF_SEED"]
    if os.environ.get("CI") == "true":
        return CI_SEED
    return str(random.SystemRandom().randrange(10 ** 9))


def _indexes():
    only = os.environ.get("MAILPROXY_DIFF_ONLY")
    if only:
        return [int(index) for index in only.split(",")]
    return range(int(os.environ.get("MAILPROXY_DIFF_DIALOGUES") or DEFAULT_DIALOGUES))


def test_same_bytes_as_nginx(proxies):
    seed = _seed()
    items = [dialogue(seed, index) for index in _indexes()]

    def run(item):
        return item, proxies.run(item)

    differences, explained = [], {}
    with ThreadPoolExecutor(PARALLEL) as pool:
        for item, (theirs, ours) in pool.map(run, items):
            names = classify(item, theirs, ours, proxies)
            if names is None:
                differences.append(show(item, theirs, ours, proxies))
                continue
            requests = proxies.requests(item, theirs, ours)
            if REST not in names:
                explains_requests = compare_requests(*requests, b"".join(sent for sent, _ in theirs.steps))
                if explains_requests is None:
                    differences.append(show(item, theirs, ours, proxies, requests))
                    continue
                names += explains_requests
            for name in sorted(set(names) - {REST}):
                explained.setdefault(name, []).append(item.index)
    report = os.environ.get("MAILPROXY_DIFF_REPORT")
    if report:
        with open(report, "w") as handle:
            handle.write("seed %s, %d dialogues\n\n%s\n" % (seed, len(items), "\n\n".join(differences)))
    pending = {entry.name for entry in PENDING}
    for name, indexes in sorted(explained.items()):
        message = "%s difference %r in dialogues %s of seed %s" % (
            "pending" if name in pending else "deliberate", name, indexes, seed)
        if name in pending:
            warnings.warn(message)
        print(message)
    assert not differences, (
        "%d of %d dialogues differ (MAILPROXY_DIFF_SEED=%s; replay one with MAILPROXY_DIFF_ONLY=<index>):\n\n%s"
        % (len(differences), len(items), seed, "\n\n".join(differences[:SHOWN])))


if PENDING:
    # Defined only while something is pending: an empty parametrization would be a test that always skips.
    @pytest.mark.parametrize("entry", PENDING, ids=[entry.name for entry in PENDING])
    def test_pending_still_differs(proxies, entry):
        """Each PENDING repro: nginx still answers as recorded (else a failure), mailproxy still differs
        (an expected failure), or mailproxy now answers alike (a failure saying to remove the entry)."""
        server, writes, nginx_bytes, our_bytes = entry.repro
        item = Dialogue("pending", 9999, server)
        item.writes = [Write(data) for data in writes]
        theirs, ours = proxies.run(item)
        assert theirs.masked == nginx_bytes, "nginx no longer answers as recorded: %r" % theirs.masked
        if ours.masked != nginx_bytes:
            changed = "" if ours.masked == our_bytes else " (otherwise than recorded: %r)" % ours.masked
            pytest.xfail("%s still differs%s" % (entry.name, changed))
        pytest.fail("%s is fixed: move it out of PENDING" % entry.name)
