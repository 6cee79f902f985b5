"""IMAP client machine (spec 2.1, 9): transcripts, capability variants, and hypothesis over any input.

Every transcript is played three ways: step by step, every client step cut into single bytes, and with an
unterminated tail glued to the last client step. All must give the same actions (style example 13).
"""

import itertools
import types

import pytest
from hypothesis import given
from hypothesis import strategies as st
from imap_cases.cases import CASES
from imap_cases.helpers import ALL, EMPTY, SALT, b64, bad, info, ok
from imap_cases.sasl_cases import SASL_CASES

from mailproxy.protocol.common import AuthAttempt, Authenticate, Close, Log, Send, StartTLS
from mailproxy.protocol import imap_parse
from mailproxy.protocol.imap import ImapConfig, ImapMachine, State

from support import nginxref
from support.harness import free_port, missing

ACTION_TYPES = (Send, Close, Log, StartTLS, Authenticate)


def play(config, steps, tls=False, cut=False, tail=b""):
    machine = ImapMachine(config, tls=tls, salt=SALT)
    got_steps = []
    client_steps = [i for i, (event, _) in enumerate(steps) if isinstance(event, bytes) and event]
    for index, (event, _) in enumerate(steps):
        if isinstance(event, bytes):
            data = event + (tail if client_steps and index == client_steps[-1] else b"")
            if cut and data:
                got = []
                for position in range(len(data)):
                    got += machine.receive_data(data[position : position + 1])
            else:
                got = machine.receive_data(data)
        elif event[0] == "tls":
            got = machine.tls_established()
        else:
            _, text, wait, sasl_error = event
            got = machine.auth_failed(text, wait, sasl_error=sasl_error)
        got_steps.append(got)
    return machine, got_steps


def check(config, steps, tls=False):
    expected = [actions for _, actions in steps]
    machine, got = play(config, steps, tls)
    assert got == expected
    _, cut = play(config, steps, tls, cut=True)
    assert cut == expected
    # An unterminated tail changes nothing, unless it lands behind a login (then it is trailing data).
    tail_machine, tailed = play(config, steps, tls, tail=b"z NO")
    assert tailed == expected
    if machine.state is State.AUTHENTICATING:
        assert tail_machine.trailing_data() == machine.trailing_data() + b"z NO"
    return machine


def config_for(overrides):
    return ImapConfig.build(**overrides)


@pytest.mark.parametrize("name,steps,overrides,tls", CASES + SASL_CASES, ids=[c[0] for c in CASES + SASL_CASES])
def test_transcript(name, steps, overrides, tls):
    check(config_for(overrides), steps, tls)


def test_greeting_and_pending_tag():
    machine = ImapMachine(ImapConfig.build())
    assert machine.greeting() == [Send(b"* OK IMAP4 ready\r\n")]
    assert machine.reading and not machine.awaiting_auth
    machine.receive_data(b"x1 LOGIN u p\r\ny NOOP\r\n")
    assert machine.tag == b"x1" and machine.awaiting_auth and not machine.reading
    assert machine.receive_data(b"z NOOP\r\n") == []
    assert machine.trailing_data() == b"y NOOP\r\nz NOOP\r\n"


def test_salt_made_once_lazily():
    machine = ImapMachine(ImapConfig.build(auth_methods=ALL, server_name="mail.example"))
    first = machine.receive_data(b"a AUTHENTICATE CRAM-MD5\r\n")[0].data
    assert first.startswith(b"+ ") and first.endswith(b"\r\n")
    machine.receive_data(b"*\r\n")
    assert machine.receive_data(b"b AUTHENTICATE CRAM-MD5\r\n")[0].data == first


def test_auth_failed_needs_attempt():
    with pytest.raises(RuntimeError):
        ImapMachine(ImapConfig.build()).auth_failed("x", True)


def test_starttls_discards_pipelined_input():
    machine = ImapMachine(ImapConfig.build(starttls="on"))
    assert machine.receive_data(b"a STARTTLS\r\nb LOGIN u p\r\n") == [ok(), StartTLS()]
    assert not machine.reading
    assert machine.tls_established() == [] and machine.tls and machine.trailing_data() == b""


