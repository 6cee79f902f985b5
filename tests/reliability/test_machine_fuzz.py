"""Stateful fuzzing (issue 10): hypothesis drives each client-facing machine and the auth reply parser
through commands, SASL responses, raw bytes, EOF and the session's events in any order.

Invariants: only known action types come out; nothing raises except the documented RuntimeError for
an event the session never sends (auth_failed with no attempt in flight, tls_established without
STARTTLS); after Close the machine is silent. HYPOTHESIS_EXAMPLES raises the example counts.
"""

import base64

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from mailproxy.auth_http.response import AuthHttpError, AuthReply, ReplyParser
from mailproxy.protocol.common import Authenticate, Close, Log, Send, StartTLS
from mailproxy.protocol.imap import ImapConfig, ImapMachine
from mailproxy.protocol.pop3 import Pop3Config, Pop3Machine
from mailproxy.protocol.smtp import SmtpConfig, SmtpMachine

# The example count is the suite's profile (tests/conftest.py, HYPOTHESIS_EXAMPLES); only the run length is ours.
SETTINGS = settings(stateful_step_count=30, suppress_health_check=list(HealthCheck))
ACTIONS = (Send, Close, Log, Authenticate, StartTLS)
ALL = ("plain", "login", "cram-md5", "external", "xoauth2", "oauthbearer")
SALT = b"<1.2@mx.example.test>\r\n"

COMMANDS = {
    "imap": [b"a NOOP", b"a CAPABILITY", b"a LOGOUT", b"a STARTTLS", b"a LOGIN alice secret",
             b"a LOGIN {5}", b"a LOGIN {5+}\r\nalice {2+}\r\npw", b'a LOGIN "al\\"ice" "p w"', b"a AUTHENTICATE PLAIN",
             b"a AUTHENTICATE LOGIN", b"a AUTHENTICATE CRAM-MD5", b"a AUTHENTICATE EXTERNAL",
             b"a AUTHENTICATE XOAUTH2", b"a AUTHENTICATE PLAIN AGEAYg==", b"a ID NIL", b"a {4294967295}", b"x"],
    "pop3": [b"CAPA", b"USER alice", b"PASS secret", b"APOP alice 0123456789abcdef0123456789abcdef", b"QUIT",
             b"NOOP", b"STLS", b"AUTH", b"AUTH PLAIN", b"AUTH LOGIN", b"AUTH CRAM-MD5", b"AUTH EXTERNAL",
             b"AUTH PLAIN AGEAYg==", b"AUTH XOAUTH2", b"RETR 1", b"user"],
    "smtp": [b"EHLO c", b"HELO c", b"MAIL FROM:<a@b>", b"RCPT TO:<c@d>", b"RSET", b"NOOP", b"QUIT",
             b"STARTTLS", b"AUTH PLAIN", b"AUTH LOGIN", b"AUTH LOGIN YWxpY2U=", b"AUTH CRAM-MD5",
             b"AUTH EXTERNAL", b"AUTH PLAIN AGEAYg==", b"AUTH OAUTHBEARER", b"DATA", b"VRFY x", b"XCLIENT A=b"],
}
SASL = [b"AGFsaWNlAHB3", b"YWxpY2U=", b"cHc=", b"*", b"=", b"", b"!!!", b"YWxpY2UgMDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
        base64.b64encode(b"n,a=alice,\x01auth=Bearer t\x01\x01"), b"AQ==", b"a b c d"]
ENDINGS = [b"\r\n", b"\n", b"\r", b"", b"\r\n\r\n"]


def make(protocol, data):
    tls = data.draw(st.booleans())
    settings_ = dict(starttls=data.draw(st.sampled_from(["off", "on", "only"])),
                     max_errors=data.draw(st.integers(0, 6)), max_commands=data.draw(st.integers(0, 40)))
    methods = data.draw(st.sampled_from([("plain",), ALL, ALL + ("apop", "none")]))
    if protocol == "imap":
        cfg = ImapConfig.build(auth_methods=[m for m in methods if m not in ("apop", "none")],
                               client_buffer=data.draw(st.sampled_from([32, 4096])), **settings_)
        return ImapMachine(cfg, tls=tls)
    if protocol == "pop3":
        cfg = Pop3Config.build(methods=[m for m in methods if m != "none"], **settings_)
        return Pop3Machine(cfg, tls=tls, salt=SALT)
    cfg = SmtpConfig.build(server_name="mx", auth_methods=frozenset(m for m in methods if m != "apop"),
                           client_buffer=data.draw(st.sampled_from([64, 4096])), **settings_)
    return SmtpMachine(cfg, tls=tls)


