"""The task message the gateway pushes in its submit script is the one Celery's send_task writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis

from shared.queue import PRIORITY_STEPS, broker_lists, create_celery, enqueue_generation, generation_message
from tests.conftest import make_settings


def _without_ids(raw: str) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(raw)
    for name in ("id", "root_id"):
        message["headers"][name] = "-"
    for name in ("correlation_id", "delivery_tag"):
        message["properties"][name] = "-"
    return message


@pytest.mark.parametrize("priority", list(PRIORITY_STEPS))
def test_generation_message_matches_what_send_task_writes_on_the_same_list(
    redis_client: redis.Redis, tmp_path: Path, priority: str
) -> None:
    celery = create_celery(make_settings(tmp_path))
    enqueue_generation(celery, "gen.flux-tiny", "job_a", 2, priority)
    [list_name] = [name for name in broker_lists("gen.flux-tiny") if redis_client.llen(name)]
    [sent] = redis_client.lrange(list_name, 0, -1)  # type: ignore[misc]
    built = generation_message(celery, "gen.flux-tiny", "job_a", 2, priority)
    assert built.list_name == list_name
    assert _without_ids(built.payload) == _without_ids(str(sent))
    task = json.loads(built.payload)
    assert task["headers"]["id"] == task["headers"]["root_id"] == task["properties"]["correlation_id"]
