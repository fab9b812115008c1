"""The OpenAI routes' synchronous wait on a queued job, and the answer built from how it ended.

A request waits on the asyncio Redis client (no thread held), following the job's event stream in
short blocks so that it notices within ``POLL_S`` when its client has gone. Outcomes:

- the job succeeded → the images (signed links or base64 read back from storage);
- the wait ran past ``openai_timeout_s`` (counted from the job's creation, which is also the job's
  ``cancel_after`` deadline) → the job is canceled and the answer is 504 ``generation_timeout``;
- the client disconnected → the job is canceled, unless another request (a retry with the same
  ``Idempotency-Key``) is still waiting on it: waiters are counted in Redis;
- the job failed on the worker → 503 with ``Retry-After`` and the job's error code (not the input's
  fault: a retry may well succeed); canceled by someone else → 409 ``job_canceled``.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from starlette.concurrency import run_in_threadpool

from api.openai_schemas import ImageData, ImagesResponse, Quality
from api.services import Services
from shared.errors import ApiError
from shared.ids import parse_iso, utcnow
from shared.jobstore import CANCELED_BY_USER, DEADLINE_EXCEEDED, JobRecord, events_key, job_key
from shared.storage import StorageError

# How often a waiting request checks that its client is still connected (one XREAD BLOCK).
POLL_S = 1.0
RETRY_AFTER_S = "5"
# A 504 or 409 would come back the same if the SDK retried it (default: twice); tell it not to.
NO_RETRY = {"x-should-retry": "false"}


class ClientDisconnected(Exception):
    """The client went away while waiting; its job has been dealt with."""


def waiters_key(job_id: str) -> str:
    return f"fg:job:{job_id}:openai_waiters"


async def read_job(client: aioredis.Redis, job_id: str) -> JobRecord | None:
    fields = await client.hgetall(job_key(job_id))
    return JobRecord.from_hash(fields) if fields else None


async def _follow(
    client: aioredis.Redis, job_id: str, deadline: float, is_disconnected: Callable[[], Awaitable[bool]]
) -> tuple[str, JobRecord | None]:
    """Until the job ends ("ended"), the deadline passes ("timeout") or the client leaves ("gone")."""
    last_id = "0-0"
    while True:
        record = await read_job(client, job_id)
        if record is None or record.is_terminal:
            return "ended", record
        if await is_disconnected():
            return "gone", record
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "timeout", record
        reply: Any = await client.xread(
            {events_key(job_id): last_id}, count=100, block=max(1, int(min(remaining, POLL_S) * 1000))
        )
        for _stream, entries in reply.items() if isinstance(reply, dict) else reply or []:
            if entries:
                last_id = entries[-1][0]


async def wait_for_job(
    services: Services, record: JobRecord, timeout_s: float, is_disconnected: Callable[[], Awaitable[bool]]
) -> JobRecord:
    """The job once it ended, or as it stood when the wait ran out (then canceled: see check_succeeded);
    raises ClientDisconnected when the client left."""
    client = services.redis_async
    age = (utcnow() - parse_iso(record.created_at)).total_seconds()
    deadline = time.monotonic() + max(0.0, timeout_s - age)
    waiters = waiters_key(record.id)
    await client.incr(waiters)
    await client.expire(waiters, int(timeout_s) + 60)
    try:
        outcome, latest = await _follow(client, record.id, deadline, is_disconnected)
    finally:
        still_waiting = int(await client.decr(waiters))
    if outcome == "gone":
        if still_waiting <= 0:
            await run_in_threadpool(services.store.cancel, record.id, CANCELED_BY_USER)
        raise ClientDisconnected
    if outcome == "timeout":
        latest = await run_in_threadpool(services.store.cancel, record.id, DEADLINE_EXCEEDED)
    if latest is None:
        raise ApiError(404, "job_not_found", f"The job {record.id} was removed while it ran.")
    return latest


def check_succeeded(record: JobRecord, timeout_s: float) -> None:
    """Raise the OpenAI-shaped error for a job that ended without images."""
    if record.status == "succeeded":
        return
    error = record.error
    if record.status == "failed":
        code, message = (error.code, error.message) if error else ("generation_failed", "")
        raise ApiError(
            503, code, f"The job {record.id} failed: {message}", headers={"Retry-After": RETRY_AFTER_S}
        )
    # Still running (flagged to stop at its next step) or canceled at its deadline: the wait ran out.
    timed_out = record.status != "canceled" or (error is not None and error.code == DEADLINE_EXCEEDED)
    if timed_out:
        raise ApiError(
            504,
            "generation_timeout",
            f"The image generation did not finish within {timeout_s:g} s; its job {record.id} was canceled.",
            headers=dict(NO_RETRY),
        )
    raise ApiError(
        409,
        "job_canceled",
        f"The job {record.id} was canceled (by its owner, or because the client that submitted it "
        "disconnected); submit again (with a new Idempotency-Key if you use one).",
        headers=dict(NO_RETRY),
    )


async def images_response(
    services: Services, record: JobRecord, response_format: str, quality: Quality
) -> ImagesResponse:
    """The response body of a succeeded job: signed links, or the images read back as base64."""
    stored = record.images or []
    prompt = record.params.prompt
    if response_format == "url":
        ttl = services.settings.result_url_ttl_s
        data = [
            ImageData(url=services.storage.url(image.key, ttl), revised_prompt=prompt) for image in stored
        ]
    else:
        blobs = await run_in_threadpool(_read_all, services, [image.key for image in stored])
        data = [ImageData(b64_json=base64.b64encode(blob).decode(), revised_prompt=prompt) for blob in blobs]
    params = record.params
    return ImagesResponse(
        created=int(parse_iso(record.created_at).timestamp()),
        data=data,
        output_format=params.output_format,
        quality=quality,
        size=f"{params.width}x{params.height}",
    )


def _read_all(services: Services, keys: Sequence[str]) -> list[bytes]:
    try:
        return [services.storage.get(key) for key in keys]
    except StorageError as error:
        raise ApiError(
            503,
            "storage_unavailable",
            f"Reading the generated images failed: {error}",
            headers={"Retry-After": RETRY_AFTER_S},
        ) from error
