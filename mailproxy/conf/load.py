"""Read a configuration the way nginx does and turn it into a Config, or fail with nginx's words.

Directives are acted on one at a time in file order (the lexer streams them), so the first error
reported is the one nginx would report: duplicates and bad values at the directive, `no "listen"` at
the end of its `server {}`, the other mail checks at the end of `mail {}` (module by module, as nginx
merges: protocol, then TLS certificates, then auth_http), and `no "events"` after the whole file.
"""

import dataclasses
import errno
import glob
import grp
import os
import socket
import sys

from mailproxy import log as errorlog

from . import values
from .directives import BY_NAME, DIRECTIVES
from .lexer import END_BLOCK_END, END_FILE, ConfigError, location, statements
from .settings import (DEFAULT_ERROR_LOG, DEFAULT_PID, Config, MainSettings, ServerSettings,
                       default_prefix, default_server_name)

NAME = "mailproxy"
# nginx has no guard and recurses until it runs out of descriptors; a bound gives a clear message instead.
MAX_INCLUDE_DEPTH = 32


class Block:
    """Values set in one block, with the file:line of each (messages name inherited lines)."""

    def __init__(self, kind, file=None, line=0):
        self.kind = kind
        self.file = file
        self.line = line
        self.values = {}
        self.where = {}
        self.servers = []
        self.auto_protocol = None
        self.ssl_listen_where = None


class DirectiveContext:
    """What a value parser may know about the directive it parses."""

    def __init__(self, loader, name, file, line, previous=()):
        self.name = name
        self.previous = previous
        self.file = file
        self.line = line
        self.prefix = loader.prefix
        self.conf_dir = loader.conf_dir
        self._loader = loader

    def warn(self, text):
        self._loader.warn(text + location(self.file, self.line))


def _open_error(path, exc):
    code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EINVAL
    return 'open() "%s" failed (%d: %s)' % (path, code, os.strerror(code))