CAPS = b"* CAPABILITY IMAP4 IMAP4rev1 UIDPLUS"


@pytest.mark.parametrize(
    "starttls,tls,methods,line",
    [
        ("off", False, ("plain",), CAPS + b" AUTH=PLAIN"),
        ("off", True, ("plain",), CAPS + b" AUTH=PLAIN"),
        ("on", False, ("plain",), CAPS + b" AUTH=PLAIN STARTTLS"),
        ("on", True, ("plain",), CAPS + b" AUTH=PLAIN"),
        ("only", False, ("plain",), CAPS + b" STARTTLS LOGINDISABLED"),
        ("only", True, ("plain",), CAPS + b" AUTH=PLAIN"),
        ("on", False, ("oauthbearer", "plain", "xoauth2"), CAPS + b" AUTH=PLAIN AUTH=XOAUTH2 AUTH=OAUTHBEARER STARTTLS"),
        ("only", False, ALL, CAPS + b" STARTTLS LOGINDISABLED"),
        ("off", False, ("external", "login", "cram-md5"), CAPS + b" AUTH=LOGIN AUTH=CRAM-MD5 AUTH=EXTERNAL"),
        ("off", False, (), CAPS),
    ],
)
def test_capability_variants(starttls, tls, methods, line):
    config = ImapConfig.build(auth_methods=methods, starttls=starttls)
    check(config, [(b"t CAPABILITY\r\n", [Send(line + b"\r\nt OK completed\r\n")])], tls)


def test_capability_after_starttls():
    config = ImapConfig.build(starttls="only")
    check(config, [(b"a CAPABILITY\r\n", [Send(CAPS + b" STARTTLS LOGINDISABLED\r\na OK completed\r\n")]),
                   (b"b STARTTLS\r\n", [ok(b"b"), StartTLS()]), (("tls",), []),
                   (b"c CAPABILITY\r\n", [Send(CAPS + b" AUTH=PLAIN\r\nc OK completed\r\n")])])


def test_custom_capabilities_and_from_server():
    server = types.SimpleNamespace(
        imap_auth=frozenset(("plain", "login")), imap_capabilities=("IMAP4rev1", "SASL-IR"),
        starttls="on", imap_client_buffer=1024, max_errors=3, max_commands=10, server_name="mx.example",
    )
    config = ImapConfig.from_server(server)
    assert config.capability_plain == b"* CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN AUTH=LOGIN STARTTLS\r\n"
    assert config.capability_tls == b"* CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN AUTH=LOGIN\r\n"
    assert (config.client_buffer, config.max_errors, config.max_commands) == (1024, 3, 10)
    assert ImapConfig.build().client_buffer == 4096


def test_default_max_errors_boundary():
    config = ImapConfig.build()
    check(config, [(b"x FOO\r\n", [bad(b"x")])] * 4 + [(b"x FOO\r\n", [Log("info", "client sent too many invalid commands"), bad(b"x"), Close()])])


def test_default_max_commands_boundary():
    config = ImapConfig.build()
    machine = ImapMachine(config)
    got = machine.receive_data(b"a NOOP\r\n" * 1001)
    assert got[:1000] == [ok()] * 1000
    assert got[1000:] == [Log("info", "client sent too many commands"), bad(), Close()]


# --- hypothesis -------------------------------------------------------------------------------------

WORDS = [b"a", b"b1", b"", b" ", b"NOOP", b"noop", b"CAPABILITY", b"LOGOUT", b"STARTTLS", b"LOGIN", b"AUTHENTICATE",
         b"PLAIN", b"LOGIN", b"CRAM-MD5", b"EXTERNAL", b"XOAUTH2", b"OAUTHBEARER", b"ID", b"{3}", b"{2+}", b"{0}",
         b"{99999999999}", b'"q\\"x"', b'"', b"\\", b"AQ==", b"dXNlcg==", b"=", b"@", b"\r", b"\n", b"\r\n", b"+}",
         b"x" * 40, b"\x00", b"\xff"]
soup = st.lists(st.sampled_from(WORDS), max_size=40).map(lambda words: b" ".join(words))
events = st.lists(st.one_of(soup, st.binary(max_size=80), st.sampled_from(["fail", "wait", "sasl", "tls", "eof"])),
                  min_size=1, max_size=12)
