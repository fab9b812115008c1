"""Multi-GPU options: degrees validated at start, backends chosen for the layout, the sequence split."""

from __future__ import annotations

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
    prepare_sequence_split,
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


def test_ring_takes_cudnn_attention_unless_a_backend_returning_lse_was_chosen() -> None:
    assert attention_backend_for(ParallelLayout(ring=2), None, CUDA) == "_native_cudnn"
    assert attention_backend_for(ParallelLayout(ring=2), "flash", CUDA) == "flash"
    assert attention_backend_for(ParallelLayout(ulysses=2), None, CUDA) is None  # SDPA's own choice
    with pytest.raises(ParallelError, match="log-sum-exp"):
        attention_backend_for(ParallelLayout(ring=2), "native", CUDA)
    with pytest.raises(ParallelError, match="log-sum-exp"):
        attention_backend_for(ParallelLayout(ring=2), None, CPU)


def test_backends_without_context_parallel_support_are_refused_for_a_group() -> None:
    assert attention_backend_for(ParallelLayout(), "_native_efficient", CUDA) == "_native_efficient"
    with pytest.raises(ParallelError, match="does not support sequence parallelism"):
        attention_backend_for(ParallelLayout(ulysses=2), "_native_efficient", CUDA)


def _pipe_with_cp_config() -> SimpleNamespace:
    config = SimpleNamespace(ulysses_anything=False, ring_anything=False)
    parallel = SimpleNamespace(context_parallel_config=config)
    return SimpleNamespace(transformer=SimpleNamespace(_parallel_config=parallel))


def test_even_token_counts_take_the_even_split_and_others_the_uneven_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    pipe = _pipe_with_cp_config()
    config = pipe.transformer._parallel_config.context_parallel_config
    prepare_sequence_split(pipe, 64 * 64, ParallelLayout(ulysses=2))
    assert (config.ulysses_anything, config.ring_anything) == (False, False)
    prepare_sequence_split(pipe, 63 * 63, ParallelLayout(ulysses=2))  # 1008x1008
    assert (config.ulysses_anything, config.ring_anything) == (True, False)
    prepare_sequence_split(pipe, 63 * 63, ParallelLayout(ring=2))
    assert (config.ulysses_anything, config.ring_anything) == (False, True)
    with pytest.raises(ParallelError, match="multiples of 64"):
        prepare_sequence_split(pipe, 63 * 63, ParallelLayout(ulysses=2, ring=2))
    with pytest.raises(ParallelError, match="does not take reference images"):
        prepare_sequence_split(pipe, -1, ParallelLayout(ulysses=2, ring=2))


def test_cpu_groups_refuse_uneven_splits_that_gloo_cannot_gather(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ParallelError, match="gloo gathers only equal shards"):
        prepare_sequence_split(_pipe_with_cp_config(), 9, ParallelLayout(ulysses=2))
