"""POP3 client machine: transcripts (spec 2.2, 9) with nginx 1.22's bytes where it agrees with the spec.

Every transcript is played four ways (``check``): step by step, each step cut into single bytes, with
unterminated trailing bytes glued to the last step, and with all client bytes between two session events
sent as one pipelined segment. All four must give the same actions.
"""

import base64
import types

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailproxy.protocol.common import AuthAttempt, Authenticate, Close, Log, Send, StartTLS
from mailproxy.protocol.pop3 import Pop3Config, Pop3Machine, State

SALT = b"<12345.1700000000@mail.example>\r\n"
CRAM = b"+ " + base64.b64encode(SALT[:-2]) + b"\r\n"
ALL = frozenset(("plain", "apop", "cram-md5", "external", "xoauth2", "oauthbearer"))
OK = Send(b"+OK\r\n")
BAD = Send(b"-ERR invalid command\r\n")
EMPTY = Send(b"+ \r\n")
USERNAME = Send(b"+ VXNlcm5hbWU6\r\n")
PASSWORD = Send(b"+ UGFzc3dvcmQ6\r\n")
DEFAULT_CAPA = b"+OK Capability list follows\r\nTOP\r\nUSER\r\nUIDL\r\nSASL PLAIN LOGIN\r\n.\r\n"


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def info(text):
    return Log("info", text)


def auth(method, login, password, attempt=1, salt=None):
    return Authenticate(AuthAttempt(method, login, password, attempt, salt))


def failed(text, wait, sasl_error=None):
    return ("fail", text, wait, sasl_error)


TLS_UP = (("tls",), [])


def play(config, transcript, tls=False, cut=False, trailing=False):
    machine = Pop3Machine(config, tls=tls, salt=SALT)
    results = []
    last_bytes = max((i for i, (e, _) in enumerate(transcript) if isinstance(e, bytes)), default=-1)
    for index, (event, _) in enumerate(transcript):
        if isinstance(event, bytes):
            data = event + (b"NO" if trailing and index == last_bytes else b"")
            if cut and data:
                got = []
                for position in range(len(data)):
                    got += machine.receive_data(data[position : position + 1])
            else:
                got = machine.receive_data(data)
        elif event[0] == "fail":
            got = machine.auth_failed(event[1], event[2], sasl_error=event[3])
        else:
            got = machine.tls_established()
        results.append(got)
    return machine, results


def pipelined(config, transcript, tls=False):
    """Client bytes between two session events sent at once; the flat action list must not change."""
    machine = Pop3Machine(config, tls=tls, salt=SALT)
    flat, pending = [], b""
    for event, _ in transcript:
        if isinstance(event, bytes) and event:
            pending += event
            continue
        if pending:
            flat += machine.receive_data(pending)
            pending = b""
        if event == b"":
            flat += machine.receive_data(b"")
        elif event[0] == "fail":
            flat += machine.auth_failed(event[1], event[2], sasl_error=event[3])
        else:
            flat += machine.tls_established()
    if pending:
        flat += machine.receive_data(pending)
    return flat


def check(transcript, config=None, tls=False):
    config = config or Pop3Config.build()
    expected = [list(actions) for _, actions in transcript]
    machine, got = play(config, transcript, tls)
    assert got == expected
    _, cut = play(config, transcript, tls, cut=True)
    assert cut == expected
    trail_machine, trailed = play(config, transcript, tls, trailing=True)
    assert trailed == expected
    if trail_machine.state is State.AUTHENTICATING:
        assert trail_machine.trailing_data() == machine.trailing_data() + b"NO"
    started_tls = any(isinstance(a, StartTLS) for actions in expected for a in actions)
    if not started_tls:
        assert pipelined(config, transcript, tls) == [a for actions in expected for a in actions]
    return machine


# -- greeting and configuration ------------------------------------------------------------------


def test_greeting_plain():
    assert Pop3Machine(Pop3Config.build()).greeting() == [Send(b"+OK POP3 ready\r\n")]


@pytest.mark.parametrize("method", ["apop", "cram-md5"])
def test_greeting_carries_salt(method):
    config = Pop3Config.build(methods={"plain", method})
    assert config.needs_salt
    assert Pop3Machine(config, salt=SALT).greeting() == [Send(b"+OK POP3 ready " + SALT)]


def test_salt_made_once_when_not_given():
    config = Pop3Config.build(methods={"apop"}, server_name="mail.example")
    machine = Pop3Machine(config)
    (greeting,) = machine.greeting()
    assert greeting.data.startswith(b"+OK POP3 ready <") and greeting.data.endswith(b"@mail.example>\r\n")
    assert greeting.data == b"+OK POP3 ready " + machine.salt


