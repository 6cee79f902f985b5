"""Build mailproxy and its Cython relay (mailproxy/_splice.pyx)."""

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
                "mailproxy: cannot build mailproxy/_splice.pyx (%s); install a C compiler and the "
                "Python headers (Debian: apt-get install gcc python3-dev)" % exc
            )

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            sys.exit(
                "mailproxy: cannot compile %s (%s); install a C compiler and the Python headers "
                "(Debian: apt-get install gcc python3-dev)" % (ext.name, exc)
            )


def extensions():
    from Cython.Build import cythonize

    return cythonize(
        ["mailproxy/_splice.pyx"],
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
    extras_require={"test": ["pytest", "hypothesis", "trustme", "dnspython", "cryptography", "sievelib", "redis"],
                    "oauth": ["cryptography"],
                    # mailproxy-auth --redis only: the proxy itself never talks to Redis
                    "auth": ["redis>=4.2"], "bench": ["matplotlib", "geventhttpclient"]},
    entry_points={
        "console_scripts": [
            "mailproxy-master=mailproxy.cli:main",
            "mailproxy-auth=mailproxy.authserver.app:main",
        ]
    },
)
