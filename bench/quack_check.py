"""quack's CuTe DSL GEMMs at FLUX.1's shapes against cuBLAS, and with the gating in their epilogue.

What is left of the lossless image's time beside the GEMMs and the attention is memory-bound glue
between them (lease 96): the query/key norms and RoPE (0.068 s an image), the gating after the output
projections (0.060 s), the LayerNorms (0.054 s). cuBLASLt cannot take the gating into its epilogue (lease
97), and its algorithms already run at the card's rate (lease 94). quack (``quack-kernels``, Tri Dao's
CuTe DSL kernels, installed with FlashAttention-4) has Hopper GEMMs whose epilogues are Python functions
over the accumulator, including the per-head RMSNorm and RoPE. Fusing the glue pays only if its GEMMs
match cuBLAS's rate at these shapes: this check times both, sustained at the card's power cap.

    python -m bench.quack_check --output-file quack.json      # on the device, after bench/fa4_site.sh

``--parts`` picks what runs (all by default). Per shape (``shapes``): torch's call (cuBLAS) against quack's
``gemm`` / ``gemm_act`` (its default configuration, and autotuned with ``--tuned``). Then a single block's
gated output projection as the worker runs it (two cuBLAS GEMMs, the second accumulating, and inductor's
gating kernel) against two quack GEMMs with the gating in their epilogues (the residual as C, the second added
into the output), and a double block's feed-forward output the same way (``gated``). Each with its error
against fp32. Last (``rope``), a query's projections with their per-head RMSNorm and RoPE: the worker's
(cuBLAS, then ``fluxgate::qk_norm_rope``) against quack GEMMs with both in their epilogue
(``quack_epilogues.normed_rotated``), per tile shape whose columns hold whole heads. ``gelu``: the
feed-forwards' input projections (4,608 and 4,096 rows, 3,072 -> 12,288) with their tanh GELU,
cuBLAS's ``gelubias`` epilogue (the worker's) and its bias alone (the bound) against quack GEMMs with the
GELU on the SFU (``quack_epilogues.gelu_biased``) and with the bias alone, per tile configuration.
``qkv``: a stream's fused query, key and value projection (3,072 -> 9,216, bias) at 4,608 and 4,096 rows,
cuBLAS against quack's GEMM with the bias alone (``quack_epilogues.biased``), per tile configuration.

Lease 99 (H100, autotuned): at 4,096 rows quack's GEMM matches cuBLAS (443 against 453 µs) and the gated
epilogue is free: the double block's gated feed-forward output 442 µs against the worker's 482. At the
single blocks' 4,608 rows quack is 8-9% slower than cuBLAS (cuBLAS's 192 x 192 tiles fill three waves), so
the fused single block is 14% slower. quack 0.6.5's ``gemm_act`` with the tanh GELU fails before compiling
(its epilogue fingerprint rejects a ContextVar).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

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


ROPE_CONFIGS = {  # tile rows x columns, pingpong, cluster: tiles whose columns hold whole heads (128)
    "192x128 pingpong c1x2": (192, 128, True, 1, 2),
    "128x128 pingpong c1x2": (128, 128, True, 1, 2),
    "128x256 cooperative c1x2": (128, 256, False, 1, 2),
    "256x128 cooperative c2x1": (256, 128, False, 2, 1),
}


@dataclass
class RopeOperands:
    """One attention's query (or key) projections, text rows first: inputs, weights, biases, norm weights,
    and FLUX's interleaved rotation (each pair's angle in both of its columns)."""

    inputs: list[torch.Tensor]
    weights: list[torch.Tensor]
    biases: list[torch.Tensor]
    norms: list[torch.Tensor]
    cos: torch.Tensor
    sin: torch.Tensor

    def worker(self) -> Callable[[], torch.Tensor]:
        """The worker's way: cuBLAS projections, then ``fluxgate::qk_norm_rope`` over text and image."""
        from worker.optimizations.qk_norm_rope import qk_norm_rope

        calls = list(zip(self.inputs, self.weights, self.biases, strict=True))
        return lambda: self.joint(qk_norm_rope, [F.linear(x, w, b) for x, w, b in calls], self.norms)

    def truth(self) -> torch.Tensor:
        """The same in fp32 (``qk_norm_rope``'s eager reference on fp32 projections)."""
        from worker.optimizations.qk_norm_rope import reference

        projected = [
            F.linear(x.float(), w.float(), b.float())
            for x, w, b in zip(self.inputs, self.weights, self.biases, strict=True)
        ]
        return self.joint(reference, projected, [norm.float() for norm in self.norms])

    def joint(
        self, normed_rotated: Any, projected: list[torch.Tensor], norms: list[torch.Tensor]
    ) -> torch.Tensor:
        """(tokens, features): ``normed_rotated`` (``qk_norm_rope`` or its reference) over the projections,
        text first where there are two parts."""
        text = projected[0] if len(projected) == 2 else projected[0][:0]
        joint = normed_rotated(
            text[None], norms[0], projected[-1][None], norms[-1], self.cos, self.sin, 1e-6, 128, None, True
        )
        return joint[0].flatten(1)


