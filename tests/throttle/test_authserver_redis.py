"""mailproxy-auth --redis: two auth server processes sharing a real redis-server enforce one limit,
per client address, per IPv6 /64 and per login."""

import importlib.util
import subprocess
import sys

import pytest
import requests

from support.harness import free_port, wait_listening
from support.throttlekit import require

USERS = ("backend imap 127.0.0.1:1143\nuser alice@example.com {PLAIN}wonderland\n"
         "user mallory@example.com {PLAIN}own-account\n")
LOCKED = "Too many invalid logins, try again later"
INVALID = "Invalid login or password"


@pytest.fixture
def auth_pair(tmp_path, redis_url):
    # mailproxy-auth imports the client only with --redis; the test only needs to know it is there.
    require("the redis Python client", importlib.util.find_spec("redis") is not None)
    users = tmp_path / "users"
    users.write_text(USERS)
    processes, urls = [], []
    try:
        for _ in range(2):
            port = free_port()
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "mailproxy.authserver.app", "--users", str(users),
                 "--listen", "127.0.0.1:%d" % port, "--max-failures", "4", "--lockout", "60",
                 "--redis", redis_url, "--access-log", str(tmp_path / ("access%d.log" % port))]))
            wait_listening(port, processes[-1], "mailproxy-auth")
            urls.append("http://127.0.0.1:%d/auth" % port)
        yield urls
    finally:
        for process in processes:
            process.terminate()
            process.wait(10)


def ask(url, user, password, client):
    headers = {"Auth-Method": "plain", "Auth-User": user, "Auth-Pass": password, "Auth-Protocol": "imap",
               "Auth-Login-Attempt": "1", "Client-IP": client}
    return requests.get(url, headers=headers, timeout=5).headers.get("Auth-Status")


def test_two_auth_servers_share_one_limit_per_address(auth_pair):
    first, second = auth_pair
    for url in (first, second, first):
        assert ask(url, "nobody@example.com", "x", "192.0.2.7") == INVALID
    # The fourth failure, counted on the other process, reaches the limit of four.
    assert ask(second, "someone@example.com", "x", "192.0.2.7") == LOCKED
    assert ask(first, "alice@example.com", "wonderland", "192.0.2.7") == LOCKED
    # Another address is untouched.
    assert ask(second, "alice@example.com", "wonderland", "192.0.2.8") == "OK"


def test_two_auth_servers_share_one_limit_per_login(auth_pair):
    first, second = auth_pair
    for n, url in enumerate((first, second, first)):
        assert ask(url, "alice@example.com", "wrong", "198.51.100.%d" % n) == INVALID
    assert ask(second, "Alice@example.com", "wrong", "198.51.100.9") == LOCKED
    assert ask(first, "alice@example.com", "wonderland", "198.51.100.10") == LOCKED


def test_own_logins_between_guesses_do_not_reset_the_address(auth_pair):
    # Issue 25 item 3 against the Redis store (limit four): guesses at alice, alternating between the servers,
    # with a login to the attacker's own account after every third. Alice's login counter locks her
    # guesses either way; what the own logins must not do is clear the address's count.
    attacker = "192.0.2.66"
    guesses, own = [], []
    for n in range(1, 31):
        guesses.append(ask(auth_pair[n % 2], "alice@example.com", "guess-%d" % n, attacker))
        if n % 3 == 0:
            own.append(ask(auth_pair[n // 3 % 2], "mallory@example.com", "own-account", attacker))
    assert guesses == [INVALID] * 3 + [LOCKED] * 27
    assert own == ["OK"] + [LOCKED] * 9


def test_addresses_of_one_ipv6_64_share_a_counter(auth_pair):
    first, second = auth_pair
    for n, url in enumerate((first, second, first), 1):
        assert ask(url, "nobody%d@example.com" % n, "x", "2001:db8:1:2::%x" % n) == INVALID
    assert ask(second, "nobody4@example.com", "x", "2001:db8:1:2::4") == LOCKED
    assert ask(first, "alice@example.com", "wonderland", "2001:db8:1:2:ffff::1") == LOCKED
    assert ask(second, "alice@example.com", "wonderland", "2001:db8:1:3::1") == "OK"