def test_no_salt_without_apop_or_cram():
    machine = Pop3Machine(Pop3Config.build(methods=ALL - {"apop", "cram-md5"}), salt=SALT)
    assert machine.salt is None


def test_from_server_reads_documented_names():
    server = types.SimpleNamespace(
        pop3_auth=frozenset(("plain", "xoauth2")),
        pop3_capabilities=("TOP", "USER"),
        pop3_client_buffer=4096,
        starttls="on",
        max_errors=7,
        max_commands=9,
        server_name="mx",
    )
    config = Pop3Config.from_server(server)
    assert config == Pop3Config.build(
        methods={"plain", "xoauth2"}, capabilities=("TOP", "USER"), starttls="on",
        client_buffer=4096, max_errors=7, max_commands=9, server_name="mx",
    )
    assert config.capa_starttls == (
        b"+OK Capability list follows\r\nTOP\r\nUSER\r\nSASL PLAIN LOGIN XOAUTH2\r\nSTLS\r\n.\r\n"
    )


# -- CAPA and AUTH lists (bytes recorded from nginx 1.22, spec 9.2 for the OAuth names) -----------

ON_CAPA = b"+OK Capability list follows\r\nTOP\r\nUSER\r\nUIDL\r\nSASL PLAIN LOGIN\r\nSTLS\r\n.\r\n"
ONLY_CAPA = b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nSTLS\r\n.\r\n"


@pytest.mark.parametrize(
    "starttls, tls, start_capa",
    [
        ("off", False, DEFAULT_CAPA),
        ("off", True, DEFAULT_CAPA),
        ("on", False, ON_CAPA),
        ("on", True, DEFAULT_CAPA),
        ("only", False, ONLY_CAPA),
        ("only", True, DEFAULT_CAPA),
    ],
)
def test_capa_variants(starttls, tls, start_capa):
    config = Pop3Config.build(starttls=starttls)
    if starttls == "only" and not tls:
        check([(b"CAPA\r\n", [Send(start_capa)]), (b"USER a\r\n", [BAD])], config, tls)
        return
    # The user state always shows the base list, never the STLS variants.
    check(
        [(b"CAPA\r\n", [Send(start_capa)]), (b"USER a\r\n", [OK]), (b"capa x\r\n", [Send(DEFAULT_CAPA)])],
        config,
        tls,
    )


def test_capa_only_drops_user_any_case_and_keeps_order():
    config = Pop3Config.build(starttls="only", capabilities=("TOP", "user", "UIDL", "X"))
    expected = b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nX\r\nSTLS\r\n.\r\n"  # nginx 1.22
    check([(b"CAPA\r\n", [Send(expected)])], config)


@pytest.mark.parametrize(
    "methods, sasl_line, listed",
    [
        ({"plain"}, b"SASL PLAIN LOGIN", b"PLAIN\r\nLOGIN\r\n"),
        ({"apop"}, b"SASL", b""),
        ({"plain", "apop", "cram-md5", "external"}, b"SASL PLAIN LOGIN CRAM-MD5 EXTERNAL",
         b"PLAIN\r\nLOGIN\r\nCRAM-MD5\r\nEXTERNAL\r\n"),
        ({"oauthbearer", "plain", "xoauth2"}, b"SASL PLAIN LOGIN XOAUTH2 OAUTHBEARER",
         b"PLAIN\r\nLOGIN\r\nXOAUTH2\r\nOAUTHBEARER\r\n"),
        (ALL, b"SASL PLAIN LOGIN CRAM-MD5 EXTERNAL XOAUTH2 OAUTHBEARER",
         b"PLAIN\r\nLOGIN\r\nCRAM-MD5\r\nEXTERNAL\r\nXOAUTH2\r\nOAUTHBEARER\r\n"),
    ],
)
def test_capa_sasl_line_and_auth_list(methods, sasl_line, listed):
    capa = b"+OK Capability list follows\r\nTOP\r\nUSER\r\nUIDL\r\n" + sasl_line + b"\r\n.\r\n"
    check(
        [
            (b"CAPA\r\n", [Send(capa)]),
            (b"AUTH\r\n", [Send(b"+OK methods supported:\r\n" + listed + b".\r\n")]),
        ],
        Pop3Config.build(methods=methods),
    )


# -- every command in the command states ---------------------------------------------------------

