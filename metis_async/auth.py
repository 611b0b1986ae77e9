"""Learner credentials: HMAC-signed tokens with an expiry, revocations, and mTLS identities.

A token binds a learner id to an expiry time, signed with the controller's secret:

    mat1.<learner id, base64url>.<expiry, unix seconds>.<HMAC-SHA256 of the first three, b64url>

`metis-async keys learner-token ID --secret FILE` issues one. The controller checks it in the
hello, before any session exists: the signature in constant time (`hmac.compare_digest`), then
the id it names against `Hello.learner_id` (nobody can join as another learner, or displace
it), then the expiry and the revocation list (learner ids; reloaded on SIGHUP). A wrong or
expired token gives UNAUTHENTICATED; a revoked learner, or a token or certificate for another
learner id, PERMISSION_DENIED. With mutual TLS the certificate's common name is the learner's
identity and must equal `Hello.learner_id` as well. Tokens and secrets never reach the logs.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "mat1"
SECRET_BYTES = 32


class AuthError(Exception):
    """A credential was refused; `denied` tells PERMISSION_DENIED from UNAUTHENTICATED."""

    def __init__(self, message: str, denied: bool = False) -> None:
        super().__init__(message)
        self.denied = denied


def new_secret() -> bytes:
    """A fresh signing secret (32 random bytes)."""
    return secrets.token_bytes(SECRET_BYTES)


def read_secret(path: str | Path) -> bytes:
    """The signing secret in `path` (hex, as `keys token-secret` writes it)."""
    text = Path(path).read_text(encoding="ascii").strip()
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"{path}: the token secret must be hex") from None
    if len(secret) < 16:
        raise ValueError(f"{path}: the token secret must have at least 16 bytes")
    return secret


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _signature(secret: bytes, message: str) -> str:
    return _b64(hmac.new(secret, message.encode(), hashlib.sha256).digest())


def issue_token(secret: bytes, learner_id: str, valid_seconds: float) -> str:
    """A token for `learner_id` valid for `valid_seconds` from now."""
    if not learner_id:
        raise ValueError("a token needs a learner id")
    expiry = int(time.time() + valid_seconds)
    message = f"{PREFIX}.{_b64(learner_id.encode())}.{expiry}"
    return f"{message}.{_signature(secret, message)}"


@dataclass
class TokenVerifier:
    """Checks learner tokens (see the module docstring).

    Args:
        secret: the signing secret; None accepts no signed token.
        static: learner id -> fixed token (the older `tokens_file`); checked in constant time.
        revoked: learner ids refused whatever their credential.
    """

    secret: bytes | None = field(default=None, repr=False)
    static: Mapping[str, str] = field(default_factory=dict, repr=False)
    revoked: frozenset[str] = frozenset()

    def check(self, learner_id: str, token: str, now: float | None = None) -> None:
        """Raise `AuthError` unless `token` lets `learner_id` join now."""
        if token.startswith(PREFIX + ".") and self.secret is not None:
            self._check_signed(learner_id, token, time.time() if now is None else now)
        else:
            expected = self.static.get(learner_id, "")
            # Constant time whatever the token; an unknown id compares against "" and fails.
            if not (expected and hmac.compare_digest(expected.encode(), token.encode())):
                raise AuthError("invalid token")
        if learner_id in self.revoked:
            raise AuthError("this learner's credentials are revoked", denied=True)

    def _check_signed(self, learner_id: str, token: str, now: float) -> None:
        assert self.secret is not None
        parts = token.split(".")
        if len(parts) != 4:
            raise AuthError("malformed token")
        message = ".".join(parts[:3])
        if not hmac.compare_digest(_signature(self.secret, message), parts[3]):
            raise AuthError("invalid token")
        try:
            named = _unb64(parts[1]).decode()
            expiry = int(parts[2])
        except (ValueError, UnicodeDecodeError):
            raise AuthError("malformed token") from None
        if not hmac.compare_digest(named.encode(), learner_id.encode()):
            raise AuthError("the token is for another learner id", denied=True)
        if expiry < now:
            raise AuthError("the token has expired")


def read_revoked(path: str | Path) -> frozenset[str]:
    """Revoked learner ids: one per line; blank lines and `#` comments are skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return frozenset(line.strip() for line in lines if line.strip() and not line.startswith("#"))
