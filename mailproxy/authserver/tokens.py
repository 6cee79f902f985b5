"""OAuth 2.0 bearer tokens for mailproxy-auth: who does this token speak for?

Two sources of truth, either or both:

- a JWT signed with a key we hold (an HS256 secret, or the issuer's RS256/ES256 public key in PEM):
  the signature, `exp`, `nbf` and, when configured, `aud` and `iss` are checked by PyJWT;
- RFC 7662 token introspection: the token is POSTed to the authorization server, which answers
  `{"active": true, "sub": ...}`. Answers are cached for a short time, so a client that logs in to
  IMAP and SMTP at once costs one round trip, not two.

The result is the token's user: the value of a claim (`sub` by default, `email` is common), which the
app then looks up in the users file.
"""

import hashlib
import time

import jwt
import requests

SYMMETRIC = ("HS256", "HS384", "HS512")
ASYMMETRIC = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")


class TokenRefused(Exception):
    """The token does not prove anything: bad signature, expired, inactive, no user claim."""


class TokenUnavailable(Exception):
    """The token could not be judged now (introspection endpoint down): try again later."""


class JwtVerifier:
    def __init__(self, key_path, algorithms, audience=None, issuer=None, leeway=0):
        with open(key_path, "rb") as source:
            key = source.read()
        algorithms = tuple(algorithms)
        unknown = [name for name in algorithms if name not in SYMMETRIC + ASYMMETRIC]
        if unknown or not algorithms:
            raise ValueError("unknown JWT algorithm %s (use %s)" % (",".join(unknown) or '""', ", ".join(SYMMETRIC + ASYMMETRIC)))
        pem = key.lstrip().startswith(b"-----BEGIN")
        # One key for both families would let a token signed with HMAC over the *public* key pass as
        # RS256's peer (algorithm confusion), so the key's kind fixes which algorithms may be used.
        if pem and any(name in SYMMETRIC for name in algorithms):
            raise ValueError("%s is a PEM key: HS* algorithms need a shared secret file instead" % key_path)
        if not pem and any(name in ASYMMETRIC for name in algorithms):
            raise ValueError("%s is not a PEM public key, which %s need" % (key_path, ",".join(algorithms)))
        if pem:
            self.key = key
            usable = []
            for name in algorithms:
                try:
                    algorithm = jwt.get_algorithm_by_name(name)
                except NotImplementedError:
                    raise ValueError("%s needs the cryptography package (pip install 'mailproxy[oauth]')" % name)
                try:
                    algorithm.prepare_key(key)
                    usable.append(name)
                except (jwt.PyJWTError, ValueError):
                    continue  # an RSA key next to ES256 in the list: that algorithm can never verify
            if not usable:
                raise ValueError("%s is not a public key for %s" % (key_path, ",".join(algorithms)))
            algorithms = tuple(usable)
        else:
            # Editors and `echo` add a final newline that was never part of the secret.
            self.key = key.rstrip(b"\r\n")
            if not self.key:
                raise ValueError("%s is empty" % key_path)
        self.algorithms = list(algorithms)
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway

    def claims(self, token: str) -> dict:
        try:
            return jwt.decode(
                token,
                self.key,
                algorithms=self.algorithms,
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": ["exp"]},
            )
        except jwt.PyJWTError as exc:
            raise TokenRefused("jwt: %s" % exc) from exc


class Introspection:
    """RFC 7662 client: POST token=..., expect a JSON object with active=true."""

    def __init__(self, url, auth=None, cache_seconds=60.0, timeout=5.0, clock=time.monotonic, session=None):
        self.url = url
        self.auth = tuple(auth.split(":", 1)) if auth else None
        self.cache_seconds = cache_seconds
        self.timeout = timeout
        self.clock = clock
        self.session = session or requests.Session()
        self.cache = {}  # sha256(token) -> (claims or None, valid until)

    def claims(self, token: str) -> dict:
        key = hashlib.sha256(token.encode("latin-1")).digest()  # the cache keeps no usable token
        now = self.clock()
        hit = self.cache.get(key)
        if hit is not None and hit[1] > now:
            if hit[0] is None:
                raise TokenRefused("introspection: token not active (cached)")
            return hit[0]
        claims = self._ask(token)
        active = claims.get("active") is True
        until = now + self.cache_seconds
        if active and isinstance(claims.get("exp"), (int, float)):
            # Never serve a token from the cache past its own expiry.
            until = min(until, now + claims["exp"] - time.time())
        if len(self.cache) >= 10000:  # bounded: a flood of random tokens must not grow memory
            self.cache.clear()
        self.cache[key] = (claims if active else None, until)
        if not active:
            raise TokenRefused("introspection: token not active")
        if until <= now:
            raise TokenRefused("introspection: token expired")
        return claims

    def _ask(self, token):
        try:
            reply = self.session.post(
                self.url,
                data={"token": token, "token_type_hint": "access_token"},
                auth=self.auth,
                headers={"Accept": "application/json"},
                timeout=self.timeout,
            )
            reply.raise_for_status()
            claims = reply.json()
        except (requests.RequestException, ValueError) as exc:
            raise TokenUnavailable("introspection: %s" % exc) from exc
        if not isinstance(claims, dict):
            raise TokenUnavailable("introspection: reply is not a JSON object")
        return claims


class TokenChecker:
    """The configured verifiers, in order: a JWT first, then introspection for anything it refuses."""

    def __init__(self, verifiers, user_claim="sub"):
        self.verifiers = list(verifiers)
        self.user_claim = user_claim

    def user(self, token: str) -> str:
        """The user the token speaks for; raises TokenRefused or TokenUnavailable."""
        if not token:
            raise TokenRefused("empty token")
        refusals, unavailable = [], None
        for verifier in self.verifiers:
            try:
                claims = verifier.claims(token)
            except TokenRefused as exc:
                refusals.append(str(exc))
                continue
            except TokenUnavailable as exc:
                unavailable = exc
                continue
            user = claims.get(self.user_claim)
            if not isinstance(user, str) or not user:
                refusals.append("no %r claim" % self.user_claim)
                continue
            return user
        if unavailable is not None:
            raise unavailable
        raise TokenRefused("; ".join(refusals))


def from_arguments(args):
    """A TokenChecker from mailproxy-auth's command line, or None when no token option is given."""
    verifiers = []
    if args.jwt_key:
        algorithms = [name.strip() for name in args.jwt_algorithms.split(",") if name.strip()]
        verifiers.append(JwtVerifier(args.jwt_key, algorithms, args.jwt_audience, args.jwt_issuer, args.jwt_leeway))
    if args.introspection_url:
        verifiers.append(Introspection(args.introspection_url, args.introspection_auth, args.introspection_cache))
    return TokenChecker(verifiers, args.jwt_user_claim) if verifiers else None
