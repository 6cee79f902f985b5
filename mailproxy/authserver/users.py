"""The users file of mailproxy-auth: who may log in, with which password, to which backend.

One entry a line, `#` starts a comment::

    backend  imap 127.0.0.1:1143 127.0.0.1:2143      # default backends, per protocol
    backend  sieve 127.0.0.1:4190                     # imap, pop3, smtp and sieve (ManageSieve)
    domain   example.org  imap=10.0.0.5:143 pop3=10.0.0.5:110 smtp=10.0.0.6:25
    user     alice@example.com  {PLAIN}secret
    user     bob@example.com    {SHA512-CRYPT}$6$...   imap=127.0.0.1:3143

A user's backend comes from its own line, else from its domain's line, else from the `backend` lines;
where several addresses are given one is chosen by a stable hash of the login, so a user always lands on
the same backend. Passwords are stored as Dovecot writes them: `{PLAIN}`, `{SHA512-CRYPT}`,
`{SHA256-CRYPT}`, `{BLF-CRYPT}` (bcrypt) or `{CRYPT}`; the crypt schemes are checked by the system's
libcrypt. APOP and CRAM-MD5 need the clear text, so they work for `{PLAIN}` users only.

An unknown login is checked against the stored hash of a user of the file's most common crypt scheme
(and then refused whatever the result), so that it takes as long as a known user's wrong password and
the time of the answer does not tell which users exist.

The SQL and LDAP stores (stores.py) hand their rows to the same User and the same checks: a password
is checked the same way whatever store it came from.
"""

import collections
import ctypes
import ctypes.util
import hashlib
import hmac
import zlib
from dataclasses import dataclass, field

PROTOCOLS = ("imap", "pop3", "smtp", "sieve")
_CRYPT_SCHEMES = ("SHA512-CRYPT", "SHA256-CRYPT", "BLF-CRYPT", "CRYPT", "MD5-CRYPT")


class UsersFileError(ValueError):
    pass


@dataclass(frozen=True)
class User:
    name: str
    scheme: str
    secret: str
    backends: dict = field(default_factory=dict)
    # Extra reply headers for an OK (a store's mapped columns or attributes, e.g. Auth-User).
    headers: tuple = ()

    @property
    def clear_text(self):
        return self.secret if self.scheme == "PLAIN" else None

    def check(self, method: str, password: bytes, salt: bytes) -> bool:
        """Check what the client proved: a password, or an APOP/CRAM-MD5 digest over the salt."""
        if self.scheme == "UNUSABLE":
            return False  # a store's password in a scheme this server cannot check, or none at all
        if method in ("apop", "cram-md5"):
            if self.clear_text is None:
                return False
            key = self.clear_text.encode()
            if method == "apop":
                expected = hashlib.md5(salt + key).hexdigest().encode()
            else:
                expected = hmac.new(key, salt, hashlib.md5).hexdigest().encode()
            return hmac.compare_digest(expected, password.lower())
        if self.scheme == "PLAIN":
            return hmac.compare_digest(self.secret.encode(), password)
        hashed = _crypt(password, self.secret.encode())
        return hashed is not None and hmac.compare_digest(hashed, self.secret.encode())


@dataclass(frozen=True)
class Directory:
    users: dict
    domains: dict  # domain -> {protocol: [addresses]}
    defaults: dict  # protocol -> [addresses]
    decoy: "User | None" = None  # checked for unknown logins, see the module's docstring

    def authenticate(self, login: str, method: str, password: bytes, salt: bytes):
        """The user, when the login exists and the proof is right; else None."""
        user = self.users.get(login)
        if user is None:
            if self.decoy is not None:
                self.decoy.check(method, password, salt)  # for its time only: an unknown login never passes
            return None
        return user if user.check(method, password, salt) else None

    def backend(self, login: str, protocol: str):
        """(ip, port) for this login and protocol, or None when nothing routes it."""
        user = self.users.get(login)
        choices = None
        if user is not None:
            choices = user.backends.get(protocol)
        if not choices:
            domain = login.rpartition("@")[2].lower()
            choices = self.domains.get(domain, {}).get(protocol)
        if not choices:
            choices = self.defaults.get(protocol)
        return choose(choices, login)