START_COMMANDS = [
    (b"USER a\r\n", [OK], State.USER),
    (b"PASS a\r\n", [BAD], State.START),
    (b"APOP a 0123\r\n", [auth("apop", b"a", b"0123", salt=SALT)], State.AUTHENTICATING),
    (b"AUTH\r\n", None, State.START),
    (b"AUTH PLAIN\r\n", [EMPTY], State.AUTH_PLAIN),
    (b"CAPA\r\n", None, State.START),
    (b"STLS\r\n", [OK, StartTLS()], State.STARTING_TLS),
    (b"NOOP\r\n", [OK], State.START),
    (b"QUIT\r\n", [OK, Close()], State.CLOSED),
]
USER_COMMANDS = [
    (b"USER b\r\n", [BAD], State.START),
    (b"PASS p\r\n", [auth("plain", b"a", b"p")], State.AUTHENTICATING),
    (b"APOP a 0123\r\n", [BAD], State.START),
    (b"AUTH\r\n", [BAD], State.START),
    (b"AUTH PLAIN\r\n", [BAD], State.START),
    (b"CAPA\r\n", None, State.USER),
    (b"STLS\r\n", [BAD], State.START),
    (b"NOOP\r\n", [OK], State.USER),
    (b"QUIT\r\n", [OK, Close()], State.CLOSED),
]


@pytest.mark.parametrize("line, reply, after", START_COMMANDS)
def test_start_state_commands(line, reply, after):
    config = Pop3Config.build(methods=ALL, starttls="on")
    if reply is None:
        reply = [Send(config.auth_list if line.startswith(b"AUTH") else config.capa_starttls)]
    machine = check([(line, reply)], config)
    assert machine.state is after


@pytest.mark.parametrize("line, reply, after", USER_COMMANDS)
def test_user_state_commands(line, reply, after):
    config = Pop3Config.build(methods=ALL, starttls="on")
    if reply is None:
        reply = [Send(config.capa)]
    machine = check([(b"USER a\r\n", [OK]), (line, reply)], config)
    assert machine.state is after


def test_refusal_in_user_state_forgets_the_name():
    check([(b"USER a\r\n", [OK]), (b"AUTH\r\n", [BAD]), (b"PASS p\r\n", [BAD])])


def test_user_and_pass_keep_spaces_and_lowercase_verbs():
    check(
        [
            (b"user   a b  \r\n", [OK]),
            (b"pass  p  q \r\n", [auth("plain", b"a b  ", b"p  q ")]),
        ]
    )


@pytest.mark.parametrize("line", [b"USER\r\n", b"USER   \r\n", b"PASS\r\n"])
def test_user_pass_need_an_argument(line):
    prefix = [(b"USER a\r\n", [OK])] if line.startswith(b"PASS") else []
    check(prefix + [(line, [BAD]), (b"NOOP\r\n", [OK])], Pop3Config.build(max_errors=1))


def test_noop_and_quit_ignore_arguments():
    check([(b"NOOP a b c\r\n", [OK]), (b"QUIT now\r\n", [OK, Close()])])


@pytest.mark.parametrize(
    "line",
    [b"STAT\r\n", b"RETR 1\r\n", b"NOOPX\r\n", b"NOO\r\n", b"\r\n", b"\n", b" NOOP\r\n",
     b"NOOP\rX\r\n", b"NO1P\r\n", b"NOOP\tx\r\n", b"NOOP a b c d\r\n", b"\x00\xff\r\n"],
)
def test_parse_errors_are_counted(line):
    check([(line, [BAD]), (line, [info("client sent too many invalid commands"), BAD, Close()])],
          Pop3Config.build(max_errors=2))


def test_bare_lf_and_crlf_lines():
    check([(b"NOOP\n", [OK]), (b"NOOP\r\n", [OK])])


# -- nginx 1.22 bytes: max_errors default 5, pipelined STLS, USER state CAPA ----------------------


def test_nginx_parse_error_sequence():
    check(
        [
            (b"NOOP\rX\r\n", [BAD]),
            (b"noop\n", [OK]),
            (b"\r\n", [BAD]),
            (b" NOOP\r\n", [BAD]),
            (b"STAT\r\n", [BAD]),
            (b"NOOPX\r\n", [info("client sent too many invalid commands"), BAD, Close()]),
            (b"NOOP\r\n", []),
        ]
    )


def test_rejections_are_not_counted():
    config = Pop3Config.build(max_errors=1)
    check([(b"PASS x\r\n", [BAD]), (b"AUTH FOO\r\n", [BAD]), (b"APOP a b\r\n", [BAD]),
           (b"STLS\r\n", [BAD]), (b"NOOP\r\n", [OK])], config)


# -- APOP ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("line", [b"APOP a\r\n", b"APOP a b c\r\n", b"APOP\r\n"])
def test_apop_needs_two_arguments(line):
    check([(line, [BAD])], Pop3Config.build(methods={"apop"}))


def test_apop_extra_spaces_are_fine():
    check([(b"APOP a  b \r\n", [auth("apop", b"a", b"b", salt=SALT)])], Pop3Config.build(methods={"apop"}))


