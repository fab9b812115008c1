"""Multi-GPU options: degrees validated at start, backends chosen for the layout, the sequence split."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError

from worker.options import EngineOptions
from worker.parallel import (
    ParallelError,
    ParallelLayout,
    attention_backend_for,
    check_heads,
    group_attention_backend,
    parallel_layout,
    replicated_transformer,
    splits_evenly,
)

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")


@pytest.mark.parametrize(
    ("options", "layout"),
    [
        ({}, (1, 1)),
        ({"num_gpus": 2}, (2, 1)),
        ({"num_gpus": 4, "sp_degree": 4}, (4, 1)),
        ({"num_gpus": 2, "ring_degree": 2}, (1, 2)),
        ({"num_gpus": 4, "ulysses_degree": 2, "ring_degree": 2, "sp_degree": 4}, (2, 2)),
    ],
)
def test_degrees_default_to_ulysses_over_every_gpu_of_the_group(
    options: dict[str, int], layout: tuple[int, int]
) -> None:
    assert EngineOptions(**options).layout == layout


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_gpus": 2, "ulysses_degree": 2, "ring_degree": 2}, "exceeds --num-gpus 2"),
        ({"num_gpus": 4, "ulysses_degree": 2}, "ulysses x ring must equal --num-gpus"),
        ({"num_gpus": 4, "sp_degree": 4, "ulysses_degree": 2}, "--sp-degree 4 must equal"),
        ({"num_gpus": 2, "tp_size": 3}, "--tp-size 3 must divide --num-gpus 2"),
        ({"num_gpus": 2, "dit_cpu_offload": True}, "offloading is for one GPU"),
        ({"num_gpus": 0}, "num_gpus"),
        ({"num_gpus": 4, "dit_tp_size": 2}, "--dit-tp-size 2 shards the transformer over the whole group"),
        ({"num_gpus": 2, "dit_tp_size": 2, "ulysses_degree": 2}, "without --ulysses-degree"),
        ({"num_gpus": 2, "dit_tp_size": 2, "quantize": "fp8"}, "does not combine with --quantize fp8"),
        ({"num_gpus": 2, "dit_tp_size": 2, "parallel_vae": True}, "does not combine with --parallel-vae"),
        ({"num_gpus": 3}, "degree of 3 does not divide the 512 text tokens"),  # Ulysses 3 divides 24 heads
        ({"num_gpus": 6, "ulysses_degree": 2, "ring_degree": 3}, "degree of 6 does not divide"),
    ],
)
def test_impossible_layouts_are_refused_at_start_naming_the_flag(
    options: dict[str, object], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        EngineOptions(**options)


def test_ulysses_must_divide_the_attention_heads() -> None:
    pipe = SimpleNamespace(transformer=SimpleNamespace(config=SimpleNamespace(num_attention_heads=24)))
    check_heads(pipe, ParallelLayout(ulysses=8))
    with pytest.raises(ParallelError, match="--ulysses-degree 5 must divide the transformer's 24"):
        check_heads(pipe, ParallelLayout(ulysses=5))


DIFFUSERS = "diffusers"


def test_one_gpu_takes_the_chosen_backend_and_a_group_sets_its_own_with_its_parallelism() -> None:
    assert attention_backend_for(ParallelLayout(), "_native_efficient", CUDA) == "_native_efficient"
    assert attention_backend_for(ParallelLayout(ulysses=2), "flash", CUDA) is None


def test_on_diffusers_ring_takes_cudnn_attention_unless_a_backend_returning_lse_was_chosen() -> None:
    ring = ParallelLayout(ring=2, runtime=DIFFUSERS)
    assert group_attention_backend(ring, None, CUDA) == "_native_cudnn"
    assert group_attention_backend(ring, "flash", CUDA) == "flash"
    assert group_attention_backend(ParallelLayout(ulysses=2, runtime=DIFFUSERS), None, CUDA) is None
    with pytest.raises(ParallelError, match="log-sum-exp"):
        group_attention_backend(ring, "native", CUDA)
    with pytest.raises(ParallelError, match="log-sum-exp"):
        group_attention_backend(ring, None, CPU)
    with pytest.raises(ParallelError, match="does not support sequence parallelism"):
        group_attention_backend(ParallelLayout(ulysses=2, runtime=DIFFUSERS), "_native_efficient", CUDA)


def test_on_cache_dit_a_group_takes_cache_dits_backends_and_ring_those_returning_lse(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ulysses, ring = ParallelLayout(ulysses=2), ParallelLayout(ring=2)
    assert group_attention_backend(ulysses, None, CUDA) is None  # cache-dit's "native" (SDPA)
    assert group_attention_backend(ulysses, "_SDPA_cudnn", CUDA) == "_sdpa_cudnn"
    assert group_attention_backend(ulysses, "native", CPU) == "native"
    assert group_attention_backend(ring, None, CUDA) is None  # native returns it through flash SDPA
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: name == "flash_attn" or None)
    assert group_attention_backend(ring, "flash", CUDA) == "flash"
    with pytest.raises(ParallelError, match="needs the 'sageattention' package"):
        group_attention_backend(ulysses, "sage", CUDA)
    with pytest.raises(ParallelError, match="cache-dit's name for it: '_sdpa_cudnn'"):
        group_attention_backend(ulysses, "_native_cudnn", CUDA)
    with pytest.raises(ParallelError, match="log-sum-exp: one of"):
        group_attention_backend(ring, "_sdpa_cudnn", CUDA)
    with pytest.raises(ParallelError, match="no CPU implementation"):
        group_attention_backend(ring, None, CPU)
    with pytest.raises(ParallelError, match="needs CUDA"):
        group_attention_backend(ulysses, "flash", CPU)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ulysses_async": True}, "--ulysses-async overlaps Ulysses' all-to-all: it needs --ulysses-degree"),
        ({"num_gpus": 4, "ulysses_degree": 2, "ring_degree": 2, "ulysses_async": True}, "skips the Ring"),
        ({"num_gpus": 2, "ulysses_async": True, "sp_runtime": DIFFUSERS}, "--ulysses-async is cache-dit's"),
        ({"parallel_vae": True}, "--parallel-vae splits the decode over a group's GPUs"),
        ({"num_gpus": 2, "parallel_vae": True, "sp_runtime": DIFFUSERS}, "--parallel-vae is cache-dit's"),
        ({"num_gpus": 2, "sp_runtime": "megatron"}, "sp_runtime"),
    ],
)
def test_cache_dit_features_are_refused_at_start_where_they_cannot_act(
    options: dict[str, object], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        EngineOptions(**options)


def test_the_layout_carries_the_runtime_and_features_and_describes_those_not_default() -> None:
    layout = parallel_layout(EngineOptions(num_gpus=2, ulysses_async=True, parallel_vae=True))
    assert (layout.ulysses, layout.runtime) == (2, "cache-dit")
    assert layout.ulysses_async and layout.parallel_vae
    assert layout.describe == "ulysses=2,ring=1,tp=1,runtime=cache-dit,ulysses_async,parallel_vae"
    plain = parallel_layout(EngineOptions(num_gpus=2, ring_degree=2, sp_runtime=DIFFUSERS))
    assert plain.describe == "ulysses=1,ring=2,tp=1,runtime=diffusers"
    assert parallel_layout(EngineOptions(num_gpus=2)).describe == "ulysses=2,ring=1,tp=1,runtime=diffusers"
    assert parallel_layout(EngineOptions()).describe == "ulysses=1,ring=1,tp=1"  # one GPU: no runtime


@pytest.mark.parametrize(
    ("options", "fullgraph"),
    [
        ({}, True),
        ({"num_gpus": 2}, True),
        ({"num_gpus": 2, "ring_degree": 2, "sp_runtime": DIFFUSERS}, True),
        ({"num_gpus": 2, "ring_degree": 2}, True),  # "auto": diffusers' runtime
        ({"num_gpus": 2, "ring_degree": 2, "sp_runtime": "cache-dit"}, False),  # p2p K/V rotation: a break
        ({"num_gpus": 4, "ulysses_degree": 2, "ring_degree": 2, "sp_runtime": "cache-dit"}, False),
    ],
)
def test_blocks_compile_as_one_graph_except_around_cache_dits_ring_exchange(
    options: dict[str, object], fullgraph: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker import engine as engine_module
    from worker.tiny_model import build_tiny_pipeline

    compiled: list[object] = []
    monkeypatch.setattr(engine_module, "apply_sequence_parallel", lambda *args: None)
    monkeypatch.setattr(engine_module, "apply_regional_compile", lambda pipe, config: compiled.append(config))
    layout = parallel_layout(EngineOptions(**options))  # type: ignore[arg-type]
    assert layout.compile_fullgraph is fullgraph
    pipe = build_tiny_pipeline("flux1", seed=0)
    engine_module.FluxEngine.from_pipeline(pipe, EngineOptions(compile=True, **options), CPU)  # type: ignore[arg-type]
    assert [config.fullgraph for config in compiled] == [fullgraph]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("options", "presets", "runtime"),
    [
        ({"num_gpus": 2}, False, DIFFUSERS),
        ({"num_gpus": 2}, True, "cache-dit"),  # only cache-dit runs the presets
        ({"num_gpus": 2, "ulysses_async": True}, False, "cache-dit"),
        ({"num_gpus": 2, "ring_degree": 2}, False, DIFFUSERS),
        ({"num_gpus": 4, "ulysses_degree": 2, "ring_degree": 2}, False, DIFFUSERS),
        ({"num_gpus": 2, "ring_degree": 2}, True, "cache-dit"),  # only cache-dit runs the presets
        ({"num_gpus": 2, "ring_degree": 2, "parallel_vae": True}, False, "cache-dit"),
        ({"num_gpus": 2, "ring_degree": 2, "sp_runtime": "cache-dit"}, False, "cache-dit"),
        ({"num_gpus": 2, "sp_runtime": DIFFUSERS}, True, DIFFUSERS),  # asked for: refused later
    ],
)
def test_auto_runtime_is_diffusers_unless_the_layout_needs_a_cache_dit_feature(
    options: dict[str, object], presets: bool, runtime: str
) -> None:
    engine_options = EngineOptions(**options)  # type: ignore[arg-type]
    assert engine_options.sp_runtime == (options.get("sp_runtime") or "auto")
    assert engine_options.resolved_sp_runtime(cache_presets=presets) == runtime


def test_sequences_that_do_not_split_evenly_run_on_the_replica() -> None:
    assert splits_evenly(64 * 64, ParallelLayout(ulysses=2))
    assert splits_evenly(64 * 64, ParallelLayout(ulysses=2, ring=2))
    assert not splits_evenly(63 * 63, ParallelLayout(ulysses=2))  # 1008x1008
    assert not splits_evenly(63 * 63, ParallelLayout(ring=2, runtime=DIFFUSERS))
    assert splits_evenly(62 * 63, ParallelLayout(ulysses=2)) and not splits_evenly(
        62 * 63, ParallelLayout(ring=4)
    )
    assert not splits_evenly(-1, ParallelLayout(ulysses=2))  # a Kontext reference: count unknown ahead


def test_the_replica_shares_every_weight_and_keeps_its_own_modules() -> None:
    from worker.tiny_model import build_tiny_pipeline

    transformer = build_tiny_pipeline("flux1", seed=0).transformer
    replica = replicated_transformer(transformer)
    originals = dict(transformer.named_parameters())
    for name, parameter in replica.named_parameters():
        assert parameter is originals[name], name
    assert replica is not transformer
    assert all(a is not b for a, b in zip(replica.modules(), transformer.modules(), strict=True))
    transformer.transformer_blocks[0].attn.processor.marker = True  # state set on the original's processors
    assert not hasattr(replica.transformer_blocks[0].attn.processor, "marker")
