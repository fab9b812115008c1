"""Batches through run_job: one message claims compatible jobs, one engine call runs them, and each job
keeps its own events, progress, cancel, upload, metrics and end. A fake engine and real Redis."""

from __future__ import annotations

import argparse
import hashlib
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import redis
from PIL import Image
from prometheus_client import CollectorRegistry

from shared.ids import new_job_id
from shared.jobstore import JobOptions, JobRecord, JobStore
from shared.schemas import GenerationParams
from shared.settings import Settings
from shared.storage import LocalStorage, StorageError
from shared.sweeper import sweep_lost_workers
from shared.workers import live_workers
from tests.support import generation_params
from worker.cli import add_worker_arguments, engine_options
from worker.heartbeat import Heartbeat
from worker.metrics import WorkerMetrics
from worker.options import EngineOptions
from worker.runner import WorkerRuntime, run_job
from worker.types import GenerationOutput, StepCallback

STEPS = 3
StepHook = Callable[[int], None]


class FakeBatchEngine:
    """Solid-colour images whose colour is the job's seed; records each call's batch and steps run."""

    def __init__(self, on_step_hook: StepHook | None = None, fail_with: Exception | None = None) -> None:
        self.hook, self.fail_with = on_step_hook, fail_with
        self.batches: list[list[str]] = []
        self.steps_run = 0

    def generate(self, params: GenerationParams, on_step: StepCallback) -> GenerationOutput:
        return self.generate_batch([params], on_step)

    def generate_batch(self, batch: Sequence[GenerationParams], on_step: StepCallback) -> GenerationOutput:
        self.batches.append([params.prompt for params in batch])
        total = batch[0].num_inference_steps
        for step in range(1, total + 1):
            if self.hook:
                self.hook(step)
            on_step(step, total)
            self.steps_run = step
        if self.fail_with:
            raise self.fail_with
        images = [Image.new("RGB", (p.width, p.height), (p.image_seed(0) % 256, 0, 0)) for p in batch]
        return GenerationOutput(images=images, peak_memory_mb=40.0)


class StorageFailingFor(LocalStorage):
    """Refuses uploads of one job's images."""

    job_id: str | None = None

    def put(self, key: str, data: bytes, content_type: str) -> None:
        if self.job_id and key.startswith(self.job_id):
            raise StorageError("access denied")
        super().put(key, data, content_type)


@pytest.fixture
def runtime(redis_client: redis.Redis, tmp_path: Path) -> WorkerRuntime:
    storage = StorageFailingFor(tmp_path / "files", "http://h", b"k")
    return WorkerRuntime(
        JobStore(redis_client), storage, FakeBatchEngine(), "w1", 3, model="flux-tiny", max_batch_size=4
    )


def submit(
    runtime: WorkerRuntime, count: int, options: JobOptions | None = None, **overrides: object
) -> list[str]:
    ids = []
    for index in range(count):
        values = {
            "prompt": f"prompt {len(ids)}",
            "seed": 10 + index,
            "num_inference_steps": STEPS,
            **overrides,
        }
        ids.append(runtime.store.create(new_job_id(), "alice", generation_params(**values), options).id)
    return ids


def record(runtime: WorkerRuntime, job_id: str) -> JobRecord:
    found = runtime.store.get(job_id)
    assert found is not None
    return found


def events(runtime: WorkerRuntime, job_id: str) -> list[str]:
    return [fields["type"] for _, fields in runtime.store.redis.xrange(f"fg:job:{job_id}:events")]


def engine(runtime: WorkerRuntime) -> FakeBatchEngine:
    assert isinstance(runtime.engine, FakeBatchEngine)
    return runtime.engine


def test_compatible_jobs_run_in_one_call_and_each_ends_with_its_own_image_and_metrics(
    runtime: WorkerRuntime,
) -> None:
    jobs = submit(runtime, 3)
    assert run_job(jobs[0], 1, runtime) == "succeeded,succeeded,succeeded"
    assert engine(runtime).batches == [["prompt 0", "prompt 1", "prompt 2"]]
    storage = runtime.storage
    assert isinstance(storage, LocalStorage)
    for index, job_id in enumerate(jobs):
        done = record(runtime, job_id)
        assert done.status == "succeeded" and done.images is not None and done.metrics is not None
        [image] = done.images
        assert (image.seed, image.key) == (10 + index, f"{job_id}/1/0.png")
        data, _ = storage.read(image.key) or (b"", "")
        assert hashlib.sha256(data).hexdigest() == image.sha256
        assert (done.metrics.batch_size, done.metrics.peak_memory_mb, done.progress.step) == (3, 40.0, STEPS)
        assert events(runtime, job_id) == [
            "job.queued",
            "job.started",
            *["job.progress"] * STEPS,
            "job.succeeded",
        ]
    assert run_job(jobs[1], 1, runtime) == "dropped"  # the mates' own messages find nothing queued