def rope_operands(rows: tuple[int, ...], device: torch.device | None = None) -> RopeOperands:
    device, bf16 = device or torch.device("cuda"), torch.bfloat16
    generator = torch.Generator(device).manual_seed(0)

    def draw(*shape: int, dtype: torch.dtype = bf16) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

    angles = draw(sum(rows), 64, dtype=torch.float32) * 3
    return RopeOperands(
        inputs=[draw(count, 3072) for count in rows],
        weights=[draw(3072, 3072) * 0.02 for _ in rows],
        biases=[draw(3072) for _ in rows],
        norms=[1 + 0.1 * draw(128) for _ in rows],
        cos=angles.cos().repeat_interleave(2, dim=-1),
        sin=angles.sin().repeat_interleave(2, dim=-1),
    )


def rope_row(rows: tuple[int, ...], seconds: float) -> dict[str, Any]:
    """A query's projections with their norms and rotation: the worker's (cuBLAS + ``qk_norm_rope``) against
    quack GEMMs with both in the epilogue (``quack_epilogues.normed_rotated``), each writing its rows of the
    joint output, per tile configuration; the plain cuBLAS projections alone for what the glue costs."""
    from worker.optimizations import quack_epilogues
    from worker.optimizations.quack_qk import hopper_config, rope_table

    operands = rope_operands(rows)
    truth, worker = operands.truth(), operands.worker()
    joint = torch.empty(sum(rows), 3072, device="cuda", dtype=torch.bfloat16)
    library = torch.empty_like(joint[: rows[-1]])
    starts = [sum(rows[:index]) for index in range(len(rows))]
    table = rope_table(operands.cos, operands.sin)
    parts = [
        (x, w.t(), b, norm.repeat(24), table[start : start + count], joint[start : start + count])
        for x, w, b, norm, start, count in zip(
            operands.inputs, operands.weights, operands.biases, operands.norms, starts, rows, strict=True
        )
    ]

    def fused(config: Any) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            for x, weight_t, bias, norm, cs, out in parts:
                quack_epilogues.normed_rotated(
                    x,
                    weight_t,
                    out={"D": out},
                    config=config,
                    tuned=False,
                    table=cs,
                    head_rstd=128,
                    weight=norm,
                    bias=bias,
                )
            return joint

        return call

    plain = [
        partial(F.linear, x, w, b)
        for x, w, b in zip(operands.inputs, operands.weights, operands.biases, strict=True)
    ]
    result: dict[str, Any] = {
        "rows": list(rows),
        "cublas_projections_us": round(sustained_us(lambda: [call() for call in plain][-1], seconds), 2),
        "worker_us": round(sustained_us(worker, seconds), 2),
        "worker_max_abs_err": (worker().float() - truth).abs().max().item(),
        "worker_kernels": launched(worker),
    }

    def configured(pins: tuple[int, int, bool, int, int]) -> dict[str, Any]:
        call = fused(hopper_config(*pins))
        return {
            "us": round(sustained_us(call, seconds), 2),
            "max_abs_err": (call().float() - truth).abs().max().item(),
        }

    result["quack"] = {name: guarded(partial(configured, pins)) for name, pins in ROPE_CONFIGS.items()}

    def library_epilogue() -> dict[str, Any]:  # quack's own qk_rope_epi (no bias), the image rows: its cost
        from quack.epilogue.library import qk_rope_epi

        x, weight_t, _, norm, cs, _ = parts[-1]
        call = partial(qk_rope_epi, x, weight_t, out={"D": library}, tuned=False, cs=cs, qk=128, w=norm)
        return {"rows": rows[-1], "us": round(sustained_us(lambda: call()["D"], seconds), 2)}

    result["quack_library_qk_rope_epi"] = guarded(library_epilogue)
    return result


