"""``fluxgate bench serving`` against the real stack (gateway + CPU worker on the tiny model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import serving
from tests.integration.conftest import ADMIN_KEY, Stack

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("backend", "extra"),
    [("jobs", []), ("jobs", ["--prefer-wait", "0"]), ("openai", [])],
    ids=["jobs", "jobs-followed-on-events", "openai"],
)
def test_bench_serving_completes_every_request(
    file_stack: Stack, tmp_path: Path, backend: str, extra: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / f"{backend}.json"
    argv = ["--base-url", file_stack.base_url, "--api-key", ADMIN_KEY, "--backend", backend, *extra]
    argv += ["--model", "flux-tiny", "--dataset", "random", "--num-prompts", "6", "--max-concurrency", "3"]
    argv += ["--width", "64", "--height", "64", "--steps", "2", "--request-timeout", "120"]
    argv += ["--output-file", str(out)]

    assert serving.main(argv) == 0

    document = json.loads(out.read_text())
    summary, requests = document["summary"], document["requests"]
    assert (summary["completed"], summary["failed"], summary["failures_by_code"]) == (6, 0, {})
    assert summary["request_throughput"] > 0 and summary["duration_s"] > 0
    assert 0 < summary["latency_median_s"] <= summary["latency_p99_s"]
    assert summary["inference_mean_s"] > 0 and summary["queue_mean_s"] is not None
    assert summary["peak_memory_mb"] is not None and summary["peak_memory_mb"] > 0
    assert len(requests) == 6 and len({r["job_id"] for r in requests}) == 6
    for record in requests:
        assert record["success"] and record["status"] == "succeeded" and record["latency_s"] > 0
        assert record["job_id"].startswith("job_")
        assert None not in (record["queue_s"], record["inference_s"], record["upload_s"])
    assert "Request throughput (req/s):" in capsys.readouterr().out
