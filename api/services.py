"""The gateway's long-lived clients, built once per app from the settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import redis
from celery import Celery

from shared.jobstore import JobStore
from shared.keys import KeyStore
from shared.queue import create_celery
from shared.redis_client import connect
from shared.settings import Settings
from shared.signing import file_signing_secret
from shared.storage import Storage, open_storage


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
        self.keys = KeyStore(self.redis)
        self.celery = create_celery(self.settings)

    @cached_property
    def storage(self) -> Storage:
        """Built on first use: local storage signs links with a key that may live in Redis."""
        secret = file_signing_secret(self.settings.file_signing_key, self.redis)
        return open_storage(
            self.settings.storage_url, self.settings.public_base_url, secret, self.settings.s3_endpoint_url
        )

    def close(self) -> None:
        self.redis.close()