def test_apop_disabled():
    check([(b"APOP a b\r\n", [BAD])])


# -- SASL exchanges ------------------------------------------------------------------------------

PLAIN_IR = b64(b"zid\0user\0pass")


@pytest.mark.parametrize("verb", [b"AUTH PLAIN", b"auth plain", b"AUTH pLaIn"])
def test_plain_with_and_without_initial_response(verb):
    check([(verb + b" " + PLAIN_IR + b"\r\n", [auth("plain", b"user", b"pass")])])
    check([(verb + b"\r\n", [EMPTY]), (PLAIN_IR + b"\r\n", [auth("plain", b"user", b"pass")])])


def test_plain_response_uses_first_token_only():
    # nginx 1.22: "AGEAYg== xx" logs in as a/b; " AGEAYg==" is an empty first token.
    check([(b"AUTH PLAIN\r\n", [EMPTY]), (b"AGEAYg== xx\r\n", [auth("plain", b"a", b"b")])])
    check([(b"AUTH PLAIN\r\n", [EMPTY]),
           (b" AGEAYg==\r\n", [info("client sent invalid login in AUTH PLAIN command"), BAD])])


def test_response_with_four_tokens_is_a_parse_error():
    check([(b"AUTH PLAIN\r\n", [EMPTY]), (b"a b c d\r\n", [BAD]),
           (b"AUTH PLAIN\r\n", [EMPTY]), (b"a b c d\r\n", [info("client sent too many invalid commands"), BAD, Close()])],
          Pop3Config.build(max_errors=2))


@pytest.mark.parametrize(
    "payload, log",
    [
        (b"nonul", "client sent invalid login in AUTH PLAIN command"),
        (b"a\0b", "client sent invalid password in AUTH PLAIN command"),
    ],
)
def test_plain_payload_errors(payload, log):
    check([(b"AUTH PLAIN " + b64(payload) + b"\r\n", [info(log), BAD]), (b"NOOP\r\n", [OK])])


def test_plain_password_may_hold_nuls_and_be_empty():
    check([(b"AUTH PLAIN " + b64(b"\0u\0p\0q") + b"\r\n", [auth("plain", b"u", b"p\0q")])])
    check([(b"AUTH PLAIN " + b64(b"\0u\0") + b"\r\n", [auth("plain", b"u", b"")])])


def test_login_exchanges():
    check([(b"AUTH LOGIN\r\n", [USERNAME]), (b64(b"u") + b"\r\n", [PASSWORD]),
           (b64(b"p") + b"\r\n", [auth("plain", b"u", b"p")])])
    check([(b"AUTH LOGIN " + b64(b"u") + b"\r\n", [PASSWORD]), (b64(b"p") + b"\r\n", [auth("plain", b"u", b"p")])])
    # nginx 1.22: two empty lines log in with an empty name and password.
    check([(b"AUTH LOGIN\r\n", [USERNAME]), (b"\r\n", [PASSWORD]), (b"\r\n", [auth("plain", b"", b"")])])


@pytest.mark.parametrize("line", [b"AUTH LOGIN a b\r\n", b"AUTH PLAIN a b\r\n", b"AUTH FOO\r\n",
                                  b"AUTH CRAM-MD5\r\n", b"AUTH EXTERNAL\r\n", b"AUTH EXTERNAL eA==\r\n",
                                  b"AUTH XOAUTH2\r\n", b"AUTH OAUTHBEARER x\r\n", b"AUTH APOP\r\n"])
def test_auth_refusals_with_default_methods(line):
    check([(line, [BAD]), (line, [BAD]), (b"NOOP\r\n", [OK])], Pop3Config.build(max_errors=1))


def test_cram_md5():
    config = Pop3Config.build(methods={"plain", "cram-md5"})
    digest = b"0123456789abcdef" * 2
    check([(b"AUTH CRAM-MD5\r\n", [Send(CRAM)]),
           (b64(b"user " + digest) + b"\r\n", [auth("cram-md5", b"user", digest, salt=SALT)])], config)
    check([(b"AUTH CRAM-MD5 " + b64(b"u " + digest) + b"\r\n", [BAD])], config)
    check([(b"AUTH CRAM-MD5\r\n", [Send(CRAM)]),
           (b64(b"user short") + b"\r\n", [info("client sent invalid CRAM-MD5 hash in AUTH CRAM-MD5 command"), BAD])],
          config)


