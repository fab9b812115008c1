"""Redis restarts under a stream of submissions: every accepted job still reaches a terminal state.

The stack runs against its own redis-server (append-only, fsync on every write), which the test stops
and starts again on the same port and data directory while jobs are submitted and running.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import ADMIN_KEY, Stack, start_stack
from tests.support import free_port, wait_for


def redis_server(port: int, directory: Path) -> subprocess.Popen[bytes]:
    server = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(directory),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--maxmemory-policy",
            "noeviction",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: _answers(port), 10, f"redis on {port}")
    return server


def _answers(port: int) -> bool:
    import redis

    try:
        return bool(redis.Redis(port=port, socket_timeout=1).ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="module")
def durable(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[tuple[Stack, int, Path]]:
    tmp = tmp_path_factory.mktemp("redis-restart")
    port, data = free_port(), tmp / "redis"
    data.mkdir()
    server = redis_server(port, data)
    stack = start_stack(
        tmp,
        tiny_model_dir,
        f"file://{tmp / 'files'}",
        {
            "FLUXGATE_REDIS_URL": f"redis://127.0.0.1:{port}/0",
        },
    )
    try:
        yield stack, port, data
    finally:
        stack.stop()
        subprocess.run(["redis-cli", "-p", str(port), "shutdown", "nosave"], capture_output=True, timeout=10)
        server.wait(timeout=10)


def test_every_accepted_job_finishes_across_a_redis_restart(durable: tuple[Stack, int, Path]) -> None:
    stack, port, data = durable
    accepted: list[str] = []
    refused: list[int] = []
    stop = threading.Event()

    def submit_stream() -> None:
        with httpx.Client(
            base_url=stack.base_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10
        ) as c:
            for index in range(60):
                if stop.is_set():
                    return
                try:
                    response = c.post(
                        "/v1/jobs",
                        json={
                            "prompt": f"durable {index}",
                            # small and quick: what is tested is the jobs' fate across the restart (a
                            # backlog queued and one running when Redis stops), not their images
                            "width": 256,
                            "height": 256,
                            "num_inference_steps": 12,
                        },
                    )
                except httpx.HTTPError:
                    refused.append(0)
                    continue
                if response.status_code == 202:
                    accepted.append(response.json()["id"])
                else:
                    assert response.status_code == 503 and response.headers["Retry-After"], response.text
                    refused.append(response.status_code)
                time.sleep(0.1)

    submitter = threading.Thread(target=submit_stream)
    submitter.start()
    wait_for(lambda: len(accepted) >= 10, 60, "ten accepted jobs")
    subprocess.run(["redis-cli", "-p", str(port), "shutdown"], capture_output=True, timeout=10)
    time.sleep(2)  # submissions meanwhile are refused with 503
    server = redis_server(port, data)
    submitter.join(timeout=120)
    stop.set()
    try:
        assert refused, "the gateway should have answered 503 while Redis was down"
        finished = [stack.wait_for_job(job_id, timeout=180) for job_id in accepted]
        statuses = {job["status"] for job in finished}
        assert statuses <= {"succeeded", "failed"}, statuses
        lost = [
            job["id"]
            for job in finished
            if job["status"] == "failed" and job["error"]["code"] != "worker_lost"
        ]
        assert not lost
        by_status = {status: sum(job["status"] == status for job in finished) for status in statuses}
        print(f"redis restart: accepted={len(accepted)} refused={len(refused)} terminal={by_status} lost=0")
    finally:
        server.poll()
