"""Shared fixtures: a real Redis database that each test starts empty, settings built for it."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from shared.redis_client import connect
from shared.settings import ModelConfig, ModelDefaults, Settings, load_settings

REDIS_SERVER = pytest.StashKey[subprocess.Popen[bytes]]()


def pytest_configure(config: pytest.Config) -> None:
    """Start a private redis-server for this test process, so that nothing else on the machine (another
    run, a local deployment, another pytest-xdist worker of this run) shares or flushes the tests'
    databases. FLUXGATE_TEST_REDIS_URL set in the environment skips it and uses that server instead;
    pytest-xdist's workers inherit the URL of the server their controller started, and start their own."""
    if os.environ.get("FLUXGATE_TEST_REDIS_URL") and not os.environ.get("FLUXGATE_TEST_PRIVATE_REDIS"):
        return
    from tests.support import start_redis_server

    server, port = start_redis_server(Path(tempfile.mkdtemp(prefix="fluxgate-test-redis-")))
    config.stash[REDIS_SERVER] = server
    os.environ["FLUXGATE_TEST_PRIVATE_REDIS"] = "1"
    os.environ["FLUXGATE_TEST_REDIS_URL"] = f"redis://127.0.0.1:{port}/15"
    os.environ["FLUXGATE_TEST_INTEGRATION_REDIS_URL"] = f"redis://127.0.0.1:{port}/14"
    os.environ["FLUXGATE_TEST_WEBHOOK_REDIS_URL"] = f"redis://127.0.0.1:{port}/13"


# The files that take minutes on two cores (CPU process groups, compiled groups): collected first, so that
# pytest-xdist hands them out at the start instead of leaving one for last while the other process idles.
LONGEST_FIRST = ("tests/worker/test_group.py", "tests/bench/test_parallel.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Move the longest files' tests to the front, each file's in its own order (a stable sort)."""
    rank = {path: index for index, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


def pytest_unconfigure(config: pytest.Config) -> None:
    server = config.stash.get(REDIS_SERVER, None)
    if server is not None:
        server.terminate()
        server.wait(timeout=10)


def unit_redis_url() -> str:
    """The database unit tests own and flush (on the private server unless configured otherwise)."""
    return os.environ.get("FLUXGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    client = connect(unit_redis_url())
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def make_settings(tmp_path: Path, **overrides: object) -> Settings:
    """Settings for tests: the test Redis, storage under tmp_path, a small tiny-model config."""
    values: dict[str, object] = {
        "redis_url": unit_redis_url(),
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


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server over HTTP on a free loopback port."""
    from moto.server import ThreadedMotoServer

    from tests.support import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()
