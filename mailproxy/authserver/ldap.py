"""The LDAP store: a search with the operator's base and filter, as Dovecot's passdb ldap does.

Options ([store] with type = ldap):

    url             ldap://HOST:PORT or ldaps://HOST:PORT
    starttls        yes: StartTLS on an ldap:// connection before anything is sent (default no)
    ca_file         CA certificates (PEM) the directory's certificate must chain to; without it the
                    system's. tls_verify = no skips the check (a test directory only).
    bind_dn, bind_password (or bind_password_file)
                    who searches; anonymous when unset
    base            the search base, e.g. ou=people,dc=example,dc=org
    filter          e.g. (&(objectClass=inetOrgPerson)(mail=%{user})); placeholders (stores.py) are
                    escaped per RFC 4515, so a login of `*)(uid=*` is a literal string, not a filter
    scope           sub (default), one or base
    auth            bind (default): the password is checked by binding as the entry found, the
                    directory keeps the hash; password: the `password` attribute's {SCHEME}hash is
                    read and checked here (the bind DN must be allowed to read it)
    attributes      field=attribute, space-separated: password=userPassword host=mailHost
                    imap=mailImapServer Auth-User=uid (a field with a dash is a reply header)
    decoy_dn        bind mode: an entry (a disabled account whose password nobody knows, hashed with
                    the users' scheme and cost) that unknown logins bind to, so that the directory spends
                    on them what it spends on a known user's bind. Without it they bind to a DN that
                    does not exist, which a directory refuses at once, and then wait out the average
                    time of the known users' binds
    backends, ports, default_scheme, timeout, pool_size   as for the SQL store

APOP and CRAM-MD5 need the clear text: they work with auth = password and a {PLAIN} password only.
"""

import math
import os
import ssl
import time

from mailproxy.authserver.stores import (
    PLACEHOLDERS,
    Pool,
    Store,
    StoreConfigError,
    StoreUnavailable,
    placeholders,
    values_for,
)

INVALID_CREDENTIALS = 49
NO_SUCH_OBJECT = 32
SIZE_LIMIT_EXCEEDED = 4


def render_filter(template, values):
    """The filter with each placeholder's value escaped per RFC 4515 (\\, *, (, ) and NUL)."""
    import re

    from ldap3.utils.conv import escape_filter_chars

    def one(match):
        if match.group(0) == "%%":
            return "%"
        return escape_filter_chars(values[PLACEHOLDERS[match.group(1) or match.group(2)]])

    return re.sub(r"%%|%\{(\w+)\}|%(\w)", one, template)


