"""FLUX.1-dev's GEMMs under each cuBLAS reduction setting (``python -m bench.gemm_check``), one GPU.

A compiled lossless step runs ~400 memsets, most just before its large GEMMs (lease 48's profile). Were
they the zeroed counters of cuBLASLt's in-place split-K reduction? torch picks the reduction schemes
cuBLASLt may use from ``torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction``: ``(True, True)``
(the default) allows all of them, ``(False, True)`` split-K reduced in fp32 in a separate kernel,
``(False, False)`` no split-K (the cuBLASLt backend only: the cuBLAS one refuses it). Each of the
transformer's GEMM shapes (one GPU, and Ulysses-2's half sequence) is timed from a replayed CUDA graph
under each setting, with the kernels one call launches (the chosen kernel's name and whether a memset
precedes it) and its output against the default's.

Lease 53: no. Every setting picks the same kernels and the memsets stay (they come with cuBLAS's
cooperative "nvjet" kernels, whatever the reduction; without a workspace, lease 55, cuBLAS picks
stream-scheduled forms of them and no memset, and the image is no faster). ``--settings`` narrows the
table; the workspace cuBLAS gets is an environment variable read once a process
(``CUBLASLT_WORKSPACE_SIZE``, ``CUBLAS_WORKSPACE_CONFIG``): the result names them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from bench.attention_probe import graph_ms, report

HIDDEN, MLP = 3072, 12288
IMAGE, TEXT = 4096, 512


@dataclass(frozen=True)
class Shape:
    """One GEMM of the transformer: ``tokens`` x ``inputs`` -> ``outputs``, ``calls`` of it a step."""

    name: str
    tokens: int
    inputs: int
    outputs: int
    calls: int
    op: str = "linear"  # "linear" (bias epilogue), "gelu" (bias + tanh GELU epilogue), "mm" (no bias)


def shapes(sequence_parallel: int) -> list[Shape]:
    """The transformer's GEMMs a step: 19 double blocks (image and text streams), 38 single blocks."""
    image, text = IMAGE // sequence_parallel, TEXT // sequence_parallel
    return [
        Shape("double image q/k/v", image, HIDDEN, HIDDEN, 19 * 3),
        Shape("double image out", image, HIDDEN, HIDDEN, 19),
        Shape("double image ff in (GELU)", image, HIDDEN, MLP, 19, "gelu"),
        Shape("double image ff out", image, MLP, HIDDEN, 19),
        Shape("double text q/k/v", text, HIDDEN, HIDDEN, 19 * 3),
        Shape("double text ff in (GELU)", text, HIDDEN, MLP, 19, "gelu"),
        Shape("double text ff out", text, MLP, HIDDEN, 19),
        Shape("single q/k/v", image + text, HIDDEN, HIDDEN, 38 * 3),
        Shape("single mlp in (GELU)", image + text, HIDDEN, MLP, 38, "gelu"),
        Shape("single out, attention part", image + text, HIDDEN, HIDDEN, 38, "mm"),
        Shape("single out, mlp part", image + text, MLP, HIDDEN, 38),
    ]


# name: (torch's preferred BLAS library, allow_bf16_reduced_precision_reduction)
SETTINGS: dict[str, tuple[str, tuple[bool, bool]]] = {
    "cublas (default)": ("cublas", (True, True)),
    "cublas, fp32 split-K": ("cublas", (False, True)),
    "cublaslt": ("cublaslt", (True, True)),
    "cublaslt, fp32 split-K": ("cublaslt", (False, True)),
    "cublaslt, no split-K": ("cublaslt", (False, False)),
}


@contextlib.contextmanager
def blas_setting(library: str, reduction: tuple[bool, bool]) -> Iterator[None]:
    """torch's BLAS library and bf16 reduction setting inside the block, the previous ones after."""
    matmul = torch.backends.cuda.matmul
    library_before = torch.backends.cuda.preferred_blas_library()
    reduction_before = tuple(torch._C._get_cublas_allow_bf16_reduced_precision_reduction())
    torch.backends.cuda.preferred_blas_library(library)
    matmul.allow_bf16_reduced_precision_reduction = reduction
    try:
        yield
    finally:
        matmul.allow_bf16_reduced_precision_reduction = reduction_before
        torch.backends.cuda.preferred_blas_library(library_before)


