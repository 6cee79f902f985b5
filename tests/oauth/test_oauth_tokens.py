"""mailproxy-auth's token checks (tokens.py) and its auth_http answers for XOAUTH2/OAUTHBEARER."""

import base64
import json
import time

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from mailproxy.authserver.tokens import (Introspection, JwtVerifier, TokenChecker, TokenRefused,  # noqa: E402
                                         TokenUnavailable)

from support.oauthkit import SECRET, AuthProcess, IntrospectionEndpoint, free_port, issue


@pytest.fixture
def secret_file(tmp_path):
    path = tmp_path / "secret"
    path.write_bytes(SECRET + b"\n")
    return str(path)


def pem_pair(tmp_path, private):
    public = tmp_path / "public.pem"
    public.write_bytes(private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return str(public)


def test_hs256_claims_checked(secret_file):
    verifier = JwtVerifier(secret_file, ["HS256"], audience="mail", issuer="https://idp.test/")
    good = dict(aud="mail", iss="https://idp.test/")
    assert verifier.claims(issue(**good))["sub"] == "alice"
    for bad, why in [
        (issue(lifetime=-10, **good), "expired"),
        (issue(nbf=int(time.time()) + 600, **good), "not yet valid"),
        (issue(aud="other", iss="https://idp.test/"), "audience"),
        (issue(aud="mail", iss="https://evil.test/"), "issuer"),
        (issue(key=b"k" * 40, **good), "Signature"),
        (jwt.encode({"sub": "alice", "aud": "mail", "iss": "https://idp.test/"}, SECRET, "HS256"), "exp"),
        (issue(algorithm="HS512", **good), "alg"),
        ("not-a-jwt", ""),
    ]:
        with pytest.raises(TokenRefused, match="(?i)" + why):
            verifier.claims(bad)


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
def test_public_key_algorithms(tmp_path, algorithm):
    if algorithm == "RS256":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        private = ec.generate_private_key(ec.SECP256R1())
    public = pem_pair(tmp_path, private)
    verifier = JwtVerifier(public, ["RS256", "ES256"])  # the key picks the one it can verify
    assert verifier.algorithms == [algorithm]
    assert verifier.claims(issue(key=private, algorithm=algorithm))["sub"] == "alice"
    with pytest.raises(TokenRefused):
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        verifier.claims(issue(key=other, algorithm="RS256"))


def test_key_kind_fixes_the_algorithm_family(tmp_path, secret_file):
    public = pem_pair(tmp_path, rsa.generate_private_key(public_exponent=65537, key_size=2048))
    # HMAC keyed with the public key is the classic algorithm-confusion forgery: refused at startup.
    with pytest.raises(ValueError, match="HS"):
        JwtVerifier(public, ["RS256", "HS256"])
    with pytest.raises(ValueError, match="PEM"):
        JwtVerifier(secret_file, ["RS256"])
    with pytest.raises(ValueError, match="unknown"):
        JwtVerifier(secret_file, ["none"])


def test_introspection_active_cached_and_inactive():
    endpoint = IntrospectionEndpoint({"t1": {"sub": "alice", "exp": int(time.time()) + 600}})
    try:
        now = [100.0]
        checker = Introspection(endpoint.url, "mailproxy:s3cret", cache_seconds=30, clock=lambda: now[0])
        assert checker.claims("t1")["sub"] == "alice"
        assert checker.claims("t1")["sub"] == "alice"
        assert endpoint.asked == ["t1"]
        now[0] += 31
        checker.claims("t1")
        assert endpoint.asked == ["t1", "t1"]
        for _ in range(2):
            with pytest.raises(TokenRefused, match="not active"):
                checker.claims("t2")
        assert endpoint.asked == ["t1", "t1", "t2"]
        with pytest.raises(TokenUnavailable, match="401"):
            Introspection(endpoint.url, "mailproxy:wrong").claims("t1")
    finally:
        endpoint.close()
    with pytest.raises(TokenUnavailable):
        Introspection("http://127.0.0.1:%d/" % free_port(), timeout=2).claims("t1")


def test_checker_falls_back_and_needs_the_user_claim(secret_file):
    endpoint = IntrospectionEndpoint({"opaque": {"sub": "bob", "email": "bob@example.test"}})
    try:
        both = TokenChecker([JwtVerifier(secret_file, ["HS256"]),
                             Introspection(endpoint.url, "mailproxy:s3cret")], user_claim="email")
        assert both.user("opaque") == "bob@example.test"
        assert both.user(issue(email="alice@example.test")) == "alice@example.test"
        with pytest.raises(TokenRefused, match="no 'email' claim"):
            both.user(issue())
        with pytest.raises(TokenRefused):
            both.user("")
    finally:
        endpoint.close()


# -- mailproxy-auth as a process ----------------------------------------------------------------------

USERS = """backend imap 127.0.0.1:1143
backend smtp 127.0.0.1:1025
user alice {PLAIN}wonderland
user bob {SHA512-CRYPT}$6$eSQ6SLecl.z80b96$0NwdVuNF/TNopjYvdQxk6Jv7bMZU5ta6On9eMK0QmsD5iLela..LhNGHwtfkE6L.1lT5g7Xz5361.k6vYWjiU.
"""


@pytest.fixture(scope="module")
def auth():
    server = AuthProcess(USERS, "--wait", "2", "--max-failures", "3", "--jwt-key", "{secret}")
    yield server
    server.stop()


def ask(server, user, token, method="xoauth2", client="192.0.2.1"):
    reply = requests.get(server.url, timeout=5, headers={
        "Auth-Method": method, "Auth-User": user, "Auth-Pass": token, "Auth-Protocol": "imap",
        "Auth-Login-Attempt": "1", "Client-IP": client})
    return {k: v for k, v in reply.headers.items() if k.startswith("Auth-")}


@pytest.mark.process
def test_ok_maps_user_and_password(auth):
    assert ask(auth, "alice", issue()) == {
        "Auth-Status": "OK", "Auth-Server": "127.0.0.1", "Auth-Port": "1143", "Auth-User": "alice",
        "Auth-Pass": "wonderland"}
    assert ask(auth, "", issue(), method="oauthbearer")["Auth-User"] == "alice"  # `user=` may be empty
    # A hashed user: no clear text to give, so the token goes to the backend as the password.
    reply = ask(auth, "bob", issue(sub="bob"))
    assert reply["Auth-User"] == "bob" and "Auth-Pass" not in reply


@pytest.mark.process
def test_refused_with_sasl_error_then_locked(auth):
    refused = ask(auth, "alice", issue(lifetime=-5), client="198.51.100.1")
    assert refused == {"Auth-Status": "invalid token", "Auth-Wait": "2",
                       "Auth-Error-SASL": "eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIn0="}
    assert json.loads(base64.b64decode(refused["Auth-Error-SASL"])) == {"status": "401", "schemes": "bearer"}
    assert ask(auth, "bob", issue(), client="198.51.100.1")["Auth-Status"] == "invalid token"  # not bob's
    assert "Auth-Wait" not in ask(auth, "alice", issue(), client="198.51.100.1")  # third failure: locked
    assert 'result="invalid token: jwt: Signature has expired"' in auth.log()
    assert issue(lifetime=-5) not in auth.log()


@pytest.mark.process
def test_passwords_unchanged_for_other_methods(auth):
    assert ask(auth, "alice", "wonderland", method="plain")["Auth-Status"] == "OK"
    assert ask(auth, "alice", issue(), method="plain", client="192.0.2.50")["Auth-Status"] != "OK"


@pytest.mark.process
def test_bad_key_option_stops_startup(tmp_path):
    with pytest.raises(RuntimeError, match="not a PEM public key"):
        AuthProcess(USERS, "--jwt-key", "{secret}", "--jwt-algorithms", "RS256")
