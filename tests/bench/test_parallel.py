"""The multi-GPU benchmark on CPU ranks (``--smoke``): its group flags reach the group and the report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_a_smoke_run_times_a_cached_preset_with_async_ulysses_and_a_split_decode(tmp_path: Path) -> None:
    report_file = tmp_path / "report.json"
    flags = ["--ulysses-async", "--parallel-vae", "--cache", "fast", "--profile-first"]
    command = [sys.executable, "-m", "bench.parallel", "--num-gpus", "2", "--smoke", "--steps", "6"]
    command += ["--res", "256", "--repeats", "1", *flags, "--output-file", str(report_file)]
    subprocess.run(command, check=True, timeout=300, capture_output=True)  # rank 0 in its own process
    report = json.loads(report_file.read_text())
    assert (report["ulysses_async"], report["parallel_vae"], report["cache"]) == (True, True, "fast")
    assert report["first_job_profile_rank0"]["host_top"]  # the first job, profiled on the host
    result = report["256"]
    assert result["cached_steps"] == 2  # cache-dit's "fast" mask at 6 steps: 1,1,1,0,0,1
    assert [phases["to_first_step_s"] > 0 for phases in result["host_phases"]] == [True]
    # the reference: one device, the same preset and decode tiles
    assert result["max_pixel_difference_vs_one_gpu"] <= 1


def test_skipping_guards_after_the_warm_up_keeps_the_compiled_groups_image(tmp_path: Path) -> None:
    report_file = tmp_path / "report.json"
    command = [sys.executable, "-m", "bench.parallel", "--num-gpus", "2", "--smoke", "--steps", "3"]
    command += [
        "--res",
        "128",
        "--repeats",
        "2",
        "--compile",
        "--skip-guards",
        "--no-compile-vae",  # it tests the blocks' guards; the decoder's C++ kernels cost ~45 s cold
        "--output-file",
        str(report_file),
    ]
    subprocess.run(command, check=True, timeout=300, capture_output=True)
    report = json.loads(report_file.read_text())
    assert report["skip_guards"] is True and report["compile"] is True and report["compile_vae"] is False
    assert report["packed_exchange"] is True  # the compiled fused processor's one exchange for q, k, v
    assert len(report["128"]["seconds"]) == 2
    assert report["128"]["max_pixel_difference_vs_one_gpu"] <= 1


def test_the_fused_qk_processor_keeps_the_groups_image_under_ulysses_with_diffusers_exchanges(
    tmp_path: Path,
) -> None:
    # the packed exchange (the default) runs in the compiled smoke run above; here diffusers' three
    report_file = tmp_path / "report.json"
    command = [sys.executable, "-m", "bench.parallel", "--num-gpus", "2", "--smoke", "--steps", "3"]
    command += ["--res", "128", "--repeats", "1", "--qk-rope", "--unpacked-exchange", "--output-file"]
    subprocess.run([*command, str(report_file)], check=True, timeout=300, capture_output=True)
    report = json.loads(report_file.read_text())
    assert report["qk_rope"] is True and report["layout"]["ulysses"] == 2
    assert report["packed_exchange"] is False
    assert report["128"]["max_pixel_difference_vs_one_gpu"] <= 1


def test_host_phases_name_the_longest_wait_between_steps() -> None:
    from bench.parallel import host_phases

    phases = host_phases(2.0, [0.25, 0.5, 1.5, 1.75])
    assert phases == {
        "to_first_step_s": 0.25,
        "longest_step_gap_s": 1.0,
        "longest_gap_after_step": 1,
        "after_last_step_s": 0.25,
    }
    assert host_phases(1.0, []) == {}