class Loader:
    def __init__(self, path, prefix):
        self.path = path
        self.prefix = prefix
        self.conf_dir = os.path.dirname(path)
        self.warnings = []
        self.files = []
        self.main = Block("main")
        self.events = None
        self.mail = None
        self.servers = []
        self.listen_keys = set()
        self.listen_owners = {}  # (family, sockaddr) -> (server block, Listen): the address's default server
        self.shared_listens = []  # (Listen, server block, owner, where): later servers on an address
        self.include_depth = 0

    def warn(self, text):
        self.warnings.append("[warn] " + text)

    # --- reading ------------------------------------------------------------------------------------

    def read(self, path, where=""):
        try:
            with open(path, "rb") as f:
                text = f.read().decode("utf-8", "surrogateescape")
        except (OSError, ValueError) as exc:
            raise ConfigError(_open_error(path, exc) + where) from None
        self.files.append((path, text))
        return text

    def load(self, directives):
        if directives:
            self.parse(statements(directives, None), self.main, nested=False)
        self.parse(statements(self.read(self.path), self.path), self.main, nested=False)
        if self.events is None:
            raise ConfigError('no "events" section in configuration')
        return self.build()

    def parse(self, stream, block, nested):
        for st in stream:
            if st.end == END_FILE:
                if nested:
                    raise ConfigError('unexpected end of file, expecting "}"' + st.where)
                return
            if st.end == END_BLOCK_END:
                if not nested:
                    raise ConfigError('unexpected "}"' + st.where)
                return
            self.directive(st, stream, block)

    # --- one directive ------------------------------------------------------------------------------

    def directive(self, st, stream, block):
        name, args = st.args[0], st.args[1:]
        d = BY_NAME.get(name)
        if d is None:
            raise ConfigError('unknown directive "%s"' % name + st.where)
        if block.kind not in d.contexts:
            raise ConfigError('"%s" directive is not allowed here' % name + st.where)
        if d.opens and st.end != "{":
            raise ConfigError('directive "%s" has no opening "{"' % name + st.where)
        if not d.opens and st.end != ";":
            raise ConfigError('directive "%s" is not terminated by ";"' % name + st.where)
        low, high = d.nargs
        if len(args) < low or (high is not None and len(args) > high):
            raise ConfigError('invalid number of arguments in "%s" directive' % name + st.where)

        if d.opens:
            self.open_block(d.opens, st, stream, block)
        elif name == "include":
            self.include(args[0], st, block)
        elif name != "load_module":
            self.set_value(d, args, st, block)

    def include(self, mask, st, block):
        path = os.path.join(self.conf_dir, mask)
        if glob.has_magic(path):
            try:
                paths = sorted(glob.glob(path))
            except ValueError as exc:
                raise ConfigError(_open_error(path, exc) + st.where) from None
        else:
            paths = [path]
        if self.include_depth >= MAX_INCLUDE_DEPTH:
            raise ConfigError('include nesting deeper than %d levels at "%s"' % (MAX_INCLUDE_DEPTH, path)
                              + st.where)
        self.include_depth += 1
        for one in paths:
            self.parse(statements(self.read(one, st.where), one), block, nested=False)
        self.include_depth -= 1

    def open_block(self, kind, st, stream, parent):
        if kind == "events":
            if self.events is not None:
                raise ConfigError('"events" directive is duplicate' + st.where)
            self.events = Block("events", st.file, st.line)
            self.parse(stream, self.events, nested=True)
        elif kind == "mail":
            if self.mail is not None:
                raise ConfigError('"mail" directive is duplicate' + st.where)
            self.mail = Block("mail", st.file, st.line)
            self.parse(stream, self.mail, nested=True)
            self.finish_mail()
        else:
            server = Block("server", st.file, st.line)
            parent.servers.append(server)
            self.parse(stream, server, nested=True)
            if not server.values.get("listen"):
                raise ConfigError('no "listen" is defined for server' + location(server.file, server.line))

    def set_value(self, d, args, st, block):
        name = d.name
        if d.repeat == "dup" and name in block.values:
            raise ConfigError('"%s" directive is duplicate' % name + st.where)
        ctx = DirectiveContext(self, name, st.file, st.line, block.values.get(name) or ())
        try:
            value = d.parse(ctx, list(args))
        except values.BadValue as exc:
            raise ConfigError(str(exc) + st.where) from None
        if name == "listen":
            value = self.add_listens(value, block, st)
        old = block.values.get(name)
        if old is not None and d.repeat == "append":
            value = old + value
        elif old is not None and d.repeat == "or":
            value = old | value
        block.values[name] = value
        block.where[name] = (st.file, st.line)

    def add_listens(self, listens, block, st):
        fresh = []
        for one in listens:
            key = (one.family, one.sockaddr)
            if key in self.listen_keys:
                if any((l.family, l.sockaddr) == key for l in fresh):
                    continue  # one hostname resolving twice to the same address is not an error
                owner = self.listen_owners.get(key)
                if owner is None or owner[0] is block:
                    raise ConfigError('duplicate "%s" address and port pair' % one.text + st.where)
                # Certificates by SNI (ours): whether this is allowed depends on server_name and starttls,
                # which may come later in the file; finish_mail() decides, with this line's location.
                if one.ssl != owner[1].ssl:
                    raise ConfigError('duplicate "%s" address and port pair' % one.text + st.where)
                self.shared_listens.append((one, block, owner, st.where))
            else:
                self.listen_keys.add(key)
                self.listen_owners[key] = (block, one)
            fresh.append(one)
            if block.auto_protocol is None and one.family != socket.AF_UNIX:
                port = one.sockaddr[1]
                for protocol, ports in values.PROTOCOL_PORTS.items():
                    if port in ports:
                        block.auto_protocol = protocol
                        break
            if one.ssl:
                block.ssl_listen_where = (st.file, st.line)
        return tuple(fresh)

    # --- end of mail{}: merge and check -------------------------------------------------------------

    def finish_mail(self):
        merged = [self.merge(server) for server in self.mail.servers]
        self.check_shared_listens(dict((id(server), m) for server, m in zip(self.mail.servers, merged)))
        for server, m in zip(self.mail.servers, merged):
            m["protocol"] = server.values.get("protocol") or server.auto_protocol
            if m["protocol"] is None:
                raise ConfigError("unknown mail protocol for server" + location(server.file, server.line))
        for server, m in zip(self.mail.servers, merged):
            self.check_tls(server, m)
        for server, m in zip(self.mail.servers, merged):
            if m["auth_http"] is None:
                raise ConfigError('no "auth_http" is defined for server' + location(server.file, server.line))
        zones = dict(self.mail.values.get("mail_login_limit_zone", ()))
        for server, m in zip(self.mail.servers, merged):
            limit = m["mail_login_limit"]
            if limit is not None:
                if limit.zone not in zones:
                    raise ConfigError('zone "%s" is unknown in "mail_login_limit"' % limit.zone
                                      + location(*m["_where"]["mail_login_limit"]))
                m["mail_login_limit"] = dataclasses.replace(limit, zone_size=zones[limit.zone])
        self.servers = list(zip(self.mail.servers, merged))

    def merge(self, server):
        merged, where = {}, {}
        for d in DIRECTIVES:
            if not d.inherit:
                continue
            for block in (server, self.mail):
                if d.name in block.values:
                    merged[d.name] = block.values[d.name]
                    where[d.name] = block.where[d.name]
                    break
            else:
                merged[d.name] = d.default
        for d in DIRECTIVES:
            if d.inherit and callable(merged[d.name]):
                merged[d.name] = merged[d.name](merged)
        if not merged["server_name"]:
            merged["server_name"] = default_server_name()
        merged["error_log"] = server.values.get("error_log") or self.mail.values.get("error_log")
        merged["_where"] = where
        return merged

    def check_shared_listens(self, merged):
        """Several servers on one address choose their certificate by SNI (ours); nginx refuses them all.

        Allowed only between servers of one protocol that all use TLS on that address (each `listen ... ssl`,
        or each with starttls) under distinct server names; anything else keeps nginx's error.
        """
        names = {}
        for listen, block, (first_block, first_listen), where in self.shared_listens:
            key = (listen.family, listen.sockaddr)
            mine, first = merged[id(block)], merged[id(first_block)]
            taken = names.setdefault(key, {first["server_name"]})

            def tls_on(listen, m):
                return listen.ssl or m["starttls"] != "off"

            def protocol(block):
                return block.values.get("protocol") or block.auto_protocol

            if (not tls_on(listen, mine) or not tls_on(first_listen, first)
                    or protocol(block) != protocol(first_block) or mine["server_name"] in taken):
                raise ConfigError('duplicate "%s" address and port pair' % listen.text + where)
            taken.add(mine["server_name"])

    def check_tls(self, server, m):
        ssl_listen = server.ssl_listen_where
        if ssl_listen is None and m["starttls"] == "off":
            return
        if ssl_listen is not None:
            mode, (file, line) = "listen ... ssl", ssl_listen
        else:
            mode, (file, line) = "starttls", m["_where"]["starttls"]
        certs, keys = m["ssl_certificate"], m["ssl_certificate_key"]
        if not certs:
            raise ConfigError('no "ssl_certificate" is defined for the "%s" directive' % mode + location(file, line))
        if not keys:
            raise ConfigError('no "ssl_certificate_key" is defined for the "%s" directive' % mode
                              + location(file, line))
        if len(keys) < len(certs):
            raise ConfigError('no "ssl_certificate_key" is defined for certificate "%s" and the "%s" directive'
                              % (certs[-1], mode) + location(file, line))
        if m["ssl_verify_client"] in ("on", "optional") and not (
                m["ssl_client_certificate"] or m["ssl_trusted_certificate"]):
            raise ConfigError("no ssl_client_certificate or ssl_trusted_certificate for ssl_verify_client")

    # --- the result ---------------------------------------------------------------------------------

    def build(self):
        main = self.main.values
        default_log = (os.path.join(self.prefix, DEFAULT_ERROR_LOG), "error")
        error_log = main.get("error_log") or (default_log,)
        if not any(errorlog.is_file(target) for target, _ in error_log):
            # nginx's ngx_log_open_default: syslog and memory logs alone still get the default file.
            error_log += (default_log,)

        def main_value(name, block=main):
            return block.get(name, BY_NAME[name].default)

        def events_value(name):
            return main_value(name, self.events.values)

        settings = MainSettings(
            worker_processes=main_value("worker_processes"),
            error_log=error_log,
            pid=main.get("pid") or os.path.join(self.prefix, DEFAULT_PID),
            daemon=main_value("daemon"),
            master_process=main_value("master_process"),
            user=main["user"] if "user" in main else default_user(),
            worker_rlimit_nofile=main_value("worker_rlimit_nofile"),
            worker_shutdown_timeout=main_value("worker_shutdown_timeout"),
            worker_connections=events_value("worker_connections"),
            metrics_listen=self.mail.values.get("metrics_listen") if self.mail else None,
            mail_login_limit_zones=self.mail.values.get("mail_login_limit_zone", ()) if self.mail else (),
            worker_priority=main_value("worker_priority"),
            worker_cpu_affinity=main_value("worker_cpu_affinity"),
            worker_rlimit_core=main_value("worker_rlimit_core"),
            working_directory=main_value("working_directory"),
            env=main_value("env"),
            multi_accept=events_value("multi_accept"),
            accept_mutex=events_value("accept_mutex"),
            accept_mutex_delay=events_value("accept_mutex_delay"),
            debug_connection=events_value("debug_connection"),
        )
        affinity = settings.worker_cpu_affinity
        if affinity and not affinity[0] and len(affinity[1]) not in (1, settings.worker_processes):
            # nginx says it once the configuration is read, without a file:line.
            self.warn('the number of "worker_processes" is not equal to the number of "worker_cpu_affinity" '
                      'masks, using last mask for remaining worker processes')
        servers = tuple(self.server_settings(block, m, error_log) for block, m in self.servers)
        return Config(path=self.path, prefix=self.prefix, main=settings, servers=servers,
                      files=tuple(self.files), warnings=tuple(self.warnings))

    def server_settings(self, block, m, main_error_log):
        fields = {k: val for k, val in m.items() if not k.startswith("_")}
        resolver = fields.pop("resolver")
        fields.update(
            resolver=resolver["addresses"] if resolver else None,
            resolver_valid=resolver["valid"] if resolver else None,
            resolver_ipv4=resolver["ipv4"] if resolver else True,
            resolver_ipv6=resolver["ipv6"] if resolver else True,
            error_log=fields["error_log"] or main_error_log,
            listens=block.values["listen"],
            file=block.file,
            line=block.line,
        )
        return ServerSettings(**fields)


