"""SMTP client machine: transcripts (spec 2.3, 9) checked whole, byte by byte, merged and with trailing bytes.

Expected bytes were recorded from Debian's nginx 1.22 mail proxy (tests/support/nginxref.py) with
``server_name mail.example.com``; where 1.22 differs from the spec (compaction, EXTERNAL gating, OAuth,
max_commands) the spec's bytes are used (spec 9.13).
"""

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailproxy.protocol import sasl, smtp
from mailproxy.protocol.common import AuthAttempt, Authenticate, Close, Log, Send, StartTLS
from mailproxy.protocol.smtp import SmtpConfig, SmtpMachine, State

from support import nginxref
from support.harness import free_port, missing

NAME = "mail.example.com"
GREETING = b"220 mail.example.com ESMTP ready\r\n"
INVALID = b"500 5.5.1 Invalid command\r\n"
ARG = b"501 5.5.4 Invalid argument\r\n"
SEQ = b"503 5.5.1 Bad sequence of commands\r\n"
OK = b"250 2.0.0 OK\r\n"
HELO = b"250 mail.example.com\r\n"
EHLO = b"250-mail.example.com\r\n250 AUTH PLAIN LOGIN\r\n"
SALT = b"<1253483233.1795609615@mail.example.com>\r\n"
CHALLENGE = b"334 PDEyNTM0ODMyMzMuMTc5NTYwOTYxNUBtYWlsLmV4YW1wbGUuY29tPg==\r\n"
ALL = frozenset(("plain", "login", "cram-md5", "external", "xoauth2", "oauthbearer", "none"))


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def config(**kw):
    kw.setdefault("server_name", NAME)
    return SmtpConfig.build(**kw)


def info(text):
    return Log("info", text)


def attempt(method, login=b"", password=b"", n=1, **kw):
    return Authenticate(AuthAttempt(method=method, login=login, password=password, attempt=n, **kw))


def fail(text="Invalid login", wait=False, code=None, sasl_error=None):
    return ("fail", text, wait, code, sasl_error)


TLS = ("tls",)


@pytest.fixture(autouse=True)
def fixed_salt(monkeypatch):
    monkeypatch.setattr(sasl, "make_salt", lambda name: SALT)


def _play(machine, steps, mode):
    out = []
    for step in steps:
        if isinstance(step, bytes):
            if mode == "bytes" and step:
                for i in range(len(step)):
                    out += machine.receive_data(step[i : i + 1])
            else:
                out += machine.receive_data(step)
        elif step[0] == "fail":
            out += machine.auth_failed(*step[1:])
        else:
            out += machine.tls_established()
    return out


def _merged(steps):
    merged = []
    for step in steps:
        if isinstance(step, bytes) and merged and isinstance(merged[-1], bytes) and step:
            merged[-1] += step
        else:
            merged.append(step)
    return merged


def check(steps, expected, cfg=None, tls=False):
    """Run a transcript four ways; every way must give exactly ``expected`` (bytes = Send)."""
    expected = [Send(e) if isinstance(e, bytes) else e for e in expected]
    runs = {
        "steps": steps,
        "bytes": steps,
        "merged": _merged(steps),
        "trailing": steps + [b"NO"],
    }
    machines = {}
    for mode, script in runs.items():
        machine = SmtpMachine(cfg or config(), tls)
        assert machine.greeting() == [Send((cfg or config()).greeting)]
        assert _play(machine, script, mode) == expected, mode
        machines[mode] = machine
    return machines["steps"]


# -- greeting, HELO/EHLO ----------------------------------------------------------------------------


def test_greeting_and_canned_bytes():
    c = config()
    assert c.greeting == GREETING
    assert c.auth_ok == b"235 2.0.0 OK\r\n"
    assert c.internal_error == b"451 4.3.2 Internal server error\r\n"


def test_helo_ehlo_arguments():
    check(
        [b"HELO x\r\n", b"HELO\r\n", b"HELO a b\r\n", b"EHLO x\r\n", b"ehlo y\r\n", b"EHLO\r\n", b"helo  z  \n"],
        [HELO, ARG, ARG, EHLO, EHLO, ARG, HELO],
    )


