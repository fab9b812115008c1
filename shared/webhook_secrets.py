"""Per-owner webhook signing secrets (Standard Webhooks ``whsec_…``), with rotation.

``fg:whsec:{owner}`` is a hash: ``current`` and ``created_at``, and after a rotation ``previous`` and
``previous_valid_until`` (epoch seconds). While the previous secret is valid, deliveries carry one
signature per secret, so a receiver can switch to the new one at its own pace. A second rotation
inside the window retires the oldest secret at once: at most two secrets sign a delivery.

The secrets are stored in plain text: signing needs the key itself (an HMAC), not a hash of it.
"""

from __future__ import annotations

import base64
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis

from shared.ids import iso

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32  # Standard Webhooks asks for 24 to 64 random bytes

# KEYS[1] the owner's hash. ARGV: 1 new secret, 2 now, 3 overlap seconds.
# The current secret (if any) becomes the previous one, valid until now + overlap.
ROTATE = """
local current = redis.call('HGET', KEYS[1], 'current')
redis.call('HSET', KEYS[1], 'current', ARGV[1], 'created_at', ARGV[2])
if current then
  local valid_until = tonumber(ARGV[2]) + tonumber(ARGV[3])
  redis.call('HSET', KEYS[1], 'previous', current, 'previous_valid_until', valid_until)
else
  redis.call('HDEL', KEYS[1], 'previous', 'previous_valid_until')
end
return current or ''
"""


def secret_key(owner: str) -> str:
    return f"fg:whsec:{owner}"


def new_secret() -> str:
    """A fresh ``whsec_`` secret: the prefix and the base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii")


def secret_bytes(secret: str) -> bytes:
    """The HMAC key of a ``whsec_`` secret: the base64-decoded part after the prefix."""
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


@dataclass(frozen=True)
class Rotation:
    """The outcome of a rotation: the new secret, and until when the one it replaced still signs."""

    key: str
    previous_valid_until: str | None


class WebhookSecrets:
    """The webhook secrets of every owner, in Redis."""

    def __init__(self, client: redis.Redis, overlap_s: float, clock: Callable[[], float] = time.time) -> None:
        self.redis = client
        self.overlap_s = overlap_s
        self.clock = clock
        self._rotate = client.register_script(ROTATE)

    def current(self, owner: str) -> str:
        """The owner's current secret, created on first use (atomically: concurrent callers agree)."""
        key = secret_key(owner)
        self.redis.hsetnx(key, "current", new_secret())
        self.redis.hsetnx(key, "created_at", str(self.clock()))
        return _text(self.redis.hget(key, "current"))

    def rotate(self, owner: str) -> Rotation:
        """Issue a new current secret; the replaced one keeps signing for ``overlap_s`` seconds."""
        now = self.clock()
        secret = new_secret()
        replaced = _text(
            self._rotate(keys=[secret_key(owner)], args=[secret, repr(now), repr(self.overlap_s)])
        )
        until = iso(datetime.fromtimestamp(now + self.overlap_s, UTC)) if replaced else None
        return Rotation(key=secret, previous_valid_until=until)

    def signing_secrets(self, owner: str) -> list[str]:
        """The secrets that sign the owner's deliveries now: the current one first, then a previous one
        still inside its overlap window."""
        current = self.current(owner)
        fields: dict[Any, Any] = self.redis.hgetall(secret_key(owner))
        previous = _text(fields.get("previous") or "")
        valid_until = float(_text(fields.get("previous_valid_until") or "0"))
        if previous and previous != current and self.clock() < valid_until:
            return [current, previous]
        return [current]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")
