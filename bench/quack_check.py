"""quack's CuTe DSL GEMMs at FLUX.1's shapes against cuBLAS, and with the gating in their epilogue.

What is left of the lossless image's time beside the GEMMs and the attention is memory-bound glue
between them (lease 96): the query/key norms and RoPE (0.068 s an image), the gating after the output
projections (0.060 s), the LayerNorms (0.054 s). cuBLASLt cannot take the gating into its epilogue (lease
97), and its algorithms already run at the card's rate (lease 94). quack (``quack-kernels``, Tri Dao's
CuTe DSL kernels, installed with FlashAttention-4) has Hopper GEMMs whose epilogues are Python functions
over the accumulator, including the per-head RMSNorm and RoPE. Fusing the glue pays only if its GEMMs
match cuBLAS's rate at these shapes: this check times both, sustained at the card's power cap.

    python -m bench.quack_check --output-file quack.json      # on the device, after bench/fa4_site.sh

Per shape: torch's call (cuBLAS) against quack's ``gemm`` / ``gemm_act`` (its default configuration, and
autotuned with ``--tuned``). Then a single block's gated output projection as the worker runs it (two
cuBLAS GEMMs, the second accumulating, and inductor's gating kernel) against two quack GEMMs with the
gating in their epilogues (the residual as C, the second added into the output), and a double block's
feed-forward output the same way. Each with its error against fp32.

Lease 99 (H100, autotuned): at 4,096 rows quack's GEMM matches cuBLAS (443 against 453 µs) and the gated
epilogue is free: the double block's gated feed-forward output 442 µs against the worker's 482. At the
single blocks' 4,608 rows quack is 8-9% slower than cuBLAS (cuBLAS's 192 x 192 tiles fill three waves), so
the fused single block is 14% slower. quack 0.6.5's ``gemm_act`` with the tanh GELU fails before compiling
(its epilogue fingerprint rejects a ContextVar).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from bench.attention_probe import report
from bench.gemm_algos import gated_operands, gating_kernel, problem_for, sustained_us, worker_shapes
from bench.gemm_check import Shape, draws, launched, operation

SHAPES = ("single q/k/v", "single mlp in (GELU)", "single out, mlp part", "double image ff out")


def quack_call(shape: Shape, tuned: bool) -> Callable[[], torch.Tensor]:
    """quack's GEMM on the shape's seeded tensors (``gemm_check.draws``), with the same epilogue."""
    from quack.gemm_interface import gemm, gemm_act

    x, weight, bias = draws(shape)
    if shape.op == "gelu":
        return lambda: gemm_act(
            x, weight.t(), bias=bias, activation="gelu_tanh_approx", store_preact=False, tuned=tuned
        )[1]
    if shape.op == "accumulate":
        out = torch.zeros(shape.tokens, shape.outputs, device="cuda", dtype=torch.bfloat16)
        return lambda: gemm(x, weight.t(), out=out, tuned=tuned)
    return lambda: gemm(x, weight.t(), bias=bias if shape.op == "linear" else None, tuned=tuned)


def shape_row(shape: Shape, seconds: float, tuned: bool) -> dict[str, Any]:
    flops = 2 * shape.tokens * shape.inputs * shape.outputs
    row: dict[str, Any] = {"tokens": shape.tokens, "inputs": shape.inputs, "outputs": shape.outputs}
    cublas, quack = problem_for(shape)[1], quack_call(shape, tuned)  # torch's call as the worker makes it
    if shape.op != "accumulate":
        row["max_abs_diff"] = (quack().float() - cublas().float()).abs().max().item()
    for name, call in (("cublas", cublas), ("quack", quack)):
        us = sustained_us(call, seconds)
        row[name] = {"us": round(us, 2), "tflop_s": round(flops / us / 1e6, 1), "kernels": launched(call)}
    row["quack_vs_cublas"] = round(row["quack"]["us"] / row["cublas"]["us"], 4)
    return row


def gated_row(rows: int, parts: tuple[int, ...], seconds: float, tuned: bool) -> dict[str, Any]:
    """``residual + gate * (cat(inputs) @ W.T + bias)``: the worker's cuBLAS GEMMs and gating kernel against
    quack GEMMs with the gating in their epilogues."""
    from worker.optimizations import quack_epilogues

    operands = gated_operands(rows, parts)
    worker = operands.worker(gating_kernel())
    out = torch.empty(rows, 3072, device="cuda", dtype=torch.bfloat16)
    gate, residual, bias = operands.gate, operands.residual, operands.bias
    blocks = list(zip(operands.inputs, operands.views, strict=True))  # (input, its weight columns)

    def fused() -> torch.Tensor:
        x, view = blocks[0]
        quack_epilogues.gated_residual(
            x, view.t(), residual, out={"D": out}, tuned=tuned, bias=bias, gate=gate
        )
        for x, view in blocks[1:]:
            quack_epilogues.gated(x, view.t(), out={"D": out}, add_to_output=True, tuned=tuned, gate=gate)
        return out

    truth = operands.truth()
    return {
        "rows": rows,
        "worker_max_abs_err": (worker().float() - truth).abs().max().item(),
        "fused_max_abs_err": (fused().float() - truth).abs().max().item(),
        "worker_us": round(sustained_us(worker, seconds), 2),
        "fused_us": round(sustained_us(fused, seconds), 2),
        "worker_kernels": launched(worker),
        "fused_kernels": launched(fused),
    }


def guarded(work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return work()
    except Exception as error:  # a DSL compile or an unsupported layout: report it, go on
        return {"error": f"{type(error).__name__}: {str(error)[:300]}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.5, help="sustained stretch per timing")
    parser.add_argument("--tuned", action="store_true", help="let quack autotune each shape (slow)")
    parser.add_argument("--output-file", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(), "tuned": args.tuned}
    sustained_us(operation(worker_shapes(1)[-1]), 3.0)  # the card at its power cap first
    shapes = {shape.name: shape for shape in worker_shapes(1)}
    result["shapes"] = {
        name: guarded(partial(shape_row, shapes[name], args.seconds, args.tuned)) for name in SHAPES
    }
    result["gated"] = {
        "single block": guarded(partial(gated_row, 4608, (3072, 12288), args.seconds, args.tuned)),
        "double ff out": guarded(partial(gated_row, 4096, (12288,), args.seconds, args.tuned)),
    }
    report(result, args.output_file)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