TILES = {  # tile rows x columns, pingpong, cluster: quack's Hopper configurations the wide parts time
    "256x192 cooperative c2x1": (256, 192, False, 2, 1),
    "256x192 cooperative c1x2": (256, 192, False, 1, 2),
    "256x128 cooperative c2x1": (256, 128, False, 2, 1),
    "256x128 cooperative c1x2": (256, 128, False, 1, 2),
    "128x256 cooperative c1x2": (128, 256, False, 1, 2),
    "128x192 pingpong c2x1": (128, 192, True, 2, 1),
    "128x192 pingpong c1x2": (128, 192, True, 1, 2),
    "192x128 pingpong c1x2": (192, 128, True, 1, 2),
}
# 12,288 columns (the GELU's projection) and 9,216 (the fused query, key and value), in whole tiles: all
# but one each (lease 114 did not time 256x128 c1x2; lease 117 not 128x192 pingpong c2x1)
GELU_CONFIGS = {name: pins for name, pins in TILES.items() if name != "256x128 cooperative c1x2"}
QKV_CONFIGS = {name: pins for name, pins in TILES.items() if name != "128x192 pingpong c2x1"}


Pins = tuple[int, int, bool, int, int]


def gelu_row(rows: int, seconds: float, configs: dict[str, Pins]) -> dict[str, Any]:
    """A feed-forward's input projection (3,072 -> 12,288) with its tanh GELU at ``rows`` tokens: cuBLAS's
    GELU epilogue (the worker's ``gelu_linear``) and its bias alone, against quack's GEMM with the GELU in its
    epilogue and with the bias alone, per tile configuration; each GELU's error against fp32."""
    from worker.optimizations import quack_epilogues
    from worker.optimizations.quack_qk import hopper_config

    shape = Shape("mlp in", rows, 3072, 12288, 1, "gelu")
    x, weight, bias = draws(shape)
    flops = 2 * rows * 3072 * 12288
    truth = F.gelu(F.linear(x.float(), weight.float(), bias.float()), approximate="tanh")
    cublas_gelu = partial(torch._addmm_activation, bias, x, weight.t(), use_gelu=True)
    cublas_bias = partial(torch.addmm, bias, x, weight.t())

    def timed(call: Callable[[], torch.Tensor], gelu: bool) -> dict[str, Any]:
        us = sustained_us(call, seconds)
        row = {"us": round(us, 2), "tflop_s": round(flops / us / 1e6, 1)}
        if gelu:
            row["max_abs_err"] = (call().float() - truth).abs().max().item()
        return row

    result: dict[str, Any] = {
        "rows": rows,
        "cublas_gelu": {**timed(cublas_gelu, True), "kernels": launched(cublas_gelu)},
        "cublas_bias": timed(cublas_bias, False),
    }
    out = torch.empty(rows, 12288, device="cuda", dtype=torch.bfloat16)

    def quack(epilogue: Any, config: Any) -> Callable[[], torch.Tensor]:
        return lambda: epilogue(x, weight.t(), out={"D": out}, config=config, tuned=False, bias=bias)["D"]

    def configured(pins: Pins) -> dict[str, Any]:
        config = hopper_config(*pins)
        row: dict[str, Any] = {}
        for name, epilogue in (("gelu", quack_epilogues.gelu_biased), ("bias", quack_epilogues.biased)):
            row[name] = timed(quack(epilogue, config), name == "gelu")
        row["gelu_vs_cublas_gelu"] = round(row["gelu"]["us"] / result["cublas_gelu"]["us"], 4)
        print(rows, pins, row, flush=True)
        return row

    result["quack"] = {name: guarded(partial(configured, pins)) for name, pins in configs.items()}
    return result


