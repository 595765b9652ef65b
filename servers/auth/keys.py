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
            # O_EXCL: two processes starting at once must not both write a key.
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "wb") as f:
                    f.write(pem)
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise SystemExit(f"agentmesh: {path} is not an EC private key")
        return cls(loaded)

    def jwks(self) -> dict[str, Any]:
        return {"keys": [dict(self._jwk)]}

    def write_jwks(self, path: Path) -> None:
        """Publishes the JWKS atomically, for Envoy to read at start."""
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.jwks()))
        tmp.replace(path)
