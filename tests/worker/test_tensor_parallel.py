"""Megatron-style sharding of linear pairs on two CPU ranks (gloo): the sharded pair computes what the
whole pair computes, biases included, and each rank keeps only its slices."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path
from typing import Any

from tests.support import free_port


def on_two_ranks(target: Any, tmp_path: Path) -> list[dict[str, Any]]:
    """Run ``target(rank, port, out)`` on two spawned gloo ranks; each rank's JSON report."""
    context = multiprocessing.get_context("spawn")
    port = free_port()
    ranks = [context.Process(target=target, args=(rank, port, str(tmp_path))) for rank in (0, 1)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=120)
        assert process.exitcode == 0
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def shard_and_compare(rank: int, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn

    from worker.tensor_parallel import _parallelize, tensor_parallel_mesh

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)  # both ranks build the same weights, as every rank loads the same checkpoint
    pair = nn.Module()
    pair.up = nn.Linear(8, 12)
    pair.down = nn.Linear(12, 6)
    inputs, cpu = torch.randn(3, 8), torch.device("cpu")
    with torch.no_grad():
        whole = pair.down(torch.relu(pair.up(inputs)))
        _parallelize(pair, tensor_parallel_mesh(2, cpu), cpu, columns=("up",), rows=("down",))
        sharded = pair.down(torch.relu(pair.up(inputs)))
    report = {
        "max_difference": float((whole - sharded).abs().max()),
        "up": list(pair.up.weight.shape),
        "down": list(pair.down.weight.shape),
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def test_a_column_then_row_sharded_pair_computes_the_whole_pair_with_its_biases(tmp_path: Path) -> None:
    for report in on_two_ranks(shard_and_compare, tmp_path):
        assert report["max_difference"] < 1e-5
        assert (report["up"], report["down"]) == ([6, 8], [6, 6])  # half the up's outputs, the down's inputs


def shard_flux2_transformer(rank: int, port: int, out: str) -> None:
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist

    from worker.tensor_parallel import apply_transformer_tp
    from worker.tiny_flux2 import build_tiny_flux2_pipeline

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    pipeline: Any = build_tiny_flux2_pipeline()
    transformer = pipeline.transformer
    torch.manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(1, 16, 128),
        "encoder_hidden_states": torch.randn(1, 8, 48),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([3.5]),
        "img_ids": torch.zeros(1, 16, 4),
        "txt_ids": torch.zeros(1, 8, 4),
        "return_dict": False,
    }
    fused = transformer.single_transformer_blocks[0].attn.to_qkv_mlp_proj
    whole_rows = fused.weight.shape[0]
    with torch.no_grad():
        whole = transformer(**inputs)[0]
        apply_transformer_tp(SimpleNamespace(transformer=transformer), 2, torch.device("cpu"))
        sharded = transformer(**inputs)[0]
    report = {
        "max_difference": float((whole - sharded).abs().max()),
        "rows": [whole_rows, fused.weight.shape[0]],
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def test_flux2s_transformer_sharded_by_its_plan_computes_the_whole_transformer(tmp_path: Path) -> None:
    """Packed projections included: the single blocks' fused Q/K/V/gate/up linear keeps half of each block."""
    for report in on_two_ranks(shard_flux2_transformer, tmp_path):
        assert report["max_difference"] < 1e-4
        assert report["rows"][1] * 2 == report["rows"][0]
