"""THE TABLE: every directive mailproxy accepts, one row each, data only.

Columns:
  contexts  where the directive may appear: "main", "events", "mail", "server" (block directives open
            the context named by `opens`)
  nargs     (min, max) argument count; max None = unbounded
  parse     values.py parser, called as parse(ctx, args)
  default   value when the directive is not set (for mail directives: neither the server nor the mail
            block sets it); a callable is called at merge time with the merged server values (defaults
            that depend on other directives or on the host)
  repeat    what a second occurrence in the same block does:
              "dup"     error `"<name>" directive is duplicate`
              "append"  tuples concatenate (lists, in order)
              "or"      bitmask values are OR-ed (`*_auth`, ssl_protocols)
              "last"    the later one wins (nginx's `protocol`)
  inherit   a server that does not set it takes the mail-level value (spec 1.6); lists are replaced
            as a whole, never merged
"""

from dataclasses import dataclass
from typing import Callable, Optional

from . import values as v
from .settings import DEFAULT_PID, default_server_name, pagesize

ANY = frozenset({"main", "events", "mail", "server"})
MAIL = frozenset({"mail", "server"})
MAIN = frozenset({"main"})
EVENTS = frozenset({"events"})

IMAP_AUTH = ("plain", "login", "cram-md5", "external", "xoauth2", "oauthbearer")
POP3_AUTH = ("plain", "apop", "cram-md5", "external", "xoauth2", "oauthbearer")
SMTP_AUTH = ("plain", "login", "cram-md5", "external", "xoauth2", "oauthbearer", "none")
SSL_PROTOCOLS = ("SSLv2", "SSLv3", "TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
OAUTH = frozenset({"xoauth2", "oauthbearer"})
SIEVE_AUTH = ("plain", "login", "xoauth2", "oauthbearer")
# What Dovecot Pigeonhole enables out of the box, the usual backend; operators with another set say so.
SIEVE_EXTENSIONS = ("fileinto", "reject", "envelope", "encoded-character", "vacation", "subaddress",
                    "comparator-i;ascii-numeric", "relational", "regex", "imap4flags", "copy", "include",
                    "variables", "body", "enotify", "environment", "mailbox", "date", "index", "ihave",
                    "duplicate", "mime", "foreverypart", "extracttext", "NOTIFY=mailto")


@dataclass(frozen=True)
class Directive:
    name: str
    contexts: frozenset
    nargs: tuple
    parse: Optional[Callable]
    default: object = None
    repeat: str = "dup"
    inherit: bool = False
    opens: Optional[str] = None


def pop3_client_buffer_default(merged):
    # Real OAuth tokens do not fit nginx's 128-byte POP3 line (spec 9.13), so enabling them widens it.
    return 4096 if merged["pop3_auth"] & OAUTH else 128


def _mail(name, nargs, parse, default, repeat="dup"):
    return Directive(name, MAIL, nargs, parse, default, repeat, inherit=True)


ONE = (1, 1)
MORE = (1, None)

DIRECTIVES = (
    # core, main context
    Directive("worker_processes", MAIN, ONE, v.worker_processes, 1),
    Directive("error_log", frozenset({"main", "mail", "server"}), MORE, v.error_log, None, "append"),
    Directive("pid", MAIN, ONE, v.prefix_path, DEFAULT_PID),  # default resolved by the loader
    Directive("daemon", MAIN, ONE, v.flag, True),
    Directive("master_process", MAIN, ONE, v.flag, True),
    Directive("user", MAIN, (1, 2), v.user, None),
    Directive("worker_rlimit_nofile", MAIN, ONE, v.number, None),
    Directive("worker_shutdown_timeout", MAIN, ONE, v.time_msec, None),
    # Debian's nginx configs start with it; mailproxy has no dynamic modules, so it is accepted and dropped.
    Directive("load_module", MAIN, ONE, v.word, None, "append"),
    Directive("worker_priority", MAIN, ONE, v.worker_priority, 0, "last"),
    Directive("worker_cpu_affinity", MAIN, MORE, v.worker_cpu_affinity, None),
    Directive("worker_rlimit_core", MAIN, ONE, v.offset, None),
    Directive("working_directory", MAIN, ONE, v.word, None),
    Directive("env", MAIN, ONE, v.env, (), "append"),
    # Accepted for nginx's configurations; nothing in mailproxy for them to steer (README's table says why).
    Directive("timer_resolution", MAIN, ONE, v.time_msec, None),
    Directive("lock_file", MAIN, ONE, v.word, None),
    Directive("debug_points", MAIN, ONE, v.enum("stop", "abort"), None),
    Directive("pcre_jit", MAIN, ONE, v.flag, False),
    Directive("thread_pool", MAIN, (2, 3), v.thread_pool, (), "append"),
    Directive("ssl_engine", MAIN, ONE, v.word, None),
    Directive("ssl_object_cache_inheritable", MAIN, ONE, v.flag, True),
    Directive("include", ANY, ONE, None),
    Directive("events", MAIN, (0, 0), None, opens="events"),
    Directive("worker_connections", EVENTS, ONE, v.worker_connections, 512),
    Directive("multi_accept", EVENTS, ONE, v.flag, False),
    Directive("accept_mutex", EVENTS, ONE, v.flag, False),
    Directive("accept_mutex_delay", EVENTS, ONE, v.time_msec, 0.5),
    Directive("debug_connection", EVENTS, ONE, v.debug_connection, (), "append"),
    Directive("use", EVENTS, ONE, v.event_type, "epoll"),
    Directive("epoll_events", EVENTS, ONE, v.number, None),
    Directive("worker_aio_requests", EVENTS, ONE, v.number, None),
    Directive("mail", MAIN, (0, 0), None, opens="mail"),
    # ngx_mail_core_module
    Directive("server", frozenset({"mail"}), (0, 0), None, opens="server"),
    Directive("listen", frozenset({"server"}), MORE, v.listen, (), "append"),
    Directive("protocol", frozenset({"server"}), ONE, v.mail_protocol, None, "last"),
    _mail("timeout", ONE, v.time_msec, 60.0),
    _mail("server_name", ONE, v.word, lambda merged: default_server_name()),
    _mail("resolver", MORE, v.resolver, None),
    _mail("resolver_timeout", ONE, v.time_msec, 30.0),
    _mail("max_errors", ONE, v.number, 5),
    _mail("max_commands", ONE, v.number, 1000),
    # ngx_mail_auth_http_module
    _mail("auth_http", ONE, v.auth_http, None, "last"),
    _mail("auth_http_header", (2, 2), lambda ctx, args: (v.pair(ctx, args),), (), "append"),
    _mail("auth_http_pass_client_cert", ONE, v.flag, False),
    _mail("auth_http_timeout", ONE, v.time_msec, 60.0),
    _mail("auth_http_keepalive", ONE, v.flag, False),
    _mail("auth_http_cache", MORE, v.auth_http_cache, None),  # ours, off by default
    # ngx_mail_proxy_module
    _mail("proxy", ONE, v.flag, False),
    _mail("proxy_buffer", ONE, v.size, lambda merged: pagesize()),
    _mail("proxy_timeout", ONE, v.time_msec, 86400.0),
    _mail("proxy_pass_error_message", ONE, v.flag, False),
    _mail("xclient", ONE, v.flag, True),
    _mail("proxy_smtp_auth", ONE, v.proxy_smtp_auth, False),
    # ours, off by default: Dovecot's ID / XCLIENT naming the client to IMAP and POP3 backends
    _mail("proxy_client_id", ONE, v.flag, False),
    _mail("proxy_protocol", ONE, v.proxy_protocol, "off"),
    # TLS to the backends (ours, named after ngx_stream_proxy_module's; all off, see mailproxy/tls/upstream.py)
    _mail("proxy_ssl", ONE, v.flag, False),
    _mail("proxy_starttls", ONE, v.flag, False),
    _mail("proxy_ssl_verify", ONE, v.flag, False),
    _mail("proxy_ssl_verify_depth", ONE, v.number, 1),
    _mail("proxy_ssl_trusted_certificate", ONE, v.conf_path, None),
    _mail("proxy_ssl_name", ONE, v.word, None),
    _mail("proxy_ssl_server_name", ONE, v.flag, False),
    _mail("proxy_ssl_certificate", ONE, v.conf_path, None),
    _mail("proxy_ssl_certificate_key", ONE, v.conf_path, None),
    _mail("proxy_ssl_protocols", MORE, v.bitmask(*SSL_PROTOCOLS), frozenset({"TLSv1.2", "TLSv1.3"}), "or"),
    _mail("proxy_ssl_ciphers", ONE, v.word, "DEFAULT"),
    _mail("proxy_ssl_session_reuse", ONE, v.flag, True),
    # The stream module's: SSL_CONF_cmd() on the backend context, (name, value, the config's directory).
    _mail("proxy_ssl_conf_command", (2, 2), lambda ctx, args: (v.pair(ctx, args) + (ctx.conf_dir,),), (), "append"),
    # ngx_mail_imap_module, ngx_mail_pop3_module, ngx_mail_smtp_module
    _mail("imap_auth", MORE, v.bitmask(*IMAP_AUTH), frozenset({"plain"}), "or"),
    _mail("imap_capabilities", MORE, v.words, ("IMAP4", "IMAP4rev1", "UIDPLUS"), "append"),
    _mail("imap_client_buffer", ONE, v.size, lambda merged: pagesize()),
    # ours, off by default (nginx answers ID with BAD): answer ID before login, pass the fields on
    _mail("imap_client_id", ONE, v.flag, False),
    _mail("pop3_auth", MORE, v.bitmask(*POP3_AUTH), frozenset({"plain"}), "or"),
    _mail("pop3_capabilities", MORE, v.words, ("TOP", "USER", "UIDL"), "append"),
    _mail("pop3_client_buffer", ONE, v.size, pop3_client_buffer_default),
    _mail("smtp_auth", MORE, v.bitmask(*SMTP_AUTH), frozenset({"plain", "login"}), "or"),
    _mail("smtp_capabilities", MORE, v.words, (), "append"),
    _mail("smtp_client_buffer", ONE, v.size, lambda merged: pagesize()),
    _mail("smtp_greeting_delay", ONE, v.time_msec, 0.0),
    # ManageSieve (ours): the SIEVE extensions are advertised before the backend is known (RFC 5804 1.7)
    _mail("sieve_auth", MORE, v.bitmask(*SIEVE_AUTH), frozenset({"plain"}), "or"),
    _mail("sieve_capabilities", MORE, v.words, SIEVE_EXTENSIONS, "append"),
    _mail("sieve_client_buffer", ONE, v.size, lambda merged: pagesize()),
    # ngx_mail_ssl_module
    _mail("starttls", ONE, v.enum("on", "off", "only"), "off"),
    _mail("ssl_certificate", ONE, lambda ctx, args: (v.conf_path(ctx, args),), (), "append"),
    _mail("ssl_certificate_key", ONE, lambda ctx, args: (v.conf_path(ctx, args),), (), "append"),
    _mail("ssl_password_file", ONE, v.conf_path, None),
    _mail("ssl_certificate_compression", ONE, v.flag, False),
    _mail("ssl_ciphers", ONE, v.word, "HIGH:!aNULL:!MD5"),
    _mail("ssl_prefer_server_ciphers", ONE, v.flag, False),
    _mail("ssl_protocols", MORE, v.bitmask(*SSL_PROTOCOLS), frozenset({"TLSv1.2", "TLSv1.3"}), "or"),
    _mail("ssl_dhparam", ONE, v.conf_path, None),
    _mail("ssl_ecdh_curve", ONE, v.word, "auto"),
    _mail("ssl_session_cache", MORE, v.ssl_session_cache, "none", "last"),
    _mail("ssl_session_tickets", ONE, v.flag, True),
    _mail("ssl_session_ticket_key", ONE, lambda ctx, args: (v.conf_path(ctx, args),), (), "append"),
    _mail("ssl_session_timeout", ONE, v.time_sec, 300.0),
    _mail("ssl_verify_client", ONE, v.enum("on", "off", "optional", "optional_no_ca"), "off"),
    _mail("ssl_verify_depth", ONE, v.number, 1),
    _mail("ssl_client_certificate", ONE, v.conf_path, None),
    _mail("ssl_trusted_certificate", ONE, v.conf_path, None),
    _mail("ssl_crl", ONE, v.conf_path, None),
    # (name, value, the config's directory): a file or directory value resolves against it, as nginx's do.
    _mail("ssl_conf_command", (2, 2), lambda ctx, args: (v.pair(ctx, args) + (ctx.conf_dir,),), (), "append"),
    # ngx_mail_realip_module
    _mail("set_real_ip_from", ONE, v.network, (), "append"),
    # observability (ours, off by default): the master serves metrics; sessions write one line each
    Directive("metrics_listen", frozenset({"mail"}), ONE, v.metrics_listen, None),
    _mail("session_log", (1, 2), v.session_log, None),
    # login throttling (ours, off by default; mailproxy/throttle.py): zones are made by the master before fork
    Directive("mail_login_limit_zone", frozenset({"mail"}), (2, 2), v.login_limit_zone, (), "append"),
    _mail("mail_login_limit", MORE, v.login_limit, None),
)

BY_NAME = {d.name: d for d in DIRECTIVES}
