"""Does an attention's last, partial wave fill with a GEMM beside it? (``python -m bench.concurrency``)

cuDNN's attention runs one program per 128 queries of a head. At 1024x1024 (4,608 tokens) one GPU runs
24 heads x 36 = 864 programs on 132 SMs, 6.5 waves; a Ulysses-2 rank runs 12 heads, 432 programs, 3.3
waves, so the last wave leaves ~70% of the SMs idle for one program's time. Profiled on 2xH200 (lease 75),
a rank's attention took 0.432 s an image against the one GPU's 0.737 s / 2 = 0.368 s: about what four waves
against 3.3 would cost.

In FLUX.1's single blocks the MLP's GEMMs do not depend on the attention (``proj_mlp`` reads the block's
normed input; ``proj_out``'s MLP part reads ``gelu(proj_mlp)``), so one could run beside it. This times, at
one GPU's shapes and a Ulysses-2 rank's, each replayed from a CUDA graph:

* ``attention`` and ``gemm`` alone, and one after the other (``serial``);
* ``beside``: the attention on a high-priority stream, the GEMM launched after it on the caller's
  (lower-priority) stream: the attention's programs go first, the GEMM's fill the SMs it frees;
* ``beside_gemm_first``: the GEMM launched first, on the high-priority stream, the attention after it;
* ``attention_halves``: the attention in two calls over halves of the queries (what sending the half that
  goes back first, beside the other half's attention, would cost in the attention itself).

If ``beside`` takes less than ``serial``, the tail is filled and a block could order its work so; if it
takes the sum, the GEMM's programs (persistent, a fixed grid) wait for SMs the attention holds.
The kernels each case launches are listed (``bench.gemm_check.launched``). Measured on an H100 (lease 78,
docs/performance.md): against the two kernels alone only the Ulysses-2 rank's ``proj_out`` GEMM gained
beside the attention; inside the pipeline neither arrangement gained (leases 79 and 80), so none is used.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.attention_probe import graph_ms, report
from bench.exchange import overlapped
from bench.gemm_check import launched

TOKENS, HEADS, HEAD_DIM, HIDDEN, MLP = 4096 + 512, 24, 128, 3072, 12288


def attention(heads: int, device: torch.device, parts: int = 1) -> Callable[[], torch.Tensor]:
    """cuDNN's attention over every token for ``heads`` heads, token-major as the worker's processor
    writes the query, key and value; in ``parts`` calls over as many slices of the queries."""
    q, k, v = (
        torch.randn(1, TOKENS, heads, HEAD_DIM, device=device, dtype=torch.bfloat16).transpose(1, 2)
        for _ in range(3)
    )

    def run() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            outs = [F.scaled_dot_product_attention(part, k, v) for part in q.chunk(parts, dim=2)]
        return outs[-1]

    return run


def gemms(tokens: int, device: torch.device) -> dict[str, Callable[[], torch.Tensor]]:
    """The single block's MLP GEMMs for a rank's ``tokens``: ``proj_mlp`` with its GELU epilogue, and
    ``proj_out``'s MLP part."""
    bf16 = torch.bfloat16
    x = torch.randn(tokens, HIDDEN, device=device, dtype=bf16)
    mlp_weight = torch.randn(MLP, HIDDEN, device=device, dtype=bf16) * 0.02
    bias = torch.randn(MLP, device=device, dtype=bf16)
    hidden = torch.randn(tokens, MLP, device=device, dtype=bf16)
    out_weight = torch.randn(MLP, HIDDEN, device=device, dtype=bf16) * 0.02
    return {
        "proj_mlp": lambda: torch._addmm_activation(bias, x, mlp_weight.t(), use_gelu=True),
        "proj_out_mlp": lambda: torch.mm(hidden, out_weight),
    }


def serial(*steps: Callable[[], Any]) -> Callable[[], None]:
    """The steps one after the other, as one call."""

    def run() -> None:
        for step in steps:
            step()

    return run


def timed(cases: dict[str, Callable[[], Any]], calls: int, arrangements: tuple[str, str]) -> dict[str, float]:
    """Each case's µs a call, replayed from a CUDA graph, and ``saved``: the ``serial`` case's less the
    faster of the two ``arrangements`` (negative: running side by side costs more)."""
    us = {case: round(graph_ms(fn, calls=calls)[0] * 1000, 1) for case, fn in cases.items()}
    us["saved"] = round(us["serial"] - min(us[name] for name in arrangements), 1)
    return us


def measure(sequence_parallel: int, calls: int) -> dict[str, Any]:
    device = torch.device("cuda", torch.cuda.current_device())
    high = torch.cuda.Stream(device, priority=-1)
    heads = HEADS // sequence_parallel
    attend = attention(heads, device)
    result: dict[str, Any] = {
        "attention_us": round(graph_ms(attend, calls=calls)[0] * 1000, 1),
        "attention_kernels": launched(attend),
        # the queries in two calls: what a query-split attention (the half going back first) would cost
        "attention_halves_us": round(graph_ms(attention(heads, device, parts=2), calls=calls)[0] * 1000, 1),
    }
    for name, gemm in gemms(TOKENS // sequence_parallel, device).items():
        times = {
            "gemm": gemm,
            "serial": serial(attend, gemm),
            # ``overlapped(a, b, side)``: b on the side stream, launched first, a after it on the caller's
            "beside": overlapped(gemm, attend, high),
            "beside_gemm_first": overlapped(attend, gemm, high),
        }
        us = timed(times, calls, ("beside", "beside_gemm_first"))
        result[name] = {**us, "gemm_kernels": launched(gemm)}
    return result


def graph_arguments(doc: str, argv: list[str] | None) -> argparse.Namespace:
    """What the side-by-side checks take: ``--calls`` captured in each CUDA graph, and ``--output-file``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20, help="calls captured in each CUDA graph")
    parser.add_argument("--output-file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = graph_arguments(__doc__, argv)
    result = {
        "device": torch.cuda.get_device_name(),
        "one_gpu": measure(1, args.calls),
        "ulysses_2_rank": measure(2, args.calls),
    }
    report(result, args.output_file)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