def biased_row(rows: int, outputs: int, seconds: float, configs: dict[str, Pins]) -> dict[str, Any]:
    """``x @ W.T + bias`` (3,072 inputs) at ``rows`` tokens: cuBLAS (the worker's ``F.linear``) against
    quack's GEMM with the bias in its epilogue, per tile configuration, and their largest difference."""
    from worker.optimizations import quack_epilogues
    from worker.optimizations.quack_qk import hopper_config

    x, weight, bias = draws(Shape("projection", rows, 3072, outputs, 1, "linear"))
    flops = 2 * rows * 3072 * outputs
    cublas = partial(F.linear, x, weight, bias)
    expected = cublas().float()
    out = torch.empty(rows, outputs, device="cuda", dtype=torch.bfloat16)

    def timed(call: Callable[[], torch.Tensor]) -> dict[str, Any]:
        us = sustained_us(call, seconds)
        return {"us": round(us, 2), "tflop_s": round(flops / us / 1e6, 1)}

    result: dict[str, Any] = {
        "rows": rows,
        "outputs": outputs,
        "cublas": {**timed(cublas), "kernels": launched(cublas)},
    }

    def configured(pins: Pins) -> dict[str, Any]:
        config = hopper_config(*pins)

        def call() -> torch.Tensor:
            return quack_epilogues.biased(
                x, weight.t(), out={"D": out}, config=config, tuned=False, bias=bias
            )["D"]

        row = {**timed(call), "max_abs_diff_vs_cublas": (call().float() - expected).abs().max().item()}
        row["vs_cublas"] = round(row["us"] / result["cublas"]["us"], 4)
        print(rows, outputs, pins, row, flush=True)
        return row

    result["quack"] = {name: guarded(partial(configured, pins)) for name, pins in configs.items()}
    return result


def guarded(work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return work()
    except Exception as error:  # a DSL compile or an unsupported layout: report it, go on
        return {"error": f"{type(error).__name__}: {str(error)[:300]}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.5, help="sustained stretch per timing")
    parser.add_argument("--tuned", action="store_true", help="let quack autotune each shape (slow)")
    parser.add_argument(
        "--parts", default="shapes,gated,rope", help="comma-separated: shapes, gated, rope, gelu, qkv"
    )
    parser.add_argument(
        "--gelu-configs", default=",".join(GELU_CONFIGS), help="comma-separated names of GELU_CONFIGS"
    )
    parser.add_argument("--output-file", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(), "tuned": args.tuned}
    sustained_us(operation(worker_shapes(1)[-1]), 3.0)  # the card at its power cap first
    parts = set(args.parts.split(","))
    if "shapes" in parts:
        shapes = {shape.name: shape for shape in worker_shapes(1)}
        result["shapes"] = {
            name: guarded(partial(shape_row, shapes[name], args.seconds, args.tuned)) for name in SHAPES
        }
    if "gated" in parts:
        result["gated"] = {
            "single block": guarded(partial(gated_row, 4608, (3072, 12288), args.seconds, args.tuned)),
            "double ff out": guarded(partial(gated_row, 4096, (12288,), args.seconds, args.tuned)),
        }
    if "rope" in parts:
        result["qk_norm_rope"] = {
            "double block (512 text + 4096 image rows)": guarded(
                partial(rope_row, (512, 4096), args.seconds)
            ),
            "single block (4608 rows)": guarded(partial(rope_row, (4608,), args.seconds)),
        }
    if "gelu" in parts:
        configs = {name: GELU_CONFIGS[name] for name in args.gelu_configs.split(",") if name}
        result["gelu"] = {
            f"{rows} rows": guarded(partial(gelu_row, rows, args.seconds, configs)) for rows in (4608, 4096)
        }
    if "qkv" in parts:
        result["qkv"] = {
            f"{rows} rows": guarded(partial(biased_row, rows, 9216, args.seconds, QKV_CONFIGS))
            for rows in (4608, 4096)
        }
    report(result, args.output_file)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
