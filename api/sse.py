"""A job's Server-Sent Events: a snapshot, then its Redis event stream, until the terminal event.

Event ids are the entry ids (``<ms>-<seq>``) of the job's stream ``fg:job:{id}:events``: they increase
per job and mean the same on every gateway replica, so a client may reconnect to any replica with
``Last-Event-ID``. All state is in Redis; a stream holds one Redis connection while it waits.

- The stream opens with ``job.snapshot`` (the job object). Its id is the stream's last entry when the
  job was read, both read in one MULTI, so resuming from the snapshot's id misses nothing.
- Then every entry after the resume point: the snapshot's id, or ``Last-Event-ID`` when the client sent
  one. Entries replayed after ``Last-Event-ID`` are older than the snapshot (their ids are lower than
  its id): apply events in the order received and the state converges on the live one.
- The stream ends after the terminal event (``job.succeeded``, ``job.failed``, ``job.canceled``) at or
  after the snapshot, or right after the snapshot when the job was already terminal and nothing is left
  to replay. A terminal event older than the snapshot (the job was retried since) does not end it.
- ``: ping`` comments keep proxies from closing an idle stream. The stream also ends when the job is
  purged, or when Redis fails mid-stream (the client reconnects with ``Last-Event-ID``).
- The stream is bounded (``EVENT_MAXLEN`` entries, trimmed approximately): a client that resumes from
  an entry already trimmed gets the snapshot and the entries still kept.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio as aioredis
from fastapi.sse import ServerSentEvent

from shared.jobstore import JobRecord, events_key, job_key

log = logging.getLogger("fluxgate.api.sse")

TERMINAL_EVENTS = frozenset({"job.succeeded", "job.failed", "job.canceled"})
# Seconds without an event before a ": ping" comment; common proxy idle timeouts are 60 s (nginx, ALB).
HEARTBEAT_S = 15.0
# The longest XREAD BLOCK (below the async client's socket timeout): also how soon a purge is noticed.
MAX_BLOCK_S = 5.0
READ_COUNT = 100

_STREAM_ID = re.compile(r"(\d{1,20})-(\d{1,20})")
_UINT64 = 2**64


@dataclass(frozen=True, order=True)
class StreamId:
    """A Redis stream entry id, ordered as Redis orders them."""

    ms: int
    seq: int

    @classmethod
    def parse(cls, text: str) -> StreamId | None:
        """The id ``<ms>-<seq>`` (each part a 64-bit unsigned integer), else None."""
        match = _STREAM_ID.fullmatch(text.strip())
        if match is None:
            return None
        ms, seq = int(match[1]), int(match[2])
        return cls(ms, seq) if ms < _UINT64 and seq < _UINT64 else None

    def __str__(self) -> str:
        return f"{self.ms}-{self.seq}"


STREAM_START = StreamId(0, 0)


@dataclass(frozen=True)
class Snapshot:
    """A job read with its stream's last entry id; ``job`` is its public object, as the API shows it."""

    record: JobRecord
    last_id: StreamId
    job: dict[str, Any] = field(default_factory=dict)

    def event(self) -> ServerSentEvent:
        """``job.snapshot``: the job object with ``type`` and ``job_id``, id'd by the stream's last entry."""
        data = {"type": "job.snapshot", "job_id": self.record.id, **self.job}
        return ServerSentEvent(data=data, event="job.snapshot", id=str(self.last_id))


def read_snapshot(client: redis.Redis, job_id: str) -> Snapshot | None:
    """The job and its stream's last entry id in one MULTI (no event falls between); None if it is gone."""
    pipe = client.pipeline(transaction=True)
    pipe.hgetall(job_key(job_id))
    pipe.xrevrange(events_key(job_id), count=1)
    fields, last = pipe.execute()
    if not fields:
        return None
    last_id = StreamId.parse(last[0][0]) if last else None
    return Snapshot(JobRecord.from_hash(fields), last_id or STREAM_START)


async def job_events(
    client: aioredis.Redis, snapshot: Snapshot, resume_after: StreamId | None
) -> AsyncIterator[ServerSentEvent]:
    """The snapshot, then the job's stream entries after ``resume_after`` (default: the snapshot's id).

    Waits in bounded XREAD BLOCKs on the asyncio client, so a stream holds no thread; cancellation (the
    client went away) interrupts the wait at once.
    """
    job_id, end_from = snapshot.record.id, snapshot.last_id
    yield snapshot.event()
    # An id past the stream's end cannot come from this job: resuming from it would skip what comes next.
    cursor = min(resume_after, end_from) if resume_after is not None else end_from
    if snapshot.record.is_terminal and cursor >= end_from:
        return
    sent, last_write = 0, time.monotonic()
    try:
        while True:
            idle = time.monotonic() - last_write
            block_s = min(max(HEARTBEAT_S - idle, 0.0), MAX_BLOCK_S)
            # BLOCK 0 would wait forever: always at least 1 ms.
            reply = await client.xread(
                {events_key(job_id): str(cursor)}, count=READ_COUNT, block=max(1, int(block_s * 1000))
            )
            entries = _entries(reply)
            for entry_id, fields in entries:
                cursor = StreamId.parse(entry_id) or cursor
                yield ServerSentEvent(raw_data=fields["data"], event=fields["type"], id=entry_id)
                sent, last_write = sent + 1, time.monotonic()
                if fields["type"] in TERMINAL_EVENTS and cursor >= end_from:
                    return
            if entries:
                continue
            if not await client.exists(job_key(job_id)):
                return  # purged: nothing more will come
            if time.monotonic() - last_write >= HEARTBEAT_S:
                yield ServerSentEvent(comment="ping")
                last_write = time.monotonic()
    except redis.RedisError as error:
        log.warning("event stream of %s ended: Redis failed: %s", job_id, error)
    finally:
        log.debug("event stream of %s closed after %d events", job_id, sent)


def _entries(reply: Any) -> list[tuple[str, dict[str, str]]]:
    """The entries of a one-stream XREAD reply: a list of ``[key, entries]`` (RESP2) or a dict (RESP3)."""
    if not reply:
        return []
    streams = reply.values() if isinstance(reply, dict) else [entries for _, entries in reply]
    return [(entry_id, fields) for entries in streams for entry_id, fields in entries]
