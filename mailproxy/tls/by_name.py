"""Certificates found by the TLS server name (ours): `ssl_certificate` / `ssl_certificate_key` naming
`$ssl_server_name`, as nginx's http module allows and its mail module does not.

    ssl_certificate     certs/default.pem;             # clients without SNI, or with an unknown name
    ssl_certificate_key certs/default.key;
    ssl_certificate     certs/$ssl_server_name.pem;    # example.org -> certs/example.org.pem
    ssl_certificate_key certs/$ssl_server_name.key;

Why it is built this way:

* Files are read on first use, in the worker, not in the master: one address may serve tens of
  thousands of domains, and a master that loaded them all would make every start and reload as slow as
  the slowest disk. Each worker keeps the contexts it made in a bounded LRU cache (oldest out first).
* Each use stats the files (a few microseconds next to a handshake's signatures): a certificate renewed
  in place or by rename (new mtime, size or inode), or made readable (new mode or owner), is picked up
  at the next handshake, with no reload.
  A file that fails to load is remembered with its stamps too, so a client cannot make a worker parse a
  broken file on every handshake; a missing file costs one failed stat.
* Only a host name (RFC 1123 letters, digits, hyphens, dots; 253 bytes at most; lower-cased, a final dot
  dropped) is put into a path: "../x", "a/b", NUL or a space never reach the file system.
* Anything else (no name, not a host name, no such file, a broken file) gets the certificates without
  variables, which must exist: a handshake always has a certificate to present. A broken file is
  reported (the session logs it) when it is first tried, not at every handshake.

What it costs: the keys are read by the worker, so they must be readable by the `user` workers run as;
contexts made in a worker have that worker's session-ticket keys unless `ssl_session_ticket_key` names
files, so without it resumption of such sessions works within one worker only (the default
certificate's tickets still work across workers, see tls.py).
"""

import collections
import os
import re

from mailproxy.conf.lexer import ConfigError

VARIABLES = ("${ssl_server_name}", "$ssl_server_name")

# Contexts kept per server block and worker.
CACHE_SIZE = 1000

_HOST_NAME = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)(?:\.(?!-)[a-z0-9-]{1,63}(?<!-))*\Z")
_MISSING = object()


def names_server(path: str) -> bool:
    """True for a configured file name that depends on the TLS server name."""
    return not path.startswith("data:") and any(variable in path for variable in VARIABLES)


def split_pairs(server):
    """(static pairs, by-name pairs) of a server's ssl_certificate / ssl_certificate_key."""
    static, by_name = [], []
    for cert, key in zip(server.ssl_certificate, server.ssl_certificate_key):
        (by_name if names_server(cert) or names_server(key) else static).append((cert, key))
    return tuple(static), tuple(by_name)


def host_name(name):
    """The name as it may enter a path, or None."""
    if not name:
        return None
    name = name.lower()
    if name.endswith("."):
        name = name[:-1]
    if len(name) > 253 or not _HOST_NAME.match(name):
        return None
    return name


def _fill(template: str, name: str) -> str:
    for variable in VARIABLES:
        template = template.replace(variable, name)
    return template


def _stamp(path: str):
    info = os.stat(path)
    # Mode and owner too: a key unreadable by the worker (0600) is tried again after a chmod or chown,
    # which leave the mtime alone.
    return (info.st_mtime_ns, info.st_size, info.st_ino, info.st_mode, info.st_uid, info.st_gid)


class CertificatesByName:
    """The per-name contexts of one server: ``context(name)`` gives one, or None for the default.

    ``build(pairs)`` makes a context with the server's settings and these (cert, key) files; it raises
    ConfigError (the -t wording) when they do not load.
    """

    def __init__(self, pairs, build, size=CACHE_SIZE):
        self.pairs = pairs
        self.build = build
        self.size = size
        self.cache = collections.OrderedDict()  # name -> (stamps, context or None)

    def context(self, name, report=None):
        """``report(text)`` hears why files that exist did not load (once per change of the files)."""
        name = host_name(name)
        if name is None:
            return None
        paths = tuple((_fill(cert, name), _fill(key, name)) for cert, key in self.pairs)
        try:
            stamps = tuple(_stamp(path) for pair in paths for path in pair)
        except OSError:
            self.cache.pop(name, None)
            return None
        entry = self.cache.get(name, _MISSING)
        if entry is not _MISSING and entry[0] == stamps:
            self.cache.move_to_end(name)
            return entry[1]
        try:
            ctx = self.build(paths)
        except ConfigError as exc:
            # The handshake goes on with the default certificate; the stamps keep this file from being
            # parsed again until it changes.
            ctx = None
            if report is not None:
                report(str(exc))
        self.cache[name] = (stamps, ctx)
        self.cache.move_to_end(name)
        while len(self.cache) > self.size:
            self.cache.popitem(last=False)
        return ctx