EHLO_CASES = [
    # (smtp_auth, smtp_capabilities, starttls, tls, reply) -- all observed on nginx 1.22
    (ALL - {"xoauth2", "oauthbearer"}, ("PIPELINING", "SIZE 100"), "off", False,
     b"250-mail.example.com\r\n250-PIPELINING\r\n250-SIZE 100\r\n250 AUTH PLAIN LOGIN CRAM-MD5 EXTERNAL\r\n"),
    ({"none"}, (), "off", False, b"250 mail.example.com\r\n"),
    ({"cram-md5"}, (), "off", False, b"250-mail.example.com\r\n250 AUTH CRAM-MD5\r\n"),
    ({"plain", "login"}, (), "on", False, b"250-mail.example.com\r\n250-AUTH PLAIN LOGIN\r\n250 STARTTLS\r\n"),
    ({"plain", "login"}, (), "only", False, b"250-mail.example.com\r\n250 STARTTLS\r\n"),
    ({"none"}, (), "only", False, b"250-mail.example.com\r\n250 STARTTLS\r\n"),
    ({"plain", "login"}, ("PIPELINING",), "on", False,
     b"250-mail.example.com\r\n250-PIPELINING\r\n250-AUTH PLAIN LOGIN\r\n250 STARTTLS\r\n"),
    ({"plain", "login"}, ("PIPELINING", "8BITMIME"), "only", False,
     b"250-mail.example.com\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 STARTTLS\r\n"),
    ({"plain", "login"}, ("PIPELINING",), "on", True,
     b"250-mail.example.com\r\n250-PIPELINING\r\n250 AUTH PLAIN LOGIN\r\n"),
    ({"plain", "login"}, (), "only", True, EHLO),
    ({"none"}, ("X",), "on", True, b"250-mail.example.com\r\n250 X\r\n"),
    ({"none"}, (), "on", False, b"250-mail.example.com\r\n250 STARTTLS\r\n"),
    # freenginx 9.2: fixed order whatever the configuration order
    ({"plain", "oauthbearer", "xoauth2"}, (), "off", False,
     b"250-mail.example.com\r\n250 AUTH PLAIN XOAUTH2 OAUTHBEARER\r\n"),
    (ALL, (), "off", False,
     b"250-mail.example.com\r\n250 AUTH PLAIN LOGIN CRAM-MD5 EXTERNAL XOAUTH2 OAUTHBEARER\r\n"),
]


@pytest.mark.parametrize("auth, caps, starttls, tls, reply", EHLO_CASES)
def test_ehlo_variants(auth, caps, starttls, tls, reply):
    cfg = config(auth_methods=frozenset(auth), capabilities=caps, starttls=starttls)
    check([b"EHLO x\r\n", b"HELO x\r\n"], [reply, HELO], cfg, tls)


def test_from_server_reads_directive_names():
    from types import SimpleNamespace

    server = SimpleNamespace(
        server_name=NAME, smtp_auth=frozenset({"login"}), smtp_capabilities=("SIZE 1",), starttls="on",
        smtp_client_buffer=128, max_errors=2, max_commands=7, smtp_greeting_delay=1.5,
    )
    c = SmtpConfig.from_server(server)
    assert (c.client_buffer, c.max_errors, c.max_commands, c.greeting_delay) == (128, 2, 7, 1.5)
    assert c.ehlo_plain == b"250-mail.example.com\r\n250-SIZE 1\r\n250-AUTH LOGIN\r\n250 STARTTLS\r\n"
    assert c.ehlo_tls == b"250-mail.example.com\r\n250-SIZE 1\r\n250 AUTH LOGIN\r\n"


# -- every command in the start state ---------------------------------------------------------------


def test_simple_commands():
    m = check(
        [b"MAIL FROM:<a@b>\r\n", b"RCPT TO:<x>\r\n", b"RSET\r\n", b"NOOP\r\n", b"VRFY a\r\n", b"EXPN\r\n",
         b"HELP\r\n", b"STARTTLS\r\n", b"AUTH\r\n", b"noop x y\r\n", b"QUIT\r\n", b"NOOP\r\n"],
        [info('client was rejected: "MAIL FROM:<a@b>__"'), b"530 5.7.1 Authentication required\r\n", SEQ,
         OK, OK, INVALID, INVALID, INVALID, INVALID, ARG, OK, b"221 2.0.0 Bye\r\n", Close()],
    )
    assert m.state is State.CLOSED and m.receive_data(b"NOOP\r\n") == []


@pytest.mark.parametrize(
    "line",
    [b"DATA\r\n", b"BDAT 1\r\n", b"ETRN\r\n", b"\r\n", b"\n", b" NOOP\r\n", b"NOOP\rX\r\n", b"NO1P\r\n",
     b"NOOP a b c d e f g h i j k l\r\n", b"NOOP\x00\r\n", b"\x00NOOP\r\n", b"NO\x00OP\r\n", b"NOOPS\r\n",
     b"STARTTLSX\r\n", b"NOOP a\r\r\n", b"NOOP\r\r\n"],
)
def test_parse_errors(line):
    check([line, b"NOOP a b c d e f g h i j k\r\n"], [INVALID, OK])


def test_bare_lf_and_spaces():
    check([b"NOOP\n", b"RSET   a   b  \r\n", b"HeLo  x  \n"], [OK, OK, HELO])


