"""Worker metrics from run_job's outcomes (fake engine, real Redis), and the runner's observer hook."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry

from shared.jobstore import JobRecord, JobStore
from shared.logging import current_job
from shared.schemas import JobMetrics
from shared.storage import LocalStorage
from tests.worker.test_runner import BrokenStorage, FakeEngine, submit
from worker.metrics import WorkerMetrics
from worker.runner import WorkerRuntime, run_job


class RecordingObserver:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, JobMetrics | None, str | None]] = []

    def job_finished(
        self, record: JobRecord, outcome: str, metrics: JobMetrics | None, error_code: str | None
    ) -> None:
        self.calls.append((record.id, outcome, metrics, error_code))


class BrokenObserver:
    def job_finished(self, *args: Any) -> None:
        raise RuntimeError("metrics backend gone")


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def runtime(redis_client: redis.Redis, tmp_path: Path, registry: CollectorRegistry) -> WorkerRuntime:
    storage = LocalStorage(tmp_path / "files", "http://h", b"k")
    return WorkerRuntime(
        JobStore(redis_client), storage, FakeEngine(), "w1", 3, observer=WorkerMetrics(registry)
    )


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def test_observer_is_told_once_per_ended_attempt(runtime: WorkerRuntime) -> None:
    observer = RecordingObserver()
    runtime.observer = observer
    done, failed = submit(runtime), submit(runtime)
    run_job(done, 1, runtime)
    runtime.engine = FakeEngine(fail_with=RuntimeError("boom"))
    run_job(failed, 1, runtime)
    run_job(failed, 1, runtime)  # a duplicate message: dropped at the claim, not observed
    (first_id, first, metrics, no_code), (second_id, second, no_metrics, code) = observer.calls
    assert (first_id, first, no_code, metrics is not None) == (done, "succeeded", None, True)
    assert (second_id, second, no_metrics, code) == (failed, "failed", None, "generation_failed")


def test_successful_jobs_observe_every_timing(runtime: WorkerRuntime, registry: CollectorRegistry) -> None:
    for _ in range(2):
        assert run_job(submit(runtime), 1, runtime) == "succeeded"
    model = {"model": "flux-tiny"}
    for name in (
        "fluxgate_job_queue_seconds",
        "fluxgate_job_inference_seconds",
        "fluxgate_job_upload_seconds",
    ):
        assert value(registry, f"{name}_count", **model) == 2
    assert value(registry, "fluxgate_job_steps_per_second", **model) > 0
    assert value(registry, "fluxgate_gpu_peak_memory_bytes", **model) == 12.5 * 2**20
    assert value(registry, "fluxgate_jobs_finished_total", model="flux-tiny", status="succeeded") == 2
    assert value(registry, "fluxgate_job_cached_steps_total", **model) == 0


def test_failures_are_counted_by_code(
    runtime: WorkerRuntime, registry: CollectorRegistry, tmp_path: Path
) -> None:
    runtime.engine = FakeEngine(fail_with=RuntimeError("boom"))
    assert run_job(submit(runtime), 1, runtime) == "failed"
    runtime.engine = FakeEngine()
    runtime.storage = BrokenStorage(tmp_path / "broken", "http://h", b"k")
    assert run_job(submit(runtime), 1, runtime) == "failed"
    for code in ("generation_failed", "storage_error"):
        assert value(registry, "fluxgate_job_failures_total", model="flux-tiny", code=code) == 1
    assert value(registry, "fluxgate_jobs_finished_total", model="flux-tiny", status="failed") == 2
    assert value(registry, "fluxgate_job_inference_seconds_count", model="flux-tiny") == 0


def test_a_failing_observer_does_not_fail_the_job(runtime: WorkerRuntime) -> None:
    runtime.observer = BrokenObserver()
    job_id = submit(runtime)
    assert run_job(job_id, 1, runtime) == "succeeded"
    record = runtime.store.get(job_id)
    assert record is not None and record.status == "succeeded"


class ContextRecordingEngine(FakeEngine):
    """Remembers the log context the pipeline ran in."""

    seen: dict[str, Any] | None = None

    def generate(self, params, on_step):  # type: ignore[no-untyped-def]
        self.seen = current_job()
        return super().generate(params, on_step)


def test_log_lines_inside_a_job_carry_its_id(runtime: WorkerRuntime) -> None:
    engine = ContextRecordingEngine()
    runtime.engine = engine
    job_id = submit(runtime)
    run_job(job_id, 1, runtime)
    assert engine.seen == {"job_id": job_id, "attempt": 1, "worker_id": "w1"}
    assert current_job() is None
