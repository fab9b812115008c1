"""A job as stored (``JobRecord``) and what a submission sets besides its parameters (``JobOptions``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, Field

from shared.schemas import TERMINAL_STATUSES, GenerationParams, JobError, JobMetrics, Progress, StoredImage


def text(value: Any) -> str:
    """Redis replies as str (clients decode responses; bytes are tolerated)."""
    return value.decode() if isinstance(value, bytes) else str(value)


JSON_FIELDS = ("params", "progress", "images", "error", "metrics", "metadata")


@dataclass(frozen=True)
class JobOptions:
    """What a submission sets besides the generation parameters."""

    metadata: dict[str, Any] = field(default_factory=dict)
    priority: str = "normal"
    webhook_url: str | None = None
    webhook_events: tuple[str, ...] = ()
    deadline_at: str | None = None


class JobRecord(BaseModel):
    """A job as stored in its Redis hash (structured fields are JSON there)."""

    id: str
    owner: str
    model: str
    status: str
    attempt: int
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    worker: str | None = None
    params: GenerationParams
    progress: Progress = Field(default_factory=Progress)
    images: list[StoredImage] | None = None
    error: JobError | None = None
    error_detail: str | None = None
    metrics: JobMetrics | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    priority: str = "normal"
    webhook_url: str | None = None
    webhook_events: list[str] = Field(default_factory=list)
    deadline_at: str | None = None
    cancel_requested: str | None = None

    @classmethod
    def from_hash(cls, fields: dict[Any, Any]) -> JobRecord:
        decoded = {text(name): text(value) for name, value in fields.items()}
        values: dict[str, Any] = {name: value or None for name, value in decoded.items()}
        for name in JSON_FIELDS:
            if values.get(name):
                values[name] = json.loads(values[name])
        values["webhook_events"] = [e for e in (values.get("webhook_events") or "").split(",") if e]
        return cls.model_validate(values)

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES
