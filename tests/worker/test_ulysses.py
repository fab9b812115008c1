"""Ulysses with the query, key and value in one exchange: diffusers' Ulysses output, on gloo ranks."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from worker.optimizations.ulysses import packed_exchange_applies


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    return dispatch_attention_fn(q, k, v)


def pending_output(pending: Any) -> torch.Tensor:
    """The attention's output through a PendingAttention's two steps, around 1-row GEMMs."""
    width = pending.query.shape[-2] * pending.query.shape[-1]
    pending.attend_beside(torch.ones(1, width), torch.ones(4, width), torch.zeros(4))
    return pending.settle_beside(torch.ones(1, 4), torch.ones(4, 2))[1]


def rank_main(rank: int, world: int, port: int, batches: list[int], out_dir: str) -> None:
    """One rank: its shard of the same random query/key/value through both Ulysses paths, per batch size."""
    import torch.distributed as dist
    from diffusers import ContextParallelConfig
    from diffusers.models._modeling_parallel import ParallelConfig
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from torch.distributed.device_mesh import init_device_mesh

    from worker.optimizations.ulysses import PendingAttention, packed_ulysses_attention

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        layout = ContextParallelConfig(ulysses_degree=world)
        mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("ring", "ulysses"))
        layout.setup(rank, world, torch.device("cpu"), mesh=mesh)
        config = ParallelConfig(context_parallel_config=layout)
        generator = torch.Generator().manual_seed(0)
        tokens, heads, head_dim = 8 * world, 2 * world, 16
        shard = slice(rank * tokens // world, (rank + 1) * tokens // world)
        results = {}
        for batch in batches:
            whole = [torch.randn(batch, tokens, heads, head_dim, generator=generator) for _ in range(3)]
            query, key, value = (part[:, shard].contiguous() for part in whole)
            results[batch] = {
                "diffusers": dispatch_attention_fn(query, key, value, parallel_config=config),
                "packed": packed_ulysses_attention(
                    query, key, value, config, lambda q, k, v: dispatch_attention_fn(q, k, v)
                ),
                "full": dispatch_attention_fn(*whole)[:, shard],
                # without symmetric memory (gloo) a pending attention runs whole beside nothing
                "pending": pending_output(
                    PendingAttention(query, key, value, config, attend, symmetric=False)
                ),
            }
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("world", "batches"), [(2, [1, 2]), (3, [1])])
def test_the_packed_exchange_gives_diffusers_ulysses_output(
    tmp_path: Path, world: int, batches: list[int]
) -> None:
    mp.start_processes(
        rank_main, args=(world, free_port(), batches, str(tmp_path)), nprocs=world, start_method="spawn"
    )
    for rank in range(world):
        results: dict[int, dict[str, Any]] = torch.load(tmp_path / f"rank{rank}.pt")
        assert sorted(results) == batches
        for result in results.values():
            assert torch.equal(result["packed"], result["diffusers"])  # the same attention, the same tokens
            assert torch.equal(result["pending"], result["packed"])
            torch.testing.assert_close(result["packed"], result["full"])


def test_the_packed_exchange_applies_to_ulysses_alone_without_a_mask() -> None:
    class Layout:
        def __init__(self, ulysses: int, ring: int) -> None:
            self.ulysses_degree, self.ring_degree = ulysses, ring

    class Config:
        def __init__(self, ulysses: int, ring: int) -> None:
            self.context_parallel_config = Layout(ulysses, ring)

    assert packed_exchange_applies(Config(2, 1), None)
    assert not packed_exchange_applies(Config(2, 1), torch.ones(1, 4))
    assert not packed_exchange_applies(Config(2, 2), None)
    assert not packed_exchange_applies(Config(1, 2), None)
    assert not packed_exchange_applies(None, None)
