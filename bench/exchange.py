"""Ulysses' exchange alone on a pair of GPUs (``torchrun --nproc-per-node 2 -m bench.exchange``).

A Ulysses-2 image on 2xH100 spends ~0.29 s of its ~2.4 s in NCCL's all-to-all (docs/performance.md,
leases 34 and 45): 4 exchanges a block (query, key, value in; the attention's output back), 6,384 an
image, ~45 us each for a 14.2 MB tensor, of which 7.1 MB cross NVLink. Before an overlapped or fused
exchange is built, this measures what the exchange itself costs and what overlapping it would give, each
replayed from a CUDA graph as the worker replays its steps:

* ``one``: one attention input (2,304 tokens x 24 heads x 128, bf16: 1024x1024's half sequence);
* ``three``: query, key and value in one call (3x the bytes, one launch);
* ``gemm``: the single block's MLP projection (2,304 x 3,072 -> 12,288), the work an exchange could
  hide behind;
* ``gemm+one``: the GEMM on the main stream while one exchange runs on a side stream: if the pair takes
  no longer than the GEMM, the exchange hides; if it takes the sum, overlapping gains nothing (NCCL's
  kernels and the GEMM share the SMs).

Then the whole round trip of the worker's Ulysses attention with an attention that costs nothing (the
query's values as its output), each way it can exchange:

* ``nccl-packed``: query, key and value in one all-to-all, the output back in another, with the copies
  around them (``worker.optimizations.ulysses``, the default);
* ``symmetric``: the same bytes through symmetric memory, copied by the copy engines, one barrier each way
  (``worker.optimizations.symmetric_exchange``), checked to give the packed path's output to the bit;
* ``gemm+symmetric``: the GEMM beside it on a side stream: how much of it hides when the copies take no SMs.

NCCL's environment (``NCCL_*``) is read once a process: the lane runs the script once per setting, and
the result names the settings it ran under.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist

from bench.attention_probe import graph_ms, report
from worker.optimizations.ulysses import Attend, packed_ulysses_attention

TOKENS, HEADS, HEAD_DIM = (4096 + 512) // 2, 24, 128
HIDDEN, MLP = 3072, 12288


def exchange(send: torch.Tensor, receive: torch.Tensor) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        dist.all_to_all_single(receive, send)
        return receive

    return run


def overlapped(
    first: Callable[[], Any], second: Callable[[], Any], side: torch.cuda.Stream
) -> Callable[[], None]:
    """``second`` on a side stream beside ``first`` on the current one, joined at the end."""

    def run() -> None:
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            second()
        first()
        main.wait_stream(side)

    return run


def measure(calls: int) -> dict[str, Any]:
    device = torch.device("cuda", torch.cuda.current_device())
    one = torch.randn(TOKENS * HEADS * HEAD_DIM, device=device, dtype=torch.bfloat16)
    three = torch.randn(3 * one.numel(), device=device, dtype=torch.bfloat16)
    one_out, three_out = torch.empty_like(one), torch.empty_like(three)
    x = torch.randn(TOKENS, HIDDEN, device=device, dtype=torch.bfloat16)
    weight = torch.randn(MLP, HIDDEN, device=device, dtype=torch.bfloat16) / HIDDEN**0.5

    def gemm() -> torch.Tensor:
        return torch.nn.functional.linear(x, weight)

    dist.all_to_all_single(one_out, one)  # the communicator exists before any capture
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    cases: dict[str, Callable[[], Any]] = {
        "one": exchange(one, one_out),
        "three": exchange(three, three_out),
        "gemm": gemm,
        "gemm+one": overlapped(gemm, exchange(one, one_out), side),
    }
    cases.update(round_trips(device, gemm, side))
    timings = {name: graph_ms(fn, calls=calls)[0] * 1000 for name, fn in cases.items()}
    return {
        **summarise(timings, one.numel() * one.element_size() / 1e6),
        "symmetric_equals_packed": symmetric_equals_packed(device),
    }


def ulysses_config() -> Any:
    """The parts of diffusers' parallel config the exchanges read: the group and its Ulysses degree."""
    group = dist.group.WORLD
    mesh = SimpleNamespace(get_group=lambda: group)
    layout = SimpleNamespace(_ulysses_mesh=mesh, ulysses_degree=dist.get_world_size(), ring_degree=1)
    return SimpleNamespace(context_parallel_config=layout)


