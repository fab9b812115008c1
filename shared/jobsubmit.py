"""A submission in one Redis round trip: quotas, the queued job, its deadline, its task message and its
queue position, all in the ``SUBMIT`` script (shared/store_scripts.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from shared.ids import now_iso, parse_iso
from shared.jobrecord import JobOptions, JobRecord, text
from shared.queue import BrokerMessage
from shared.schemas import GenerationParams, Progress

EVENT_MAXLEN = 1000


@dataclass(frozen=True)
class Quotas:
    """The limits a submission is admitted under; 0 or "" turns one off."""

    max_queued_jobs: int = 0  # of the job's model
    max_active_jobs: int = 0  # queued + running of the owner
    rate_key: str = ""  # the API key's counter for the current window
    rate_limit: int = 0
    rate_ttl_s: int = 0


class QuotaExceeded(Exception):
    """A quota refused the submission: ``reason`` is the error code, ``count`` what the script saw."""

    def __init__(self, reason: str, count: int) -> None:
        super().__init__(f"{reason} ({count})")
        self.reason = reason
        self.count = count


@dataclass(frozen=True)
class Submitted:
    record: JobRecord
    queue_position: int


@dataclass(frozen=True)
class SubmitCall:
    """The script's keys and arguments, and the record they write."""

    keys: list[str]
    args: list[str]
    fields: dict[str, str]


def encode(value: Any) -> str:
    """A record field: strings as they are, models and structures as compact JSON."""
    if isinstance(value, str):
        return value
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    return json.dumps(value, separators=(",", ":"))


def submit_call(
    job_id: str,
    owner: str,
    params: GenerationParams,
    options: JobOptions,
    quotas: Quotas,
    message: BrokerMessage | None,
) -> SubmitCall:
    """The ``SUBMIT`` call that creates ``job_id`` queued (attempt 1) if ``quotas`` admit it."""
    progress = Progress(step=0, total=params.num_inference_steps)
    fields: dict[str, str] = {
        "id": job_id,
        "owner": owner,
        "model": params.model,
        "status": "queued",
        "attempt": "1",
        "created_at": now_iso(),
        "params": encode(params),
        "progress": encode(progress),
        "metadata": encode(options.metadata),
        "priority": options.priority,
        "webhook_url": options.webhook_url or "",
        "webhook_events": ",".join(options.webhook_events),
        "deadline_at": options.deadline_at or "",
    }
    event = {"type": "job.queued", "job_id": job_id, "status": "queued", "attempt": 1}
    event["progress"] = progress.model_dump()
    deadline = str(parse_iso(options.deadline_at).timestamp()) if options.deadline_at else ""
    args = [
        str(EVENT_MAXLEN),
        owner,
        params.model,
        encode(event),
        str(quotas.max_queued_jobs),
        str(quotas.max_active_jobs),
        quotas.rate_key,
        str(quotas.rate_limit),
        str(quotas.rate_ttl_s),
        deadline,
        message.list_name if message else "",
        message.payload if message else "",
        *(part for item in fields.items() for part in item),
    ]
    return SubmitCall([f"fg:job:{job_id}", f"fg:job:{job_id}:events"], args, fields)


def submit_outcome(call: SubmitCall, reply: list[Any]) -> Submitted:
    """The script's reply: the new job and its queue position; raises :class:`QuotaExceeded` otherwise."""
    outcome, count = text(reply[0]), int(reply[1])
    if outcome == "ok":
        return Submitted(JobRecord.from_hash(call.fields), count)
    raise QuotaExceeded(outcome, count)
