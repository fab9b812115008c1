"""FlashAttention-4's Hopper kernel against cuDNN's at FLUX.1's shapes (``python -m bench.fa4_check``).

The worker's attention is SDPA's cuDNN kernel (``cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma``):
661 TFLOP/s alone on an H100 at one GPU's shape, 565 inside a whole image (lease 48), and 81% of that rate
at a Ulysses-2 rank's 12 heads (lease 78). ``flash-attn-4`` (``flash_attn.cute``, CuTe DSL, compiled at
its first call) has a Hopper forward kernel too, which reads the query, key and value token-major, as the
worker's processors write them, and writes its output token-major, as ``to_out`` reads it.

For 24, 12 and 6 heads of 128 over 4,608 tokens (one GPU, a Ulysses-2 rank, a Ulysses-4 rank) this times,
replayed from CUDA graphs (which FA4's calls must survive to be of use to the worker):

* cuDNN through SDPA, on token-major views, as the worker calls it;
* FA4 with its default tile for head dim 128 (128 x 128) and with each tile of ``--tiles``;
* FA4's default with the value read as the worker's fused projections leave it (``value_strided``): the last
  third of each token's (query, key, value) row, a row stride three times the value's width;

each in short bursts (20 calls a graph, 5 replays) and sustained (``--sustained-replays``, ~1 s of work:
the card holds its power cap, and the rates inside an image are the sustained ones). Every FA4 output is
compared with cuDNN's (max abs difference, relative L2, PSNR) and with fp32 attention on the first head; each
variant's first call (its compile) is timed. A variant FA4 refuses is reported with its error.

``--waves`` times ``--fa4-waves``'s split calls instead (``worker.optimizations.fa4_waves``), for each head
count: FA4 unsplit against the op with the worker's plan and with other part counts, interleaved (unsplit,
split, unsplit, split: the card's drift falls on both), the plan's three launches alone (the whole waves,
the tail's parts, the combine), the tail's query copied rather than broadcast, and each output against the
unsplit one and fp32's first head.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.attention_probe import errors, graph_ms, report, time_ms

TOKENS, HEAD_DIM = 4096 + 512, 128


def cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)

    return run


def fa4(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tile: tuple[int, int] | None
) -> Callable[[], torch.Tensor]:
    from flash_attn.cute.interface import _flash_attn_fwd

    def run() -> torch.Tensor:
        return _flash_attn_fwd(q, k, v, tile_mn=tile)[0]

    return run


def fp32_first_head(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    hq, hk, hv = (t[:, :, :1].transpose(1, 2).float() for t in (q, k, v))
    return F.scaled_dot_product_attention(hq, hk, hv).transpose(1, 2)


def timed(fn: Callable[[], torch.Tensor], flops: float, sustained_replays: int) -> dict[str, Any]:
    """Burst and sustained GPU time a call, from CUDA graphs; launched one by one where capture fails."""
    try:
        burst_ms, _ = graph_ms(fn, calls=20, replays=5)
        sustained_ms, _ = graph_ms(fn, calls=20, replays=sustained_replays)
        graph_error = None
    except Exception as error:
        graph_error = f"{type(error).__name__}: {str(error)[:300]}"
        torch.cuda.synchronize()
        burst_ms = time_ms(fn, repeats=100)
        sustained_ms = time_ms(fn, repeats=20 * sustained_replays)
    return {
        "graph_error": graph_error,
        "us": round(burst_ms * 1000, 1),
        "tflop_s": round(flops / burst_ms / 1e9, 1),
        "sustained_us": round(sustained_ms * 1000, 1),
        "sustained_tflop_s": round(flops / sustained_ms / 1e9, 1),
    }


def random_qkv(heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Token-major bf16 query, key and value of ``heads`` heads over FLUX.1's tokens (seeded by the head
    count), and the attention's FLOPs."""
    generator = torch.Generator("cuda").manual_seed(heads)
    q, k, v = (
        torch.randn(1, TOKENS, heads, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=generator)
        for _ in range(3)
    )
    return q, k, v, 4.0 * heads * TOKENS * TOKENS * HEAD_DIM