def draws(shape: Shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The shape's input, weight and bias on the GPU, seeded: every check draws the same values."""
    device, bf16 = torch.device("cuda"), torch.bfloat16
    generator = torch.Generator(device).manual_seed(0)
    x = torch.randn(shape.tokens, shape.inputs, generator=generator, device=device, dtype=bf16)
    weight = torch.randn(shape.outputs, shape.inputs, generator=generator, device=device, dtype=bf16) * 0.02
    bias = torch.randn(shape.outputs, generator=generator, device=device, dtype=bf16)
    return x, weight, bias


def operation(shape: Shape) -> Callable[[], torch.Tensor]:
    x, weight, bias = draws(shape)
    if shape.op == "gelu":
        return lambda: torch._addmm_activation(bias, x, weight.t(), use_gelu=True)
    if shape.op == "mm":
        return lambda: torch.mm(x, weight.t())
    return lambda: torch.nn.functional.linear(x, weight, bias)


def launched(fn: Callable[[], torch.Tensor]) -> list[str]:
    """The GPU work one call launches, in order (kernel names shortened; memsets as "Memset")."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [event for event in prof.events() if event.device_type == DeviceType.CUDA]
    events.sort(key=lambda event: event.time_range.start)
    return ["Memset" if "memset" in event.name.lower() else event.name[:100] for event in events]


def measure(shape: Shape, reference: torch.Tensor | None) -> tuple[dict[str, Any], torch.Tensor]:
    """The shape's time and launched kernels under the current setting, and its output."""
    fn = operation(shape)
    ms, out = graph_ms(fn, calls=20)
    flops = 2 * shape.tokens * shape.inputs * shape.outputs
    result: dict[str, Any] = {
        "ms": round(ms, 4),
        "tflop_s": round(flops / ms / 1e9, 1),
        "kernels": launched(fn),
    }
    if reference is not None:
        difference = (out.float() - reference.float()).abs()
        result["max_abs_diff_vs_default"] = difference.max().item()
    return result, out


WORKSPACE_ENV = ("CUBLASLT_WORKSPACE_SIZE", "CUBLAS_WORKSPACE_CONFIG")


def check(sequence_parallel: int, settings: list[str]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    references: dict[str, torch.Tensor] = {}
    for shape in shapes(sequence_parallel):
        rows: dict[str, Any] = {}
        for setting in settings:
            library, reduction = SETTINGS[setting]
            try:
                with blas_setting(library, reduction):
                    rows[setting], out = measure(shape, references.get(shape.name))
                references.setdefault(shape.name, out)
            except RuntimeError as error:  # a setting this torch or this shape refuses
                rows[setting] = {"error": str(error)[:200]}
        table[shape.name] = {"tokens": shape.tokens, "inputs": shape.inputs, "outputs": shape.outputs, **rows}
    totals: dict[str, float] = {}
    for setting in settings:  # GPU milliseconds of the step's GEMMs under each setting
        per_shape = [(table[s.name][setting].get("ms"), s.calls) for s in shapes(sequence_parallel)]
        if all(ms is not None for ms, _ in per_shape):
            totals[setting] = round(sum(ms * calls for ms, calls in per_shape), 2)
    return {"shapes": table, "step_gemm_ms": totals}


def epilogue_cost(sequence_parallel: int) -> dict[str, Any]:
    """Each biased (or GELU) shape timed with its epilogue and as a plain ``mm`` of the same size, under the
    default setting: what a step's GEMMs would save if their biases were added by the elementwise kernels
    that read their outputs anyway (the query/key kernel, the output projection's bias, a gating kernel)."""
    table: dict[str, Any] = {}
    saved = 0.0
    for shape in shapes(sequence_parallel):
        if shape.op == "mm":
            continue
        with_epilogue = graph_ms(operation(shape), calls=20)[0]
        plain = graph_ms(operation(dataclasses.replace(shape, op="mm")), calls=20)[0]
        table[shape.name] = {
            "epilogue_ms": round(with_epilogue, 4),
            "mm_ms": round(plain, 4),
            "calls": shape.calls,
        }
        saved += (with_epilogue - plain) * shape.calls
    return {"shapes": table, "step_ms_saved_without_epilogues": round(saved, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-file", default=None)
    parser.add_argument(
        "--settings", default=";".join(SETTINGS), help="names of SETTINGS, separated by semicolons"
    )
    parser.add_argument(
        "--epilogue-cost", action="store_true", help="only time each biased shape against a plain mm"
    )
    args = parser.parse_args(argv)
    settings = args.settings.split(";")  # the names hold commas
    if unknown := [name for name in settings if name not in SETTINGS]:
        parser.error(f"unknown settings {unknown}; choose from {list(SETTINGS)}")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    if args.epilogue_cost:
        report(
            {
                "device": torch.cuda.get_device_name(),
                "one_gpu": epilogue_cost(1),
                "ulysses_2": epilogue_cost(2),
            },
            args.output_file,
        )
        return 0
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "workspace_env": {name: os.environ.get(name) for name in WORKSPACE_ENV},
        "one_gpu": check(1, settings),
        "ulysses_2": check(2, settings),
    }
    report(result, args.output_file)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
