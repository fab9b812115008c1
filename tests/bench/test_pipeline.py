"""The GPU pipeline benchmark's smoke mode (tiny pipeline, CPU) and its output comparison."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import gemm_check, pipeline
from bench.fidelity import Capture, difference
from worker.optimizations import qk_norm_rope


def test_smoke_runs_fp8_variants_and_reports_their_difference_from_bf16(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    argv = ["--smoke", "--res", "64", "--steps", "2", "--repeats", "1", "--output-file", str(out)]
    assert pipeline.main([*argv, "--variants", "eager,fp8,fp8-all-compiled,fp8-fused-compiled"]) == 0
    results = {result["variant"]: result for result in json.loads(out.read_text())["variants"]}
    assert "difference" not in results["eager"]
    assert results["eager"]["fp8_layers"] == 0
    assert all(result["fa4_attention_modules"] == 0 for result in results.values())  # no Hopper GPU here
    # tiny model: 1 double block (12 GEMMs) + 1 single block (5); "all" adds embedders, modulation, proj_out
    assert results["fp8"]["fp8_layers"] == 17
    assert results["fp8-all-compiled"]["fp8_layers"] == 30
    # fused QKV adds to_qkv and to_added_qkv (double block) and to_qkv (single block); the unfused
    # originals stay, unused
    assert results["fp8-fused-compiled"]["fp8_layers"] == 17 + 3
    for name in ("fp8", "fp8-all-compiled"):
        compared = results[name]["difference"]
        assert compared["image_psnr_db"] > 20 and compared["image_max_abs_diff"] > 0
        assert compared["latents_rel_rms"] > 0


def test_reference_all_compares_bf16_variants_too(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    argv = ["--smoke", "--res", "64", "--steps", "2", "--repeats", "1", "--output-file", str(out)]
    assert pipeline.main([*argv, "--variants", "eager", "--reference", "all"]) == 0
    compared = json.loads(out.read_text())["variants"][0]["difference"]
    assert compared["image_psnr_db"] is None and compared["image_max_abs_diff"] == 0  # eager is the reference


def test_difference_reports_psnr_and_absolute_differences() -> None:
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    latents = torch.ones(1, 16, 2, 2)
    reference = Capture(image, latents, torch.zeros(1, 3, 4, 4))
    brighter = image.copy()
    brighter[0, 0, 0] = 255  # one channel of 48 off by 255: MSE 255^2/48
    other = Capture(brighter, latents * 1.1, torch.full((1, 3, 4, 4), 0.5))
    compared = difference(reference, other)
    assert compared["image_psnr_db"] == pytest.approx(10 * np.log10(48), abs=0.01)
    assert compared["image_max_abs_diff"] == 255
    assert compared["latents_max_abs_diff"] == pytest.approx(0.1, abs=1e-5)
    assert compared["latents_rel_rms"] == pytest.approx(0.1, abs=1e-5)
    assert compared["decoded_max_abs_diff"] == 0.5


def test_unknown_variant_is_refused_with_the_choices() -> None:
    with pytest.raises(SystemExit):
        pipeline.main(["--smoke", "--variants", "fp9"])


def test_whole_transformer_variants_compile_one_graph_and_report_a_profile(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    argv = ["--smoke", "--res", "64", "--steps", "2", "--repeats", "1", "--output-file", str(out)]
    assert pipeline.main([*argv, "--variants", "whole-compiled,compiled-cd", "--profile"]) == 0
    results = {result["variant"]: result for result in json.loads(out.read_text())["variants"]}
    whole = results["whole-compiled"]
    assert whole["options"]["compile"] is False and whole["bench_changes"]["whole"] == "default"
    assert "compile_cache" in whole  # the benchmark's own compile counts as compiled
    assert results["compiled-cd"]["bench_changes"]["inductor"] == {"coordinate_descent_tuning": True}
    for result in results.values():
        assert "error" not in result
        host = result["kernel_seconds"]["host_top"]  # the CPU's operators, heaviest first
        assert host and host[0]["s"] >= host[-1]["s"] > 0
    # the inductor settings apply to the variant only
    assert torch._inductor.config.coordinate_descent_tuning is False


def test_variants_leaving_out_the_fused_qk_processor_or_the_compiled_vae_pass_engine_options(
    tmp_path: Path,
) -> None:
    out = tmp_path / "report.json"
    argv = ["--smoke", "--res", "64", "--steps", "2", "--repeats", "1", "--output-file", str(out)]
    assert pipeline.main([*argv, "--variants", "compiled-neither,fp8-compiled-neither"]) == 0
    for result in json.loads(out.read_text())["variants"]:
        assert "error" not in result
        assert result["options"]["fused_qk_norm_rope"] is False and result["options"]["compile_vae"] is False


def test_fp8_mlp_kernel_variant_runs_the_quantized_model_with_the_kernel_blocks(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    argv = ["--smoke", "--res", "64", "--steps", "2", "--repeats", "1", "--output-file", str(out)]
    assert pipeline.main([*argv, "--variants", "fp8-compiled-mlp-kernel", "--reference", "all"]) == 0
    result = json.loads(out.read_text())["variants"][0]
    assert "error" not in result and result["bench_changes"]["fp8_mlp"] is True
    assert result["fp8_layers"] > 0


def test_true_cfg_batched_jobs_with_chunked_modulation_tables_match_the_per_step_projection(
    tmp_path: Path,
) -> None:
    out = tmp_path / "report.json"
    argv = ["--smoke", "--res", "64", "--steps", "3", "--repeats", "1", "--output-file", str(out)]
    argv += ["--true-cfg", "4.0", "--images", "2", "--table-bytes", "1", "--reference", "all"]
    assert pipeline.main([*argv, "--variants", "compiled,compiled-per-step-modulation"]) == 0
    results = {result["variant"]: result for result in json.loads(out.read_text())["variants"]}
    assert results["compiled"]["modulation_table_bytes"] == 1  # one step a chunk
    assert results["compiled"]["modulation_tables"] == 1
    assert results["compiled-per-step-modulation"]["modulation_tables"] == 0
    for result in results.values():
        assert "error" not in result
        # both against the eager true-CFG image of two: the precompute changes only the GEMMs' rounding
        assert result["difference"]["latents_rel_rms"] < 0.01


def test_qk_tokens_variants_set_the_kernels_tokens_per_program_for_their_run_only(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    argv = ["--smoke", "--res", "64", "--steps", "2", "--repeats", "1", "--output-file", str(out)]
    assert pipeline.main([*argv, "--variants", "compiled-qk-tokens-1"]) == 0
    result = json.loads(out.read_text())["variants"][0]
    assert "error" not in result and result["bench_changes"]["qk_tokens"] == 1
    assert qk_norm_rope.TOKENS_PER_PROGRAM == 4  # back to the worker's kernel for what runs next


def test_blas_variants_name_a_gemm_check_setting_and_run_on_the_cpu_without_it(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    argv = ["--smoke", "--res", "64", "--steps", "2", "--repeats", "1", "--output-file", str(out)]
    assert pipeline.main([*argv, "--variants", "compiled-no-split-k"]) == 0
    result = json.loads(out.read_text())["variants"][0]
    assert "error" not in result and result["bench_changes"]["blas"] == "cublaslt, no split-K"
    for variant in pipeline.VARIANTS.values():
        assert variant.blas is None or variant.blas in gemm_check.SETTINGS
