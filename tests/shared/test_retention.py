"""Retention and purge: a finished job and everything it left go; nothing else does."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from shared.ids import new_job_id
from shared.jobstore import JobStore
from shared.retention import sweep_retention
from shared.schemas import StoredImage
from shared.storage import LocalStorage
from tests.conftest import make_settings
from tests.support import generation_params


def finished_job(store: JobStore, storage: LocalStorage) -> str:
    job_id = store.create(new_job_id(), "alice", generation_params()).id
    store.claim(job_id, 1, "w1", max_attempts=3)
    key = f"{job_id}/1/0.png"
    storage.put(key, b"png", "image/png")
    image = StoredImage(key=key, content_type="image/png", width=64, height=64, seed=1, sha256="x", bytes=3)
    store.transition(job_id, "succeeded", allowed_from={"running"}, fields={"images": [image.model_dump()]})
    return job_id


def test_jobs_past_retention_are_purged_with_their_objects(redis_client: redis.Redis, tmp_path: Path) -> None:
    store, storage = JobStore(redis_client), LocalStorage(tmp_path, "http://h", b"k")
    old = finished_job(store, storage)
    running = store.create(new_job_id(), "alice", generation_params()).id
    store.claim(running, 1, "w1", max_attempts=3)
    assert sweep_retention(store, storage, retention_s=3600) == 0  # ended just now
    assert sweep_retention(store, storage, retention_s=3600, now=time.time() + 3601) == 1
    assert store.get(old) is None and not (tmp_path / old).exists()
    assert not redis_client.exists(f"fg:job:{old}:events")
    listed, _ = store.list_for_owner("alice", None, 10, None)
    assert [record.id for record in listed] == [running]
    assert store.list_for_owner("alice", "succeeded", 10, None)[0] == []


def test_retried_job_leaves_the_retention_index(redis_client: redis.Redis, tmp_path: Path) -> None:
    store, storage = JobStore(redis_client), LocalStorage(tmp_path, "http://h", b"k")
    job_id = finished_job(store, storage)
    store.transition(job_id, "queued", allowed_from={"succeeded"}, bump_attempt=True)
    assert store.ended_before(time.time() + 10**6) == []


def test_links_must_expire_before_their_objects(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="RESULT_URL_TTL_S"):
        make_settings(tmp_path, result_url_ttl_s=7 * 24 * 3600, retention_s=7 * 24 * 3600)
