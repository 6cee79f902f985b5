"""The loaded configuration as frozen dataclasses: what every module below the loader sees.

Nothing here is a raw string from the file: times are float seconds, sizes int bytes, flags bool,
enums lower-case str, lists tuples. Mail-level values are already merged into each ServerSettings
(spec 1.6), so a session never looks anything up in two places.

Paths: `pid` and `error_log` files resolve against the prefix, as nginx does; `include` and the ssl
files resolve against the directory of the main config file (nginx's "conf prefix"). Without `-p` the
prefix is the parent of the config file's directory, the shape of nginx's own layout (prefix/conf/
nginx.conf): /etc/mailproxy/mailproxy.conf gives prefix /etc, so the default pid file is
/etc/logs/mailproxy.pid unless `-p` or `pid` says otherwise; a checkout's etc/mailproxy.conf gives
the checkout itself, with logs/ beside etc/.
"""

import os
import socket
from dataclasses import dataclass
from typing import Optional

DEFAULT_CONF_PATH = "/etc/mailproxy/mailproxy.conf"
DEFAULT_PID = "logs/mailproxy.pid"
DEFAULT_ERROR_LOG = "logs/error.log"


def default_prefix(conf_path):
    return os.path.dirname(os.path.dirname(os.path.abspath(conf_path)))


def default_server_name():
    return socket.gethostname().lower()


def pagesize():
    return os.sysconf("SC_PAGESIZE")


@dataclass(frozen=True)
class Listen:
    text: str
    family: int
    sockaddr: object
    wildcard: bool = False
    ssl: bool = False
    proxy_protocol: bool = False
    backlog: int = 511
    rcvbuf: Optional[int] = None
    sndbuf: Optional[int] = None
    bind: bool = False
    ipv6only: bool = True
    so_keepalive: object = None
    multipath: bool = False
    file: Optional[str] = None
    line: int = 0


@dataclass(frozen=True)
class AuthHttpUrl:
    host_header: str
    uri: str
    sockaddr: object
    family: int
    peer: str


@dataclass(frozen=True)
class LoginLimit:
    """`mail_login_limit` (ours): what counts, how many failures, and what follows them."""
    zone: str
    per: str = "address"  # "address" | "login" | "both"
    failures: int = 5
    window: float = 600.0
    delay: float = 1.0
    block: float = 900.0
    exempt: tuple = ()  # ip networks never counted
    zone_size: int = 0  # of the zone named, filled in by the loader


@dataclass(frozen=True)
class MainSettings:
    worker_processes: int
    error_log: tuple
    pid: str
    daemon: bool
    master_process: bool
    user: Optional[tuple]
    worker_rlimit_nofile: Optional[int]
    worker_shutdown_timeout: Optional[float]
    worker_connections: int
    # mail-level `metrics_listen` (ours): (family, sockaddr, text) or None = no metrics endpoint
    metrics_listen: Optional[tuple] = None
    # mail-level `mail_login_limit_zone` (ours): ((name, size in bytes), ...), created before fork
    mail_login_limit_zones: tuple = ()
    # what each worker sets up before it serves (nginx's ngx_worker_process_init)
    worker_priority: int = 0
    worker_cpu_affinity: Optional[tuple] = None  # (auto, masks): each mask a tuple of CPU numbers
    worker_rlimit_core: Optional[int] = None
    working_directory: Optional[str] = None
    env: tuple = ()  # ((name, value or None), ...): None keeps the master's value
    # events {}
    multi_accept: bool = False
    accept_mutex: bool = False
    accept_mutex_delay: float = 0.5
    # `debug_connection`: clients logged at debug level whatever error_log says; ip networks and/or
    # "unix:" (connections on unix sockets), in file order
    debug_connection: tuple = ()


@dataclass(frozen=True)
class ServerSettings:
    protocol: str
    listens: tuple
    file: str
    line: int
    error_log: tuple
    # ngx_mail_core_module
    timeout: float
    server_name: str
    resolver: Optional[tuple]
    resolver_valid: Optional[float]
    resolver_ipv4: bool
    resolver_ipv6: bool
    resolver_timeout: float
    max_errors: int
    max_commands: int
    # ngx_mail_auth_http_module (+ our keepalive pool switch)
    auth_http: AuthHttpUrl
    auth_http_header: tuple
    auth_http_pass_client_cert: bool
    auth_http_timeout: float
    auth_http_keepalive: bool
    auth_http_cache: Optional[tuple]  # ours: (ttl, negative ttl or None, max entries) or None
    # ngx_mail_proxy_module
    proxy: bool
    proxy_buffer: int
    proxy_timeout: float
    proxy_pass_error_message: bool
    xclient: bool
    proxy_smtp_auth: object  # False, "plain" (nginx's on) or "login" (ours)
    proxy_client_id: bool  # ours
    proxy_protocol: str
    # TLS to the backends (ours; mailproxy/tls/upstream.py)
    proxy_ssl: bool
    proxy_starttls: bool
    proxy_ssl_verify: bool
    proxy_ssl_verify_depth: int
    proxy_ssl_trusted_certificate: Optional[str]
    proxy_ssl_name: Optional[str]
    proxy_ssl_server_name: bool
    proxy_ssl_certificate: Optional[str]
    proxy_ssl_certificate_key: Optional[str]
    proxy_ssl_protocols: frozenset
    proxy_ssl_ciphers: str
    proxy_ssl_session_reuse: bool
    proxy_ssl_conf_command: tuple
    # ngx_mail_imap_module, ngx_mail_pop3_module, ngx_mail_smtp_module
    imap_auth: frozenset
    imap_capabilities: tuple
    imap_client_buffer: int
    imap_client_id: bool  # ours
    pop3_auth: frozenset
    pop3_capabilities: tuple
    pop3_client_buffer: int
    smtp_auth: frozenset
    smtp_capabilities: tuple
    smtp_client_buffer: int
    smtp_greeting_delay: float
    # ManageSieve (ours)
    sieve_auth: frozenset
    sieve_capabilities: tuple
    sieve_client_buffer: int
    # ngx_mail_ssl_module
    starttls: str
    ssl_certificate: tuple
    ssl_certificate_key: tuple
    ssl_password_file: Optional[str]
    ssl_certificate_compression: bool
    ssl_ciphers: str
    ssl_prefer_server_ciphers: bool
    ssl_protocols: frozenset
    ssl_dhparam: Optional[str]
    ssl_ecdh_curve: str
    ssl_session_cache: object
    ssl_session_tickets: bool
    ssl_session_ticket_key: tuple
    ssl_session_timeout: float
    ssl_verify_client: str
    ssl_verify_depth: int
    ssl_client_certificate: Optional[str]
    ssl_trusted_certificate: Optional[str]
    ssl_crl: Optional[str]
    ssl_conf_command: tuple
    # ngx_mail_realip_module
    set_real_ip_from: tuple
    # ours: (path, "json" | "combined") or None
    session_log: Optional[tuple] = None
    # ours: LoginLimit or None (mailproxy/throttle.py)
    mail_login_limit: Optional["LoginLimit"] = None

    @property
    def uses_tls(self):
        return self.starttls != "off" or any(listen.ssl for listen in self.listens)


@dataclass(frozen=True)
class Config:
    path: str
    prefix: str
    main: MainSettings
    servers: tuple
    files: tuple
    warnings: tuple = ()
