"""The multi-GPU benchmark on CPU ranks (``--smoke``): its group flags reach the group and the report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_a_smoke_run_times_a_cached_preset_with_async_ulysses_and_a_split_decode(tmp_path: Path) -> None:
    report_file = tmp_path / "report.json"
    flags = ["--ulysses-async", "--parallel-vae", "--cache", "fast"]
    command = [sys.executable, "-m", "bench.parallel", "--num-gpus", "2", "--smoke", "--steps", "6"]
    command += ["--res", "256", "--repeats", "1", *flags, "--output-file", str(report_file)]
    subprocess.run(command, check=True, timeout=300, capture_output=True)  # rank 0 in its own process
    report = json.loads(report_file.read_text())
    assert (report["ulysses_async"], report["parallel_vae"], report["cache"]) == (True, True, "fast")
    result = report["256"]
    assert result["cached_steps"] == 2  # cache-dit's "fast" mask at 6 steps: 1,1,1,0,0,1
    # the reference: one device, the same preset and decode tiles
    assert result["max_pixel_difference_vs_one_gpu"] <= 1
