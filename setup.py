"""Build mailproxy, its Cython relay (mailproxy/_splice.pyx), socket calls (mailproxy/_netio.pyx) and OpenSSL bridge
(mailproxy/_openssl.pyx)."""

import sys

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext


class build_ext_loud(build_ext):
    """Fail the whole install when the extension cannot be compiled.

    A proxy without its relay is not a proxy worth installing, so a missing compiler must stop
    `pip install .` with one clear line rather than leave a package that fails at first login.
    """

    def run(self):
        try:
            super().run()
        except Exception as exc:  # distutils raises several unrelated types here
            sys.exit(
                "mailproxy: cannot build mailproxy's extensions (%s); install a C compiler, the "
                "Python and the OpenSSL headers (Debian: apt-get install gcc python3-dev libssl-dev)" % exc
            )

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            sys.exit(
                "mailproxy: cannot compile %s (%s); install a C compiler, the Python and the OpenSSL "
                "headers (Debian: apt-get install gcc python3-dev libssl-dev)" % (ext.name, exc)
            )


def extensions():
    from Cython.Build import cythonize
    from setuptools import Extension

    return cythonize(
        [
            Extension("mailproxy._splice", ["mailproxy/_splice.pyx"]),
            # recv/send for the session before the relay, without socket.socket's GIL round trip.
            Extension("mailproxy._netio", ["mailproxy/_netio.pyx"]),
            # Linked with the system libssl, the one CPython's _ssl uses: both must see one SSL_CTX.
            Extension("mailproxy._openssl", ["mailproxy/_openssl.pyx"], libraries=["ssl", "crypto"]),
        ],
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
    )


setup(
    name="mailproxy",
    version="0.1.0",
    description="nginx's mail proxy (IMAP, POP3, SMTP) rebuilt in Python",
    packages=find_packages(include=["mailproxy", "mailproxy.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": build_ext_loud},
    python_requires=">=3.9",
    # PyJWT: mailproxy-auth's JWT checks (signature, exp/nbf/aud/iss, algorithm allow-list) are easy to
    # get subtly wrong by hand; it is pure Python and small. RS*/ES* keys also need cryptography: "oauth".
    install_requires=["gevent>=22", "requests", "setproctitle", "dnspython>=2.3", "PyJWT>=2.6",
                      # metrics_listen: multiprocess-safe counters and the Prometheus text format
                      "prometheus_client>=0.17"],
    extras_require={"test": ["pytest", "hypothesis", "trustme", "dnspython", "cryptography", "sievelib", "redis",
                             "pytest-cov",  # .ci/run: the fast tier's line coverage gate
                             # tests/authstores: mailproxy-auth on PostgreSQL and LDAP
                             "psycopg[binary]>=3.1", "psycopg-pool>=3.2", "ldap3>=2.9"],
                    "oauth": ["cryptography"],
                    # mailproxy-auth only, the proxy itself never talks to them: --redis; the PostgreSQL
                    # store (psycopg 3 and its pool: gevent-aware waiting, server-side parameter binding;
                    # [binary] brings libpq); the LDAP store (ldap3: pure Python, so gevent-cooperative,
                    # and RFC 4515 escaping). SQLite is the standard library's.
                    "auth": ["redis>=4.2", "psycopg[binary]>=3.1", "psycopg-pool>=3.2", "ldap3>=2.9"],
                    "bench": ["matplotlib", "geventhttpclient"]},
    # Where pip puts data files: <prefix>/share/man/man8, on man's path for /usr and /usr/local.
    data_files=[("share/man/man8", ["man/mailproxy-master.8", "man/mailproxy-auth.8"])],
    entry_points={
        "console_scripts": [
            "mailproxy-master=mailproxy.cli:main",
            "mailproxy-auth=mailproxy.authserver.app:main",
        ]
    },
)
