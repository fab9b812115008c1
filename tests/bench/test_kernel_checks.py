"""What the GPU kernel checks (bench.qk_rope_check, bench.fp8_mlp_check) hand the device suite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.attention_probe import report


def test_report_prints_the_result_line_and_writes_the_json_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = {"device": "cpu", "single": {"bytes_differing": 0}}
    out = tmp_path / "check.json"
    report(result, str(out))
    line = capsys.readouterr().out.strip()
    assert line.startswith("RESULT ") and json.loads(line.removeprefix("RESULT ")) == result
    assert json.loads(out.read_text()) == result
    report(result, None)  # no file asked for: the line only
    assert capsys.readouterr().out.startswith("RESULT ")


def test_exchange_summary_reads_bandwidth_and_the_hidden_fraction() -> None:
    from bench.exchange import summarise

    us = {"one": 40.0, "three": 105.0, "gemm": 100.0, "gemm+one": 110.0}
    us |= {"nccl-packed": 200.0, "symmetric": 120.0, "gemm+symmetric": 130.0}
    result = summarise(us, tensor_mb=14.16)
    assert result["one_gb_s_across"] == pytest.approx(177.0)  # 7.08 MB across in 40 us
    assert result["three_per_tensor_us"] == 35.0
    assert result["hidden_fraction"] == 0.75  # 30 of the exchange's 40 us hidden behind the GEMM
    assert result["symmetric_saves_us"] == 80.0
    assert result["symmetric_hidden_fraction"] == 0.75  # 90 of the round trip's 120 us hidden
    serial = summarise({**us, "gemm+one": 140.0}, tensor_mb=14.16)
    assert serial["hidden_fraction"] == 0.0


def test_the_vae_check_times_each_variant_and_compares_it_with_the_first(tmp_path: Path) -> None:
    import argparse

    from bench.vae_check import run

    out = tmp_path / "vae.json"
    variants = "eager,eager-channels-last"  # the compiled ones add a minute of CPU compile, nothing else
    args = argparse.Namespace(
        smoke=True, res=32, repeats=1, variants=variants, output_file=str(out), profile=True
    )
    results = run(args)
    assert results["eager"]["max_abs_diff_vs_first"] == 0.0
    assert results["eager-channels-last"]["ms"] > 0
    assert results["eager-channels-last"]["max_abs_diff_vs_first"] < 1e-3  # the same decode, other strides
    (check,) = results["stats_check"]  # the group statistics against torch's, on the CPU torch's both
    assert not check["kernel"] and check["mean_max_abs_diff"] < 1e-5 and check["rstd_max_rel_diff"] < 1e-5


def test_the_text_beside_check_times_the_workers_gemm_calls_in_order() -> None:
    import torch

    from bench.concurrency import serial
    from bench.text_beside import linear

    cpu = torch.device("cpu")
    torch.manual_seed(0)
    plain, gelu = linear(4, 8, 16, cpu), linear(4, 8, 16, cpu, gelu=True)
    assert plain().shape == (4, 16) and gelu().shape == (4, 16)
    calls: list[str] = []
    serial(lambda: calls.append("first"), lambda: calls.append("second"))()
    assert calls == ["first", "second"]