def test_starttls():
    cfg = config(starttls="on")
    m = check(
        [b"EHLO a\r\n", b"STARTTLS foo\r\nNOOP\r\n", b"NOOP\r\n", TLS, b"EHLO b\r\n", b"STARTTLS\r\n",
         b"AUTH PLAIN AHUAcA==\r\n"],
        [b"250-mail.example.com\r\n250-AUTH PLAIN LOGIN\r\n250 STARTTLS\r\n", b"220 2.0.0 Start TLS\r\n",
         StartTLS(), EHLO, INVALID, attempt("plain", b"u", b"p", helo=b"b", esmtp=True)],
        cfg,
    )
    assert m.tls


def test_starttls_forgets_helo_and_envelope():
    cfg = config(starttls="only", auth_methods=frozenset({"none"}))
    check(
        [b"HELO a\r\nMAIL FROM:<a>\r\n", b"STARTTLS\r\n", TLS, b"RCPT TO:<b>\r\n", b"AUTH PLAIN AHUAcA==\r\n"],
        [HELO, OK, b"220 2.0.0 Start TLS\r\n", StartTLS(), SEQ, attempt("plain", b"u", b"p")],
        cfg,
    )


def test_starttls_only_refuses_auth_first_but_not_mail():
    cfg = config(starttls="only", auth_methods=frozenset({"plain", "none"}))
    check(
        [b"AUTH\r\n", b"AUTH PLAIN AHUAcA==\r\n", b"MAIL FROM:<a>\r\n", b"RCPT TO:<b>\r\n"],
        [INVALID, INVALID, OK, attempt("none", mail_from=b"MAIL FROM:<a>", rcpt_to=b"RCPT TO:<b>")],
        cfg,
    )


def test_tls_established_without_starttls_is_a_bug():
    with pytest.raises(RuntimeError):
        SmtpMachine(config()).tls_established()


# -- smtp_auth none ---------------------------------------------------------------------------------


def test_none_flow_and_retry():
    cfg = config(auth_methods=ALL - {"xoauth2", "oauthbearer"})
    hh = dict(helo=b"hh", esmtp=True, mail_from=b"MAIL FROM:<a@b>  SIZE=1")
    m = check(
        [b"EHLO hh\r\nMAIL FROM:<a@b>  SIZE=1  \r\nRCPT TO:<c>\r\nNOOP\r\n", fail(wait=True),
         b"RCPT TO:<d>  x \r\n", fail(wait=True), b"MAIL x\r\n", b"RSET\r\n", b"MAIL\r\n", b"RCPT\r\n",
         b"MAIL FROM:<e>\r\nRCPT\r\nHELO z\r\nRCPT TO:<f>\r\n"],
        [cfg.ehlo_plain, OK, attempt("none", rcpt_to=b"RCPT TO:<c>", **hh),
         info('client login failed: "Invalid login"'), b"535 5.7.0 Invalid login\r\n", OK,
         attempt("none", rcpt_to=b"RCPT TO:<d>  x", n=2, **hh),
         info('client login failed: "Invalid login"'), b"535 5.7.0 Invalid login\r\n",
         SEQ, OK, ARG, SEQ, OK, ARG, HELO, SEQ],
        cfg,
    )
    assert m.state is State.START


def test_none_success_keeps_trailing_data():
    m = SmtpMachine(config(auth_methods=frozenset({"none"})))
    actions = m.receive_data(b"MAIL FROM:<a>\r\nRCPT TO:<b>\r\nDATA\r\nSubj")
    assert actions[-1] == attempt("none", mail_from=b"MAIL FROM:<a>", rcpt_to=b"RCPT TO:<b>")
    assert m.receive_data(b"ect: x\r\n") == []
    assert m.trailing_data() == b"DATA\r\nSubject: x\r\n"


@pytest.mark.parametrize("line", [b"HELO a\x00b\r\n", b"EHLO \x00\r\n"])
def test_nul_in_helo_is_refused(line):
    # nginx 1.22 answers 250 and would copy the NUL into Auth-SMTP-Helo; we refuse the argument.
    check([line, b"HELO ok\r\n"], [ARG, HELO])


def test_nul_in_envelope_is_refused():
    cfg = config(auth_methods=frozenset({"none"}))
    check(
        [b"MAIL FROM:<a\x00b>\r\n", b"MAIL FROM:<a>\r\n", b"RCPT TO:<\x00>\r\n", b"RCPT TO:<b>\r\n"],
        [ARG, OK, ARG, attempt("none", mail_from=b"MAIL FROM:<a>", rcpt_to=b"RCPT TO:<b>")],
        cfg,
    )


_ARGUMENT_BYTES = st.binary(min_size=1, max_size=6).map(lambda b: b.replace(b" ", b"x"))


