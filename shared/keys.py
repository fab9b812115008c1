"""API keys: stored hashed in Redis, each mapping to an owner and a role.

Keys are 256-bit random tokens, so a plain SHA-256 is enough to store them (no password hashing
needed: there is nothing to brute-force), and a lookup is one Redis read. The gateway keeps valid keys'
principals in memory for :data:`KEY_CACHE_TTL_S` seconds: a key revoked through another process (the
CLI, another replica) stops working within that bound; through the same store, at once. Invalid keys
are not cached, so a new key works at once.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal

import redis
import redis.asyncio as aioredis

from shared.ids import now_iso

Role = Literal["user", "admin"]
ROLES: tuple[Role, ...] = ("user", "admin")
KEY_PREFIX = "fg:apikey:"
KEY_INDEX = "fg:apikeys"  # key id -> digest, for listing and revoking
KEY_CACHE_TTL_S = 5.0  # the gateway's bound on how long a revoked key keeps working
KEY_CACHE_MAX = 10_000  # entries; the cache starts over when full


@dataclass(frozen=True)
class Principal:
    """Who is calling: the owner of the key and its role."""

    key_id: str
    owner: str
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def _digest(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


class KeyStore:
    """Create and look up API keys."""

    def __init__(self, client: redis.Redis, cache_ttl_s: float = 0.0) -> None:
        self.redis = client
        self.cache_ttl_s = cache_ttl_s
        self._cache: dict[str, tuple[float, Principal]] = {}  # digest -> (valid until, principal)

    def create(self, owner: str, role: Role = "user") -> str:
        """A new key for ``owner``; the plaintext is returned once and never stored."""
        api_key = "fg_" + secrets.token_urlsafe(32)
        self._store(api_key, owner, role)
        return api_key

    def ensure(self, api_key: str, owner: str, role: Role) -> None:
        """Make ``api_key`` valid for ``owner`` with ``role`` (the bootstrap admin key)."""
        self._store(api_key, owner, role)

    def _store(self, api_key: str, owner: str, role: Role) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if not owner or len(owner) > 128:
            raise ValueError("owner must be 1 to 128 characters")
        digest = _digest(api_key)
        fields: dict[Any, Any] = {
            "key_id": "key_" + digest[:16],
            "owner": owner,
            "role": role,
            "created_at": now_iso(),
        }
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(KEY_PREFIX + digest, mapping=fields)
        pipe.hset(KEY_INDEX, fields["key_id"], digest)
        pipe.execute()

    def all_keys(self) -> list[dict[str, str]]:
        """Every key's id, owner, role, creation time and revocation (never the key itself)."""
        digests = self.redis.hgetall(KEY_INDEX)
        pipe = self.redis.pipeline(transaction=False)
        for digest in digests.values():
            pipe.hgetall(KEY_PREFIX + str(digest))
        keys = [dict(fields) for fields in pipe.execute() if fields]
        return sorted(keys, key=lambda key: (key.get("created_at", ""), key["key_id"]))

    def revoke(self, key_id: str) -> bool:
        """Revoke a key by its id; False when there is no such key."""
        digest = self.redis.hget(KEY_INDEX, key_id)
        if digest is None:
            return False
        self.redis.hset(KEY_PREFIX + str(digest), "revoked", now_iso())
        self._cache.pop(str(digest), None)
        return True

    def lookup(self, api_key: str) -> Principal | None:
        """The principal of a valid key, or None."""
        digest = _digest(api_key)
        cached = self._cached(digest)
        if cached is not None:
            return cached
        return self._remember(digest, self.redis.hgetall(KEY_PREFIX + digest))

    async def lookup_async(self, api_key: str, client: aioredis.Redis) -> Principal | None:
        """:meth:`lookup` on an asyncio client (the same Redis)."""
        digest = _digest(api_key)
        cached = self._cached(digest)
        if cached is not None:
            return cached
        return self._remember(digest, await client.hgetall(KEY_PREFIX + digest))

    def _cached(self, digest: str) -> Principal | None:
        entry = self._cache.get(digest)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def _remember(self, digest: str, fields: Any) -> Principal | None:
        principal = _principal(fields)
        if principal is not None and self.cache_ttl_s > 0:
            if len(self._cache) >= KEY_CACHE_MAX:
                self._cache.clear()
            self._cache[digest] = (time.monotonic() + self.cache_ttl_s, principal)
        return principal


def _principal(fields: Any) -> Principal | None:
    """The principal a key's stored fields grant, or None (missing, revoked, or an unknown role)."""
    if not fields:
        return None
    decoded: dict[str, str] = dict(fields)  # clients decode responses
    if decoded.get("revoked") or decoded.get("role") not in ROLES:
        return None
    role: Role = "admin" if decoded["role"] == "admin" else "user"
    return Principal(key_id=decoded["key_id"], owner=decoded["owner"], role=role)
