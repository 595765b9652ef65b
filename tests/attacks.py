"""Forged and unacceptable access tokens, each with the reason a server must answer it with."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

ISSUER = AUDIENCE = "agentmesh"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _hs256(claims: dict[str, object], secret: bytes, kid: str) -> str:
    """Signs by hand: PyJWT rightly refuses to use a PEM public key as an HMAC secret."""
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    body = _b64(json.dumps(claims).encode())
    mac = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(mac)}"


def _unsigned(claims: dict[str, object], kid: str) -> str:
    """An `alg: none` token: claims with an empty signature."""
    head = _b64(json.dumps({"alg": "none", "typ": "JWT", "kid": kid}).encode())
    return f"{head}.{_b64(json.dumps(claims).encode())}."


def sign(key: ec.EllipticCurvePrivateKey, kid: str, **overrides: object) -> str:
    """A well-formed access token for subject u1, with some claims overridden."""
    now = int(time.time())
    claims = {
        "sub": "u1",
        "username": "u",
        "roles": ["user"],
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 600,
        "jti": "j",
        "typ": "access",
        **overrides,
    }
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid})


def forged_tokens(key: ec.EllipticCurvePrivateKey, kid: str) -> dict[str, tuple[str, str]]:
    """name -> (token, expected ErrorInfo reason); `key` is the mesh's real signing key."""
    other = ec.generate_private_key(ec.SECP256R1())
    now = int(time.time())
    head, body, sig = sign(key, kid).split(".")
    tampered_sig = sig[:-4] + ("AAAA" if not sig.endswith("AAAA") else "BBBB")
    claims = {
        "sub": "u1",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 60,
        "jti": "j",
        "typ": "access",
        "roles": ["admin"],
    }
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    forged_claims = _b64(json.dumps({**claims, "sub": "someone-else"}).encode())
    return {
        "alg none": (_unsigned(claims, kid), "AUTH_REQUIRED"),
        # The classic key-confusion attack: HMAC keyed with the (public) verification key.
        "HS256 with the public key": (_hs256(claims, public_pem, kid), "AUTH_REQUIRED"),
        "foreign kid": (sign(other, "someone-elses-key"), "AUTH_REQUIRED"),
        "right kid, other key": (sign(other, kid), "AUTH_REQUIRED"),
        "expired": (sign(key, kid, iat=now - 7200, exp=now - 3600), "TOKEN_EXPIRED"),
        "not yet valid": (sign(key, kid, nbf=now + 3600), "AUTH_REQUIRED"),
        "wrong audience": (sign(key, kid, aud="elsewhere"), "AUTH_REQUIRED"),
        "wrong issuer": (sign(key, kid, iss="evil"), "AUTH_REQUIRED"),
        "tampered signature": (f"{head}.{body}.{tampered_sig}", "AUTH_REQUIRED"),
        "swapped claims": (f"{head}.{forged_claims}.{sig}", "AUTH_REQUIRED"),
        "refresh-type token": (sign(key, kid, typ="refresh"), "AUTH_REQUIRED"),
        "garbage": ("not-a-jwt", "AUTH_REQUIRED"),
    }