@given(st.lists(st.tuples(st.sampled_from([b"HELO ", b"EHLO ", b"MAIL ", b"RCPT ", b"RSET", b"X"]),
                          _ARGUMENT_BYTES), max_size=8))
def test_attempt_never_carries_line_breaks_or_nul(pieces):
    # Any commands, then a clean envelope: every example ends in exactly one attempt (the clean MAIL is
    # refused as nested after an accepted one, whose value the attempt then carries), and its fields are
    # what the auth request's header lines take.
    m = SmtpMachine(config(auth_methods=frozenset({"none"}), max_errors=100))
    data = b"".join(verb + arg + b"\r\n" for verb, arg in pieces) + b"MAIL FROM:<a>\r\nRCPT TO:<b>\r\n"
    attempts = [a.request for a in m.receive_data(data) if isinstance(a, Authenticate)]
    assert len(attempts) == 1
    request = attempts[0]
    assert request.method == "none" and request.mail_from and request.rcpt_to
    for value in (request.helo, request.mail_from, request.rcpt_to):
        assert b"\r" not in value and b"\n" not in value and b"\0" not in value


# -- SASL -------------------------------------------------------------------------------------------

PLAIN = b64(b"\0u\0p")


@pytest.mark.parametrize(
    "steps, expected",
    [
        ([b"AUTH PLAIN " + PLAIN + b"\r\n"], [attempt("plain", b"u", b"p")]),
        ([b"auth plain\r\n", PLAIN + b" extra\r\n"], [b"334 \r\n", attempt("plain", b"u", b"p")]),
        ([b"AUTH PLAIN\r\n", b" " + PLAIN + b"\r\n"],
         [b"334 \r\n", info("client sent invalid login in AUTH PLAIN command"), INVALID]),
        ([b"AUTH PLAIN " + b64(b"u\0") + b"\r\n"], [info("client sent invalid password in AUTH PLAIN command"),
                                                    INVALID]),
        ([b"AUTH PLAIN @@@\r\n"], [info("client sent invalid base64 encoding in AUTH PLAIN command"), INVALID]),
        ([b"AUTH PLAIN\r\n", b"*\r\n"],
         [b"334 \r\n", info("client sent invalid base64 encoding in AUTH PLAIN command"), INVALID]),
        ([b"AUTH PLAIN a b\r\n", b"AUTH FOO\r\n"], [INVALID, INVALID]),
        ([b"AUTH LOGIN\r\n", b"dQ==\r\n", b"cA==\r\n"],
         [b"334 VXNlcm5hbWU6\r\n", b"334 UGFzc3dvcmQ6\r\n", attempt("plain", b"u", b"p")]),
        ([b"AUTH LOGIN dQ==\r\n", b"\r\n"], [b"334 UGFzc3dvcmQ6\r\n", attempt("plain", b"u", b"")]),
        ([b"AUTH LOGIN a b\r\n", b"AUTH LOGIN\r\n", b"!\r\n"],
         [INVALID, b"334 VXNlcm5hbWU6\r\n", info("client sent invalid base64 encoding in AUTH LOGIN command"),
          INVALID]),
        ([b"AUTH CRAM-MD5\r\n", b64(b"u " + b"0" * 32) + b"\r\n"],
         [CHALLENGE, attempt("cram-md5", b"u", b"0" * 32, salt=SALT)]),
        ([b"AUTH CRAM-MD5 a\r\n", b"AUTH CRAM-MD5\r\n", b64(b"u 0") + b"\r\n"],
         [INVALID, CHALLENGE, info("client sent invalid CRAM-MD5 hash in AUTH CRAM-MD5 command"), INVALID]),
        ([b"AUTH EXTERNAL\r\n", b"dQ==\r\n"], [b"334 VXNlcm5hbWU6\r\n", attempt("external", b"u")]),
        ([b"AUTH EXTERNAL =\r\n"], [attempt("external")]),
        ([b"AUTH EXTERNAL a b\r\n"], [INVALID]),
        ([b"AUTH XOAUTH2\r\n", b64(b"user=u\x01auth=Bearer t\x01\x01") + b"\r\n"],
         [b"334 \r\n", attempt("xoauth2", b"u", b"t")]),
        ([b"AUTH XOAUTH2 " + b64(b"user=u\x01") + b"\r\n"],
         [info("client sent invalid token in AUTH XOAUTH2 command"), INVALID]),
        ([b"AUTH OAUTHBEARER " + b64(b"n,a=u,\x01auth=Bearer t\x01\x01") + b"\r\n"],
         [attempt("oauthbearer", b"u", b"t")]),
        ([b"AUTH OAUTHBEARER\r\n", b64(b"n,,\x01auth=Bearer t\x01\x01") + b"\r\n"],
         [b"334 \r\n", info("client sent invalid login in AUTH OAUTHBEARER command"), INVALID]),
        ([b"AUTH OAUTHBEARER\r\n", b"=\x01\r\n"],
         [b"334 \r\n", info("client sent invalid login in AUTH OAUTHBEARER command"), INVALID]),
        ([b"AUTH XOAUTH2 a b\r\n"], [INVALID]),
    ],
)
def test_sasl_exchanges(steps, expected):
    if isinstance(expected[-1], Authenticate):
        check(steps, expected, config(auth_methods=ALL))
    else:  # a refused exchange goes back to the start state
        check(steps + [b"NOOP\r\n"], expected + [OK], config(auth_methods=ALL))


