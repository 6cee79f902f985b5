"""Free ports for the private servers of the quick start, the tests and the bench: one source per process."""

import socket

_HANDED_OUT = set()


def free_port(host="127.0.0.1", family=socket.AF_INET):
    """A port nothing listens on, never one this process handed out before: bind(0) may give a
    just-released port straight back, and two servers of one configuration must not share a port
    (a fresh-clone CI run once got nginx's duplicate-address error from exactly that)."""
    probes = []
    try:
        while True:
            # Every probe stays bound until one is new, so the kernel cannot offer the same port twice.
            probe = socket.socket(family, socket.SOCK_STREAM)
            probes.append(probe)
            probe.bind((host, 0))
            port = probe.getsockname()[1]
            if port not in _HANDED_OUT:
                _HANDED_OUT.add(port)
                return port
    finally:
        for probe in probes:
            probe.close()
