"""GET /v1/jobs/{id}/events: snapshot first, events in order, resume, heartbeats, disconnects.

Streams are read over real HTTP from a uvicorn server in a thread, so every read is bounded by the
client's timeout and closing the client is a real disconnect.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis
import uvicorn
from fastapi.testclient import TestClient

import api.sse
from api.app import create_app
from shared.ids import now_iso
from shared.jobstore import JobStore, events_key, job_key
from shared.settings import Settings
from tests.api.conftest import Keys, auth
from tests.support import free_port, wait_for

READ_TIMEOUT_S = 5.0


@dataclass
class Event:
    id: str | None
    event: str | None
    data: dict[str, Any] | None
    comment: str | None = None


@pytest.fixture
def server(settings: Settings) -> Iterator[str]:
    """The gateway on a free port; yields its base URL."""
    config = uvicorn.Config(
        create_app(settings),
        host="127.0.0.1",
        port=free_port(),
        log_level="warning",
        timeout_graceful_shutdown=2,
    )
    gateway = uvicorn.Server(config)
    thread = threading.Thread(target=gateway.run, daemon=True)
    thread.start()
    wait_for(lambda: gateway.started, 10, "the gateway to start", interval=0.02)
    yield f"http://127.0.0.1:{config.port}"
    gateway.should_exit = True
    thread.join(10)


@pytest.fixture
def store(redis_client: redis.Redis) -> JobStore:
    return JobStore(redis_client)


def submit(client: TestClient, key: str) -> str:
    response = client.post("/v1/jobs", json={"prompt": "a red fox"}, headers=auth(key))
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


def parse(lines: Iterator[str]) -> Iterator[Event]:
    """SSE frames (fields up to a blank line) as events; a comment-only frame is an event with a comment."""
    fields: dict[str, str] = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            fields[name or "comment"] = value[1:] if value.startswith(" ") else value
            continue
        if fields:
            data = fields.get("data")
            yield Event(
                fields.get("id"),
                fields.get("event"),
                json.loads(data) if data else None,
                fields.get("comment"),
            )
            fields = {}


@contextmanager
def open_stream(
    base_url: str,
    key: str,
    job_id: str,
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
) -> Iterator[tuple[httpx.Response, Iterator[Event]]]:
    with (
        httpx.Client(base_url=base_url, timeout=READ_TIMEOUT_S) as http,
        http.stream(
            "GET", f"/v1/jobs/{job_id}/events", headers={**auth(key), **(headers or {})}, params=params
        ) as response,
    ):
        yield response, (event for event in parse(response.iter_lines()) if event.comment is None)


def run_to_success(store: JobStore, job_id: str) -> None:
    assert store.claim(job_id, 1, "w1", max_attempts=3) is not None
    for step in (1, 2):
        assert store.record_progress(job_id, 1, "w1", step, 2) == "running"
    store.transition(
        job_id,
        "succeeded",
        allowed_from={"running"},
        expect_attempt=1,
        expect_worker="w1",
        fields={"finished_at": now_iso()},
    )


def stream_ids(redis_client: redis.Redis, job_id: str) -> list[str]:
    entries: list[tuple[str, dict[str, str]]] = redis_client.xrange(events_key(job_id))  # type: ignore[assignment]
    return [entry_id for entry_id, _ in entries]


def as_tuple(stream_id: str) -> tuple[int, int]:
    ms, seq = stream_id.split("-")
    return int(ms), int(seq)


def test_snapshot_first_then_every_event_in_order_and_the_stream_ends_at_the_terminal_one(
    client: TestClient, keys: Keys, server: str, store: JobStore, redis_client: redis.Redis
) -> None:
    job_id = submit(client, keys.alice)
    with open_stream(server, keys.alice, job_id) as (response, events):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        snapshot = next(events)
        run_to_success(store, job_id)
        rest = list(events)  # ends only when the server ends the stream

    assert (snapshot.event, snapshot.id) == ("job.snapshot", stream_ids(redis_client, job_id)[0])
    assert snapshot.data is not None
    assert snapshot.data["type"] == "job.snapshot" and snapshot.data["job_id"] == job_id
    assert snapshot.data["id"] == job_id and snapshot.data["object"] == "job"
    assert (snapshot.data["status"], snapshot.data["progress"]) == ("queued", {"step": 0, "total": 2})
    assert [e.event for e in rest] == ["job.started", "job.progress", "job.progress", "job.succeeded"]
    assert [e.id for e in rest] == stream_ids(redis_client, job_id)[1:]
    assert [e.data["progress"]["step"] for e in rest if e.data] == [0, 1, 2, 2]
    for event in rest:
        assert event.data is not None
        assert (event.data["type"], event.data["job_id"]) == (event.event, job_id)
        assert {"status", "progress", "attempt"} <= event.data.keys()
    assert rest[-1].data is not None and rest[-1].data["status"] == "succeeded"


@pytest.mark.parametrize("via", ["header", "query"])
def test_resume_after_last_event_id_replays_exactly_the_later_events(
    client: TestClient, keys: Keys, server: str, store: JobStore, redis_client: redis.Redis, via: str
) -> None:
    job_id = submit(client, keys.alice)
    with open_stream(server, keys.alice, job_id) as (_, events):
        next(events)  # snapshot
        assert store.claim(job_id, 1, "w1", max_attempts=3) is not None
        started = next(events)
        assert started.event == "job.started" and started.id is not None
    # Disconnected: the client misses these.
    for step in (1, 2):
        store.record_progress(job_id, 1, "w1", step, 2)

    resume = (
        {"headers": {"Last-Event-ID": started.id}}
        if via == "header"
        else {"params": {"last_event_id": started.id}}
    )
    with open_stream(server, keys.alice, job_id, **resume) as (_, events):
        snapshot = next(events)
        missed = [next(events), next(events)]
        store.transition(
            job_id,
            "succeeded",
            allowed_from={"running"},
            expect_attempt=1,
            expect_worker="w1",
            fields={"finished_at": now_iso()},
        )
        live = list(events)

    ids = stream_ids(redis_client, job_id)
    # The snapshot is the state at reconnection: its id is the last entry then, and the replayed entries
    # after Last-Event-ID are older than it.
    assert snapshot.event == "job.snapshot" and snapshot.id == ids[-2]
    assert snapshot.data is not None and snapshot.data["progress"] == {"step": 2, "total": 2}
    assert [(e.event, e.id) for e in missed] == [("job.progress", ids[2]), ("job.progress", ids[3])]
    assert [(e.event, e.id) for e in live] == [("job.succeeded", ids[4])]
    assert started.id == ids[1] and len(ids) == 5  # queued, started, progress x2, succeeded: none missed


def test_resume_of_a_job_that_ended_meanwhile_replays_up_to_its_terminal_event(
    client: TestClient, keys: Keys, server: str, store: JobStore, redis_client: redis.Redis
) -> None:
    job_id = submit(client, keys.alice)
    run_to_success(store, job_id)
    ids = stream_ids(redis_client, job_id)
    with open_stream(server, keys.alice, job_id, headers={"Last-Event-ID": ids[1]}) as (_, events):
        received = list(events)
    assert [e.event for e in received] == ["job.snapshot", "job.progress", "job.progress", "job.succeeded"]
    assert [e.id for e in received] == [ids[-1], *ids[2:]]


def test_a_terminal_job_gives_its_snapshot_and_the_stream_ends(
    client: TestClient, keys: Keys, server: str, store: JobStore, redis_client: redis.Redis
) -> None:
    job_id = submit(client, keys.alice)
    store.transition(job_id, "canceled", allowed_from={"queued"}, fields={"finished_at": now_iso()})
    with open_stream(server, keys.alice, job_id) as (response, events):
        assert response.status_code == 200
        received = list(events)
    assert len(received) == 1
    assert (received[0].event, received[0].id) == ("job.snapshot", stream_ids(redis_client, job_id)[-1])
    assert received[0].data is not None and received[0].data["status"] == "canceled"


def test_a_last_event_id_past_the_end_does_not_skip_later_events(
    client: TestClient, keys: Keys, server: str, store: JobStore, redis_client: redis.Redis
) -> None:
    job_id = submit(client, keys.alice)
    with open_stream(server, keys.alice, job_id, headers={"Last-Event-ID": f"{2**63}-0"}) as (_, events):
        assert next(events).event == "job.snapshot"
        run_to_success(store, job_id)
        received = list(events)
    assert [e.id for e in received] == stream_ids(redis_client, job_id)[1:]


def test_another_owners_job_and_an_unknown_job_are_404(client: TestClient, keys: Keys) -> None:
    job_id = submit(client, keys.alice)
    for url in (f"/v1/jobs/{job_id}/events", "/v1/jobs/job_doesnotexist/events"):
        response = client.get(url, headers=auth(keys.bob))
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == "job_not_found"
    assert client.get(f"/v1/jobs/{job_id}/events").status_code == 401


@pytest.mark.parametrize("value", ["abc", "12", "1-2-3", "-1-0", f"{2**64}-0", "1-x", "1-2\x7f"])
def test_a_malformed_last_event_id_is_400_naming_it(client: TestClient, keys: Keys, value: str) -> None:
    job_id = submit(client, keys.alice)
    url = f"/v1/jobs/{job_id}/events"
    for response, param in (
        (client.get(url, headers={**auth(keys.alice), "Last-Event-ID": value}), "Last-Event-ID"),
        (client.get(url, params={"last_event_id": value}, headers=auth(keys.alice)), "last_event_id"),
    ):
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert (error["code"], error["param"]) == ("invalid_last_event_id", param)
        assert param in error["message"]


def test_an_idle_stream_sends_ping_comments(
    client: TestClient, keys: Keys, server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(api.sse, "HEARTBEAT_S", 0.2)
    job_id = submit(client, keys.alice)
    with (
        httpx.Client(base_url=server, timeout=READ_TIMEOUT_S) as http,
        http.stream("GET", f"/v1/jobs/{job_id}/events", headers=auth(keys.alice)) as response,
    ):
        frames = parse(response.iter_lines())
        assert next(frames).event == "job.snapshot"
        assert [next(frames).comment for _ in range(2)] == ["ping", "ping"]


def test_a_client_disconnect_ends_the_stream_promptly(
    client: TestClient, keys: Keys, server: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="fluxgate.api.sse")
    job_id = submit(client, keys.alice)
    with open_stream(server, keys.alice, job_id) as (_, events):
        assert next(events).event == "job.snapshot"
    # The server is blocked in XREAD (up to MAX_BLOCK_S = 5 s): closing must interrupt it, not outwait it.
    wait_for(
        lambda: any(f"event stream of {job_id} closed" in r.getMessage() for r in caplog.records),
        3,
        "the server to close the stream",
        interval=0.02,
    )


def test_a_purged_job_ends_its_stream(
    client: TestClient,
    keys: Keys,
    server: str,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(api.sse, "MAX_BLOCK_S", 0.1)
    job_id = submit(client, keys.alice)
    with open_stream(server, keys.alice, job_id) as (_, events):
        assert next(events).event == "job.snapshot"
        redis_client.delete(job_key(job_id), events_key(job_id))
        assert list(events) == []


def test_an_empty_last_event_id_means_none(
    client: TestClient, keys: Keys, server: str, store: JobStore, redis_client: redis.Redis
) -> None:
    job_id = submit(client, keys.alice)
    store.transition(job_id, "canceled", allowed_from={"queued"}, fields={"finished_at": now_iso()})
    with open_stream(server, keys.alice, job_id, headers={"Last-Event-ID": ""}) as (response, events):
        assert response.status_code == 200
        assert [e.event for e in events] == ["job.snapshot"]