def machine_test(protocol):
    class Machine(RuleBasedStateMachine):
        @initialize(data=st.data())
        def start(self, data):
            self.machine = make(protocol, data)
            self.closed = False
            self.auth_pending = False
            self.tls_pending = False
            self.check(self.machine.greeting())

        def check(self, actions):
            for action in actions:
                assert isinstance(action, ACTIONS), action
                if self.closed:
                    assert isinstance(action, (Log, Close)), ("after Close", action)
                if isinstance(action, Close):
                    self.closed = True
                elif isinstance(action, Authenticate):
                    self.auth_pending = True
                elif isinstance(action, StartTLS):
                    self.tls_pending = True

        @rule(command=st.sampled_from(COMMANDS[protocol]), ending=st.sampled_from(ENDINGS))
        def command(self, command, ending):
            self.check(self.machine.receive_data(command + ending))

        @rule(response=st.sampled_from(SASL), ending=st.sampled_from(ENDINGS))
        def sasl_response(self, response, ending):
            self.check(self.machine.receive_data(response + ending))

        @rule(data=st.binary(min_size=1, max_size=300))
        def raw(self, data):
            self.check(self.machine.receive_data(data))

        @rule()
        def eof(self):
            self.check(self.machine.receive_data(b""))

        @rule(wait=st.booleans(), code=st.sampled_from([None, "535 5.7.0"]), sasl_error=st.sampled_from([None, "eyJ9"]))
        def auth_failed(self, wait, code, sasl_error):
            if not self.auth_pending:
                try:
                    self.check(self.machine.auth_failed("no", wait=wait, error_code=code, sasl_error=sasl_error))
                except RuntimeError:
                    pass  # the session never reports an attempt it did not start; the machine says so
                return
            self.auth_pending = False
            self.check(self.machine.auth_failed("Invalid login", wait=wait, error_code=code, sasl_error=sasl_error))

        @rule()
        def tls_established(self):
            pending, self.tls_pending = self.tls_pending, False
            try:
                self.check(self.machine.tls_established())
            except RuntimeError:
                assert not pending, "tls_established() refused after StartTLS"

        @invariant()
        def trailing_is_bytes(self):
            if hasattr(self, "machine"):
                assert isinstance(self.machine.trailing_data(), bytes)

    Machine.TestCase.settings = SETTINGS
    return Machine.TestCase


TestImapMachine = machine_test("imap")
TestPop3Machine = machine_test("pop3")
TestSmtpMachine = machine_test("smtp")

REPLY_LINES = [b"HTTP/1.0 200 OK", b"HTTP/1.1 200 OK", b"HTTP/1.0 500 Oops", b"Auth-Status: OK",
               b"Auth-Status: Invalid login", b"Auth-Server: 127.0.0.1", b"Auth-Server: ::1", b"Auth-Port: 143",
               b"Auth-Port: 99999", b"Auth-Wait: 3", b"Auth-Wait: x", b"Auth-User: bob", b"Auth-Pass: p%20w",
               b"Auth-Error-Code: 535 5.7.0", b"Content-Length: 4", b"Transfer-Encoding: chunked",
               b"Connection: close", b"X: \x00", b"no colon", b"", b": empty"]


class AuthReplyParser(RuleBasedStateMachine):
    @initialize()
    def start(self):
        self.parser = ReplyParser("127.0.0.1:9000")
        self.done = False

    def feed(self, data):
        if self.done:
            return
        try:
            reply = self.parser.feed(data)
        except AuthHttpError as exc:
            assert str(exc).startswith("auth http server 127.0.0.1:9000 ")
            self.done = True
            return
        if reply is not None:
            assert isinstance(reply, AuthReply)
            self.done = True

    @rule(line=st.sampled_from(REPLY_LINES), ending=st.sampled_from(ENDINGS))
    def line(self, line, ending):
        self.feed(line + ending)

    @rule(data=st.binary(max_size=200))
    def raw(self, data):
        self.feed(data)

    @rule()
    def eof(self):
        if not self.done:
            try:
                self.parser.eof()
            except AuthHttpError:
                pass  # the documented verdict on a cut reply
            self.done = True


AuthReplyParser.TestCase.settings = SETTINGS
TestAuthReplyParser = AuthReplyParser.TestCase
