"""Jobs' endings in the background (worker.endings): the task returns when the pipeline does, the next
job runs while the last ones upload, and every job still reaches its terminal status."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import redis

from shared.jobstore import JobStore
from shared.storage import LocalStorage
from tests.worker.test_batching import FakeBatchEngine, engine, record, submit
from worker.endings import ENDING, Endings
from worker.runner import WorkerRuntime, run_job


class HeldStorage(LocalStorage):
    """Uploads wait until the test lets them through; ``broken`` makes them fail unexpectedly."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, "http://h", b"k")
        self.open = threading.Event()
        self.broken = False

    def put(self, key: str, data: bytes, content_type: str) -> None:
        if self.broken:
            raise RuntimeError("disk on fire")
        assert self.open.wait(10), "the test never let the upload through"
        super().put(key, data, content_type)


@pytest.fixture
def storage(tmp_path: Path) -> HeldStorage:
    return HeldStorage(tmp_path / "files")


def runtime_with(redis_client: redis.Redis, storage: HeldStorage, endings: Endings | None) -> WorkerRuntime:
    store = JobStore(redis_client)
    return WorkerRuntime(
        store, storage, FakeBatchEngine(), "w1", 3, model="flux-tiny", max_batch_size=2, endings=endings
    )


def test_the_next_job_runs_while_the_last_batch_uploads_and_every_job_then_succeeds(
    redis_client: redis.Redis, storage: HeldStorage
) -> None:
    endings = Endings(threads=4)
    runtime = runtime_with(redis_client, storage, endings)
    jobs = submit(runtime, 3)
    assert run_job(jobs[0], 1, runtime) == f"{ENDING},{ENDING}"  # returned with the uploads held
    assert [record(runtime, job_id).status for job_id in jobs[:2]] == ["running", "running"]
    assert run_job(jobs[2], 1, runtime) == ENDING
    assert engine(runtime).batches == [["prompt 0", "prompt 1"], ["prompt 2"]]
    assert endings.pending == 3
    storage.open.set()
    assert endings.drain(10)
    for job_id in jobs:
        done = record(runtime, job_id)
        assert done.status == "succeeded" and done.images is not None
        assert storage.read(done.images[0].key) is not None


def test_drain_waits_for_the_pending_endings_and_says_when_some_are_left(
    redis_client: redis.Redis, storage: HeldStorage
) -> None:
    endings = Endings(threads=2)
    runtime = runtime_with(redis_client, storage, endings)
    job_id = submit(runtime, 1)[0]
    assert run_job(job_id, 1, runtime) == ENDING
    assert not endings.drain(0.05)
    storage.open.set()
    assert endings.drain(10) and endings.pending == 0
    assert record(runtime, job_id).status == "succeeded"


@pytest.mark.parametrize("background", [True, False])
def test_an_unexpected_error_while_ending_fails_the_job_instead_of_leaving_it_running(
    redis_client: redis.Redis, storage: HeldStorage, background: bool
) -> None:
    endings = Endings(threads=2) if background else None
    runtime = runtime_with(redis_client, storage, endings)
    storage.broken = True
    jobs = submit(runtime, 2)
    outcome = run_job(jobs[0], 1, runtime)
    if endings is not None:
        assert endings.drain(10)
    assert outcome == (f"{ENDING},{ENDING}" if background else "failed,failed")
    for job_id in jobs:
        done = record(runtime, job_id)
        assert done.status == "failed" and done.error is not None
        assert done.error.code == "generation_failed"
        assert done.error.message == "Finishing the result failed."


def test_endings_need_a_thread() -> None:
    with pytest.raises(ValueError, match="threads must be >= 1"):
        Endings(threads=0)
