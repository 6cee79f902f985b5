"""One entry per mail protocol: everything the session, the backend login and the configuration need to
know about it, as nginx's ngx_mail_protocol_t. Adding a protocol is one entry here (plus its two sans-IO
machines, the client's in protocol/ and the backend login's in upstream/).
"""

from dataclasses import dataclass
from typing import Callable, Tuple

from mailproxy.protocol import imap, pop3, sieve, smtp
from mailproxy.upstream import imap as upstream_imap
from mailproxy.upstream import pop3 as upstream_pop3
from mailproxy.upstream import sieve as upstream_sieve
from mailproxy.upstream import smtp as upstream_smtp


class BackendLoginFacts:
    """What a backend login machine may need besides the login itself; each protocol takes its part.
    (A plain class: a frozen dataclass costs a setattr call per field, on every login.)"""

    __slots__ = ("login", "password", "attempt", "ok", "client_ip", "client_host", "client_id", "starttls")

    def __init__(self, login, password, attempt, ok, client_ip, client_host, client_id, starttls):
        self.login = login
        self.password = password
        self.attempt = attempt  # the client's AuthAttempt
        self.ok = ok  # the auth server's AuthOk
        self.client_ip = client_ip
        self.client_host = client_host
        self.client_id = client_id  # (client ip, port, local ip, port) for proxy_client_id, or None
        self.starttls = starttls


@dataclass(frozen=True)
class Protocol:
    name: str
    # Ports that imply this protocol when a server names none (spec 1.5); TLS is never implied.
    ports: Tuple[int, ...]
    config_class: type
    machine_class: type
    # (server, BackendLoginFacts) -> the upstream/ machine that logs in to the backend.
    backend_login: Callable
    # Bytes one read from the client may bring in the relay (nginx's <protocol>_client_buffer).
    client_buffer: Callable
    # Client-Host and XCLIENT NAME come from the resolver, asked before the greeting.
    resolves_client: bool = False
    # smtp_greeting_delay: seconds the greeting waits while a client that talks first is caught.
    greeting_delay: Callable = lambda server: 0.0


# The machines are made with positional arguments, in their signatures' order: a class called with
# keywords has them packed into a dict and unpacked again, some 3,000 instructions a call.
def _imap_login(server, facts):
    return upstream_imap.ImapUpstreamLogin(
        facts.login, facts.password, facts.attempt.tag, server.proxy_buffer, server.proxy_pass_error_message,
        facts.starttls, facts.client_id, facts.attempt.imap_id)


def _pop3_login(server, facts):
    return upstream_pop3.Pop3UpstreamLogin(
        facts.login, facts.password, server.proxy_buffer, server.proxy_pass_error_message, facts.starttls,
        facts.client_id)


def _sieve_login(server, facts):
    return upstream_sieve.SieveUpstreamLogin(
        facts.login, facts.password, server.proxy_buffer, server.proxy_pass_error_message, facts.starttls)


def _smtp_login(server, facts):
    attempt, ok = facts.attempt, facts.ok
    return upstream_smtp.SmtpUpstreamLogin(
        server.server_name, facts.login, facts.password, attempt.method, attempt.helo, attempt.esmtp,
        attempt.mail_from, attempt.rcpt_to, facts.client_ip, facts.client_host, server.xclient,
        # Auth-Method from the auth server (ours) overrides proxy_smtp_auth for this login.
        ok.smtp_auth if ok.smtp_auth is not None else server.proxy_smtp_auth,
        server.proxy_buffer, server.proxy_pass_error_message, facts.starttls)


PROTOCOLS = {
    "imap": Protocol("imap", (143, 993), imap.ImapConfig, imap.ImapMachine, _imap_login,
                     lambda server: server.imap_client_buffer),
    "pop3": Protocol("pop3", (110, 995), pop3.Pop3Config, pop3.Pop3Machine, _pop3_login,
                     lambda server: server.pop3_client_buffer),
    "smtp": Protocol("smtp", (25, 465, 587), smtp.SmtpConfig, smtp.SmtpMachine, _smtp_login,
                     lambda server: server.smtp_client_buffer, resolves_client=True,
                     greeting_delay=lambda server: server.smtp_greeting_delay),
    # ManageSieve (RFC 5804) is ours; nginx has none. 4190 is its IANA port.
    "sieve": Protocol("sieve", (4190,), sieve.SieveConfig, sieve.SieveMachine, _sieve_login,
                      lambda server: server.sieve_client_buffer),
}
