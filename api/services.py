"""The gateway's long-lived clients, built once per app from the settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import redis
import redis.asyncio as aioredis
from celery import Celery

from shared.jobstore import JobStore
from shared.keys import KEY_CACHE_TTL_S, KeyStore
from shared.queue import create_celery
from shared.redis_client import connect
from shared.settings import Settings
from shared.signing import file_signing_secret
from shared.storage import Storage, open_storage

# Above the longest XREAD BLOCK the gateway issues (api.sse.MAX_BLOCK_S, 5 s), so a blocked read is not
# mistaken for a dead connection.
ASYNC_SOCKET_TIMEOUT_S = 15.0


@dataclass
class Services:
    """Clients shared by every request: Redis, the job and key stores, storage, the Celery producer."""

    settings: Settings
    redis: redis.Redis = field(init=False)
    store: JobStore = field(init=False)
    keys: KeyStore = field(init=False)
    celery: Celery = field(init=False)

    def __post_init__(self) -> None:
        # redis-py connects lazily, so building these needs no live Redis.
        self.redis = connect(self.settings.redis_url)
        self.store = JobStore(self.redis)
        self.keys = KeyStore(self.redis, cache_ttl_s=KEY_CACHE_TTL_S)
        self.celery = create_celery(self.settings)

    @cached_property
    def storage(self) -> Storage:
        """Built on first use: local storage signs links with a key that may live in Redis."""
        secret = file_signing_secret(self.settings.file_signing_key, self.redis)
        return open_storage(
            self.settings.storage_url, self.settings.public_base_url, secret, self.settings.s3_endpoint_url
        )

    @cached_property
    def redis_async(self) -> aioredis.Redis:
        """An asyncio client on the same Redis, for waits that must not hold a thread (SSE's XREAD BLOCK).

        Built on first use, inside the serving event loop, which its connections belong to.
        """
        return aioredis.Redis.from_url(
            self.settings.redis_url,
            decode_responses=True,
            socket_timeout=ASYNC_SOCKET_TIMEOUT_S,
            socket_connect_timeout=2,
            health_check_interval=30,
        )

    def close(self) -> None:
        self.redis.close()

    async def aclose(self) -> None:
        """Close every client; the asyncio one is closed on its own event loop, hence async (the lifespan)."""
        if "redis_async" in self.__dict__:
            await self.__dict__.pop("redis_async").aclose()
        self.close()
