"""Prometheus metrics of one worker process, fed by the runner's ``job_finished`` and served on
``FLUXGATE_WORKER_METRICS_PORT``.

A registry per instance (tests build several); every series carries the model, so that a scrape of
all workers can be summed per model.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from shared.jobstore import JobRecord
from shared.schemas import JobMetrics

MIB = 2**20
# Waiting ranges from nothing to a long backlog; inference from a tiny model's fraction of a second to a
# large FLUX image's minutes on a small card; uploads from local files to a slow S3.
QUEUE_BUCKETS = (0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
INFERENCE_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 20, 30, 60, 120, 300)
UPLOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16)  # --max-batch-size is at most 16


class WorkerMetrics:
    """The worker's series; a :class:`worker.runner.JobObserver`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        reg = self.registry
        self.queue_seconds = Histogram(
            "fluxgate_job_queue_seconds",
            "Submission to start, per job",
            ["model"],
            buckets=QUEUE_BUCKETS,
            registry=reg,
        )
        self.inference_seconds = Histogram(
            "fluxgate_job_inference_seconds",
            "Pipeline time per job",
            ["model"],
            buckets=INFERENCE_BUCKETS,
            registry=reg,
        )
        self.upload_seconds = Histogram(
            "fluxgate_job_upload_seconds",
            "Encode and upload time per job",
            ["model"],
            buckets=UPLOAD_BUCKETS,
            registry=reg,
        )
        self.load_seconds = Gauge(
            "fluxgate_worker_load_seconds", "Pipeline load and warm-up at start", registry=reg
        )
        self.steps_per_second = Gauge(
            "fluxgate_job_steps_per_second",
            "Denoising steps per second of the last job",
            ["model"],
            registry=reg,
        )
        self.batch_size = Histogram(
            "fluxgate_job_batch_size",
            "Jobs in the pipeline call that made each succeeded job (1: it ran alone)",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=reg,
        )
        self.cached_steps = Counter(
            "fluxgate_job_cached_steps", "Denoising steps served from the cache", ["model"], registry=reg
        )
        self.peak_memory = Gauge(
            "fluxgate_gpu_peak_memory_bytes",
            "Peak GPU memory allocated by the last job",
            ["model"],
            registry=reg,
        )
        self.finished = Counter(
            "fluxgate_jobs_finished",
            "Attempts this worker ended, by outcome",
            ["model", "status"],
            registry=reg,
        )
        self.failures = Counter(
            "fluxgate_job_failures", "Failed jobs by error code", ["model", "code"], registry=reg
        )

    def job_finished(
        self, record: JobRecord, outcome: str, metrics: JobMetrics | None, error_code: str | None
    ) -> None:
        """Record one ended attempt: timings of a success, the code of a failure."""
        model = record.params.model
        self.finished.labels(model, outcome).inc()
        if outcome == "failed":
            self.failures.labels(model, error_code or "unknown").inc()
        if outcome != "succeeded" or metrics is None:
            return
        if metrics.queue_s is not None:
            self.queue_seconds.labels(model).observe(max(metrics.queue_s, 0.0))
        if metrics.inference_s is not None:
            self.inference_seconds.labels(model).observe(metrics.inference_s)
            if metrics.inference_s > 0:
                self.steps_per_second.labels(model).set(
                    record.params.num_inference_steps / metrics.inference_s
                )
        if metrics.upload_s is not None:
            self.upload_seconds.labels(model).observe(metrics.upload_s)
        self.cached_steps.labels(model).inc(metrics.cached_steps)
        self.batch_size.labels(model).observe(metrics.batch_size)
        if metrics.peak_memory_mb is not None:
            self.peak_memory.labels(model).set(metrics.peak_memory_mb * MIB)

    def serve(self, port: int) -> None:
        """Serve ``/metrics`` on ``port`` from a daemon thread (prometheus_client's own HTTP server)."""
        start_http_server(port, registry=self.registry)