def test_a_job_alone_on_a_batching_worker_reports_a_batch_of_one(runtime: WorkerRuntime) -> None:
    [job_id] = submit(runtime, 1)
    submit(runtime, 1, width=128)
    assert run_job(job_id, 1, runtime) == "succeeded"
    assert record(runtime, job_id).metrics.batch_size == 1  # type: ignore[union-attr]


def test_a_job_canceled_in_a_batch_ends_canceled_at_that_step_while_the_others_finish(
    runtime: WorkerRuntime,
) -> None:
    jobs = submit(runtime, 3)
    seen: dict[int, str] = {}

    def cancel_second(step: int) -> None:
        seen[step] = record(runtime, jobs[1]).status
        if step == 2:
            runtime.store.cancel(jobs[1])

    runtime.engine = FakeBatchEngine(cancel_second)
    assert run_job(jobs[0], 1, runtime) == "succeeded,canceled,succeeded"
    assert seen == {1: "running", 2: "running", 3: "canceled"}  # ended at step 2, not with the batch
    canceled = record(runtime, jobs[1])
    assert (canceled.status, canceled.images, canceled.error, canceled.progress.step) == (
        "canceled",
        None,
        None,
        1,
    )
    assert events(runtime, jobs[1])[-1] == "job.canceled"
    storage = runtime.storage
    assert isinstance(storage, LocalStorage) and not list(storage.root.rglob(f"{jobs[1]}*"))
    assert [record(runtime, job_id).status for job_id in (jobs[0], jobs[2])] == ["succeeded", "succeeded"]


def test_a_batch_whose_jobs_are_all_canceled_stops_before_the_decode(runtime: WorkerRuntime) -> None:
    jobs = submit(runtime, 2, num_inference_steps=10)

    def cancel_all(step: int) -> None:
        if step == 2:
            runtime.store.cancel(jobs[0], "deadline_exceeded")
            runtime.store.cancel(jobs[1])

    runtime.engine = FakeBatchEngine(cancel_all, fail_with=AssertionError("a canceled batch must not decode"))
    assert run_job(jobs[0], 1, runtime) == "canceled,canceled"
    assert engine(runtime).steps_run == 1
    assert record(runtime, jobs[0]).error.code == "deadline_exceeded"  # type: ignore[union-attr]
    assert record(runtime, jobs[1]).error is None


def test_a_pipeline_error_fails_every_job_of_the_batch_as_it_would_fail_one(runtime: WorkerRuntime) -> None:
    class OutOfMemoryError(RuntimeError):
        pass

    jobs = submit(runtime, 3)
    runtime.engine = FakeBatchEngine(fail_with=OutOfMemoryError("CUDA out of memory"))
    assert run_job(jobs[0], 1, runtime) == "failed,failed,failed"
    for job_id in jobs:
        failed = record(runtime, job_id)
        assert failed.error is not None and failed.error.code == "out_of_memory"
        assert failed.error_detail is not None and "CUDA out of memory" in failed.error_detail


def test_a_failed_upload_fails_only_its_own_job(runtime: WorkerRuntime) -> None:
    jobs = submit(runtime, 3)
    storage = runtime.storage
    assert isinstance(storage, StorageFailingFor)
    storage.job_id = jobs[1]
    assert run_job(jobs[0], 1, runtime) == "succeeded,failed,succeeded"
    assert record(runtime, jobs[1]).error.code == "storage_error"  # type: ignore[union-attr]


def test_a_job_past_its_deadline_at_claim_is_canceled_and_left_out_of_the_call(
    runtime: WorkerRuntime,
) -> None:
    late = submit(runtime, 1, JobOptions(deadline_at="2020-01-01T00:00:00.000Z"))
    jobs = submit(runtime, 2)
    assert run_job(late[0], 1, runtime) == "canceled,succeeded,succeeded"
    assert record(runtime, late[0]).error.code == "deadline_exceeded"  # type: ignore[union-attr]
    assert engine(runtime).batches == [["prompt 0", "prompt 1"]]
    assert record(runtime, jobs[1]).metrics.batch_size == 2  # type: ignore[union-attr]


def test_a_job_reclaimed_from_a_batch_is_dropped_and_the_others_finish(runtime: WorkerRuntime) -> None:
    jobs = submit(runtime, 2)

    def reclaim_first(step: int) -> None:
        if step == 2:  # w1 looked dead and its message went to another worker, which reclaimed one job
            runtime.store.claim_batch("hint", 1, "w2", 3, model="flux-tiny", ticket=ticket(runtime, jobs[0]))

    runtime.engine = FakeBatchEngine(reclaim_first)
    assert run_job(jobs[0], 1, runtime, ticket="m1") == "dropped,succeeded"
    reclaimed = record(runtime, jobs[0])
    assert (reclaimed.status, reclaimed.attempt, reclaimed.worker) == ("running", 2, "w2")


