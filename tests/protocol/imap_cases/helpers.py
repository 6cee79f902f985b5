"""Building blocks for IMAP transcripts: each step is (event, the actions it must produce)."""

import base64

from mailproxy.protocol.common import AuthAttempt, Authenticate, Close, Log, Send, StartTLS

SALT = b"<12345.1700000000@mail.example>\r\n"
CRAM = Send(b"+ " + base64.b64encode(SALT[:-2]) + b"\r\n")
ALL = ("plain", "login", "cram-md5", "external", "xoauth2", "oauthbearer")
EMPTY = Send(b"+ \r\n")
USERNAME = Send(b"+ VXNlcm5hbWU6\r\n")
PASSWORD = Send(b"+ UGFzc3dvcmQ6\r\n")
GO_AHEAD = Send(b"+ OK\r\n")
UNTAGGED_BAD = Send(b"BAD invalid command\r\n")
CLOSE = Close()
START_TLS = StartTLS()
TLS_UP = (("tls",), [])
EOF_STEP = (b"", [Close()])


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def ok(tag=b"a"):
    return Send(tag + b" OK completed\r\n")


def bad(tag=b"a"):
    return Send(tag + b" BAD invalid command\r\n")


def no(text, tag=b"a"):
    return Send(tag + b" NO " + text + b"\r\n")


def info(text):
    return Log("info", text)


def auth(method, login, password, attempt=1, tag=b"a", salt=None):
    return Authenticate(AuthAttempt(method, login, password, attempt, salt=salt, tag=tag))


def failed(text, wait, sasl_error=None):
    return ("fail", text, wait, sasl_error)


def login_failed(text):
    return info('client login failed: "%s"' % text)


def base64_error(mech):
    return info("client sent invalid base64 encoding in AUTH %s command" % mech)


TOO_MANY_INVALID = info("client sent too many invalid commands")
TOO_MANY_COMMANDS = info("client sent too many commands")