class LdapStore(Store):
    label = "directory"

    def __init__(self, options):
        super().__init__(options)
        import ldap3
        from ldap3.core.exceptions import LDAPException

        self.ldap3 = ldap3
        self.errors = (LDAPException, OSError, ssl.SSLError)
        url = options.get("url", "")
        if not url.startswith(("ldap://", "ldaps://")):
            raise StoreConfigError("the ldap store needs url=ldap://HOST[:PORT] or ldaps://HOST[:PORT]")
        self.base = options.get("base", "")
        self.filter = options.get("filter", "")
        if not self.base or not self.filter:
            raise StoreConfigError("the ldap store needs base= and filter=")
        self.uses_client = "client" in placeholders(self.filter)
        self.scope = {"sub": ldap3.SUBTREE, "subtree": ldap3.SUBTREE, "one": ldap3.LEVEL,
                      "onelevel": ldap3.LEVEL, "base": ldap3.BASE}.get(options.get("scope", "sub"))
        if self.scope is None:
            raise StoreConfigError("scope must be sub, one or base")
        self.auth = options.get("auth", "bind")
        if self.auth not in ("bind", "password"):
            raise StoreConfigError("auth must be bind or password")
        self.fields = {}
        for word in options.get("attributes", "").split():
            field, equals, attribute = word.partition("=")
            if not equals or not attribute:
                raise StoreConfigError("invalid attributes entry %r (expected field=attribute)" % word)
            self.fields[field if "-" in field else field.lower()] = attribute
        if self.auth == "password" and "password" not in self.fields:
            raise StoreConfigError("auth = password needs attributes = password=userPassword")
        self.decoy_dn = options.get("decoy_dn") or None
        self.bind_seconds = None  # moving average of the known users' binds, for unknown ones to match
        self.bind_dn = options.get("bind_dn") or None
        self.bind_password = options.get("bind_password") or None
        tls = None
        starttls = options.get("starttls", "no").lower() in ("yes", "true", "on", "1")
        if url.startswith("ldaps://") or starttls:
            verify = options.get("tls_verify", "yes").lower() not in ("no", "false", "off", "0")
            tls = ldap3.Tls(validate=ssl.CERT_REQUIRED if verify else ssl.CERT_NONE,
                            ca_certs_file=options.get("ca_file") or None,
                            version=ssl.PROTOCOL_TLS_CLIENT if verify else ssl.PROTOCOL_TLS)
        self.starttls = starttls
        self.server = ldap3.Server(url, tls=tls, connect_timeout=self.timeout, get_info=ldap3.NONE)
        size = int(options.get("pool_size", 4))
        close = lambda conn: conn.unbind()  # noqa: E731
        self.searchers = Pool(self._searcher, close, size, self.timeout)
        self.binders = Pool(self._connect, close, size, self.timeout)

    def _connect(self, user=None, password=None):
        conn = self.ldap3.Connection(
            self.server, user=user, password=password, raise_exceptions=False,
            # ldap3 hands it to setsockopt as whole seconds.
            receive_timeout=max(1, int(math.ceil(self.timeout))), auto_referrals=False,
            authentication=self.ldap3.SIMPLE if user else self.ldap3.ANONYMOUS)
        conn.open(read_server_info=False)
        if self.starttls and not conn.start_tls(read_server_info=False):
            conn.unbind()
            raise StoreUnavailable("directory: StartTLS refused: %s" % conn.result)
        return conn

    def _searcher(self):
        conn = self._connect(self.bind_dn, self.bind_password)
        if self.bind_dn and not conn.bind(read_server_info=False):
            result = conn.result
            conn.unbind()
            raise StoreUnavailable("directory: cannot bind as %s: %s" % (self.bind_dn, result.get("description")))
        return conn

    def _with(self, pool, operation):
        """operation(conn) on a pooled connection; a stale one (the directory restarted while it sat
        idle) is dropped and the operation tried once more on a fresh one."""
        for attempt in (1, 2):
            try:
                with pool.connection() as (conn, reused):
                    try:
                        return operation(conn)
                    except self.errors:
                        if reused and attempt == 1:
                            raise _Stale() from None
                        raise
            except _Stale:
                continue
            except self.errors as exc:
                raise StoreUnavailable("directory: %s" % (str(exc) or type(exc).__name__)) from None

    def find(self, login, protocol, client, purpose="password"):
        if "\0" in login:
            # Escaped or not, some directories compare only up to a NUL: such a login is nobody's.
            return None
        search = render_filter(self.filter, values_for(login, protocol, client))
        attributes = sorted(set(self.fields.values())) or [self.ldap3.NO_ATTRIBUTES]

        def run(conn):
            conn.search(self.base, search, self.scope, attributes=attributes, size_limit=2,
                        time_limit=max(1, int(self.timeout)))
            code = conn.result.get("result")
            if conn.result.get("type") is None and code is None:
                raise self.errors[0]("no answer to the search")
            return code, [entry for entry in conn.response or () if entry.get("type") == "searchResEntry"]

        code, entries = self._with(self.searchers, run)
        if code == SIZE_LIMIT_EXCEEDED or len(entries) > 1:
            from mailproxy.authserver.stores import warn

            warn("directory: the filter matched several entries for one login; refused")
            return None
        if code not in (0, NO_SUCH_OBJECT):
            raise StoreUnavailable("directory: search failed with result %s" % code)
        if not entries:
            return None
        entry = entries[0]
        raw = entry.get("raw_attributes", {})
        lowered = {name.lower(): values for name, values in raw.items()}
        fields = {field: lowered.get(attribute.lower()) for field, attribute in self.fields.items()}
        try:
            user = self.user_from(login, protocol, fields, "the directory's entry %s" % entry["dn"])
        except ValueError as exc:
            raise StoreUnavailable("directory: %s" % exc) from None
        # The DN rides along as the user's secret in bind mode: what the password is checked against.
        if self.auth == "bind":
            return _BoundUser(user, entry["dn"])
        return user

    def authenticate(self, login, method, password, salt, protocol, client):
        found = self.find(login, protocol, client)
        if found is None:
            if self.auth == "bind" and method not in ("apop", "cram-md5"):
                # An unknown login costs a bind too, which fails as a wrong password does, so that the
                # time of the answer does not tell which users exist.
                started = time.monotonic()
                self._bind(self.decoy_dn or "cn=%s,%s" % (os.urandom(8).hex(), self.base), password)
                # Only a bind that would have reached the directory for a known user is waited out.
                if self.decoy_dn is None and self.bind_seconds is not None and _sent(password):
                    time.sleep(max(0.0, self.bind_seconds - (time.monotonic() - started)))
            else:
                self.decoys.check(method, password, salt)
            return None
        if self.auth == "password":
            self.decoys.saw(found)
            return found if found.check(method, password, salt) else None
        if method in ("apop", "cram-md5"):
            return found.user if found.user.clear_text is not None and found.user.check(
                method, password, salt) else None
        started = time.monotonic()
        bound = self._bind(found.dn, password)
        if _sent(password):
            spent = time.monotonic() - started
            self.bind_seconds = spent if self.bind_seconds is None else 0.9 * self.bind_seconds + 0.1 * spent
        return found.user if bound else None

    def _bind(self, dn, password):
        if not _sent(password):
            return False

        def run(conn):
            conn.authentication = self.ldap3.SIMPLE
            conn.user, conn.password = dn, password
            if conn.bind(read_server_info=False):
                return True
            code = conn.result.get("result")
            if code == INVALID_CREDENTIALS:
                return False
            if code is None:
                raise self.errors[0]("no answer to the bind")
            raise StoreUnavailable("directory: bind failed with result %s (%s)" % (
                code, conn.result.get("description")))

        return self._with(self.binders, run)

    def backend(self, login, protocol, client, user=None):
        if user is None:
            user = self.find(login, protocol, client, purpose="route")
        if isinstance(user, _BoundUser):
            user = user.user
        return super().backend(login, protocol, client, user if user is not None else _NOBODY)

    def close(self):
        self.searchers.close()
        self.binders.close()


def _sent(password):
    """Whether a bind with this password goes to the directory at all. RFC 4513 5.1.2: one with an empty
    password is an unauthenticated bind, which succeeds, so it is never sent."""
    return bool(password) and b"\0" not in password


class _Stale(Exception):
    pass


class _BoundUser:
    """A user found in bind mode: its entry's DN, which the password is bound against."""

    def __init__(self, user, dn):
        self.user, self.dn = user, dn

    def __getattr__(self, name):
        return getattr(self.user, name)


class _Nobody:
    backends = {}


_NOBODY = _Nobody()
