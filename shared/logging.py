"""Logging set-up for every process: text for people, or one JSON object per line for log pipelines.

Log lines inside a job carry its id: :func:`job_context` sets a context variable for the job's
duration, and the JSON formatter adds ``job_id``, ``attempt`` and ``worker_id`` from it (or from
``extra=``) to every line.
"""

from __future__ import annotations

import contextvars
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CONTEXT_FIELDS = ("job_id", "attempt", "worker_id")

_job: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("fluxgate_job", default=None)


@contextmanager
def job_context(job_id: str, attempt: int, worker_id: str) -> Iterator[None]:
    """Tag every log line written inside the block (in this thread or task) with the job."""
    token = _job.set({"job_id": job_id, "attempt": attempt, "worker_id": worker_id})
    try:
        yield
    finally:
        _job.reset(token)


def current_job() -> dict[str, Any] | None:
    """The job whose context is active here, or None."""
    return _job.get()


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, job fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(current_job() or {})
        for name in CONTEXT_FIELDS:  # extra= wins over the context
            if name in record.__dict__:
                entry[name] = record.__dict__[name]
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


def configure_logging(json: bool, level: int = logging.INFO) -> None:
    """Send the root logger's records to stderr, as JSON lines or as text (replacing earlier handlers)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
