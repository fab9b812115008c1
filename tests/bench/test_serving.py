"""The serving benchmark's pieces: prompts, the arrival schedule, the summary math, failure handling."""

from __future__ import annotations

import asyncio
import json
import math
import statistics
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench import serving
from bench.serving_report import RequestRecord, failures_by_code, format_table, percentile, summarize


def test_prompt_file_skips_blank_lines_and_cycles(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("a red fox\n\n   \n a lighthouse \n", encoding="utf-8")
    assert serving.read_prompt_file(path) == ["a red fox", "a lighthouse"]
    assert serving.load_prompts(str(path), 3) == ["a red fox", "a lighthouse", "a red fox"]


def test_random_prompts_depend_on_the_seed_only() -> None:
    first = serving.load_prompts("random", 20, seed=7)
    assert first == serving.load_prompts("random", 20, seed=7)
    assert first != serving.load_prompts("random", 20, seed=8)
    assert len(first) == 20 and all(first)


def test_vbench_reads_the_default_path_or_says_to_pass_one(tmp_path: Path) -> None:
    path = tmp_path / "vbench.txt"
    path.write_text("a toilet, frozen in time\na laptop, frozen in time\n", encoding="utf-8")
    assert serving.load_prompts("vbench", 2, vbench_path=path) == [
        "a toilet, frozen in time",
        "a laptop, frozen in time",
    ]
    with pytest.raises(SystemExit, match="--dataset <path>"):
        serving.load_prompts("vbench", 2, vbench_path=tmp_path / "missing.txt")
    with pytest.raises(SystemExit, match="no prompt file"):
        serving.load_prompts(str(tmp_path / "nope.txt"), 2)


def test_poisson_gaps_average_one_over_the_rate() -> None:
    gaps = serving.inter_arrival_times(20_000, rate=4.0, seed=1)
    assert statistics.fmean(gaps) == pytest.approx(0.25, rel=0.03)
    assert statistics.stdev(gaps) == pytest.approx(0.25, rel=0.05)  # exponential: sd == mean
    assert gaps == serving.inter_arrival_times(20_000, rate=4.0, seed=1)
    assert serving.inter_arrival_times(5, rate=math.inf) == [0.0] * 5
    with pytest.raises(ValueError):
        serving.inter_arrival_times(5, rate=0)


def test_percentile_interpolates_like_numpy() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 50) == 2.5
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 4.0
    assert percentile(list(map(float, range(1, 101))), 99) == pytest.approx(99.01)
    assert percentile([], 99) is None


def _records() -> list[RequestRecord]:
    ok = [
        RequestRecord(
            i,
            "p",
            True,
            "succeeded",
            latency_s=lat,
            queue_s=q,
            inference_s=1.0,
            upload_s=0.1,
            peak_memory_mb=mem,
        )
        for i, (lat, q, mem) in enumerate([(1.0, 0.0, 500.0), (2.0, 0.5, 700.0), (3.0, 1.0, 600.0)])
    ]
    failed = [
        RequestRecord(3, "p", False, "failed", error_code="worker_error", latency_s=9.0, queue_s=2.0),
        RequestRecord(4, "p", False, "error", error_code="queue_full", http_status=429, latency_s=0.01),
        RequestRecord(5, "p", False, "error", error_code="queue_full", http_status=429, latency_s=0.01),
    ]
    return ok + failed


def test_summary_math_on_fixed_records() -> None:
    summary = summarize(_records(), 4.0, {"backend": "jobs", "request_rate": math.inf, "output_file": Path()})
    assert (summary.completed, summary.failed) == (3, 3)
    assert summary.request_throughput == 0.75
    assert summary.latency_mean_s == 2.0 and summary.latency_median_s == 2.0
    assert summary.latency_p99_s == pytest.approx(2.98)
    assert summary.queue_mean_s == pytest.approx(3.5 / 4)  # every job that reported one, failed included
    assert summary.inference_mean_s == 1.0 and summary.upload_mean_s == pytest.approx(0.1)
    assert summary.peak_memory_mb == 700.0
    assert summary.config["request_rate"] == "inf" and "output_file" not in summary.config


def test_failures_are_grouped_by_code_most_frequent_first() -> None:
    assert failures_by_code(_records()) == {"queue_full": 2, "worker_error": 1}
    assert list(failures_by_code(_records())) == ["queue_full", "worker_error"]


