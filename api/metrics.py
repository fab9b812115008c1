"""Prometheus metrics of the gateway, in a registry per app (tests build several apps)."""

from __future__ import annotations

import logging
import time
from collections import Counter as Tally
from collections.abc import Iterator, Sequence

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.jobstore import RUNNING_KEY, JobRecord, JobStore, job_key
from shared.queues import BAND_WIDTH, BANDS

log = logging.getLogger("fluxgate.api")


class QueueCollector(Collector):
    """Queue depth per model and priority, and running jobs per model, read from Redis at scrape time.

    Shared state, so every gateway replica reports the same values (aggregate with max, not sum).
    Redis down does not fail the scrape: ``fluxgate_redis_up`` is 0 and the queue series are left out.
    """

    def __init__(self, client: redis.Redis, models: Sequence[str]) -> None:
        self.client = client
        self.models = list(models)

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("fluxgate_redis_up", "Whether this scrape could read Redis")
        try:
            depths, running = self._read()
        except redis.RedisError as error:
            log.warning("metrics: cannot read the queues from Redis: %s", error)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        depth = GaugeMetricFamily("fluxgate_queue_depth", "Queued jobs", labels=["model", "priority"])
        for (model, priority), count in depths.items():
            depth.add_metric([model, priority], count)
        yield depth
        busy = GaugeMetricFamily("fluxgate_jobs_running", "Running jobs", labels=["model"])
        for model in self.models:
            busy.add_metric([model], running[model])
        yield busy

    def _read(self) -> tuple[dict[tuple[str, str], int], Tally[str]]:
        pipe = self.client.pipeline(transaction=False)
        for model in self.models:
            for band in BANDS.values():
                pipe.zcount(f"fg:queue:{model}", band * BAND_WIDTH, (band + 1) * BAND_WIDTH - 1)
        counts = iter(pipe.execute())
        depths = {(model, name): int(next(counts)) for model in self.models for name in BANDS}
        pipe = self.client.pipeline(transaction=False)
        for job_id in self.client.smembers(RUNNING_KEY):
            pipe.hget(job_key(str(job_id)), "model")
        return depths, Tally(str(model) for model in pipe.execute() if model)


class CountingJobStore(JobStore):
    """The gateway's job store, counting each job it creates by model (idempotent replays create none)."""

    def __init__(self, client: redis.Redis, submitted: Counter) -> None:
        super().__init__(client)
        self.submitted = submitted

    def on_created(self, record: JobRecord) -> None:
        self.submitted.labels(record.model).inc()


class GatewayMetrics:
    """The gateway's series; with a Redis client, also the queues' (read at scrape time)."""

    def __init__(self, client: redis.Redis | None = None, models: Sequence[str] = ()) -> None:
        self.registry = CollectorRegistry()
        if client is not None:
            self.registry.register(QueueCollector(client, models))
        self.submitted = Counter(
            "fluxgate_jobs_submitted", "Jobs created, by model", ["model"], registry=self.registry
        )
        self.requests = Counter(
            "fluxgate_http_requests_total",
            "HTTP requests",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "fluxgate_http_request_seconds",
            "HTTP request latency",
            ["method", "route"],
            registry=self.registry,
        )


class MetricsMiddleware:
    """Counts requests and times them by route template (not raw path: job ids would explode labels)."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"]
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - started)
