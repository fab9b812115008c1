"""The serving benchmark's records, summary statistics and printed table (see ``bench.serving``)."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

WIDTH = 60
CONFIG_KEYS = (
    *("backend", "model", "dataset", "base_url", "num_prompts", "max_concurrency", "request_rate"),
    *("width", "height", "steps", "output_format"),
)


@dataclass
class RequestRecord:
    """One request as the client saw it, plus the job's metrics when the gateway reported them."""

    index: int
    prompt: str
    success: bool = False
    status: str = "pending"
    error_code: str | None = None
    error_message: str | None = None
    http_status: int | None = None
    job_id: str | None = None
    start_s: float = 0.0
    latency_s: float = 0.0
    queue_s: float | None = None
    inference_s: float | None = None
    upload_s: float | None = None
    peak_memory_mb: float | None = None
    batch_size: int | None = None  # jobs in the pipeline call that made this job's image


@dataclass
class Summary:
    """What one run measured; latencies cover the successful requests, metrics every job reporting them."""

    config: dict[str, Any]
    duration_s: float
    completed: int
    failed: int
    failures_by_code: dict[str, int] = field(default_factory=dict)
    request_throughput: float = 0.0
    latency_mean_s: float | None = None
    latency_median_s: float | None = None
    latency_p99_s: float | None = None
    queue_mean_s: float | None = None
    queue_p99_s: float | None = None
    inference_mean_s: float | None = None
    upload_mean_s: float | None = None
    peak_memory_mb: float | None = None


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile with linear interpolation (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def mean(values: Sequence[float]) -> float | None:
    """The arithmetic mean; None for no values."""
    return statistics.fmean(values) if values else None


def failures_by_code(records: Sequence[RequestRecord]) -> dict[str, int]:
    """Failed requests counted by error code, most frequent first."""
    counts = Counter(record.error_code or "unknown" for record in records if not record.success)
    return dict(counts.most_common())


def _present(records: Sequence[RequestRecord], name: str) -> list[float]:
    return [value for record in records if (value := getattr(record, name)) is not None]


def public_config(config: dict[str, Any]) -> dict[str, Any]:
    """The run's settings that belong in the report (``inf`` as a string: JSON has no infinity)."""
    picked = {key: config.get(key) for key in CONFIG_KEYS}
    rate = picked.get("request_rate")
    if isinstance(rate, float) and math.isinf(rate):
        picked["request_rate"] = "inf"
    return picked


def summarize(records: Sequence[RequestRecord], duration_s: float, config: dict[str, Any]) -> Summary:
    """The summary of a run that took ``duration_s`` seconds of wall-clock time."""
    ok = [record for record in records if record.success]
    latencies = [record.latency_s for record in ok]
    queue = _present(records, "queue_s")
    peaks = _present(records, "peak_memory_mb")
    return Summary(
        config=public_config(config),
        duration_s=duration_s,
        completed=len(ok),
        failed=len(records) - len(ok),
        failures_by_code=failures_by_code(records),
        request_throughput=len(ok) / duration_s if duration_s > 0 else 0.0,
        latency_mean_s=mean(latencies),
        latency_median_s=percentile(latencies, 50),
        latency_p99_s=percentile(latencies, 99),
        queue_mean_s=mean(queue),
        queue_p99_s=percentile(queue, 99),
        inference_mean_s=mean(_present(records, "inference_s")),
        upload_mean_s=mean(_present(records, "upload_s")),
        peak_memory_mb=max(peaks) if peaks else None,
    )


def _row(label: str, value: Any, digits: int = 2) -> str:
    if value is None:
        shown = "n/a"
    elif isinstance(value, float):
        shown = f"{value:.{digits}f}"
    else:
        shown = str(value)
    return f"{label:<40} {shown}"


def format_table(summary: Summary) -> str:
    """The result table, laid out as SGLang-diffusion's ``bench_serving`` prints it."""
    config = summary.config
    total = summary.completed + summary.failed
    lines = [
        "{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=WIDTH, c="="),
        _row("Backend:", config.get("backend")),
        _row("Model:", config.get("model") or "(default)"),
        _row("Dataset:", config.get("dataset")),
        _row("Resolution / steps:", f"{config.get('width')}x{config.get('height')} / {config.get('steps')}"),
        "{s:{c}^{n}}".format(s="", n=WIDTH, c="-"),
        _row("Benchmark duration (s):", summary.duration_s),
        _row("Request rate:", str(config.get("request_rate"))),
        _row("Max request concurrency:", config.get("max_concurrency")),
        _row("Successful requests:", f"{summary.completed}/{total}"),
        _row("Failed requests:", summary.failed),
    ]
    lines += [_row(f"  {code}:", count) for code, count in summary.failures_by_code.items()]
    lines += [
        _row("Request throughput (req/s):", summary.request_throughput),
        "{s:{c}^{n}}".format(s=" End-to-End Latency ", n=WIDTH, c="-"),
        _row("Latency Mean (s):", summary.latency_mean_s, 4),
        _row("Latency Median (s):", summary.latency_median_s, 4),
        _row("Latency P99 (s):", summary.latency_p99_s, 4),
        "{s:{c}^{n}}".format(s=" Worker Metrics ", n=WIDTH, c="-"),
        _row("Queue Wait Mean (s):", summary.queue_mean_s, 4),
        _row("Queue Wait P99 (s):", summary.queue_p99_s, 4),
        _row("Inference Mean (s):", summary.inference_mean_s, 4),
        _row("Upload Mean (s):", summary.upload_mean_s, 4),
        _row("Peak Memory (MB):", summary.peak_memory_mb),
        "=" * WIDTH,
    ]
    return "\n".join(lines)