@pytest.mark.parametrize("mech", [b"CRAM-MD5", b"EXTERNAL", b"XOAUTH2", b"OAUTHBEARER"])
@pytest.mark.parametrize("initial", [b"", b" dQ=="])
def test_gated_mechanisms(mech, initial):
    # PLAIN and LOGIN are always accepted (spec 8.2); EXTERNAL <ir> is refused like freenginx (9.11, 9.13).
    check([b"AUTH " + mech + initial + b"\r\n", b"AUTH LOGIN dQ==\r\n"], [INVALID, b"334 UGFzc3dvcmQ6\r\n"],
          config(auth_methods=frozenset({"plain"})))


def test_salt_is_made_once_and_attempts_count():
    cfg = config(auth_methods=ALL)
    digest = b64(b"u " + b"1" * 32) + b"\r\n"
    check(
        [b"AUTH CRAM-MD5\r\n", digest, fail(wait=True), b"AUTH CRAM-MD5\r\n", digest, fail(wait=True),
         b"AUTH EXTERNAL dQ==\r\n"],
        [CHALLENGE, attempt("cram-md5", b"u", b"1" * 32, salt=SALT), info('client login failed: "Invalid login"'),
         b"535 5.7.0 Invalid login\r\n", CHALLENGE, attempt("cram-md5", b"u", b"1" * 32, n=2, salt=SALT),
         info('client login failed: "Invalid login"'), b"535 5.7.0 Invalid login\r\n",
         attempt("external", b"u", n=3)],
        cfg,
    )


@pytest.mark.parametrize(
    "state_line", [b"AUTH PLAIN\r\n", b"AUTH LOGIN\r\n", b"AUTH LOGIN dQ==\r\n", b"AUTH CRAM-MD5\r\n",
                   b"AUTH EXTERNAL\r\n", b"AUTH XOAUTH2\r\n", b"AUTH OAUTHBEARER\r\n"],
)
@pytest.mark.parametrize("command", [b"NOOP", b"QUIT", b"STARTTLS", b"HELO x", b"MAIL FROM:<a>", b"AUTH PLAIN"])
def test_commands_inside_exchanges_are_responses(state_line, command):
    # nginx reads the next line as the SASL response whatever it says: a command word is just bad data.
    m = SmtpMachine(config(auth_methods=ALL))
    m.receive_data(state_line)
    actions = m.receive_data(command + b"\r\n")
    for served in (Send(OK), Send(HELO), Send(b"221 2.0.0 Bye\r\n"), Close(), StartTLS()):
        assert served not in actions
    assert m.state is not State.CLOSED and not m.helo


def test_too_many_tokens_in_a_response_is_a_parse_error():
    # observed: max_errors 2, the 12-token response is counted and the session is back at the start.
    check(
        [b"AUTH PLAIN\r\n", b"a b c d e f g h i j k l\r\n", b"NOOP\r\n", b"AUTH LOGIN\r\n",
         b"a b c d e f g h i j k l\r\n", b"NOOP\r\n"],
        [b"334 \r\n", INVALID, OK, b"334 VXNlcm5hbWU6\r\n", info("client sent too many invalid commands"),
         INVALID, Close()],
        config(max_errors=2),
    )


# -- auth results -----------------------------------------------------------------------------------


def test_fatal_failure_drops_pipelined_input():
    m = check([b"AUTH PLAIN " + PLAIN + b"\r\nNOOP\r\n", fail(code="454 4.7.0")],
              [attempt("plain", b"u", b"p"), info('client login failed: "Invalid login"'),
               b"454 4.7.0 Invalid login\r\n", Close()])
    assert m.trailing_data() == b""


def test_retryable_failure_runs_pipelined_input():
    check([b"AUTH PLAIN " + PLAIN + b"\r\nNOOP\r\nAUTH LOGIN dQ==\r\n", fail(wait=True), b"cA==\r\n"],
          [attempt("plain", b"u", b"p"), info('client login failed: "Invalid login"'),
           b"535 5.7.0 Invalid login\r\n", OK, b"334 UGFzc3dvcmQ6\r\n", attempt("plain", b"u", b"p", n=2)])


