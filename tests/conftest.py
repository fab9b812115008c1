"""Shared fixtures: a real Redis database that each test starts empty, settings built for it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from shared.redis_client import connect
from shared.settings import ModelConfig, ModelDefaults, Settings, load_settings

# Tests own this database of the local Redis and flush it; `make test` starts Redis if none answers.
TEST_REDIS_URL = os.environ.get("FLUXGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    client = connect(TEST_REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def make_settings(tmp_path: Path, **overrides: object) -> Settings:
    """Settings for tests: the test Redis, storage under tmp_path, a small tiny-model config."""
    values: dict[str, object] = {
        "redis_url": TEST_REDIS_URL,
        "data_dir": str(tmp_path / "data"),
        "public_base_url": "http://testserver",
        "file_signing_key": "test-signing-key",
        # Webhook receivers in tests listen on loopback; every other private range stays refused.
        "outbound_allow_cidrs": "127.0.0.0/8",
        "models": [
            ModelConfig(
                name="flux-tiny",
                path=str(tmp_path / "models" / "flux-tiny"),
                defaults=ModelDefaults(width=64, height=64, num_inference_steps=2),
            )
        ],
    }
    values.update(overrides)
    return load_settings(**values)


@pytest.fixture
def settings(tmp_path: Path, redis_client: redis.Redis) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-weight FLUX.1 pipeline, built once per test session."""
    from worker.tiny_model import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "flux-tiny")
