"""The access-token signing key: ES256 (P-256), created on first start in the data directory.

The private key never leaves `<data_dir>/keys/`; its public half is published as a JWKS, served by
AuthService.GetJwks and written to `<data_dir>/jwks.json` for Envoy's jwt_authn filter.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

KEY_FILE = "signing-key.pem"


def _thumbprint(jwk: dict[str, str]) -> str:
    """RFC 7638 thumbprint of an EC public key: a stable, content-derived key id."""
    canonical = json.dumps({k: jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def write_once(path: Path, data: bytes) -> None:
    """Creates ``path`` (mode 0600) with ``data`` unless it exists. Written whole to a file of
    this process's own, then linked into place: processes starting at once (replicas) must
    not both write it, nor read it half written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


class SigningKey:
    """The current signing key with its `kid`."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey) -> None:
        self.private_key = private_key
        public = json.loads(ECAlgorithm.to_jwk(private_key.public_key()))
        self.kid = _thumbprint(public)
        self._jwk = {**public, "kid": self.kid, "use": "sig", "alg": "ES256"}

    @classmethod
    def load_or_create(cls, data_dir: Path) -> SigningKey:
        """Loads `<data_dir>/keys/signing-key.pem`, creating it (mode 0600) on first start."""
        key_dir = data_dir / "keys"
        key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = key_dir / KEY_FILE
        if not path.exists():
            pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            write_once(path, pem)
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise SystemExit(f"agentmesh: {path} is not an EC private key")
        return cls(loaded)

    def jwks(self) -> dict[str, Any]:
        return {"keys": [dict(self._jwk)]}

    def write_jwks(self, path: Path) -> None:
        """Publishes the JWKS atomically, for Envoy to read at start. The temporary file is the
        process's own: replicas starting together each publish the same keys."""
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.jwks()))
        tmp.replace(path)
