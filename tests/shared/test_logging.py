"""JSON log lines: one object per line, with the job's id inside a job context."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from shared.logging import JsonFormatter, configure_logging, job_context


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("fluxgate.test")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield stream
    logger.removeHandler(handler)


def parsed(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_each_record_is_one_json_object(lines: io.StringIO) -> None:
    log = logging.getLogger("fluxgate.test")
    log.info("hello %s", "world")
    try:
        raise ValueError("multi\nline")
    except ValueError:
        log.exception("it broke")
    first, second = parsed(lines)
    assert (first["level"], first["logger"], first["message"]) == ("INFO", "fluxgate.test", "hello world")
    assert "job_id" not in first and str(first["time"]).endswith("+00:00")
    assert second["level"] == "ERROR" and "ValueError: multi\nline" in str(second["exception"])


def test_lines_inside_a_job_carry_its_id_and_extra_wins(lines: io.StringIO) -> None:
    log = logging.getLogger("fluxgate.test")
    with job_context("job_1", 2, "w1"):
        log.info("inside")
        log.info("explicit", extra={"job_id": "job_other"})
    log.info("after")
    inside, explicit, after = parsed(lines)
    assert (inside["job_id"], inside["attempt"], inside["worker_id"]) == ("job_1", 2, "w1")
    assert explicit["job_id"] == "job_other"
    assert "job_id" not in after


def test_configure_logging_replaces_root_handlers() -> None:
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    try:
        configure_logging(json=True)
        configure_logging(json=True)
        assert len(root.handlers) == 1 and isinstance(root.handlers[0].formatter, JsonFormatter)
        configure_logging(json=False)
        assert not isinstance(root.handlers[0].formatter, JsonFormatter)
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved:
            root.addHandler(handler)
        root.setLevel(level)
