"""What every store of the store tests holds: the users, their passwords and the answers mailproxy-auth
gives; ``ini()`` writes a store's options as mailproxy-auth's configuration file."""

from support.crypt_helper import sha512_crypt

STORES = ("users", "sqlite", "postgresql", "ldap-bind", "ldap-password")
INVALID = "Invalid login or password"
TEMPORARY = "Temporary server problem, try again later"
# Ports the auth_http-level tests route to (nothing listens: only the answer is checked).
PORTS = {"imap": 1143, "pop3": 1110, "smtp": 1025, "sieve": 4190}
PASSWORDS = {"alice@example.test": "alice-secret", "bob@example.test": "b0b-pass+=",
             "carol@example.test": "carol's'OR'1'='1--"}


def users(ports=PORTS):
    """(login, stored password, routes): alice hashed, bob {PLAIN} (APOP/CRAM-MD5), carol with a
    password full of SQL, routed for IMAP to her own backend."""
    return [
        ("alice@example.test", "{SHA512-CRYPT}" + sha512_crypt(PASSWORDS["alice@example.test"]), None),
        ("bob@example.test", "{PLAIN}" + PASSWORDS["bob@example.test"], None),
        ("carol@example.test", "{SHA512-CRYPT}" + sha512_crypt(PASSWORDS["carol@example.test"]),
         "127.0.0.1:%d" % (ports["imap"] + 1)),
    ]


def ini(store, cache=None):
    lines = ["[store]"] + ["%s = %s" % (key, value.replace("\n", " ")) for key, value in store.items()]
    if cache:
        lines += ["[cache]"] + ["%s = %s" % item for item in cache.items()]
    return "\n".join(lines) + "\n"