def test_table_has_the_seed_rows() -> None:
    table = format_table(summarize(_records(), 4.0, {"backend": "openai", "max_concurrency": 2}))
    for label in (
        "Benchmark duration (s):",
        "Request throughput (req/s):",
        "Latency Mean (s):",
        "Latency Median (s):",
        "Latency P99 (s):",
        "Peak Memory (MB):",
        "Queue Wait Mean (s):",
        "Queue Wait P99 (s):",
        "Inference Mean (s):",
        "Upload Mean (s):",
        "  queue_full:",
    ):
        assert label in table
    assert "Successful requests:                     3/6" in table
    empty = format_table(summarize([], 1.0, {}))
    assert "Latency P99 (s):                         n/a" in empty


def _sse(*types: str) -> httpx.Response:
    body = "".join(f"id: {i}\nevent: {t}\ndata: {{}}\n\n" for i, t in enumerate(types, start=1))
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body.encode())


def _fake_gateway(request: httpx.Request) -> httpx.Response:
    """Prompt 'bad' → 429 queue_full; 'slow' → 202, then its event stream ends with job.failed and the
    job reads failed; else 200."""
    metrics = {"queue_s": 0.1, "inference_s": 0.2, "upload_s": 0.01, "peak_memory_mb": 123.0, "batch_size": 2}
    if request.url.path.endswith("/events"):
        return _sse("job.snapshot", "job.started", "job.progress", "job.failed")
    if request.method == "GET":
        error = {"code": "worker_error", "message": "boom"}
        return httpx.Response(
            200, json={"id": "job_slow", "status": "failed", "error": error, "metrics": metrics}
        )
    body: dict[str, Any] = json.loads(request.content)
    assert request.headers["Authorization"] == "Bearer k" and request.headers["Prefer"] == "wait=60"
    if body["prompt"] == "bad":
        error_body = {"error": {"code": "queue_full", "message": "full", "type": "x", "param": None}}
        return httpx.Response(429, json=error_body)
    if body["prompt"] == "slow":
        return httpx.Response(202, json={"id": "job_slow", "status": "queued"})
    return httpx.Response(200, json={"id": "job_ok", "status": "succeeded", "metrics": metrics})


def test_run_benchmark_records_every_outcome(tmp_path: Path) -> None:
    args = serving.parse_args(
        ["--api-key", "k", "--max-concurrency", "2", "--disable-progress", "--poll-interval", "0"]
    )
    prompts = ["ok", "bad", "slow", "ok"]
    records, duration = asyncio.run(serving.run_benchmark(args, prompts, httpx.MockTransport(_fake_gateway)))
    assert duration > 0
    assert [r.success for r in records] == [True, False, False, True]
    assert [r.error_code for r in records] == [None, "queue_full", "worker_error", None]
    assert records[1].http_status == 429 and records[2].job_id == "job_slow"
    assert records[0].peak_memory_mb == 123.0 and all(r.latency_s > 0 for r in records)
    assert records[0].batch_size == 2  # the e2e report's engine bound divides a batch's time by it
    out = tmp_path / "out.json"
    serving.write_output(out, summarize(records, duration, vars(args)), records)
    document = json.loads(out.read_text())
    assert document["summary"]["failures_by_code"] == {"queue_full": 1, "worker_error": 1}
    assert len(document["requests"]) == 4


def test_a_job_whose_event_stream_closes_early_is_read_again_until_it_ends() -> None:
    calls: list[str] = []
    reads = iter(["running", "succeeded"])

    def gateway(request: httpx.Request) -> httpx.Response:
        calls.append(f"{request.method} {request.url.path}")
        if request.method == "POST":
            assert "Prefer" not in request.headers  # --prefer-wait 0
            return httpx.Response(202, json={"id": "job_a", "status": "queued"})
        if request.url.path.endswith("/events"):
            return _sse("job.snapshot", "job.started")  # closed before the terminal event
        return httpx.Response(200, json={"id": "job_a", "status": next(reads)})

    argv = ["--api-key", "k", "--disable-progress", "--poll-interval", "0", "--prefer-wait", "0"]
    run = serving.run_benchmark(serving.parse_args(argv), ["p"], httpx.MockTransport(gateway))
    records, _ = asyncio.run(run)
    assert records[0].success
    assert calls == [
        "POST /v1/jobs",
        "GET /v1/jobs/job_a/events",
        "GET /v1/jobs/job_a",
        "GET /v1/jobs/job_a/events",
        "GET /v1/jobs/job_a",
    ]


@pytest.mark.parametrize("wait", ["-1", "61"])
def test_prefer_wait_outside_what_the_gateway_honours_is_refused(wait: str) -> None:
    with pytest.raises(SystemExit):
        serving.parse_args(["--prefer-wait", wait])