def test_external():
    config = Pop3Config.build(methods={"external"})
    check([(b"AUTH EXTERNAL\r\n", [USERNAME]), (b64(b"cn") + b"\r\n", [auth("external", b"cn", b"")])], config)
    check([(b"AUTH EXTERNAL " + b64(b"cn") + b"\r\n", [auth("external", b"cn", b"")])], config)
    check([(b"AUTH EXTERNAL\r\n", [USERNAME]), (b"\r\n", [auth("external", b"", b"")])], config)


XOAUTH2_IR = b64(b"user=test@example.com\x01auth=Bearer tok\x01\x01")
OAUTHBEARER_IR = b64(b"n,a=te=3Dst=2C@example.com,\x01AUTH=bearer tok\x01\x01")


@pytest.mark.parametrize(
    "mech, ir, login",
    [(b"XOAUTH2", XOAUTH2_IR, b"test@example.com"), (b"OAUTHBEARER", OAUTHBEARER_IR, b"te=st,@example.com")],
)
def test_oauth_with_and_without_initial_response(mech, ir, login):
    config = Pop3Config.build(methods={"plain", "apop", mech.decode().lower()})
    method = mech.decode().lower()
    # No Auth-Salt for OAuth even though apop makes a salt (spec 9.13).
    check([(b"AUTH " + mech + b" " + ir + b"\r\n", [auth(method, login, b"tok")])], config)
    check([(b"AUTH " + mech + b"\r\n", [EMPTY]), (ir + b"\r\n", [auth(method, login, b"tok")])], config)
    check([(b"AUTH " + mech + b" a b\r\n", [BAD])], config)


@pytest.mark.parametrize(
    "mech, payload, log",
    [
        (b"XOAUTH2", b"login=bob\x01auth=Bearer t\x01\x01", "client sent invalid login in AUTH XOAUTH2 command"),
        (b"XOAUTH2", b"user=bob\x01auth=Bearer t\x01", "client sent invalid token in AUTH XOAUTH2 command"),
        (b"OAUTHBEARER", b"n,,\x01auth=Bearer t\x01\x01", "client sent invalid login in AUTH OAUTHBEARER command"),
        (b"OAUTHBEARER", b"n,a=u,\x01auth=Bearer \x01\x01", "client sent invalid token in AUTH OAUTHBEARER command"),
    ],
)
def test_oauth_payload_errors(mech, payload, log):
    config = Pop3Config.build(methods=ALL)
    check([(b"AUTH " + mech + b" " + b64(payload) + b"\r\n", [info(log), BAD])], config)
    check([(b"AUTH " + mech + b"\r\n", [EMPTY]), (b64(payload) + b"\r\n", [info(log), BAD])], config)


@pytest.mark.parametrize(
    "start, name",
    [(b"AUTH PLAIN", "PLAIN"), (b"AUTH LOGIN", "LOGIN"), (b"AUTH CRAM-MD5", "CRAM-MD5"),
     (b"AUTH EXTERNAL", "EXTERNAL"), (b"AUTH XOAUTH2", "XOAUTH2"), (b"AUTH OAUTHBEARER", "OAUTHBEARER")],
)
@pytest.mark.parametrize("bad", [b"*", b"@@@@", b"a", b"ab!d"])
def test_bad_base64_everywhere(start, name, bad):
    config = Pop3Config.build(methods=ALL)
    log = info("client sent invalid base64 encoding in AUTH %s command" % name)
    machine = Pop3Machine(config, salt=SALT)
    first = machine.receive_data(start + b"\r\n")
    assert len(first) == 1 and isinstance(first[0], Send)
    check([(start + b"\r\n", first), (bad + b"\r\n", [log, BAD]), (b"NOOP\r\n", [OK])], config)
    if name != "CRAM-MD5":
        check([(start + b" " + bad + b"\r\n", [log, BAD])], config)
    if name == "LOGIN":
        check([(start + b"\r\n", [USERNAME]), (b"dQ==\r\n", [PASSWORD]), (bad + b"\r\n", [log, BAD])], config)


def test_base64_stops_at_equals_and_tolerates_missing_padding():
    check([(b"AUTH PLAIN " + b64(b"\0u\0p").rstrip(b"=") + b"\r\n", [auth("plain", b"u", b"p")])])
    check([(b"AUTH LOGIN dQ=garbage!\r\n", [PASSWORD])])


# -- starttls --------------------------------------------------------------------------------------


@pytest.mark.parametrize("starttls", ["on", "only"])
def test_stls_discards_pipelined_input_and_returns_to_start(starttls):
    config = Pop3Config.build(starttls=starttls)
    machine = check(
        [
            (b"STLS\r\nNOOP\r\n", [OK, StartTLS()]),
            (b"QUIT\r\n", []),
            TLS_UP,
            (b"CAPA\r\n", [Send(DEFAULT_CAPA)]),
            (b"STLS\r\n", [BAD]),
            (b"USER a\r\n", [OK]),
        ],
        config,
    )
    assert machine.tls


