"""Ulysses' exchanges through symmetric memory, on the CPU: each rank's workspace is a tensor its peers
can see, and the barrier is the point where the test moves every rank from one phase to the next."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from worker import engine as engine_module
from worker.cli import add_worker_arguments, engine_options
from worker.optimizations import symmetric_exchange
from worker.optimizations.qk_norm_rope import FusedQKFluxAttnProcessor
from worker.optimizations.symmetric_exchange import (
    Layout,
    exchange_back,
    exchange_back_beside,
    exchange_in,
    exchange_in_beside,
    place_back,
    power_of_two_divisor,
    pull_in,
    send_back,
    send_in,
    symmetric_exchange_applies,
)
from worker.parallel import parallel_layout
from worker.tiny_model import build_tiny_pipeline

HEADS, HEAD_DIM, TOKENS = 6, 4, 5


class Workspaces:
    """Every rank's workspace, one flat tensor each, as symmetric memory maps them into each rank."""

    def __init__(self, world: int, numel: int, dtype: torch.dtype) -> None:
        self.flat = [torch.full((numel,), float("nan"), dtype=dtype) for _ in range(world)]

    def of(self, rank: int) -> FakeSymmetric:
        return FakeSymmetric(self, rank)


class FakeSymmetric:
    def __init__(self, workspaces: Workspaces, rank: int) -> None:
        self.workspaces, self.rank, self.world_size = workspaces, rank, len(workspaces.flat)

    def get_buffer(
        self, rank: int, sizes: Sequence[int], dtype: torch.dtype, storage_offset: int = 0
    ) -> torch.Tensor:
        flat = self.workspaces.flat[rank]
        assert flat.dtype == dtype
        numel = int(torch.Size(sizes).numel())
        assert storage_offset + numel <= flat.numel(), "past the workspace's end"
        return flat[storage_offset : storage_offset + numel].view(*sizes)

    def barrier(self, channel: int = 0, timeout_ms: int = 0) -> None:
        raise AssertionError("the test runs the phases around the barrier itself")