configs = st.builds(
    ImapConfig.build, auth_methods=st.sampled_from([("plain",), ALL]), starttls=st.sampled_from(["off", "on", "only"]),
    client_buffer=st.sampled_from([16, 64, 4096]), max_errors=st.integers(0, 6), max_commands=st.integers(0, 20),
)


def drive(machine, event):
    if isinstance(event, bytes):
        return machine.receive_data(event)
    if event == "eof":
        return machine.receive_data(b"")
    if event == "tls":
        # The session reports a handshake only after StartTLS; out of turn the machine raises.
        return machine.tls_established() if machine.state is State.STARTING_TLS else []
    if not machine.awaiting_auth:
        return []
    return machine.auth_failed("no", event != "fail", sasl_error="eA==" if event == "sasl" else None)


@given(configs, st.booleans(), events)
def test_any_input_gives_only_actions(config, tls, script):
    machine = ImapMachine(config, tls=tls, salt=SALT)
    for event in script:
        for action in drive(machine, event):
            assert isinstance(action, ACTION_TYPES)
        assert len(machine._buffer) <= config.client_buffer or not machine.reading


@given(configs, st.booleans(), soup.filter(bool), st.integers(1, 7))
def test_any_cut_gives_the_same_actions(config, tls, data, size):
    whole = ImapMachine(config, tls=tls, salt=SALT)
    pieces = ImapMachine(config, tls=tls, salt=SALT)
    expected = whole.receive_data(data)
    got = list(itertools.chain.from_iterable(
        pieces.receive_data(data[i : i + size]) for i in range(0, len(data), size)))
    assert got == expected
    assert pieces.state is whole.state and pieces.trailing_data() == whole.trailing_data()


lines = st.tuples(st.one_of(soup, st.binary(max_size=60)), st.sampled_from([b"\r\n", b"\n", b" \r\n", b"\r", b""]))


@given(lines, st.sampled_from([8, 40, 4096]), st.booleans())
def test_the_common_line_reads_as_any_line(line, limit, client_id):
    # parse_line answers the commonest lines at one go (imap_parse._SIMPLE); whatever it answers must be
    # what the general tokenizer answers for the same bytes.
    data = line[0] + line[1]
    assert imap_parse.parse_line(data, limit, False, client_id) == imap_parse._parse(
        bytes(data[:limit]), limit, False, client_id, False)


# --- the same transcripts against nginx 1.22 -------------------------------------------------------

# Where mailproxy deliberately differs from nginx 1.22 (spec 9.9, 9.10, 9.11, 9.13, the brief), or 1.22
# lacks the feature (max_commands, OAuth), or the bytes are random (CRAM-MD5 salt).
NOT_NGINX_1_22 = {
    "login-zero-literal", "login-zero-login",
    "compaction", "external-no-earlier-password", "disabled-mechanisms", "tag-reset-after-failure",
    "capability-all",  # 1.22 has no XOAUTH2/OAUTHBEARER
    "literal-garbage-after",  # 1.22 takes "{1}CRLF ux" as the argument "ux"; spec 2.1 (1.29.6) refuses it
    "literal-bad-header",  # 1.22 reads "{}" as "{0}" and answers "+ OK"; we refuse a count without digits
}


def nginx_bytes(steps):
    """The bytes nginx should send for a transcript, or None when it needs an auth server answer."""
    chunks, sent = [], [b"* OK IMAP4 ready\r\n"]
    for event, actions in steps:
        if not isinstance(event, bytes) or not event:
            return None
        chunks.append(event)
        for action in actions:
            if isinstance(action, Authenticate):
                # The auth server behind nginx is a dead port: the attempt ends in the internal error.
                return chunks, sent + [b"* BAD internal server error\r\n"]
            if isinstance(action, Send):
                sent.append(action.data)
    return chunks, sent


def nginx_comparable():
    for name, steps, overrides, tls in CASES + SASL_CASES:
        if tls or name in NOT_NGINX_1_22 or set(overrides) - {"auth_methods", "max_errors", "client_buffer"}:
            continue
        if overrides.get("auth_methods") == ALL:
            overrides = dict(overrides, auth_methods=ALL[:4])
        if any(m in name for m in ("cram", "oauth", "xoauth", "max-commands", "sasl-error", "XOAUTH2")):
            continue
        expected = nginx_bytes(steps)
        if expected:
            yield name, overrides, expected