def measure(heads: int, tiles: list[tuple[int, int] | None], sustained_replays: int) -> dict[str, Any]:
    q, k, v, flops = random_qkv(heads)
    reference = cudnn(q, k, v)().float()
    truth = fp32_first_head(q, k, v)
    result: dict[str, Any] = {
        "cudnn": {
            **timed(cudnn(q, k, v), flops, sustained_replays),
            "vs_fp32_first_head": errors(reference[:, :, :1], truth),
        }
    }
    projected = torch.empty(1, TOKENS, 3 * heads * HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    strided_v = projected[..., 2 * heads * HEAD_DIM :].unflatten(-1, (heads, HEAD_DIM))
    strided_v.copy_(v)
    variants = [("fa4_default" if tile is None else f"fa4_{tile[0]}x{tile[1]}", tile, v) for tile in tiles]
    for name, tile, value in [*variants, ("fa4_default_value_strided", None, strided_v)]:
        fn = fa4(q, k, value, tile)
        try:
            start = time.perf_counter()
            out = fn()
            torch.cuda.synchronize()
            first_s = time.perf_counter() - start
            result[name] = {
                "first_call_s": round(first_s, 2),
                **timed(fn, flops, sustained_replays),
                "vs_cudnn": errors(out, reference),
                "vs_fp32_first_head": errors(out[:, :, :1], truth),
            }
        except Exception as error:  # a tile FA4 does not build is a finding, not a failure of the check
            result[name] = {"error": f"{type(error).__name__}: {str(error)[:400]}"}
        print(name, heads, result[name], flush=True)
    return result


def measure_waves(heads: int, sustained_replays: int) -> dict[str, Any]:
    from flash_attn.cute.interface import _flash_attn_fwd

    from worker.optimizations import fa4_waves

    q, k, v, flops = random_qkv(heads)
    sms = fa4_waves.sm_count(q.device)
    plan = fa4_waves.wave_plan(1, heads, TOKENS, TOKENS, sms)
    result: dict[str, Any] = {"sms": sms, "plan": None if plan is None else vars(plan)}
    unsplit = fa4(q, k, v, None)
    reference = unsplit().float()
    truth = fp32_first_head(q, k, v)
    main_rows = plan.main_rows if plan else 33 * fa4_waves.TILE_ROWS
    candidates = {"plan": plan} if plan else {}
    for splits in (2, 3, 4):
        candidates.setdefault(f"{main_rows}_{splits}", fa4_waves.WavePlan(main_rows, splits))

    def split(p: fa4_waves.WavePlan) -> Callable[[], torch.Tensor]:
        return lambda: fa4_waves.fa4_attention_waves(q, k, v, p.main_rows, p.splits)

    for name, candidate in candidates.items():
        try:
            out = split(candidate)()
            torch.cuda.synchronize()
            result[name] = {
                "vs_unsplit": errors(out, reference),
                "vs_fp32_first_head": errors(out[:, :, :1], truth),
            }
        except Exception as error:
            result[name] = {"error": f"{type(error).__name__}: {str(error)[:400]}"}
    result["unsplit_vs_fp32_first_head"] = errors(reference[:, :, :1], truth)
    timings: dict[str, list[float]] = {}
    for _ in range(2):  # interleaved: unsplit, then each split, twice
        for name, fn in [("unsplit", unsplit), *((n, split(c)) for n, c in candidates.items())]:
            if "error" in result.get(name, {}):
                continue
            timings.setdefault(name, []).append(timed(fn, flops, sustained_replays)["sustained_us"])
    result["sustained_us"] = timings
    if plan is not None:  # the plan's launches alone, and its tail's query copied
        out = torch.empty_like(q)
        tail, key_parts, value_parts = fa4_waves.tail_parts(q, k, v, plan.main_rows, plan.splits)
        partial, lse = _flash_attn_fwd(tail, key_parts, value_parts, return_lse=True)[:2]
        parts: dict[str, Callable[[], Any]] = {
            "whole_waves": lambda: _flash_attn_fwd(
                q[:, : plan.main_rows], k, v, out=out[:, : plan.main_rows]
            )[0],
            "tail_parts": lambda: _flash_attn_fwd(tail, key_parts, value_parts, return_lse=True)[0],
            "combine": lambda: fa4_waves.combine(partial, lse, out[0, plan.main_rows :]),
        }
        result["parts"] = {name: timed(fn, flops, sustained_replays)["us"] for name, fn in parts.items()}
        broadcast = fa4_waves.QUERY_BROADCAST
        fa4_waves.QUERY_BROADCAST = False
        try:
            result["plan_query_copied"] = {
                "sustained_us": timed(split(plan), flops, sustained_replays)["sustained_us"],
                "vs_unsplit": errors(split(plan)(), reference),
            }
        finally:
            fa4_waves.QUERY_BROADCAST = broadcast
    print("waves", heads, result, flush=True)
    return result


def parse_tile(text: str) -> tuple[int, int]:
    m, n = text.lower().split("x")
    return int(m), int(n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", default="24,12,6", help="head counts, comma-separated")
    parser.add_argument("--tiles", default="128x176,192x128", help="FA4 tiles to try beside its default")
    parser.add_argument(
        "--sustained-replays", type=int, default=125, help="replays of 20 calls for the sustained rate"
    )
    parser.add_argument("--waves", action="store_true", help="time --fa4-waves's split calls instead")
    parser.add_argument("--output-file")
    args = parser.parse_args(argv)
    if args.waves:
        waves: dict[str, Any] = {"device": torch.cuda.get_device_name()}
        for heads in (int(h) for h in args.heads.split(",")):
            waves[f"heads_{heads}"] = measure_waves(heads, args.sustained_replays)
        report(waves, args.output_file)
        return 0
    tiles: list[tuple[int, int] | None] = [None, *(parse_tile(t) for t in args.tiles.split(",") if t)]
    result: dict[str, Any] = {"device": torch.cuda.get_device_name()}
    for heads in (int(h) for h in args.heads.split(",")):
        result[f"heads_{heads}"] = measure(heads, tiles, args.sustained_replays)
    report(result, args.output_file)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