def choose(choices, login):
    """One of the addresses for this login, always the same one for the same login; None if none."""
    if not choices:
        return None
    return choices[zlib.crc32(login.lower().encode()) % len(choices)]


def parse(text: str, source: str = "users file") -> Directory:
    users, domains, defaults = {}, {}, {}
    for number, raw in enumerate(text.splitlines(), 1):
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        where = "%s:%d" % (source, number)
        kind = words[0]
        if kind == "backend" and len(words) >= 3 and words[1] in PROTOCOLS:
            defaults.setdefault(words[1], []).extend(_address(word, where) for word in words[2:])
        elif kind == "domain" and len(words) >= 3:
            domains[words[1].lower()] = parse_routes(words[2:], where)
        elif kind == "user" and len(words) >= 3:
            scheme, secret = parse_password(words[2], where)
            users[words[1]] = User(words[1], scheme, secret, parse_routes(words[3:], where))
        else:
            raise UsersFileError("invalid line in %s: %r" % (where, raw.strip()))
    return Directory(users, domains, defaults, decoy_among(users.values()))


def decoy_among(users):
    # A real user's hash, not a made-up one: the same scheme with the same cost (rounds, bcrypt's log2
    # cost) is what makes an unknown login as slow as a known one.
    hashed = [user for user in users if user.scheme in _CRYPT_SCHEMES]
    if not hashed:
        return None
    scheme = collections.Counter(user.scheme for user in hashed).most_common(1)[0][0]
    return next(user for user in hashed if user.scheme == scheme)


def parse_routes(words, where):
    routes = {}
    for word in words:
        protocol, equals, addresses = word.partition("=")
        if not equals or protocol not in PROTOCOLS:
            raise UsersFileError("invalid backend %r in %s (expected imap=IP:PORT[,IP:PORT])" % (word, where))
        routes[protocol] = parse_addresses(addresses, where)
    return routes


def parse_addresses(text, where):
    """"IP:PORT[,IP:PORT...]" as a list of (host, port)."""
    return [_address(address, where) for address in text.split(",")]


def _address(text, where):
    host, colon, port = text.rpartition(":")
    host = host.strip("[]")
    if not colon or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise UsersFileError("invalid address %r in %s" % (text, where))
    return host, int(port)


def parse_password(text, where, default_scheme=None):
    """(SCHEME, secret) of a stored password; one without a {SCHEME} prefix is in `default_scheme`
    (Dovecot's default_pass_scheme) when the store has one."""
    if (not text.startswith("{") or "}" not in text) and default_scheme:
        text = "{%s}%s" % (default_scheme, text)
    if not text.startswith("{") or "}" not in text:
        raise UsersFileError("password in %s must start with a scheme such as {PLAIN}" % where)
    scheme, _, secret = text[1:].partition("}")
    scheme = scheme.upper()
    if scheme != "PLAIN" and scheme not in _CRYPT_SCHEMES:
        raise UsersFileError("unknown password scheme {%s} in %s" % (scheme, where))
    return scheme, secret


_libcrypt = None


def _crypt(password: bytes, setting: bytes):
    """The system's crypt(3): libxcrypt knows SHA-crypt, bcrypt and yescrypt, Python no longer does."""
    global _libcrypt
    if _libcrypt is None:
        path = ctypes.util.find_library("crypt") or "libcrypt.so.1"
        _libcrypt = ctypes.CDLL(path)
        _libcrypt.crypt.restype = ctypes.c_char_p
        _libcrypt.crypt.argtypes = (ctypes.c_char_p, ctypes.c_char_p)
    if b"\0" in password:
        return None
    return _libcrypt.crypt(password, setting)
