"""Signed, expiring tokens for the ``GET /v1/files/{token}`` route of ``file://`` storage.

A token is ``base64url(json{"k": key, "e": expiry}) + "." + base64url(HMAC-SHA256)``. Like a presigned
S3 URL, it works for whoever holds it until it expires.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time

import redis

SECRET_KEY = "fg:secret:files"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_file_token(key: str, expires_at: int, secret: bytes) -> str:
    """A token granting a download of ``key`` until ``expires_at`` (Unix seconds)."""
    payload = _b64(json.dumps({"k": key, "e": expires_at}, separators=(",", ":")).encode())
    signature = hmac.new(secret, payload.encode(), hashlib.sha256).digest()
    return f"{payload}.{_b64(signature)}"


def verify_file_token(token: str, secret: bytes, now: float | None = None) -> str | None:
    """The storage key a valid, unexpired token grants, else None."""
    payload, _, signature = token.partition(".")
    try:
        expected = hmac.new(secret, payload.encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(expected, _unb64(signature)):
            return None
        claims = json.loads(_unb64(payload))
        key, expires_at = claims["k"], int(claims["e"])
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(key, str) or expires_at < (time.time() if now is None else now):
        return None
    return key


def file_signing_secret(configured: str | None, client: redis.Redis) -> bytes:
    """The configured key, or one random key created once in Redis and shared by every replica."""
    if configured:
        return configured.encode()
    client.set(SECRET_KEY, secrets.token_hex(32), nx=True)
    stored = client.get(SECRET_KEY)
    assert stored is not None
    return stored if isinstance(stored, bytes) else str(stored).encode()
