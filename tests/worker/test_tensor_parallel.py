"""Megatron-style sharding of linear pairs on two CPU ranks (gloo): the sharded pair computes what the
whole pair computes, biases included, and each rank keeps only its slices."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

from tests.support import free_port


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
    context = multiprocessing.get_context("spawn")
    port = free_port()
    ranks = [context.Process(target=shard_and_compare, args=(rank, port, str(tmp_path))) for rank in (0, 1)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=120)
        assert process.exitcode == 0
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["max_difference"] < 1e-5
        assert (report["up"], report["down"]) == ([6, 8], [6, 6])  # half the up's outputs, the down's inputs
