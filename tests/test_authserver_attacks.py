"""mailproxy-auth under the attacks of issue 25 (items 3-5), each played against a real process over
real HTTP: resetting the lock-out with the attacker's own good login, guessing one login from many
addresses or from one IPv6 /64, flooding the failure table to unlock an address, and telling which
users exist from the time of the answer."""

import base64
import os
import socket
import statistics
import subprocess
import sys
import time

import pytest
import requests

from mailproxy.authserver.users import _crypt

from support.harness import free_port, wait_for

INVALID = "Invalid login or password"
LOCKED = "Too many invalid logins, try again later"
USERS = """backend imap 127.0.0.1:1143
user alice@example.com {PLAIN}wonderland
user mallory@example.com {PLAIN}own-account
"""


class AuthServer:
    def __init__(self, process, port):
        self.process = process
        self.url = "http://127.0.0.1:%d/auth" % port
        self.session = requests.Session()  # keep-alive: the flood and the timing need many quick requests

    def ask(self, user, password, client):
        headers = {"Auth-Method": "plain", "Auth-User": user, "Auth-Pass": password, "Auth-Protocol": "imap",
                   "Auth-Login-Attempt": "1", "Client-IP": client}
        return self.session.get(self.url, headers=headers, timeout=10).headers["Auth-Status"]


@pytest.fixture
def start(tmp_path):
    """start(*options, users=USERS): a mailproxy-auth listening on a free port; all stopped afterwards."""
    servers = []

    def start_one(*options, users=USERS):
        path = tmp_path / ("users%d" % len(servers))
        path.write_text(users)
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "mailproxy.authserver.app", "--users", str(path),
             "--listen", "127.0.0.1:%d" % port, "--access-log", os.devnull, *options])
        server = AuthServer(process, port)
        servers.append(server)

        def listening():
            assert process.poll() is None, "mailproxy-auth exited with %s" % process.returncode
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            except OSError:
                return False
            return True

        wait_for(listening, 20, "mailproxy-auth to listen")
        return server

    yield start_one
    for server in servers:
        server.session.close()
        server.process.terminate()
        server.process.wait(10)


def test_own_logins_between_guesses_do_not_reset_the_lockout(start):
    # Item 3: one address guesses alice's password 30 times and logs in to its own account after every
    # third guess. The fifth guess reaches the limit; the own logins never clear the address's count.
    server = start("--max-failures", "5")
    attacker = "192.0.2.66"
    guesses, own = [], []
    for n in range(1, 31):
        guesses.append(server.ask("alice@example.com", "guess-%d" % n, attacker))
        if n % 3 == 0:
            own.append(server.ask("mallory@example.com", "own-account", attacker))
    assert guesses == [INVALID] * 4 + [LOCKED] * 26
    assert own == ["OK"] + [LOCKED] * 9


def test_guesses_at_one_login_from_many_addresses_lock_that_login(start):
    server = start("--max-failures", "5")
    answers = [server.ask("alice@example.com", "guess", "198.51.100.%d" % n) for n in range(1, 8)]
    assert answers == [INVALID] * 4 + [LOCKED] * 3
    assert server.ask("Alice@example.com", "wonderland", "198.51.100.99") == LOCKED
    # The addresses themselves have failed once or twice each: still free to log in as someone else.
    assert server.ask("mallory@example.com", "own-account", "198.51.100.1") == "OK"


def test_addresses_of_one_ipv6_64_share_a_counter(start):
    # Item 4: one client holds a whole /64; a fresh address in it must not mean a fresh count.
    server = start("--max-failures", "4")
    answers = [server.ask("nobody%d@example.com" % n, "x", "2001:db8:1:2::%x" % n) for n in range(1, 5)]
    assert answers == [INVALID] * 3 + [LOCKED]
    assert server.ask("alice@example.com", "wonderland", "2001:db8:1:2:ffff::1") == LOCKED
    assert server.ask("alice@example.com", "wonderland", "2001:db8:1:3::1") == "OK"


def test_flood_from_fresh_networks_does_not_unlock_a_locked_address(start):
    # Item 4: the failure table used to be cleared when full, so enough failures from fresh addresses
    # unlocked everyone. Flood a small table with more /64 networks than it holds.
    bound = 100
    server = start("--max-failures", "3", "--max-tracked", str(bound))
    locked = "203.0.113.5"
    assert [server.ask("victim%d@example.com" % n, "x", locked) for n in range(3)] == [INVALID, INVALID, LOCKED]
    early = "203.0.113.6"
    assert [server.ask("early%d@example.com" % n, "x", early) for n in range(2)] == [INVALID, INVALID]
    flood = [server.ask("flood%d@example.com" % n, "x", "2001:db8:%x::1" % n) for n in range(2 * bound)]
    assert flood == [INVALID] * (2 * bound)
    assert server.ask("alice@example.com", "wonderland", locked) == LOCKED
    assert server.ask("alice@example.com", "wonderland", "203.0.113.7") == "OK"
    # The table is bounded: the early address's two failures, the oldest counters, were forgotten.
    assert server.ask("early2@example.com", "x", early) == INVALID


def _sha512_crypt(password, rounds):
    salt = base64.b64encode(os.urandom(12), b"./").decode()
    return _crypt(password.encode(), ("$6$rounds=%d$%s" % (rounds, salt)).encode()).decode()


def test_unknown_users_take_as_long_as_known_ones(start):
    # Item 5: an unknown login used to be refused at once, a known one only after its hash was checked.
    # Many rounds make the hash dominate the request's time, and show the decoy keeps the real cost.
    hashed = "{SHA512-CRYPT}" + _sha512_crypt("builder", 20000)
    users = (USERS + "user bob@example.com %s\nuser carol@example.com %s\nuser dave@example.com {BLF-CRYPT}%s\n"
             % (hashed, "{SHA512-CRYPT}" + _sha512_crypt("kitten", 20000),
                _crypt(b"puppy", b"$2b$04$" + base64.b64encode(os.urandom(16), b"./")[:22]).decode()))
    server = start("--max-failures", "100000", users=users)
    client = "192.0.2.80"
    for n in range(3):  # warm up: libcrypt loaded, connection open
        server.ask("bob@example.com", "warm-up", client)
        server.ask("warm-up%d@example.com" % n, "warm-up", client)

    def timed(user):
        started = time.perf_counter()
        assert server.ask(user, "wrong", client) == INVALID
        return time.perf_counter() - started

    known, unknown = [], []
    for n in range(60):  # alternated, so that the machine's load falls on both alike
        known.append(timed("bob@example.com"))
        unknown.append(timed("nobody%d@example.com" % n))
    known_median, unknown_median = statistics.median(known), statistics.median(unknown)
    print("median known %.2f ms, unknown %.2f ms" % (known_median * 1000, unknown_median * 1000))
    assert unknown_median >= 0.6 * known_median, (known_median, unknown_median)
    # An unknown login never passes, not even with the password of the user whose hash stands in for it.
    assert server.ask("nobody@example.com", "builder", client) == INVALID
    assert server.ask("bob@example.com", "builder", client) == "OK"