def test_stls_refused_when_off_or_already_tls():
    check([(b"STLS\r\n", [BAD])])
    check([(b"STLS\r\n", [BAD])], Pop3Config.build(starttls="on"), tls=True)


@pytest.mark.parametrize("line", [b"USER a\r\n", b"APOP a b\r\n", b"AUTH\r\n", b"AUTH PLAIN\r\n",
                                  b"AUTH LOGIN dQ==\r\n"])
def test_starttls_only_refuses_logins_until_tls(line):
    config = Pop3Config.build(starttls="only", methods=ALL)
    check([(line, [BAD]), (b"NOOP\r\n", [OK])], config)
    after_tls = Pop3Machine(config, tls=True, salt=SALT).receive_data(line)
    assert after_tls != [BAD]
    check([(b"STLS\r\n", [OK, StartTLS()]), TLS_UP, (line, after_tls)], config)


# -- limits ------------------------------------------------------------------------------------------


def test_line_of_exactly_the_buffer_fits():
    check([(b"USER " + b"x" * 121 + b"\r\n", [OK])])  # 128 bytes: nginx 1.22 answers +OK


def test_line_one_past_the_buffer_is_too_long():
    line = b"USER " + b"x" * 122 + b"\r\n"
    log = info('client sent too long command "USER %s\\x0D"' % ("x" * 122))
    check([(line, [log, BAD, Close()])])


def test_unterminated_full_buffer_is_too_long():
    check([(b"NOOP\r\n" + b"y" * 127, [OK]), (b"y", [info('client sent too long command "%s"' % ("y" * 128)), BAD, Close()])])


def test_too_long_never_logs_credentials():
    long_pass = b"PASS " + b"s" * 200 + b"\r\n"
    check([(b"USER a\r\n", [OK]), (long_pass, [info('client sent too long command "PASS ..."'), BAD, Close()])])
    check([(b"AUTH PLAIN\r\n", [EMPTY]), (b"A" * 200, [info('client sent too long command "..."'), BAD, Close()])])


def test_compaction_lets_many_short_lines_through():
    check([(b"NOOP\r\n" * 50, [OK] * 50)])
    # nginx would fail the USER line behind the failed AUTH (spec 9.9 a); mailproxy does not.
    long_plain = b"AUTH PLAIN " + b64(b"\0u\0" + b"p" * 73) + b"\r\n"
    assert len(long_plain) == 117
    check([(long_plain, [auth("plain", b"u", b"p" * 73)]), (failed("Incorrect", True), [info('client login failed: "Incorrect"'), Send(b"-ERR Incorrect\r\n")]),
           (b"USER " + b"x" * 40 + b"\r\n", [OK])])


def test_bigger_client_buffer():
    config = Pop3Config.build(client_buffer=4096, methods={"plain", "xoauth2"})
    token = b"t" * 2000
    ir = b64(b"user=u\x01auth=Bearer " + token + b"\x01\x01")
    check([(b"AUTH XOAUTH2 " + ir + b"\r\n", [auth("xoauth2", b"u", token)])], config)


def test_max_commands_boundary():
    config = Pop3Config.build(max_commands=3)
    too_many = [info("client sent too many commands"), BAD, Close()]
    check([(b"NOOP\r\n", [OK]), (b"bad\r\n", [BAD]), (b"PASS x\r\n", [BAD]), (b"QUIT\r\n", [OK, Close()])], config)
    check([(b"NOOP\r\nNOOP\r\nNOOP\r\nNOOP\r\nNOOP\r\n", [OK, OK, OK] + too_many)], config)
    # SASL continuation lines count too.
    check([(b"AUTH LOGIN\r\n", [USERNAME]), (b"dQ==\r\n", too_many)], Pop3Config.build(max_commands=1))
    check([(b"NOOP\r\n", too_many)], Pop3Config.build(max_commands=0))


def test_max_errors_boundary_and_one():
    check([(b"x\r\n", [info("client sent too many invalid commands"), BAD, Close()])], Pop3Config.build(max_errors=1))
    check([(b"x\r\n" * 4 + b"NOOP\r\n", [BAD] * 4 + [OK])])


# -- the auth result -------------------------------------------------------------------------------


def test_pipelined_login_keeps_trailing_data():
    machine = check([(b"USER a\r\nPASS b\r\nNOOP\r\nST", [OK, auth("plain", b"a", b"b")])])
    assert machine.trailing_data() == b"NOOP\r\nST"


