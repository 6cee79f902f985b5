"""Password hashes for tests, made with the system's libcrypt as mailproxy-auth checks them."""

import base64
import os

from mailproxy.authserver.users import _crypt


def _salt(n):
    return base64.b64encode(os.urandom(n), b"./").decode()[:n]


def sha512_crypt(password):
    return _crypt(password.encode(), ("$6$" + _salt(16)).encode()).decode()


def bcrypt_hash(password):
    return _crypt(password.encode(), ("$2b$05$" + _salt(22)).encode()).decode()
