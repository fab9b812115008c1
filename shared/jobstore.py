"""The job store: job records, their indexes and events in Redis.

Only :meth:`JobStore.transition` changes a status. It refuses moves outside :data:`LEGAL_MOVES` and
compares the current status (and, where asked, attempt and worker) inside one Lua script, so two
workers can never both own an attempt and a stale attempt can never write a result.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import redis
import redis.asyncio as aioredis

from shared.ids import now_iso
from shared.jobrecord import JobOptions, JobRecord, text
from shared.jobsubmit import (
    EVENT_MAXLEN,
    QuotaExceeded,
    Quotas,
    SubmitCall,
    Submitted,
    encode,
    submit_call,
    submit_outcome,
)
from shared.queue import BrokerMessage
from shared.schemas import GenerationParams, Progress
from shared.store_scripts import CLAIM, PROGRESS, SUBMIT, TRANSITION
from shared.workers import alive_key

PREFIX = "fg"

# queued -> running -> succeeded | failed | canceled; running -> queued is a requeue (worker lost),
# running -> running a reclaim of a dead worker's job by a new attempt; terminal -> queued an admin retry.
LEGAL_MOVES: dict[str, frozenset[str]] = {
    "queued": frozenset({"running", "canceled", "failed"}),
    "running": frozenset({"succeeded", "failed", "canceled", "queued", "running"}),
    "succeeded": frozenset({"queued"}),
    "failed": frozenset({"queued"}),
    "canceled": frozenset({"queued"}),
}


DEADLINES_KEY = f"{PREFIX}:deadlines"
# How many queued jobs of the head's priority band a batch claim looks through for batch mates: bounds
# the Lua script's work (each candidate's params are decoded) however deep the queue is.
BATCH_LOOKAHEAD = 64
RUNNING_KEY = f"{PREFIX}:running"
RETENTION_KEY = f"{PREFIX}:retention"
ALL_JOBS_KEY = f"{PREFIX}:jobs"
CANCELED_BY_USER = "canceled"
DEADLINE_EXCEEDED = "deadline_exceeded"


def canceled_fields(reason: str) -> dict[str, Any]:
    """Fields of a canceled job: a deadline is an error the user should see; their own cancel is not."""
    fields: dict[str, Any] = {"finished_at": now_iso()}
    if reason == DEADLINE_EXCEEDED:
        fields["error"] = {"code": DEADLINE_EXCEEDED, "message": "The job passed its cancel_after deadline."}
    return fields


# The event a move appends by default: running is announced as "started".
EVENT_FOR_STATUS = {"queued": "job.requeued", "running": "job.started"}


class IllegalTransition(Exception):
    """A status change the lifecycle forbids, or one whose expectations (attempt, worker) no longer hold."""

    def __init__(self, job_id: str, reason: str, status: str, attempt: str) -> None:
        super().__init__(f"{job_id}: {reason} (status={status or '-'}, attempt={attempt or '-'})")
        self.reason = reason
        self.status = status


def job_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def events_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:events"


_encode = encode


class JobStore:
    """Job records in Redis. Synchronous (redis-py); the gateway calls it from its thread pool."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._transition = client.register_script(TRANSITION)
        self._progress = client.register_script(PROGRESS)
        self._submit = client.register_script(SUBMIT)
        self._submit_async: tuple[aioredis.Redis, Any] | None = None
        self._claim = client.register_script(CLAIM)

    def create(
        self, job_id: str, owner: str, params: GenerationParams, options: JobOptions | None = None
    ) -> JobRecord:
        """Write a new queued job (attempt 1), index it and append its ``job.queued`` event, atomically."""
        return self.submit(job_id, owner, params, options or JobOptions()).record

    def submit(
        self,
        job_id: str,
        owner: str,
        params: GenerationParams,
        options: JobOptions,
        quotas: Quotas = Quotas(),
        message: BrokerMessage | None = None,
    ) -> Submitted:
        """:meth:`create` in one round trip with the quota checks and the task message (shared/jobsubmit.py).

        Raises :class:`QuotaExceeded` when a quota refuses it (nothing is written then, bar the rate
        counter), :class:`IllegalTransition` when the id exists.
        """
        call = submit_call(job_id, owner, params, options, quotas, message)
        return self._submitted(job_id, call, self._submit(keys=call.keys, args=call.args))

    async def submit_async(
        self,
        client: aioredis.Redis,
        job_id: str,
        owner: str,
        params: GenerationParams,
        options: JobOptions,
        quotas: Quotas = Quotas(),
        message: BrokerMessage | None = None,
    ) -> Submitted:
        """:meth:`submit` on an asyncio client (the gateway's event loop: no thread per submission)."""
        if self._submit_async is None or self._submit_async[0] is not client:
            self._submit_async = (client, client.register_script(SUBMIT))
        call = submit_call(job_id, owner, params, options, quotas, message)
        reply = await self._submit_async[1](keys=call.keys, args=call.args)
        return self._submitted(job_id, call, reply)

    def _submitted(self, job_id: str, call: SubmitCall, reply: list[Any]) -> Submitted:
        if text(reply[0]) == "exists":
            raise IllegalTransition(job_id, "exists", "", "")
        submitted = submit_outcome(call, reply)
        self.on_created(submitted.record)
        return submitted

    def on_created(self, record: JobRecord) -> None:
        """Called once for each job this store creates (the gateway counts them)."""

    def cancel(self, job_id: str, reason: str = CANCELED_BY_USER) -> JobRecord | None:
        """Cancel a job: a queued one never runs; a running one is flagged and its worker stops at the
        next denoising step (no decode, no upload); a terminal one is left as it is."""
        for _ in range(3):  # a queued job may start between the read and the move: look again
            record = self.get(job_id)
            if record is None or record.is_terminal:
                return record
            if record.status == "running":
                self.redis.hset(job_key(job_id), "cancel_requested", reason)
                return self.get(job_id)
            try:
                return self.transition(
                    job_id, "canceled", allowed_from={"queued"}, fields=canceled_fields(reason)
                )
            except IllegalTransition:
                continue
        return self.get(job_id)

    def running_job_ids(self) -> list[str]:
        return sorted(str(job_id) for job_id in self.redis.smembers(RUNNING_KEY))

    def requeue_lost(self, job_id: str, max_attempts: int) -> JobRecord | None:
        """A running job whose worker stopped heartbeating: back to the queue as attempt + 1 (the caller
        enqueues its message), or failed ``worker_lost`` once ``max_attempts`` were used. None when the
        job is not lost (its worker lives, or it moved on meanwhile)."""
        record = self.get(job_id)
        if (
            record is None
            or record.status != "running"
            or (record.worker and self.is_worker_alive(record.worker))
        ):
            return None
        try:
            if record.attempt >= max_attempts:
                return self._fail_worker_lost(record, max_attempts)
            return self.transition(
                job_id,
                "queued",
                allowed_from={"running"},
                expect_attempt=record.attempt,
                expect_worker=record.worker or "",
                bump_attempt=True,
                fields={
                    "worker": "",
                    "cancel_requested": "",
                    "progress": record.progress.model_copy(update={"step": 0}),
                },
            )
        except IllegalTransition:
            return None

    def _fail_worker_lost(self, record: JobRecord, max_attempts: int) -> JobRecord:
        """Fail a running job whose worker is gone on its last allowed attempt."""
        message = f"The worker stopped during attempt {record.attempt} of {max_attempts}."
        return self.transition(
            record.id,
            "failed",
            allowed_from={"running"},
            expect_attempt=record.attempt,
            expect_worker=record.worker or "",
            fields={"error": {"code": "worker_lost", "message": message}, "finished_at": now_iso()},
        )

    def ended_before(self, cutoff: float, limit: int = 100) -> list[str]:
        """Terminal jobs that ended before ``cutoff`` (Unix seconds), oldest first."""
        return [
            str(job_id)
            for job_id in self.redis.zrangebyscore(RETENTION_KEY, "-inf", cutoff, start=0, num=limit)
        ]

    def purge(self, job_id: str) -> None:
        """Delete a job's record, events and every index entry (its objects are the caller's)."""
        record = self.get(job_id)
        pipe = self.redis.pipeline(transaction=True)
        if record is not None:
            pipe.zrem(f"{PREFIX}:owner:{record.owner}:jobs", job_id)
            pipe.zrem(f"{PREFIX}:owner:{record.owner}:status:{record.status}", job_id)
            pipe.zrem(f"{PREFIX}:queue:{record.model}", job_id)
            pipe.zrem(f"{PREFIX}:queue:{record.model}:{record.priority}:owner:{record.owner}", job_id)
        pipe.delete(job_key(job_id), events_key(job_id), f"{job_key(job_id)}:openai_waiters")
        pipe.zrem(ALL_JOBS_KEY, job_id)
        pipe.srem(RUNNING_KEY, job_id)
        pipe.zrem(DEADLINES_KEY, job_id)
        pipe.zrem(RETENTION_KEY, job_id)
        pipe.execute()

    def due_deadlines(self, now: float, limit: int = 100) -> list[str]:
        """Jobs whose ``cancel_after`` deadline has passed (the sweeper cancels them)."""
        return [
            str(job_id) for job_id in self.redis.zrangebyscore(DEADLINES_KEY, "-inf", now, start=0, num=limit)
        ]

    def forget_deadline(self, job_id: str) -> None:
        self.redis.zrem(DEADLINES_KEY, job_id)

    def get(self, job_id: str) -> JobRecord | None:
        fields = self.redis.hgetall(job_key(job_id))
        return JobRecord.from_hash(fields) if fields else None

    def transition(
        self,
        job_id: str,
        to: str,
        *,
        allowed_from: Iterable[str],
        expect_attempt: int | None = None,
        expect_worker: str | None = None,
        bump_attempt: bool = False,
        fields: dict[str, Any] | None = None,
        events: Iterable[str] | None = None,
        event_extra: dict[str, Any] | None = None,
    ) -> JobRecord:
        """Move a job to ``to`` if its status is in ``allowed_from`` and expectations hold.

        Sets ``fields`` and appends ``events`` (default: ``job.<to>``) in the same atomic step.
        Raises :class:`IllegalTransition` otherwise (reason ``not_found``, ``illegal`` or ``stale``).
        """
        sources = sorted(set(allowed_from))
        for source in sources:
            if to not in LEGAL_MOVES[source]:
                raise IllegalTransition(job_id, f"move {source} -> {to} is not in the lifecycle", source, "")
        pairs: list[str] = []
        for name, value in (fields or {}).items():
            pairs += [name, _encode(value)]
        args = [
            to,
            ",".join(sources),
            "" if expect_attempt is None else str(expect_attempt),
            expect_worker or "",
            "1" if bump_attempt else "0",
            ",".join(events or [EVENT_FOR_STATUS.get(to, f"job.{to}")]),
            _encode(event_extra or {}),
            str(EVENT_MAXLEN),
            *pairs,
        ]
        keys = [job_key(job_id), events_key(job_id)]
        reply = [text(part) for part in self._transition(keys=keys, args=args)]
        if reply[0] != "ok":
            raise IllegalTransition(job_id, reply[1], reply[2], reply[3])
        record = self.get(job_id)
        assert record is not None
        return record

    def claim(
        self,
        job_id: str,
        attempt: int,
        worker_id: str,
        max_attempts: int,
        *,
        model: str | None = None,
        ticket: str | None = None,
    ) -> JobRecord | None:
        """Spend one task message on a job of its model and claim it; None means: acknowledge and drop it.

        A message is a ticket for its model's queue (fair share, docs/design.md): ``(job_id, attempt)``
        is only a hint. The job taken is the head of ``fg:queue:{model}`` -- highest priority, then the
        owner whose turn it is, then that owner's oldest -- or None when nothing is queued. ``ticket``
        names the message across redeliveries (Celery's task id; by default ``job_id:attempt``): a
        ticket whose job still runs under it was redelivered, and is a duplicate while that job's worker
        lives; if the worker died the job is reclaimed as attempt + 1, or fails ``worker_lost`` once
        ``max_attempts`` were used. ``model`` defaults to the hinted job's.
        """
        batch = self.claim_batch(job_id, attempt, worker_id, max_attempts, model=model, ticket=ticket)
        return batch[0] if batch else None

    def claim_batch(
        self,
        job_id: str,
        attempt: int,
        worker_id: str,
        max_attempts: int,
        *,
        model: str | None = None,
        ticket: str | None = None,
        max_batch: int = 1,
    ) -> list[JobRecord]:
        """:meth:`claim`, and with ``max_batch`` > 1 up to ``max_batch - 1`` more queued jobs that can run
        in one pipeline call with the first (docs/design.md, "Batching"), in one atomic step.

        The first job is the one :meth:`claim` would take; its mates are the next queued jobs of its
        priority band in fair-share order that batch with it (the others are skipped), looking at most
        :data:`BATCH_LOOKAHEAD` jobs deep. Each is claimed as its own current attempt, with its own
        ``job.started``. Empty means: acknowledge and drop the message.
        """
        model = model or text(self.redis.hget(job_key(job_id), "model") or "")
        if not model:
            return []
        ticket = ticket or f"{job_id}:{attempt}"
        args = [model, ticket, worker_id, now_iso(), str(max_attempts), str(EVENT_MAXLEN)]
        args += [str(max(max_batch, 1)), str(BATCH_LOOKAHEAD)]
        outcome, *ids = (text(part) for part in self._claim(args=args))
        if outcome == "none":
            return []
        records = [record for record in map(self.get, ids) if record is not None]
        if outcome == "lost":
            for record in records:
                with contextlib.suppress(IllegalTransition):  # else the sweeper got there first
                    self._fail_worker_lost(record, max_attempts)
            return []
        return records

    def queue_head(self, model: str) -> JobRecord | None:
        """The queued job of ``model`` that the next ticket would claim."""
        head = self.redis.zrange(f"{PREFIX}:queue:{model}", 0, 0)
        return self.get(text(head[0])) if head else None

    def record_progress(self, job_id: str, attempt: int, worker: str, step: int, total: int) -> str:
        """Record step progress of the owning attempt; returns the job's current status, ``superseded`` when
        another attempt owns it now, or ``cancel`` when its cancel was requested."""
        progress = _encode(Progress(step=step, total=total))
        reply = self._progress(
            keys=[job_key(job_id), events_key(job_id)],
            args=[str(attempt), worker, progress, str(EVENT_MAXLEN)],
        )
        return text(reply)

    def active_jobs(self, owner: str) -> int:
        """How many of the owner's jobs are queued or running."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zcard(f"{PREFIX}:owner:{owner}:status:queued")
        pipe.zcard(f"{PREFIX}:owner:{owner}:status:running")
        return sum(int(count) for count in pipe.execute())

    def queue_depth(self, model: str) -> int:
        """How many jobs of ``model`` are queued."""
        return int(self.redis.zcard(f"{PREFIX}:queue:{model}"))

    def queue_position(self, model: str, job_id: str) -> int | None:
        """How many queued jobs of the same model workers will take before this one, as the queue stands
        (fair share: a later job of an owner whose turn comes first may still go ahead of it)."""
        rank = self.redis.zrank(f"{PREFIX}:queue:{model}", job_id)
        return None if rank is None else int(rank)  # type: ignore[arg-type]

    def list_for_owner(
        self, owner: str, status: str | None, limit: int, cursor: str | None
    ) -> tuple[list[JobRecord], str | None]:
        """The owner's jobs, newest first; ``cursor`` is the last id of the previous page."""
        index = f"{PREFIX}:owner:{owner}:" + (f"status:{status}" if status else "jobs")
        upper = f"({cursor}" if cursor else "+"
        ids = [text(i) for i in self.redis.zrevrangebylex(index, upper, "-", start=0, num=limit + 1)]
        page, more = ids[:limit], len(ids) > limit
        pipe = self.redis.pipeline(transaction=False)
        for job_id in page:
            pipe.hgetall(job_key(job_id))
        records = [JobRecord.from_hash(fields) for fields in pipe.execute() if fields]
        return records, (page[-1] if more and page else None)

    def is_worker_alive(self, worker_id: str) -> bool:
        return bool(self.redis.exists(alive_key(worker_id)))


__all__ = ["IllegalTransition", "JobOptions", "JobRecord", "JobStore", "QuotaExceeded", "Quotas", "Submitted"]