def test_retryable_failure_processes_buffered_commands():
    check(
        [
            (b"USER a\r\nPASS b\r\nNOOP\r\n", [OK, auth("plain", b"a", b"b")]),
            (b"USER c\r\n", []),
            (failed("Invalid login", True), [info('client login failed: "Invalid login"'),
                                             Send(b"-ERR Invalid login\r\n"), OK, OK]),
            (b"PASS d\r\n", [auth("plain", b"c", b"d", attempt=2)]),
            (failed("Invalid login", False), [info('client login failed: "Invalid login"'),
                                              Send(b"-ERR Invalid login\r\n"), Close()]),
            (b"NOOP\r\n", []),
        ]
    )


def test_fatal_failure_drops_buffered_commands():
    machine = check([(b"AUTH PLAIN " + PLAIN_IR + b"\r\nNOOP\r\n", [auth("plain", b"user", b"pass")]),
                     (failed("No", False), [info('client login failed: "No"'), Send(b"-ERR No\r\n"), Close()])])
    assert machine.trailing_data() == b""


def test_sasl_error_ignored_for_other_methods():
    check([(b"AUTH PLAIN " + PLAIN_IR + b"\r\n", [auth("plain", b"user", b"pass")]),
           (failed("No", True, "eyJ9"), [info('client login failed: "No"'), Send(b"-ERR No\r\n")]),
           (b"NOOP\r\n", [OK])])


@pytest.mark.parametrize("wait", [True, False])
@pytest.mark.parametrize(
    "mech, ir, login, good, bad",
    [
        (b"XOAUTH2", XOAUTH2_IR, b"test@example.com", [b"\r\n", b"   \r\n"], [b"AQ==\r\n", b"x\r\n", b" x\r\n"]),
        (b"OAUTHBEARER", OAUTHBEARER_IR, b"te=st,@example.com", [b"AQ==\r\n", b"AQ==xyz \r\n"],
         [b"\r\n", b"AQ\r\n", b"foo\r\n", b"AQ== x\r\n", b"aq==\r\n"]),
    ],
)
def test_auth_error_sasl(wait, mech, ir, login, good, bad):
    config = Pop3Config.build(methods=ALL)
    method = mech.decode().lower()
    end = [] if wait else [Close()]
    for response, reply in [(r, Send(b"-ERR auth failed\r\n")) for r in good] + [(r, BAD) for r in bad]:
        check(
            [
                (b"AUTH " + mech + b" " + ir + b"\r\n", [auth(method, login, b"tok")]),
                (failed("auth failed", wait, "eyJzdGF0dXMiOiI0MDEifQ=="),
                 [info('client login failed: "auth failed"'), Send(b"+ eyJzdGF0dXMiOiI0MDEifQ==\r\n")]),
                (response, [reply] + end),
                (b"NOOP\r\n", [OK] if wait else []),
            ],
            config,
        )


def test_auth_error_sasl_pipelined_line_is_the_response_and_empty_value():
    config = Pop3Config.build(methods=ALL)
    check([(b"AUTH XOAUTH2 " + XOAUTH2_IR + b"\r\nNOOP\r\nNOOP\r\n", [auth("xoauth2", b"test@example.com", b"tok")]),
           (failed("no", True, ""), [info('client login failed: "no"'), EMPTY, BAD, OK])], config)


def test_auth_error_sasl_parse_error_counts():
    config = Pop3Config.build(methods=ALL, max_errors=1)
    check([(b"AUTH XOAUTH2 " + XOAUTH2_IR + b"\r\n", [auth("xoauth2", b"test@example.com", b"tok")]),
           (failed("no", True, "x"), [info('client login failed: "no"'), Send(b"+ x\r\n")]),
           (b"a b c d\r\n", [info("client sent too many invalid commands"), BAD, Close()])], config)


def test_attempts_count_and_methods_reset():
    config = Pop3Config.build(methods=ALL)
    fail = [info('client login failed: "x"'), Send(b"-ERR x\r\n")]
    check([(b"APOP u d\r\n", [auth("apop", b"u", b"d", 1, SALT)]), (failed("x", True), fail),
           (b"AUTH EXTERNAL dQ==\r\n", [auth("external", b"u", b"", 2)]), (failed("x", True), fail),
           (b"USER v\r\nPASS w\r\n", [OK, auth("plain", b"v", b"w", 3)])], config)


def test_eof_and_after_close():
    check([(b"NOOP\r\nNOO", [OK]), (b"", [Close()]), (b"NOOP\r\n", []), (b"", [])])


def test_misuse_raises():
    machine = Pop3Machine(Pop3Config.build())
    with pytest.raises(RuntimeError):
        machine.auth_failed("x", True)
    with pytest.raises(RuntimeError):
        machine.tls_established()


# -- hypothesis --------------------------------------------------------------------------------------