def test_success_leaves_trailing_data_and_ignores_late_failures_after_eof():
    m = SmtpMachine(config())
    assert m.receive_data(b"AUTH PLAIN " + PLAIN + b"\r\nMAIL FROM:<a>\r\n")[-1] == attempt("plain", b"u", b"p")
    assert m.trailing_data() == b"MAIL FROM:<a>\r\n"
    assert m.receive_data(b"") == [Close()]
    assert m.auth_failed("x", True) == []
    with pytest.raises(RuntimeError):
        SmtpMachine(config()).auth_failed("x", True)


XO = b"AUTH XOAUTH2 " + b64(b"user=u\x01auth=Bearer t\x01\x01") + b"\r\n"
OB = b"AUTH OAUTHBEARER " + b64(b"n,a=u,\x01auth=Bearer t\x01\x01") + b"\r\n"


@pytest.mark.parametrize(
    "auth, method, answer, accepted",
    [(XO, "xoauth2", b"\r\n", True), (XO, "xoauth2", b"   \r\n", True), (XO, "xoauth2", b"AQ==\r\n", False),
     (OB, "oauthbearer", b"AQ==\r\n", True), (OB, "oauthbearer", b"AQ==xyz\r\n", True),
     (OB, "oauthbearer", b"AQ\r\n", False), (OB, "oauthbearer", b"AQ== x\r\n", False),
     (OB, "oauthbearer", b"NOOP\r\n", False)],
)
@pytest.mark.parametrize("wait", [False, True])
def test_auth_error_sasl(auth, method, answer, accepted, wait):
    cfg = config(auth_methods=ALL)
    verdict = b"535 5.7.0 auth failed\r\n" if accepted else INVALID
    after = [OK] if wait else [Close()]
    check([auth, fail("auth failed", wait, None, "eyJ9"), answer + b"NOOP\r\n"],
          [attempt(method, b"u", b"t"), info('client login failed: "auth failed"'), b"334 eyJ9\r\n", verdict]
          + after, cfg)


def test_auth_error_sasl_with_code_pipelined_and_ignored_for_plain():
    cfg = config(auth_methods=ALL)
    check([OB + b"AQ==\r\nNOOP\r\n", fail("no", True, "454 4.7.0", "")],
          [attempt("oauthbearer", b"u", b"t"), info('client login failed: "no"'), b"334 \r\n",
           b"454 4.7.0 no\r\n", OK], cfg)
    check([b"AUTH PLAIN " + PLAIN + b"\r\n", fail("no", False, None, "eyJ9")],
          [attempt("plain", b"u", b"p"), info('client login failed: "no"'), b"535 5.7.0 no\r\n", Close()], cfg)


def test_auth_error_sasl_unreadable_dummy_response():
    cfg = config(auth_methods=ALL)
    junk = b"a b c d e f g h i j k l\r\n"
    check([XO, fail("no", False, None, "x"), junk],
          [attempt("xoauth2", b"u", b"t"), info('client login failed: "no"'), b"334 x\r\n", INVALID, Close()], cfg)
    check([XO, fail("no", True, None, "x"), junk + b"NOOP\r\n"],
          [attempt("xoauth2", b"u", b"t"), info('client login failed: "no"'), b"334 x\r\n", INVALID, OK], cfg)


def test_failure_text_is_escaped_in_the_log():
    m = SmtpMachine(config())
    m.receive_data(b"AUTH PLAIN " + PLAIN + b"\r\n")
    assert m.auth_failed('a"\xe9', False)[:2] == [info('client login failed: "a\\x22\\xE9"'),
                                                  Send(b'535 5.7.0 a"\xe9\r\n')]


# -- limits -----------------------------------------------------------------------------------------


def test_max_errors_boundary():
    # observed with max_errors 3: the 3rd parse error still gets its reply, then the close.
    check([b"bad\r\n", b"VRFY\r\n", b"bad\r\nNOOP\r\nbad\r\nNOOP\r\n"],
          [INVALID, INVALID, INVALID, OK, info("client sent too many invalid commands"), INVALID, Close()],
          config(max_errors=3))
    check([b"x\r\n"], [info("client sent too many invalid commands"), INVALID, Close()], config(max_errors=1))


def test_max_commands_boundary():
    check([b"NOOP\r\nNOOP\r\nNOOP\r\nNOOP\r\n"], [OK, OK, info("client sent too many commands"), INVALID, Close()],
          config(max_commands=2))
    check([b"AUTH PLAIN\r\n", b"@@@\r\n", b"bad\r\n", b"NOOP\r\n", b"QUIT\r\n"],
          [b"334 \r\n", info("client sent invalid base64 encoding in AUTH PLAIN command"), INVALID, INVALID,
           OK, info("client sent too many commands"), INVALID, Close()], config(max_commands=3))
    check([b"QUIT\r\n"], [info("client sent too many commands"), INVALID, Close()], config(max_commands=0))


