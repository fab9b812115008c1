"""The real stack: Redis, the HTTP gateway and Celery worker processes, moto's S3 server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from shared.redis_client import connect
from tests.support import free_port, wait_for

pytestmark = pytest.mark.integration


def integration_redis_url() -> str:
    """Read when a stack starts: this conftest can be imported before the run's private Redis is up
    (when a single integration file is named on the command line)."""
    return os.environ.get("FLUXGATE_TEST_INTEGRATION_REDIS_URL", "redis://127.0.0.1:6379/14")


ADMIN_KEY = "fg-integration-admin"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@dataclass
class Stack:
    """A running deployment; ``env`` is what its processes were started with."""

    base_url: str
    env: dict[str, str]
    logs: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def client(self, key: str = ADMIN_KEY) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=10)

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115  (closed with the process)
        process = subprocess.Popen(
            [sys.executable, "-m", "shared.cli", *args],
            env={**self.env, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).parents[2],
            start_new_session=True,
        )
        self.processes.append(process)
        return process

    def wait_for_job(self, job_id: str, key: str = ADMIN_KEY, timeout: float = 60) -> dict[str, Any]:
        with self.client(key) as client:

            def finished() -> dict[str, Any] | None:
                job = client.get(f"/v1/jobs/{job_id}").json()
                return job if job["status"] in {"succeeded", "failed", "canceled"} else None

            return wait_for(finished, timeout, f"job {job_id} to finish", interval=0.1)

    def wait_for_workers(self, model: str, count: int, timeout: float = 90) -> None:
        with self.client() as client:

            def live() -> bool:
                models = client.get("/v1/models").json()["data"]
                return any(m["id"] == model and m["live_workers"] >= count for m in models)

            wait_for(live, timeout, f"{count} live worker(s) for {model}", interval=0.25)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


def models_config(tiny_model_dir: Path) -> str:
    tiny_defaults = {"width": 64, "height": 64, "num_inference_steps": 3}
    return json.dumps(
        [
            {"name": "flux-tiny", "path": str(tiny_model_dir), "defaults": tiny_defaults},
            {"name": "flux-idle", "path": str(tiny_model_dir), "defaults": tiny_defaults},
            {
                "name": "flux-edit",
                "path": str(tiny_model_dir),
                "capabilities": {"edit": True, "max_reference_images": 1},
            },
        ]
    )


def start_stack(tmp: Path, tiny_model_dir: Path, storage_url: str, extra_env: dict[str, str]) -> Stack:
    redis_url = integration_redis_url()
    connect(redis_url).flushdb()
    port = free_port()
    env = {
        **os.environ,
        "FLUXGATE_REDIS_URL": redis_url,
        "FLUXGATE_DATA_DIR": str(tmp / "data"),
        "FLUXGATE_STORAGE_URL": storage_url,
        "FLUXGATE_PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        "FLUXGATE_BOOTSTRAP_ADMIN_KEY": ADMIN_KEY,
        "FLUXGATE_MODELS": models_config(tiny_model_dir),
        "FLUXGATE_HEARTBEAT_INTERVAL_S": "1",
        "FLUXGATE_HEARTBEAT_TIMEOUT_S": "5",
        "FLUXGATE_OUTBOUND_ALLOW_CIDRS": "127.0.0.0/8",
        "FLUXGATE_WEBHOOK_RETRY_SCHEDULE_S": "0.2,0.4",
        "PYTHONUNBUFFERED": "1",
        **extra_env,
    }
    stack = Stack(base_url=f"http://127.0.0.1:{port}", env=env, logs=tmp)
    stack.start("gateway", "serve", "--port", str(port))
    stack.start("worker", "worker", "--model-name", "flux-tiny", "--device", "cpu")
    stack.start("sweeper", "sweeper", "--interval", "0.2")
    stack.start("webhooks", "webhooks", "--concurrency", "2")

    def ready() -> bool:
        try:
            return httpx.get(f"{stack.base_url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, 30, "the gateway to be ready", interval=0.2)
        stack.wait_for_workers("flux-tiny", 1)
    except TimeoutError:
        stack.stop()
        for log in tmp.glob("*.log"):
            print(log.name, log.read_text()[-3000:])
        raise
    return stack


@pytest.fixture(scope="module")
def file_stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("file-stack")
    stack = start_stack(tmp, tiny_model_dir, f"file://{tmp / 'files'}", {})
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def s3_stack(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, s3_endpoint: str
) -> Iterator[Stack]:
    aws = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    boto3.client("s3", endpoint_url=s3_endpoint, **_aws_kwargs(aws)).create_bucket(Bucket="fluxgate-it")
    tmp = tmp_path_factory.mktemp("s3-stack")
    env = {**aws, "FLUXGATE_S3_ENDPOINT_URL": s3_endpoint}
    stack = start_stack(tmp, tiny_model_dir, "s3://fluxgate-it/results", env)
    yield stack
    stack.stop()


def _aws_kwargs(aws: dict[str, str]) -> dict[str, str]:
    return {
        "aws_access_key_id": aws["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": aws["AWS_SECRET_ACCESS_KEY"],
        "region_name": aws["AWS_DEFAULT_REGION"],
    }
