"""--fa4-waves: FA4's attention split so that its tiles fill the GPU's last wave (the plan, the split's math,
where the processors take it). FA4 and the Triton combine need a Hopper GPU (``bench.fa4_check --waves``
measures them there); on the CPU the op attends and combines with torch's math."""

from __future__ import annotations

import argparse
import logging
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from worker import engine as engine_module
from worker.cli import add_worker_arguments, engine_options
from worker.optimizations import fa4_waves
from worker.optimizations import qk_norm_rope as qk_module
from worker.optimizations.fa4_waves import WavePlan, fa4_attention_waves, planned, wave_plan
from worker.optimizations.qk_norm_rope import FusedQKFluxAttnProcessor, apply_fused_qk_norm_rope
from worker.options import EngineOptions
from worker.parallel import parallel_layout

from .device_support import failing_trial
from .transformer_support import relative_rms, tiny_transformer

H100_SMS = 132


def token_major(tokens: int, heads: int, seed: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(1, tokens, heads, 16, generator=generator).to(dtype) for _ in range(3)]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)


def test_flux1s_one_gpu_attention_leaves_its_first_six_waves_whole_and_splits_the_rest_in_three() -> None:
    # 36 tiles of rows x 24 heads = 864 tiles: 7 waves of 132 SMs unsplit; 33 x 24 = 792 = 6 waves, then
    # 3 x 24 x 3 = 216 tiles of a third of the keys
    assert wave_plan(1, 24, 4608, 4608, H100_SMS) == WavePlan(main_rows=33 * 128, splits=3)


def test_calls_whose_tiles_fill_their_waves_or_batches_of_two_are_not_split() -> None:
    assert wave_plan(1, 33, 512, 512, H100_SMS) is None  # 4 x 33 = 132 tiles: one whole wave
    assert wave_plan(1, 24, 4096, 4608, H100_SMS) is None  # 768 tiles: 5.8 of 6 waves, nothing to gain
    assert wave_plan(2, 24, 4608, 4608, H100_SMS) is None
    assert wave_plan(1, 24, 128, 4608, H100_SMS) is None  # one tile of rows
    assert wave_plan(1, 24, 4608, 4608, 0) is None  # no GPU


def test_keys_that_no_part_count_divides_are_not_split() -> None:
    assert wave_plan(1, 24, 4608, 4607, H100_SMS) is None


def test_symbolic_shapes_and_head_dims_the_combine_does_not_take_get_no_plan() -> None:
    query = torch.empty(1, 4608, 24, 128)
    assert planned(query, query, H100_SMS) == WavePlan(4224, 3)
    odd = torch.empty(1, 4608, 24, 80)
    assert planned(odd, odd, H100_SMS) is None


@pytest.mark.parametrize("main_rows,splits", [(256, 3), (128, 2), (384, 4)])
def test_the_split_attention_is_the_unsplit_attention(main_rows: int, splits: int) -> None:
    q, k, v = token_major(480, 3, seed=main_rows)
    out = fa4_attention_waves(q, k, v, main_rows, splits)
    assert out.shape == q.shape and out.is_contiguous()
    torch.testing.assert_close(out, sdpa(q, k, v), atol=1e-5, rtol=1e-5)


def test_in_bf16_the_split_rounds_each_part_once_more_and_no_more() -> None:
    q, k, v = token_major(480, 3, seed=5, dtype=torch.bfloat16)
    exact = sdpa(q.float(), k.float(), v.float())
    split = fa4_attention_waves(q, k, v, 256, 3).float()
    unsplit = sdpa(q, k, v).float()
    assert torch.equal(split[:, :256], fa4_attention_waves(q, k, v, 256, 2).float()[:, :256])
    assert (split - exact).abs().max() <= 2 * (unsplit - exact).abs().max() + 2**-8


def test_the_op_schema_and_fake_tensor_agree_with_its_output() -> None:
    torch.library.opcheck(fa4_attention_waves, (*token_major(96, 2, seed=1), 64, 2))


def split_processor(sms: int) -> FusedQKFluxAttnProcessor:
    processor = FusedQKFluxAttnProcessor()
    processor.fa4 = True
    processor.fa4_wave_sms = sms
    return processor