def test_line_that_fills_the_buffer_exactly_fits():
    cfg = config(client_buffer=64)
    check([b"NOOP " + b"x" * 57 + b"\r\n", b"NOOP " + b"x" * 58 + b"\r\n"],
          [OK, info('client sent too long command "NOOP ' + "x" * 58 + '\\x0D"'), INVALID, Close()], cfg)
    check([b"XOOP " + b"x" * 100 + b"\r\n"],
          [info('client sent too long command "XOOP ' + "x" * 59 + '"'), INVALID, Close()], cfg)


def test_too_long_never_logs_credentials():
    cfg = config(client_buffer=64)
    check([b"AUTH PLAIN " + b"A" * 70], [info('client sent too long command "AUTH ..."'), INVALID, Close()], cfg)
    check([b"AUTH PLAIN\r\n", b"A" * 70],
          [b"334 \r\n", info('client sent too long command "AUTH ..."'), INVALID, Close()], cfg)


def test_buffer_is_compacted_between_commands():
    # nginx 1.22 answers 10 of these and closes; freenginx (and mailproxy, spec 9.13) answers all.
    check([b"NOOP\r\n" * 12], [OK] * 12, config(client_buffer=64))
    cfg = config(client_buffer=128, auth_methods=frozenset({"none"}))
    mail = b"MAIL FROM:<a@example.com> FOO=" + b"X" * 93 + b"\r\n"
    assert len(mail) == 125
    check([mail + b"RCPT TO:<b>\r\n"], [OK, attempt("none", mail_from=mail[:-2], rcpt_to=b"RCPT TO:<b>")], cfg)
    # spec 9.13: after a failed AUTH the next line may use the whole buffer again.
    check([b"AUTH PLAIN " + b"A" * 100 + b"\r\n", fail(wait=True), b"NOOP " + b"x" * 121 + b"\r\n"],
          [attempt("plain", b"", b"\0" * 73), info('client login failed: "Invalid login"'),
           b"535 5.7.0 Invalid login\r\n", OK], cfg)


# -- connection edges -------------------------------------------------------------------------------


def test_eof():
    check([b"NOOP\r\nNO", b""], [OK, Close()])


def test_early_input():
    m = SmtpMachine(config(greeting_delay=1.0))
    assert m.early_input(b'EHLO x\r\nAUTH PLAIN "AHUAcA=="\r\n\x01\r\n') == [
        info('client was rejected before greeting: "EHLO x__AUTH ...__\\x01__"'),
        Send(b"503 5.5.0 Improper use of SMTP command pipelining\r\n"),
        Close(),
    ]
    assert m.receive_data(b"NOOP\r\n") == []


# -- properties -------------------------------------------------------------------------------------

_WORDS = [b"HELO x", b"EHLO y", b"MAIL FROM:<a>", b"RCPT TO:<b>", b"RSET", b"NOOP", b"VRFY", b"STARTTLS",
          b"AUTH PLAIN", b"AUTH LOGIN", b"AUTH CRAM-MD5", b"AUTH EXTERNAL", b"AUTH XOAUTH2", b"AUTH OAUTHBEARER",
          b"AUTH PLAIN " + PLAIN, b"AQ==", b"", b"@@@", b"dQ==", b"QUIT", b"a b c d e f g h i j k l", b"\x00"]
_EVENTS = st.one_of(
    st.binary(max_size=40),
    st.lists(st.sampled_from(_WORDS), max_size=4).map(lambda w: b"".join(x + b"\r\n" for x in w)),
    st.tuples(st.just("fail"), st.text(max_size=5), st.booleans(), st.sampled_from([None, "454 4.7.0"]),
              st.sampled_from([None, "", "eyJ9"])),
    st.just(TLS),
)


@given(st.lists(_EVENTS, max_size=25), st.sampled_from(["off", "on", "only"]), st.booleans(),
       st.sampled_from([16, 64, 4096]))