def default_user():
    """nginx's build-time default user, which only matters when the master starts as root."""
    if os.geteuid() != 0:
        return None
    try:
        grp.getgrnam("nobody")
        return ("nobody", "nobody")
    except KeyError:
        return ("nobody", "nogroup")


def load_config(path, prefix=None, directives=None):
    """Parse `path` (plus `-g` text `directives`, read first) into a Config; raise ConfigError."""
    path = os.path.abspath(path)
    prefix = os.path.abspath(prefix) if prefix else default_prefix(path)
    loader = Loader(path, prefix)
    try:
        return loader.load(directives)
    except ConfigError as exc:
        exc.warnings = tuple(loader.warnings)
        raise


def _say(stream, text):
    try:
        stream.write(text + "\n")
    except UnicodeEncodeError:
        stream.write(text.encode("utf-8", "surrogateescape").decode("utf-8", "replace") + "\n")


def check(path, prefix=None, directives=None, dump=False, out=sys.stdout, err=sys.stderr, probe=None,
          quiet=False, prepare=None):
    """`-t` / `-T`: report on the configuration as nginx does; returns the exit status.

    `prepare(config)` reads what the configuration names before its syntax is declared ok (the command
    line passes the TLS preparation: certificates, keys, OpenSSL settings), so that -t reports bad files
    as nginx does; this package itself knows nothing of TLS. `probe(config)` then opens what nginx -t
    opens once the syntax is ok (the pid and log files). Both raise ConfigError with nginx's words.
    `quiet` (-q) keeps only the errors.
    """
    shown = os.path.abspath(path)

    def failed(exc, warnings=()):
        for warning in warnings:
            _say(err, "%s: %s" % (NAME, warning))
        _say(err, "%s: [emerg] %s" % (NAME, exc))
        _say(err, "%s: configuration file %s test failed" % (NAME, shown))
        return 1

    try:
        config = load_config(path, prefix, directives)
        if prepare is not None:
            prepare(config)
    except ConfigError as exc:
        return failed(exc, getattr(exc, "warnings", ()))
    for warning in config.warnings:
        _say(err, "%s: %s" % (NAME, warning))
    if not quiet:
        _say(err, "%s: the configuration file %s syntax is ok" % (NAME, shown))
    if probe is not None:
        try:
            probe(config)
        except ConfigError as exc:
            return failed(exc)
    if not quiet:
        _say(err, "%s: configuration file %s test is successful" % (NAME, shown))
    if dump:
        for file, text in config.files:
            _say(out, "# configuration file %s:" % file)
            _say(out, text)
    return 0