def counting_ops(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real_waves, real_whole = qk_module.fa4_attention_waves, qk_module.fa4_attention

    def waves(*args: Any) -> torch.Tensor:
        calls.append(f"split {args[3]}/{args[4]}")
        return real_waves(*args)

    def whole(*args: Any) -> torch.Tensor:
        calls.append("whole")
        return real_whole(*args)

    monkeypatch.setattr(qk_module, "fa4_attention_waves", waves)
    monkeypatch.setattr(qk_module, "fa4_attention", whole)
    return calls


@torch.no_grad()
def test_a_processor_on_a_gpu_splits_the_calls_its_plan_splits(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = counting_ops(monkeypatch)
    q, k, v = token_major(384, 2, seed=3, dtype=torch.bfloat16)
    # 3 tiles of rows x 2 heads on 4 SMs: 2 waves unsplit; 2 x 2 whole, then 1 x 2 x 2 halves
    out = split_processor(sms=4)._local_attention()(q, k, v)
    assert calls == ["split 256/2"]
    assert relative_rms(out, sdpa(q, k, v)) < 0.01
    split_processor(sms=0)._local_attention()(q, k, v)
    assert calls[1:] == ["whole"]


@torch.no_grad()
def test_compiled_blocks_trace_the_split_op_in_one_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fa4_waves, "TILE_ROWS", 8)  # the tiny transformer's 48 tokens split on 5 SMs
    calls = counting_ops(monkeypatch)
    bf16 = torch.bfloat16
    generator = torch.Generator().manual_seed(1)
    tokens, text = 36, 12
    arguments: dict[str, Any] = {
        "hidden_states": torch.randn(1, tokens, 16, generator=generator).to(bf16),
        "encoder_hidden_states": torch.randn(1, text, 24, generator=generator).to(bf16),
        "pooled_projections": torch.randn(1, 8, generator=generator).to(bf16),
        "timestep": torch.tensor([0.7]).to(bf16),
        "guidance": torch.tensor([3.5]),
        "img_ids": torch.randn(tokens, 3, generator=generator),
        "txt_ids": torch.zeros(text, 3),
        "return_dict": False,
    }
    expected = tiny_transformer(bf16)(**arguments)[0]
    model = tiny_transformer(bf16)
    apply_fused_qk_norm_rope(model)
    assert qk_module.use_fa4_attention(model, wave_sms=5) == 2 + 3
    model.compile_repeated_blocks(fullgraph=True)
    assert relative_rms(model(**arguments)[0], expected) < 0.02
    assert calls and all(call.startswith("split") for call in calls)


def wave_sms(monkeypatch: pytest.MonkeyPatch, **options: Any) -> int:
    settings = EngineOptions(compile=True, **options)
    return engine_module.fa4_wave_sms(settings, torch.device("cuda", 0), parallel_layout(settings))


def test_the_engine_splits_on_one_gpu_whose_trial_call_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fa4_waves, "sm_count", lambda device: H100_SMS)
    monkeypatch.setattr(fa4_waves, "trial_call", lambda device: None)
    assert wave_sms(monkeypatch) == H100_SMS
    assert wave_sms(monkeypatch, fa4_waves=False) == 0
    assert wave_sms(monkeypatch, num_gpus=2, ulysses_degree=2) == 0


def test_the_log_says_why_fa4_attends_unsplit(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(fa4_waves, "sm_count", lambda device: H100_SMS)
    monkeypatch.setattr(fa4_waves, "trial_call", failing_trial(RuntimeError("no batch stride of 0")))
    with caplog.at_level(logging.INFO, logger="fluxgate.engine"):
        assert wave_sms(monkeypatch) == 0
    assert "FlashAttention-4 unsplit (FlashAttention-4's split call's trial call failed" in caplog.text


def test_a_trial_whose_broadcast_query_fails_copies_the_query(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fa4_waves, "QUERY_BROADCAST", True)
    real = fa4_waves.reference_attend

    def no_broadcast(query: torch.Tensor, *args: Any) -> Any:
        if 0 in query.stride():
            raise AssertionError("q must not have broadcast dimensions")
        return real(query, *args)

    monkeypatch.setattr(fa4_waves, "reference_attend", no_broadcast)
    fa4_waves.trial_call(torch.device("cpu"))
    assert fa4_waves.QUERY_BROADCAST is False
    q, k, v = token_major(480, 3, seed=7)
    torch.testing.assert_close(fa4_attention_waves(q, k, v, 256, 3), sdpa(q, k, v), atol=1e-5, rtol=1e-5)


def test_fa4_waves_is_on_by_default_and_the_flag_turns_it_off() -> None:
    parser = argparse.ArgumentParser()
    add_worker_arguments(parser)
    assert engine_options(parser.parse_args([])).fa4_waves is True
    assert engine_options(parser.parse_args(["--compile", "--no-fa4-waves"])).fa4_waves is False
