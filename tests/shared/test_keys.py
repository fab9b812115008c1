"""The gateway's API-key cache: revocation takes effect within its TTL, at once through the same store."""

from __future__ import annotations

import asyncio
import time

import redis
import redis.asyncio as aioredis

from shared.keys import KeyStore
from tests.conftest import unit_redis_url


def test_a_key_revoked_elsewhere_stops_working_within_the_cache_ttl(redis_client: redis.Redis) -> None:
    gateway, cli = KeyStore(redis_client, cache_ttl_s=0.3), KeyStore(redis_client)
    api_key = cli.create("alice")
    principal = gateway.lookup(api_key)
    assert principal is not None and principal.owner == "alice"
    assert cli.revoke(principal.key_id)
    assert gateway.lookup(api_key) == principal  # cached: still valid for at most the TTL
    time.sleep(0.35)
    assert gateway.lookup(api_key) is None


def test_a_key_revoked_through_the_gateway_stops_working_at_once(redis_client: redis.Redis) -> None:
    gateway = KeyStore(redis_client, cache_ttl_s=60)
    api_key = gateway.create("alice")
    principal = gateway.lookup(api_key)
    assert principal is not None and gateway.revoke(principal.key_id)
    assert gateway.lookup(api_key) is None


def test_a_key_created_after_a_failed_lookup_works_at_once(redis_client: redis.Redis) -> None:
    gateway = KeyStore(redis_client, cache_ttl_s=60)
    assert gateway.lookup("fg_not-yet") is None
    gateway.ensure("fg_not-yet", "alice", "user")
    assert gateway.lookup("fg_not-yet") is not None


def test_the_async_lookup_shares_the_cache_and_honours_revocation(redis_client: redis.Redis) -> None:
    gateway, cli = KeyStore(redis_client, cache_ttl_s=0.3), KeyStore(redis_client)
    api_key = cli.create("bob")

    async def lookups() -> list[object]:
        client = aioredis.Redis.from_url(unit_redis_url(), decode_responses=True)
        first = await gateway.lookup_async(api_key, client)
        assert first is not None and cli.revoke(first.key_id)
        cached = await gateway.lookup_async(api_key, client)
        await asyncio.sleep(0.35)
        expired = await gateway.lookup_async(api_key, client)
        await client.aclose()
        return [first, cached, expired]

    first, cached, expired = asyncio.run(lookups())
    assert cached == first and expired is None
