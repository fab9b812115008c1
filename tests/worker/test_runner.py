"""run_job: claim, generate, encode, upload and record, with a fake engine and real Redis."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
import redis
from PIL import Image

from shared.ids import new_job_id
from shared.jobstore import JobOptions, JobRecord, JobStore
from shared.schemas import GenerationParams
from shared.storage import LocalStorage, StorageError
from tests.support import generation_params
from worker.runner import WorkerRuntime, run_job
from worker.types import GenerationOutput


class FakeEngine:
    """Solid-colour images whose colour depends on the seed; reports each step."""

    def __init__(self, fail_with: Exception | None = None) -> None:
        self.fail_with = fail_with

    def generate(self, params: GenerationParams, on_step) -> GenerationOutput:  # type: ignore[no-untyped-def]
        for step in range(1, params.num_inference_steps + 1):
            on_step(step, params.num_inference_steps)
        if self.fail_with:
            raise self.fail_with
        images = [
            Image.new("RGB", (params.width, params.height), (params.image_seed(i) % 256, 0, 0))
            for i in range(params.num_images)
        ]
        return GenerationOutput(images=images, peak_memory_mb=12.5)


class BrokenStorage(LocalStorage):
    def put(self, key: str, data: bytes, content_type: str) -> None:
        raise StorageError("S3 bucket 'gone' does not exist")


def params(**overrides: object) -> GenerationParams:
    return generation_params(
        **{**{"height": 48, "num_inference_steps": 3, "seed": 10, "num_images": 2}, **overrides}
    )


@pytest.fixture
def runtime(redis_client: redis.Redis, tmp_path: Path) -> WorkerRuntime:
    storage = LocalStorage(tmp_path / "files", "http://h", b"k")
    return WorkerRuntime(JobStore(redis_client), storage, FakeEngine(), "w1", max_attempts=3)


def submit(runtime: WorkerRuntime, **overrides: object) -> str:
    return runtime.store.create(new_job_id(), "alice", params(**overrides)).id


@pytest.mark.parametrize(
    ("output_format", "pil_format"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")]
)
def test_successful_job_stores_each_image_with_its_hash_size_and_seed(
    runtime: WorkerRuntime, output_format: str, pil_format: str
) -> None:
    job_id = submit(runtime, output_format=output_format)
    assert run_job(job_id, 1, runtime) == "succeeded"
    record = runtime.store.get(job_id)
    assert record is not None and record.images is not None and record.metrics is not None
    assert (record.status, record.progress.step, record.finished_at is not None) == ("succeeded", 3, True)
    assert [image.seed for image in record.images] == [10, 11]
    storage = runtime.storage
    assert isinstance(storage, LocalStorage)
    for image in record.images:
        data, _ = storage.read(image.key) or (b"", "")
        assert hashlib.sha256(data).hexdigest() == image.sha256
        with Image.open(io.BytesIO(data)) as decoded:
            assert (decoded.format, decoded.size) == (pil_format, (64, 48))
        assert (image.width, image.height) == (64, 48)
    assert record.metrics.peak_memory_mb == 12.5 and record.metrics.inference_s is not None


def test_pipeline_exception_fails_the_job_with_a_safe_message_and_keeps_detail(
    runtime: WorkerRuntime,
) -> None:
    runtime.engine = FakeEngine(fail_with=RuntimeError("secret internals at 0xdeadbeef"))
    job_id = submit(runtime)
    assert run_job(job_id, 1, runtime) == "failed"
    record = runtime.store.get(job_id)
    assert record is not None and record.error is not None
    assert record.error.code == "generation_failed"
    assert "0xdeadbeef" not in record.error.message
    assert record.error_detail is not None and "0xdeadbeef" in record.error_detail


def test_out_of_memory_fails_with_its_own_code(runtime: WorkerRuntime) -> None:
    class OutOfMemoryError(RuntimeError):
        pass

    runtime.engine = FakeEngine(fail_with=OutOfMemoryError("CUDA out of memory"))
    job_id = submit(runtime)
    run_job(job_id, 1, runtime)
    assert runtime.store.get(job_id).error.code == "out_of_memory"  # type: ignore[union-attr]


def test_upload_failure_fails_the_job_with_storage_error(runtime: WorkerRuntime, tmp_path: Path) -> None:
    runtime.storage = BrokenStorage(tmp_path, "http://h", b"k")
    job_id = submit(runtime)
    assert run_job(job_id, 1, runtime) == "failed"
    record = runtime.store.get(job_id)
    assert record is not None and record.error is not None
    assert record.error.code == "storage_error" and "does not exist" in record.error.message
    assert record.images is None


def test_messages_beyond_the_queued_jobs_are_dropped_without_a_second_result(runtime: WorkerRuntime) -> None:
    job_id = submit(runtime)
    assert run_job(job_id, 2, runtime) == "succeeded"  # a message is a ticket: it runs what is queued
    first = runtime.store.get(job_id)
    assert run_job(job_id, 1, runtime) == "dropped"
    assert run_job(job_id, 2, runtime, ticket="redelivered") == "dropped"
    assert runtime.store.get(job_id) == first


class FinishOrder:
    """A job observer that records which job each attempt ran."""

    def __init__(self) -> None:
        self.job_ids: list[str] = []

    def job_finished(self, record: JobRecord, outcome: str, *args: object) -> None:
        self.job_ids.append(record.id)


def test_a_message_runs_the_job_whose_turn_it_is_under_fair_share(runtime: WorkerRuntime) -> None:
    burst = [submit(runtime) for _ in range(3)]
    other = runtime.store.create(new_job_id(), "bob", params()).id
    order = FinishOrder()
    runtime.model, runtime.observer = "flux-tiny", order
    outcomes = [run_job(job_id, 1, runtime) for job_id in reversed([*burst, other])]
    assert outcomes == ["succeeded"] * 4
    assert order.job_ids == [burst[0], other, burst[1], burst[2]]


def test_progress_events_follow_each_step(runtime: WorkerRuntime) -> None:
    job_id = submit(runtime)
    run_job(job_id, 1, runtime)
    events = [fields["type"] for _, fields in runtime.store.redis.xrange(f"fg:job:{job_id}:events")]
    assert events == [
        "job.queued",
        "job.started",
        "job.progress",
        "job.progress",
        "job.progress",
        "job.succeeded",
    ]


class CancelingEngine(FakeEngine):
    """Cancels its own job (as a user would, from outside) after the first step."""

    def __init__(self, store: JobStore, reason: str = "canceled") -> None:
        super().__init__()
        self.store, self.reason, self.steps_run = store, reason, 0

    def generate(self, params: GenerationParams, on_step) -> GenerationOutput:  # type: ignore[no-untyped-def]
        for step in range(1, params.num_inference_steps + 1):
            if step == 2:
                jobs, _ = self.store.list_for_owner("alice", "running", 1, None)
                self.store.cancel(jobs[0].id, self.reason)
            on_step(step, params.num_inference_steps)
            self.steps_run = step
        raise AssertionError("a canceled job must not reach decode")


def test_canceled_running_job_stops_at_the_next_step_without_upload(runtime: WorkerRuntime) -> None:
    engine = CancelingEngine(runtime.store)
    runtime.engine = engine
    job_id = submit(runtime, num_inference_steps=10)
    assert run_job(job_id, 1, runtime) == "canceled"
    record = runtime.store.get(job_id)
    assert record is not None
    assert (record.status, record.error, record.images, engine.steps_run) == ("canceled", None, None, 1)
    storage = runtime.storage
    assert isinstance(storage, LocalStorage) and not any(storage.root.rglob("*.png"))


def test_deadline_reached_while_running_cancels_with_deadline_exceeded(runtime: WorkerRuntime) -> None:
    runtime.engine = CancelingEngine(runtime.store, reason="deadline_exceeded")
    job_id = submit(runtime, num_inference_steps=10)
    assert run_job(job_id, 1, runtime) == "canceled"
    assert runtime.store.get(job_id).error.code == "deadline_exceeded"  # type: ignore[union-attr]


def test_job_past_its_deadline_at_claim_is_canceled_before_generating(runtime: WorkerRuntime) -> None:
    job_id = runtime.store.create(
        new_job_id(), "alice", params(), JobOptions(deadline_at="2020-01-01T00:00:00.000Z")
    ).id
    runtime.engine = FakeEngine(fail_with=AssertionError("must not generate"))
    assert run_job(job_id, 1, runtime) == "canceled"
    assert runtime.store.get(job_id).error.code == "deadline_exceeded"  # type: ignore[union-attr]


def test_attempt_that_loses_its_job_mid_run_stops_and_drops(runtime: WorkerRuntime) -> None:
    class LosingEngine(FakeEngine):
        def generate(self, params: GenerationParams, on_step) -> GenerationOutput:  # type: ignore[no-untyped-def]
            on_step(1, params.num_inference_steps)
            runtime.store.claim(job_id, 1, "w2", max_attempts=3)  # w1 looked dead: another worker took over
            on_step(2, params.num_inference_steps)
            raise AssertionError("unreachable")

    runtime.engine = LosingEngine()
    job_id = submit(runtime)
    assert run_job(job_id, 1, runtime) == "dropped"
    record = runtime.store.get(job_id)
    assert record is not None and (record.status, record.attempt, record.worker) == ("running", 2, "w2")