def shard(device: torch.device, seed: int) -> list[torch.Tensor]:
    """This rank's query, key and value: (1, its tokens, every head, head_dim)."""
    generator = torch.Generator(device).manual_seed(seed + dist.get_rank())
    return [
        torch.randn(1, TOKENS, HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=generator)
        for _ in range(3)
    ]


def no_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return q


def round_trips(
    device: torch.device, gemm: Callable[[], Any], side: torch.cuda.Stream
) -> dict[str, Callable[[], Any]]:
    config, (q, k, v) = ulysses_config(), shard(device, 0)

    def packed() -> torch.Tensor:
        return packed_ulysses_attention(q, k, v, config, no_attention)

    def symmetric() -> torch.Tensor:
        return packed_ulysses_attention(q, k, v, config, no_attention, symmetric=True)

    beside = overlapped(gemm, symmetric, side)
    return {"nccl-packed": packed, "symmetric": symmetric, "gemm+symmetric": beside}


def symmetric_equals_packed(device: torch.device) -> bool:
    """Both ways give the same attention inputs and the same output, on every rank."""
    config, (q, k, v) = ulysses_config(), shard(device, 1)
    seen: dict[str, list[torch.Tensor]] = {}

    def attend(name: str) -> Attend:
        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            seen[name] = [q.clone(), k.clone(), v.clone()]
            return q * 2 - v

        return run

    packed = packed_ulysses_attention(q, k, v, config, attend("packed"))
    symmetric = packed_ulysses_attention(q, k, v, config, attend("symmetric"), symmetric=True)
    same = torch.equal(packed, symmetric) and all(
        torch.equal(a, b) for a, b in zip(seen["packed"], seen["symmetric"], strict=True)
    )
    agreed = torch.tensor([int(same)], device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
    return bool(agreed.item())


def summarise(us: dict[str, float], tensor_mb: float) -> dict[str, Any]:
    """The cases' microseconds a call, with what they mean: the bandwidth across the link (half of a
    two-rank exchange stays on the GPU), the cost per tensor of one call for three, and the fraction of
    an exchange the GEMM hides (1: all of it, 0: none, the pair took the sum)."""
    return {
        "us": {name: round(value, 2) for name, value in us.items()},
        "tensor_mb": round(tensor_mb, 2),
        "one_gb_s_across": round(tensor_mb / 2 / us["one"] * 1000, 1),
        "three_per_tensor_us": round(us["three"] / 3, 2),
        "hidden_fraction": hidden_fraction(us, "one"),
        "symmetric_saves_us": round(us["nccl-packed"] - us["symmetric"], 2),
        "symmetric_hidden_fraction": hidden_fraction(us, "symmetric"),
    }


def hidden_fraction(us: dict[str, float], case: str) -> float:
    """How much of ``case`` the GEMM beside it hid: 1 all of it, 0 none (the pair took the sum)."""
    return round((us["gemm"] + us[case] - us[f"gemm+{case}"]) / us[case], 3)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=40, help="exchanges captured in one graph")
    parser.add_argument("--label", default="default", help="names the NCCL setting in the result")
    parser.add_argument("--output-file")
    args = parser.parse_args()
    rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
    try:
        result = measure(args.calls)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        settings = {key: value for key, value in sorted(os.environ.items()) if key.startswith("NCCL_")}
        report(
            {
                "label": args.label,
                "nccl_env": settings,
                "nccl_version": ".".join(map(str, torch.cuda.nccl.version())),
                "device": torch.cuda.get_device_name(),
                **result,
            },
            args.output_file,
        )


if __name__ == "__main__":
    main()