def round_trip(
    world: int, batch: int, inputs: list[torch.Tensor], attend: object, workspaces: Workspaces
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every rank through both exchanges, phase by phase: what each attended over, and what each got back."""
    memories = [workspaces.of(rank) for rank in range(world)]
    shards = [[t[:, r * TOKENS : (r + 1) * TOKENS] for t in inputs] for r in range(world)]
    received = [send_in(m, *shard) for m, shard in zip(memories, shards, strict=True)]
    received = [pull_in(m, r) for m, r in zip(memories, received, strict=True)]
    outs = [attend(*r) for r in received]  # type: ignore[operator]
    for memory, out in zip(memories, outs, strict=True):
        send_back(memory, out)
    return received, [place_back(m, out) for m, out in zip(memories, outs, strict=True)]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("batch", [1, 2])
def test_each_rank_attends_over_the_whole_sequence_of_its_heads_and_gets_its_tokens_back(
    world: int, batch: int
) -> None:
    generator = torch.Generator().manual_seed(world * 10 + batch)
    whole = [torch.randn(batch, world * TOKENS, HEADS, HEAD_DIM, generator=generator) for _ in range(3)]
    layout = Layout(batch, TOKENS, HEADS, HEAD_DIM, world)
    workspaces = Workspaces(world, layout.workspace_bytes(torch.float32) // 4, torch.float32)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return q * 2 - v + k

    received, back = round_trip(world, batch, whole, attend, workspaces)
    local = HEADS // world
    expected_out = torch.empty_like(whole[0])
    for rank in range(world):
        heads = slice(rank * local, (rank + 1) * local)
        for part in range(3):
            assert torch.equal(received[rank][part], whole[part][:, :, heads])
        expected_out[:, :, heads] = attend(*(t[:, :, heads] for t in whole))
    for rank in range(world):
        assert torch.equal(back[rank], expected_out[:, rank * TOKENS : (rank + 1) * TOKENS])


def test_the_workspace_is_reused_by_the_next_exchanges() -> None:
    world, batch = 2, 1
    layout = Layout(batch, TOKENS, HEADS, HEAD_DIM, world)
    workspaces = Workspaces(world, layout.workspace_bytes(torch.float32) // 4, torch.float32)
    for seed in (1, 2):
        generator = torch.Generator().manual_seed(seed)
        whole = [torch.randn(batch, world * TOKENS, HEADS, HEAD_DIM, generator=generator) for _ in range(3)]
        _, back = round_trip(world, batch, whole, lambda q, k, v: q, workspaces)
        assert torch.equal(torch.cat(back, dim=1), whole[0])


def test_region_back_starts_where_region_in_ends_and_both_fit_the_workspace() -> None:
    layout = Layout(batch=2, tokens=7, heads=24, head_dim=128, world=2)
    inward = torch.Size(layout.inward).numel()
    assert layout.back_offset == inward
    assert (inward + torch.Size(layout.back).numel()) * 2 == layout.workspace_bytes(torch.bfloat16)


def test_heads_that_do_not_split_over_the_ranks_are_refused() -> None:
    with pytest.raises(ValueError, match="5 heads do not split over 2 ranks"):
        Layout.of(torch.empty(1, 3, 5, 8), 2)


def test_the_ops_shapes_without_running_them() -> None:
    with FakeTensorMode():
        q = torch.empty(2, 9, 24, 128, dtype=torch.bfloat16)
        received = exchange_in(q, q, q, "group", 2)
        assert received.shape == (3, 2, 18, 12, 128) and received.dtype == torch.bfloat16
        assert exchange_back(received[0], "group", 2).shape == (2, 9, 24, 128)


def test_the_ops_beside_a_gemm_give_the_exchange_and_the_gemm_shapes() -> None:
    with FakeTensorMode():
        q = torch.empty(1, 9, 24, 128, dtype=torch.bfloat16)
        hidden = torch.empty(9, 3072, dtype=torch.bfloat16)
        weight = torch.empty(12288, 3072, dtype=torch.bfloat16)
        received, mlp = exchange_in_beside(q, q, q, hidden, weight, torch.empty(12288), "group", 2)
        assert received.shape == (3, 1, 18, 12, 128) and mlp.shape == (9, 12288)
        result, product = exchange_back_beside(received[0], mlp, weight, "group", 2)
        assert result.shape == (1, 9, 2, 12, 128) and product.shape == (9, 3072)


@pytest.mark.parametrize(
    ("value", "cap", "divisor"), [(1536, 1024, 512), (12, 1024, 4), (24, 8, 8), (6, 8, 2)]
)
def test_power_of_two_divisor_is_the_largest_up_to_the_cap(value: int, cap: int, divisor: int) -> None:
    assert power_of_two_divisor(value, cap) == divisor


def test_cpu_tensors_keep_the_nccl_exchange() -> None:
    assert not symmetric_exchange_applies(torch.empty(1, 2, 4, 8))


def test_no_symmetric_exchange_flag_keeps_nccls_exchange_and_the_barrier_waits_the_group_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parser = argparse.ArgumentParser()
    add_worker_arguments(parser)
    assert engine_options(parser.parse_args([])).symmetric_exchange is True
    options = engine_options(parser.parse_args(["--no-symmetric-exchange", "--group-timeout-s", "12"]))
    assert options.symmetric_exchange is False
    monkeypatch.setattr(symmetric_exchange, "BARRIER_TIMEOUT_MS", symmetric_exchange.BARRIER_TIMEOUT_MS)
    pipe = build_tiny_pipeline("flux1", seed=0)
    engine_module.set_fused_attention(pipe, options, torch.device("cpu"), parallel_layout(options))
    processors = [
        module.processor
        for module in pipe.transformer.modules()
        if isinstance(getattr(module, "processor", None), FusedQKFluxAttnProcessor)
    ]
    assert processors and not any(processor.symmetric_exchange for processor in processors)
    assert FusedQKFluxAttnProcessor.symmetric_exchange is True  # other engines in the process keep it
    assert symmetric_exchange.BARRIER_TIMEOUT_MS == 12_000
