"""Webhooks end to end: job store events → outbox → `fluxgate webhooks` (dispatcher + Celery worker
on the `webhooks` queue) → a real HTTP receiver, with signatures verified by `standardwebhooks`."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from standardwebhooks import Webhook

from shared.redis_client import connect
from shared.webhook_deliveries import deliveries_for_job
from shared.webhook_secrets import WebhookSecrets
from tests.support import wait_for
from tests.webhook_support import hooked_job, run_to_success

pytestmark = pytest.mark.integration
WEBHOOK_REDIS_URL = os.environ.get("FLUXGATE_TEST_WEBHOOK_REDIS_URL", "redis://127.0.0.1:6379/13")


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def payload(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1: ``/ok`` answers 200, ``/flaky`` 500 twice then 200, ``/gone`` 410."""

    port: int = 0
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def at(self, path: str, at_least: int = 1) -> list[Received] | None:
        """The requests to ``path`` once there are ``at_least`` of them."""
        with self.lock:
            requests = [r for r in self.received if r.path.startswith(path)]
        return requests if len(requests) >= at_least else None

    def answer(self, path: str) -> int:
        with self.lock:
            seen = len([r for r in self.received if r.path == path])
        if path.startswith("/gone"):
            return 410
        if path.startswith("/flaky") and seen <= 2:
            return 500
        return 200


def serve(receiver: Receiver) -> http.server.ThreadingHTTPServer:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            with receiver.lock:
                receiver.received.append(
                    Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                )
            self.send_response(receiver.answer(self.path))
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    receiver.port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    hook = Receiver()
    server = serve(hook)
    yield hook
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    """DB 13, flushed, with `fluxgate webhooks` running against it."""
    client = connect(WEBHOOK_REDIS_URL)
    client.flushdb()
    tmp = tmp_path_factory.mktemp("webhooks")
    env = {
        **os.environ,
        "FLUXGATE_REDIS_URL": WEBHOOK_REDIS_URL,
        "FLUXGATE_DATA_DIR": str(tmp / "data"),
        "FLUXGATE_OUTBOUND_ALLOW_CIDRS": "127.0.0.0/8",
        "FLUXGATE_WEBHOOK_RETRY_SCHEDULE_S": "0.2,0.4",
        "FLUXGATE_WEBHOOK_TIMEOUT_S": "3",
        "PYTHONUNBUFFERED": "1",
    }
    log_path = tmp / "webhooks.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "shared.cli", "webhooks", "--concurrency", "2"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).parents[2],
            start_new_session=True,
        )
    try:
        yield client
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        code: int | None = None
        try:
            code = process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        print(log_path.read_text()[-4000:])
        client.flushdb()
        assert code == 0, "fluxgate webhooks did not stop cleanly on SIGTERM"


def verified(client: redis.Redis, request: Received, owner: str = "alice") -> dict[str, Any]:
    secret = WebhookSecrets(client, 86400).current(owner)
    payload: dict[str, Any] = Webhook(secret).verify(request.body, request.headers)
    return payload


def settled(client: redis.Redis, job_id: str, count: int) -> list[dict[str, Any]] | None:
    deliveries = deliveries_for_job(client, job_id)
    done = len(deliveries) == count and all(d["status"] != "pending" for d in deliveries)
    return deliveries if done else None


def test_selected_events_arrive_signed_and_unselected_ones_do_not(
    client: redis.Redis, receiver: Receiver
) -> None:
    job_id = hooked_job(client, receiver.url("/ok/1"), ("job.queued", "job.succeeded"))
    run_to_success(client, job_id, progress_steps=3)
    requests = wait_for(lambda: receiver.at("/ok/1", at_least=2), 30, "two webhooks")
    payloads = [verified(client, request) for request in requests]
    assert sorted(p["type"] for p in payloads) == ["job.queued", "job.succeeded"]
    assert all(p["data"]["id"] == job_id and p["data"]["object"] == "job" for p in payloads)
    assert all(p["data"]["status"] == "succeeded" for p in payloads if p["type"] == "job.succeeded")
    deliveries = wait_for(lambda: settled(client, job_id, 2), 10, "deliveries recorded")
    assert [d["status"] for d in deliveries] == ["succeeded", "succeeded"]
    assert len({r.headers["webhook-id"] for r in requests}) == 2
    wait_for(lambda: not client.zcard("fg:webhook:retries"), 5, "nothing left scheduled")
    assert len(receiver.at("/ok/1") or []) == 2  # job.started and job.progress were not selected


def test_a_flaky_receiver_sees_one_webhook_id_three_times(client: redis.Redis, receiver: Receiver) -> None:
    job_id = hooked_job(client, receiver.url("/flaky"), ("job.succeeded",))
    run_to_success(client, job_id)
    [delivery] = wait_for(lambda: settled(client, job_id, 1), 30, "the flaky delivery to settle")
    requests = receiver.at("/flaky") or []
    assert len(requests) == 3
    assert len({r.headers["webhook-id"] for r in requests}) == 1
    for request in requests:
        assert verified(client, request)["type"] == "job.succeeded"
    assert delivery["status"] == "succeeded"
    assert [a["status_code"] for a in delivery["attempts"]] == [500, 500, 200]
    assert [a["outcome"] for a in delivery["attempts"]] == ["pending", "pending", "succeeded"]


def test_410_stops_retries(client: redis.Redis, receiver: Receiver) -> None:
    job_id = hooked_job(client, receiver.url("/gone"), ("job.succeeded",))
    run_to_success(client, job_id)
    [delivery] = wait_for(lambda: settled(client, job_id, 1), 30, "the 410 delivery to settle")
    assert delivery["status"] == "stopped"
    assert [a["status_code"] for a in delivery["attempts"]] == [410]
    assert len(receiver.at("/gone") or []) == 1


def test_a_rotated_secret_overlaps(client: redis.Redis, receiver: Receiver) -> None:
    secrets = WebhookSecrets(client, 86400)
    old = secrets.current("dora")
    new = secrets.rotate("dora").key
    job_id = hooked_job(client, receiver.url("/ok/rotated"), ("job.queued",), owner="dora")
    [request] = wait_for(lambda: receiver.at("/ok/rotated"), 30, "the webhook")
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    assert Webhook(old).verify(request.body, request.headers)["data"]["id"] == job_id
    assert Webhook(new).verify(request.body, request.headers)["data"]["id"] == job_id
