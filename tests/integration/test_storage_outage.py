"""The S3 server goes away: jobs fail with storage_error (after the client's retries), never report images
that are not there, and the worker serves again once storage is back."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from tests.integration.conftest import Stack, start_stack
from tests.support import free_port

AWS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class S3Server:
    """moto's S3 server on a fixed port that the test can stop and start again (it keeps no data)."""

    port: int = field(default_factory=free_port)
    server: ThreadedMotoServer | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="test",
            aws_secret_access_key="test",
            region_name="us-east-1",
        ).create_bucket(Bucket="flaky")

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


@pytest.fixture(scope="module")
def outage(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[tuple[Stack, S3Server]]:
    s3 = S3Server()
    s3.start()
    tmp = tmp_path_factory.mktemp("storage-outage")
    stack = start_stack(
        tmp, tiny_model_dir, "s3://flaky/out", {**AWS, "FLUXGATE_S3_ENDPOINT_URL": s3.endpoint}
    )
    try:
        yield stack, s3
    finally:
        stack.stop()
        s3.stop()


def run(stack: Stack) -> dict[str, Any]:
    with stack.client() as client:
        job = client.post("/v1/jobs", json={"prompt": "to a bucket"}).json()
    return stack.wait_for_job(job["id"], timeout=120)


def test_storage_outage_fails_jobs_with_storage_error_and_the_worker_recovers(
    outage: tuple[Stack, S3Server],
) -> None:
    stack, s3 = outage
    assert run(stack)["status"] == "succeeded"
    s3.stop()
    failed = run(stack)
    assert failed["status"] == "failed" and failed["result"] is None
    assert failed["error"]["code"] == "storage_error"
    with stack.client() as client:
        assert client.get("/readyz").status_code == 503
    s3.start()
    assert run(stack)["status"] == "succeeded"
