"""The App's private key, wrapped so it can sign but never be printed or logged."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from app.config import ConfigError, Settings


class PrivateKey:
    """Signs App JWTs. ``repr``/``str`` show only the fingerprint GitHub displays."""

    __slots__ = ("_key", "fingerprint")

    def __init__(self, pem: str, *, source: str = "the private key") -> None:
        try:
            key = serialization.load_pem_private_key(pem.encode(), password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError([f"{source}: not a PEM private key ({_reason(exc)})"]) from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ConfigError([f"{source}: GitHub App keys are RSA; this is not one"])
        self._key = key
        public = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        digest = base64.b64encode(hashlib.sha256(public).digest()).decode()
        self.fingerprint = f"SHA256:{digest}"

    def sign(self, claims: dict[str, Any]) -> str:
        return jwt.encode(claims, self._key, algorithm="RS256")

    def __repr__(self) -> str:
        return f"PrivateKey({self.fingerprint})"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("the App private key cannot be pickled")


def load_private_key(settings: Settings) -> PrivateKey | None:
    """The configured key, or None when none is set. A malformed key is a start-up error."""
    if settings.github_private_key is None:
        return None
    return PrivateKey(settings.github_private_key.reveal(), source="GITHUB_PRIVATE_KEY(_PATH)")


def _reason(exc: Exception) -> str:
    # cryptography's messages can be long and never contain key material; keep the first line.
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