def test_any_input_in_any_state_gives_only_actions(events, starttls, tls, size):
    cfg = config(auth_methods=ALL, starttls=starttls, client_buffer=size, max_errors=4, max_commands=30)
    m = SmtpMachine(cfg, tls)
    seen = m.greeting()
    for event in events:
        if isinstance(event, bytes):
            actions = m.receive_data(event)
        elif event[0] == "fail":
            if m.state is not State.AUTHENTICATING:
                continue
            actions = m.auth_failed(*event[1:])
        elif m.state is State.STARTING_TLS:
            actions = m.tls_established()
        else:
            continue
        assert all(isinstance(a, (Send, Close, Log, StartTLS, Authenticate)) for a in actions)
        assert Close() not in actions[:-1]
        assert isinstance(m.state, State)
        seen += actions
    # Whatever came, on every example: one Close at most, the last thing the session did; silent after it.
    assert seen.count(Close()) <= 1 and Close() not in seen[:-1]
    if Close() in seen:
        assert m.receive_data(b"NOOP\r\n") == []


@given(st.lists(st.sampled_from(_WORDS), min_size=1, max_size=12), st.integers(min_value=1, max_value=7))
def test_cuts_do_not_change_actions(words, cut):
    data = b"".join(w + b"\r\n" for w in words)
    whole = SmtpMachine(config(auth_methods=ALL)).receive_data(data)
    m = SmtpMachine(config(auth_methods=ALL))
    pieces = []
    for i in range(0, len(data), cut):
        pieces += m.receive_data(data[i : i + cut])
    assert pieces == whole


# -- live comparison with nginx 1.22 (where it agrees with the spec) ------------------------------

LIVE_CASES = [
    [b"HELO x\r\n", b"HELO\r\n", b"HELO a b\r\n", b"EHLO x\r\n", b"ehlo y\r\n"],
    [b"MAIL FROM:<a@b>\r\n", b"RCPT TO:<x>\r\n", b"RSET\r\n", b"NOOP\r\n", b"VRFY a\r\n", b"EXPN\r\n",
     b"HELP\r\n", b"STARTTLS\r\n", b"AUTH\r\n", b"QUIT\r\n"],
    [b"DATA\r\n", b"\r\n", b" NOOP\r\n", b"NOOP\rX\r\n", b"NOOP a b c d e f g h i j k\r\n",
     b"NO1P\r\n", b"NOOP a b c d e f g h i j k l\r\n"],
    [b"AUTH FOO\r\n", b"AUTH CRAM-MD5 x\r\n", b"AUTH PLAIN\r\n", b"@@@\r\n", b"AUTH LOGIN\r\n", b"dQ==\r\n",
     b"a b c d e f g h i j k l\r\n", b"AUTH PLAIN a b\r\n", b"AUTH LOGIN " + b64(b"u") + b" x\r\n"],
    [b"NOOP " + b"x" * 4089 + b"\r\n", b"NOOP " + b"y" * 4090 + b"\r\n"],
]


@pytest.mark.peer  # Debian's nginx, started for the comparison
def test_same_bytes_as_nginx():
    if not nginxref.available():
        missing("Debian's nginx mail module")
    port = free_port()
    block = ("auth_http 127.0.0.1:1/a; server { listen 127.0.0.1:%d; protocol smtp; server_name %s;"
             " max_errors 4; }" % (port, NAME))
    with nginxref.NginxMail(block, [port]):
        for chunks in LIVE_CASES:
            machine = SmtpMachine(config(max_errors=4))
            ours = [machine.greeting()] + [machine.receive_data(chunk) for chunk in chunks]
            sent = b"".join(a.data for actions in ours for a in actions if isinstance(a, Send))
            assert nginxref.exchange(port, chunks, settle=0.15) == sent, chunks


def _byte_by_byte_arguments(line, pos, in_argument):
    """nginx's argument scan as its state machine reads it, a byte at a time: the reference that
    smtp._scan_arguments's one split must agree with."""
    args = []
    start = last_end = pos
    end = len(line) - 1
    while pos < end:
        byte = line[pos]
        if in_argument:
            if byte in (0x20, 0x0D):
                args.append(line[start:pos])
                last_end = pos
                in_argument = False
                if byte == 0x0D:
                    return (args, last_end) if pos + 1 == end else None
        elif byte == 0x0D:
            return (args, last_end) if pos + 1 == end else None
        elif byte != 0x20:
            if len(args) >= smtp.MAX_ARGUMENTS:
                return None
            start = pos
            in_argument = True
        pos += 1
    if in_argument:
        args.append(line[start:end])
        last_end = end
    return args, last_end


@given(st.lists(st.sampled_from([b"", b"a", b"AUTH", b"PLAIN", b"a\tb", b"\0", b"=", b"\r", b"x\r"]), max_size=16),
       st.sampled_from([b"\n", b"\r\n", b" \r\n", b"\r\r\n"]), st.integers(0, 8), st.booleans())
def test_arguments_split_as_nginx_scans_them(words, ending, pos, in_argument):
    line = b" ".join(words) + ending
    pos = min(pos, len(line) - 1)
    assert smtp._scan_arguments(line, pos, in_argument) == _byte_by_byte_arguments(line, pos, in_argument)