def ticket(runtime: WorkerRuntime, job_id: str) -> str:
    return str(runtime.store.redis.hget(f"fg:job:{job_id}", "ticket"))


def test_the_heartbeat_shows_the_whole_batch_and_counts_each_job_done(
    runtime: WorkerRuntime, redis_client: redis.Redis
) -> None:
    heartbeat = Heartbeat(redis_client, "w1", {"model": "flux-tiny"}, 60, 120)
    runtime.heartbeat = heartbeat
    jobs = submit(runtime, 3)
    shown: list[str] = []

    def beat(step: int) -> None:
        heartbeat.beat()
        shown.append(live_workers(redis_client)[0]["current_job"])

    runtime.engine = FakeBatchEngine(beat)
    heartbeat.start()
    try:
        run_job(jobs[0], 1, runtime)
        heartbeat.beat()
        worker = live_workers(redis_client)[0]
    finally:
        heartbeat.stop()
    assert shown[0] == ",".join(jobs)
    assert (worker["current_job"], worker["jobs_done"]) == ("", "3")


def test_a_dead_workers_batch_is_requeued_job_by_job(runtime: WorkerRuntime, settings: Settings) -> None:
    from shared.queue import create_celery

    jobs = submit(runtime, 3)

    def die(step: int) -> None:  # the process is killed mid-batch: nothing after this runs
        raise SystemExit(137)

    runtime.engine = FakeBatchEngine(die)
    with pytest.raises(SystemExit):
        run_job(jobs[0], 1, runtime)
    assert [record(runtime, job_id).status for job_id in jobs] == ["running"] * 3
    assert sweep_lost_workers(runtime.store, create_celery(settings), settings) == 3  # w1 never heartbeat
    for job_id in jobs:
        requeued = record(runtime, job_id)
        assert (requeued.status, requeued.attempt, requeued.worker) == ("queued", 2, None)


def test_worker_metrics_count_the_batch_size_of_each_succeeded_job(runtime: WorkerRuntime) -> None:
    metrics = WorkerMetrics(CollectorRegistry())
    runtime.observer = metrics
    submit(runtime, 2)
    run_job("hint", 1, runtime)
    registry = metrics.registry
    assert registry.get_sample_value("fluxgate_job_batch_size_count", {"model": "flux-tiny"}) == 2
    assert registry.get_sample_value("fluxgate_job_batch_size_sum", {"model": "flux-tiny"}) == 4


def worker_options(*flags: str) -> EngineOptions:
    parser = argparse.ArgumentParser()
    add_worker_arguments(parser)
    return engine_options(parser.parse_args(list(flags)))


@pytest.mark.parametrize("value", ["0", "-2", "17"])
def test_a_bad_max_batch_size_stops_the_worker_naming_the_flag(value: str) -> None:
    with pytest.raises(SystemExit, match="--max-batch-size"):
        worker_options("--max-batch-size", value)


def test_max_batch_size_is_off_by_default_and_read_from_the_flag_or_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert worker_options().max_batch_size == 1
    monkeypatch.setenv("FLUXGATE_MAX_BATCH_SIZE", "4")
    assert worker_options().max_batch_size == 4
    assert worker_options("--max-batch-size", "2").max_batch_size == 2


def test_a_multi_gpu_group_refuses_batching_at_start() -> None:
    with pytest.raises(SystemExit, match="--max-batch-size 4 is for one-GPU workers"):
        worker_options("--num-gpus", "2", "--max-batch-size", "4")
    assert worker_options("--num-gpus", "2").max_batch_size == 1


class StorageWaitingForAll(LocalStorage):
    """Holds each upload until ``expected`` uploads have started: only side-by-side uploads get through."""

    def __init__(self, root: Path, expected: int) -> None:
        super().__init__(root, "http://h", b"k")
        self.barrier = threading.Barrier(expected, timeout=10)

    def put(self, key: str, data: bytes, content_type: str) -> None:
        try:
            self.barrier.wait()
        except threading.BrokenBarrierError as error:
            raise StorageError("the uploads ran one after another") from error
        super().put(key, data, content_type)


def test_a_batchs_jobs_end_side_by_side(redis_client: redis.Redis, tmp_path: Path) -> None:
    storage = StorageWaitingForAll(tmp_path / "files", expected=3)
    runtime = WorkerRuntime(
        JobStore(redis_client), storage, FakeBatchEngine(), "w1", 3, model="flux-tiny", max_batch_size=4
    )
    jobs = submit(runtime, 3)
    assert run_job(jobs[0], 1, runtime) == "succeeded,succeeded,succeeded"
    for job_id in jobs:
        done = record(runtime, job_id)
        assert done.images is not None and storage.read(done.images[0].key) is not None
