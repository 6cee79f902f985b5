"""Backend logins as sans-IO machines (spec 4), and the PROXY header written before them."""

from .common import Failed, LoggedIn, LogPhase, Send
from .imap import ImapUpstreamLogin
from .pop3 import Pop3UpstreamLogin
from .smtp import SmtpUpstreamLogin

__all__ = [
    "Send",
    "LogPhase",
    "LoggedIn",
    "Failed",
    "ImapUpstreamLogin",
    "Pop3UpstreamLogin",
    "SmtpUpstreamLogin",
]