WORDS = [b"USER a", b"PASS b", b"APOP a b", b"AUTH", b"AUTH PLAIN", b"AUTH LOGIN", b"AUTH CRAM-MD5",
         b"AUTH EXTERNAL", b"AUTH XOAUTH2", b"AUTH OAUTHBEARER", b"CAPA", b"NOOP", b"STLS", b"QUIT",
         b"STAT", b"", b"dQ==", b"AQ==", PLAIN_IR, XOAUTH2_IR, b"AUTH PLAIN " + PLAIN_IR, b"x y z w", b"*"]
ENDS = [b"\r\n", b"\n", b"\r", b""]
configs = st.builds(
    Pop3Config.build,
    methods=st.sets(st.sampled_from(sorted(ALL))),
    starttls=st.sampled_from(["off", "on", "only"]),
    client_buffer=st.sampled_from([16, 128]),
    max_errors=st.integers(0, 6),
    max_commands=st.integers(0, 8),
)
soup = st.lists(st.tuples(st.sampled_from(WORDS), st.sampled_from(ENDS)), max_size=12).map(
    lambda items: b"".join(w + e for w, e in items)
)
events = st.lists(
    st.one_of(
        st.binary(max_size=40),
        soup,
        st.tuples(st.just("fail"), st.text(max_size=5), st.booleans(), st.one_of(st.none(), st.just("eA=="))),
        st.just(("tls",)),
    ),
    max_size=10,
)


def _drive(machine, event):
    if isinstance(event, bytes):
        return machine.receive_data(event)
    if event[0] == "fail":
        if machine.state is not State.AUTHENTICATING:
            return []
        return machine.auth_failed(event[1], event[2], sasl_error=event[3])
    if machine.state is not State.STARTING_TLS:
        return []
    return machine.tls_established()


@given(configs, st.booleans(), events)
def test_any_input_gives_only_actions(config, tls, steps):
    machine = Pop3Machine(config, tls=tls, salt=SALT)
    for event in steps:
        for action in _drive(machine, event):
            assert isinstance(action, (Send, Close, Log, StartTLS, Authenticate))
    assert len(machine.trailing_data()) <= 12 * 60 + 400


@given(configs, soup.filter(bool), st.lists(st.integers(0, 200), max_size=8))  # b"" is the client's EOF
def test_any_cut_gives_the_same_actions(config, data, cuts):
    whole = Pop3Machine(config, salt=SALT)
    expected = whole.receive_data(data)
    pieces = Pop3Machine(config, salt=SALT)
    got, start = [], 0
    for cut in sorted(set(c for c in cuts if c < len(data))) + [len(data)]:
        got += pieces.receive_data(data[start:cut]) if cut > start else []
        start = cut
    assert got == expected
    assert pieces.state is whole.state and pieces.trailing_data() == whole.trailing_data()


def test_nginx_retry_then_command_words_as_sasl_responses():
    # nginx 1.22 with Auth-Wait 1: the pipelined NOOP is answered after the failure; in the CRAM-MD5
    # exchange "AUTH EXTERNAL" is a response (valid base64, no space) and fails as a bad hash.
    config = Pop3Config.build(methods={"plain", "cram-md5", "external"})
    check(
        [
            (b"USER a\r\nPASS b\r\nNOOP\r\n", [OK, auth("plain", b"a", b"b")]),
            (failed("Invalid login", True), [info('client login failed: "Invalid login"'),
                                             Send(b"-ERR Invalid login\r\n"), OK]),
            (b"AUTH CRAM-MD5\r\n", [Send(CRAM)]),
            (b"AUTH EXTERNAL\r\n", [info("client sent invalid CRAM-MD5 hash in AUTH CRAM-MD5 command"), BAD]),
        ],
        config,
    )


def test_login_as_nginx_logs_it():
    """machine.login is what nginx's log lines show (s->login): named by USER, by a CRAM-MD5 response
    even when its digest is refused, kept after a refusal, replaced by the next attempt's login."""
    machine = Pop3Machine(Pop3Config.build(methods={"plain", "cram-md5", "external"}), salt=SALT)
    assert machine.login == b""
    machine.receive_data(b"USER alice\r\n")
    assert machine.login == b"alice"
    machine.receive_data(b"PASS secret\r\n")
    machine.auth_failed("Invalid login or password", wait=True)
    assert machine.login == b"alice"
    machine.receive_data(b"AUTH CRAM-MD5\r\n")
    assert machine.receive_data(b64(b"bob short") + b"\r\n")[0] == info(
        "client sent invalid CRAM-MD5 hash in AUTH CRAM-MD5 command")
    assert machine.login == b"bob"
    machine.receive_data(b"AUTH EXTERNAL =\r\n")
    assert machine.login == b""