@pytest.mark.peer  # Debian's nginx, started for the comparison
def test_transcripts_match_nginx():
    if not nginxref.available():
        missing("Debian's nginx mail module")
    cases = list(nginx_comparable())
    groups = {}
    for name, overrides, expected in cases:
        key = tuple(sorted((k, tuple(v) if isinstance(v, tuple) else v) for k, v in overrides.items()))
        groups.setdefault(key, []).append((name, expected))
    mismatches = []
    for key, members in groups.items():
        settings_ = dict(key)
        port = free_port()
        directives = "imap_auth %s; " % " ".join(settings_.get("auth_methods", ("plain",)))
        directives += "max_errors %d; " % settings_.get("max_errors", 5)
        directives += "imap_client_buffer %d; " % settings_.get("client_buffer", 4096)
        block = "auth_http 127.0.0.1:1/a; server { listen 127.0.0.1:%d; protocol imap; %s}" % (port, directives)
        with nginxref.NginxMail(block, [port]):
            for name, (chunks, sent) in members:
                got = nginxref.exchange(port, chunks, settle=0.15)
                if got != b"".join(sent):
                    mismatches.append((name, got, b"".join(sent)))
    assert not mismatches, "\n".join("%s:\n nginx %r\n   ours %r" % m for m in mismatches)


# What the differential fuzzer against nginx found (tests/differential/): nginx's bytes, recorded there.


def attempt(login, password, tag=b"b"):
    return Authenticate(AuthAttempt("plain", login, password, 1, tag=tag))


B64_ERROR = info("client sent invalid base64 encoding in AUTH PLAIN command")
PLAIN_UP = b64(b"\0u\0p")


@pytest.mark.parametrize("line,answer", [
    (b'"' + PLAIN_UP + b'"\r\n', [B64_ERROR, bad()]),
    (b"{5+}\r\n", [B64_ERROR, bad()]),  # no literal: nothing waited for
    # No "+ OK" for a literal: the next line is a command (a tag cannot hold "=").
    (b"{12}\r\n" + PLAIN_UP + b"\r\n", [B64_ERROR, bad(), bad(b"*")]),
    # A leading space: an empty first response, which decodes to no login at all.
    (b" " + PLAIN_UP + b"\r\n", [info("client sent invalid login in AUTH PLAIN command"), bad()]),
], ids=["quoted", "literal-plus", "literal", "leading-space"])
def test_an_authenticate_response_is_read_raw_from_its_first_byte(line, answer):
    """nginx reads a continuation line from its first byte to SP, CR or LF: a quote, a brace or a leading
    space is data, not an IMAP string (ngx_mail_parse.c: sw_argument after AUTHENTICATE)."""
    check(ImapConfig.build(), [
        (b"a AUTHENTICATE PLAIN\r\n", [EMPTY]),
        (line, answer),
        (b"b NOOP\r\n", [ok(b"b")]),
    ])


def test_a_quoted_string_cut_by_its_line_end_stays_open_for_the_next_commands():
    """nginx's quirk (spec 2.1): CR/LF end the argument but not the quotes, until a quote closes them or a
    line fails to parse. Meanwhile a space does not end an argument: LOGIN gets one."""
    check(ImapConfig.build(), [
        (b'a NOOP "x\r\n', [ok()]),
        (b"b LOGIN u p\r\n", [bad(b"b")]),  # LOGIN "u p": one argument
        (b"c NOOP\r\n", [ok(b"c")]),
    ])
    check(ImapConfig.build(), [
        (b'a NOOP "x\r\n', [ok()]),
        (b'b LOGIN u" p\r\n', [attempt(b"u", b"p")]),  # the quote after u closes what was open
    ])
    check(ImapConfig.build(), [
        (b'a NOOP "x\r\n', [ok()]),
        (b"b SELECT\r\n", [bad(b"b")]),  # a parse error clears it
        (b"c LOGIN u p\r\n", [attempt(b"u", b"p", b"c")]),
    ])
