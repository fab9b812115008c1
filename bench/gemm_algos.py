"""cuBLASLt's other algorithms for FLUX.1's GEMMs, timed at the card's power cap (``bench.gemm_algos``).

A lossless image's GEMMs run at ~676 TFLOP/s (lease 89), against 698 burst and 713-725 sustained for the
best FLUX shape alone (lease 48). Under the 700 W cap a kernel's rate is set by the energy it spends per
FLOP as much as by its schedule, and cuBLAS's heuristic picks its kernel for an unthrottled card. This check
asks cuBLASLt for its ranked candidates (``cublasLtMatmulAlgoGetHeuristic``, through ctypes: torch does
not expose them) for each of the transformer's GEMM shapes with the epilogue the worker uses (bias, bias +
tanh GELU, none, or accumulating into the output), and times each candidate and torch's own call from a
replayed CUDA graph for a sustained stretch, the card held at its cap by the stretches before it. The
result: per shape the fastest candidate against torch's call, its kernel, its output against torch's, and
a step's GEMM milliseconds with torch's calls against the best candidates.

Lease 94 (H100): cuBLASLt ranks torch's kernel first for every shape, and none of its next seven is faster
beyond the timings' noise (the same kernel timed twice differs by up to 7% on the small text shapes): a
step's GEMMs 89.6 ms with torch's calls, 89.2 ms with the best candidate of each shape. Timed alone at the
cap, they take longer than inside the image (2.51 against 2.46 s for 28 steps): the GEMMs already run at
the card's sustained rate.

``--gated`` asks whether cuBLASLt could absorb the gating kernels after the output projections: its alpha
as a device vector (one scale per output feature: the gate) with the residual read as C. Lease 97: cuBLASLt
has no algorithm for a device-vector alpha on bf16 GEMMs (``CUBLAS_STATUS_NOT_SUPPORTED`` in both pointer
modes, whatever the epilogue), so that fusion needs a GEMM of our own.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bench.attention_probe import captured, report
from bench.gemm_check import Shape, draws, launched, operation, shapes

# cublasLt.h (stable since CUDA 11.x)
CUBLAS_COMPUTE_32F, CUDA_R_32F, CUDA_R_16BF = 68, 0, 14
DESC_POINTER_MODE, DESC_TRANSA, DESC_TRANSB, DESC_EPILOGUE, DESC_BIAS_POINTER = 2, 3, 4, 7, 8
POINTER_MODE_ALPHA_DEVICE_VECTOR_BETA_HOST = 4  # alpha: a device vector over D's rows (our output features)
PREF_MAX_WORKSPACE_BYTES = 1
EPILOGUE = {"mm": 1, "accumulate": 1, "linear": 4, "gelu": 36}  # DEFAULT, BIAS, GELU_BIAS
# cublasLtMatmulAlgoConfigAttributes_t: the fields that tell candidates apart
CONFIG_FIELDS = {"algo": 0, "tile": 1, "splitk": 2, "reduction": 3, "swizzle": 4, "custom": 5, "stages": 6}
CONFIG_FIELDS |= {"inner": 7, "cluster": 8}
WORKSPACE_BYTES = 32 * 1024 * 1024


class Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class HeuristicResult(ctypes.Structure):
    _fields_ = [
        ("algo", Algo),
        ("workspace_size", ctypes.c_size_t),
        ("state", ctypes.c_int),
        ("waves", ctypes.c_float),
        ("reserved", ctypes.c_int * 4),
    ]


def cublaslt_path() -> str:
    """The libcublasLt torch loaded (its wheel's CUDA), read from this process's memory map."""
    torch.ones(8, 8, device="cuda") @ torch.ones(8, 8, device="cuda")  # loads cuBLAS(Lt)
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "libcublasLt.so" in line:
                return line.split()[-1]
    raise RuntimeError("libcublasLt is not loaded in this process")


def _check(status: int, call: str) -> None:
    if status != 0:
        raise RuntimeError(f"{call} returned cuBLAS status {status}")


@dataclass
class Problem:
    """One GEMM as cuBLASLt sees torch's row-major ``out = x @ weight.T (+ bias)``: column-major
    ``D (N x M) = op(A = weight) (N x K) @ B = x (K x M)``."""

    shape: Shape
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    out: torch.Tensor
    handles: dict[str, ctypes.c_void_p] = dataclasses.field(default_factory=dict)
    # gated: ``out = gate * (x @ weight.T) + residual (+ bias)``, the gate (fp32) scaling each output
    # feature (cuBLASLt's alpha vector), the residual read as C with beta = 1
    gate: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    pointer_mode: int = POINTER_MODE_ALPHA_DEVICE_VECTOR_BETA_HOST  # with a gate


class Lt:
    """The few cuBLASLt calls the check needs, on torch's stream and a workspace of our own."""

    def __init__(self) -> None:
        self.lib = ctypes.CDLL(cublaslt_path())
        self.handle = ctypes.c_void_p()
        _check(self.lib.cublasLtCreate(ctypes.byref(self.handle)), "cublasLtCreate")
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")
        pointer, size, integer, count = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_uint64
        signatures = {
            "cublasLtMatmulDescCreate": [pointer, integer, integer],
            "cublasLtMatmulDescSetAttribute": [pointer, integer, pointer, size],
            "cublasLtMatmulPreferenceCreate": [pointer],
            "cublasLtMatmulPreferenceSetAttribute": [pointer, integer, pointer, size],
            "cublasLtMatrixLayoutCreate": [pointer, integer, count, count, ctypes.c_int64],
            "cublasLtMatmulAlgoGetHeuristic": [pointer] * 7 + [integer, pointer, pointer],
            "cublasLtMatmulAlgoConfigGetAttribute": [pointer, integer, pointer, size, pointer],
            "cublasLtMatmul": [pointer] * 14 + [size, pointer],
        }
        for name, argtypes in signatures.items():
            getattr(self.lib, name).argtypes = argtypes
            getattr(self.lib, name).restype = integer

    def _set(self, setter: Callable[..., int], target: ctypes.c_void_p, attr: int, value: Any) -> None:
        _check(setter(target, attr, ctypes.byref(value), ctypes.sizeof(value)), setter.__name__)

    def _layout(self, rows: int, cols: int, ld: int) -> ctypes.c_void_p:
        layout = ctypes.c_void_p()
        create = self.lib.cublasLtMatrixLayoutCreate
        _check(create(ctypes.byref(layout), CUDA_R_16BF, rows, cols, ld), "cublasLtMatrixLayoutCreate")
        return layout

    def describe(self, problem: Problem) -> None:
        """The descriptors of ``problem``'s GEMM, its epilogue and its bias."""
        shape = problem.shape
        desc = ctypes.c_void_p()
        _check(
            self.lib.cublasLtMatmulDescCreate(ctypes.byref(desc), CUBLAS_COMPUTE_32F, CUDA_R_32F),
            "cublasLtMatmulDescCreate",
        )
        set_desc = self.lib.cublasLtMatmulDescSetAttribute
        self._set(set_desc, desc, DESC_TRANSA, ctypes.c_int32(1))
        self._set(set_desc, desc, DESC_TRANSB, ctypes.c_int32(0))
        self._set(set_desc, desc, DESC_EPILOGUE, ctypes.c_uint32(EPILOGUE[shape.op]))
        if problem.gate is not None:
            self._set(set_desc, desc, DESC_POINTER_MODE, ctypes.c_int32(problem.pointer_mode))
        if shape.op in ("linear", "gelu"):
            self._set(set_desc, desc, DESC_BIAS_POINTER, ctypes.c_void_p(problem.bias.data_ptr()))
        preference = ctypes.c_void_p()
        _check(self.lib.cublasLtMatmulPreferenceCreate(ctypes.byref(preference)), "PreferenceCreate")
        self._set(
            self.lib.cublasLtMatmulPreferenceSetAttribute,
            preference,
            PREF_MAX_WORKSPACE_BYTES,
            ctypes.c_uint64(WORKSPACE_BYTES),
        )
        problem.handles = {
            "desc": desc,
            "a": self._layout(shape.inputs, shape.outputs, problem.weight.stride(0)),
            "b": self._layout(shape.inputs, shape.tokens, shape.inputs),
            "d": self._layout(shape.outputs, shape.tokens, shape.outputs),
            "preference": preference,
        }

    def candidates(self, problem: Problem, count: int) -> list[HeuristicResult]:
        """cuBLASLt's ranked algorithms for the problem (its first is its own pick)."""
        handles = problem.handles
        results = (HeuristicResult * count)()
        returned = ctypes.c_int()
        _check(
            self.lib.cublasLtMatmulAlgoGetHeuristic(
                self.handle,
                handles["desc"],
                handles["a"],
                handles["b"],
                handles["d"],
                handles["d"],
                handles["preference"],
                count,
                results,
                ctypes.byref(returned),
            ),
            "cublasLtMatmulAlgoGetHeuristic",
        )
        return [results[i] for i in range(returned.value) if results[i].state == 0]

    def config(self, algo: Algo) -> dict[str, int]:
        """The candidate's configuration (algorithm id, tile, split-K, stages, cluster: cublasLt's enums)."""
        fields = {}
        for name, attr in CONFIG_FIELDS.items():
            value, written = ctypes.c_uint32(), ctypes.c_size_t()
            status = self.lib.cublasLtMatmulAlgoConfigGetAttribute(
                ctypes.byref(algo), attr, ctypes.byref(value), ctypes.sizeof(value), ctypes.byref(written)
            )
            if status == 0:
                fields[name] = value.value
        return fields

    def runner(self, problem: Problem, algo: Algo) -> Callable[[], torch.Tensor]:
        """A call of the GEMM with ``algo`` on torch's current stream (capturable in a CUDA graph)."""
        handles = problem.handles
        alpha = ctypes.c_float(1.0)
        accumulates = problem.shape.op == "accumulate" or problem.residual is not None
        beta = ctypes.c_float(1.0 if accumulates else 0.0)
        chosen = Algo()
        ctypes.memmove(ctypes.byref(chosen), ctypes.byref(algo), ctypes.sizeof(Algo))
        c_matrix = problem.residual if problem.residual is not None else problem.out
        pointers = [
            problem.weight.data_ptr(),
            problem.x.data_ptr(),
            problem.out.data_ptr(),
            c_matrix.data_ptr(),
        ]
        weight, x, out, c = (ctypes.c_void_p(pointer) for pointer in pointers)
        scale: Any = ctypes.byref(alpha)
        if problem.gate is not None:
            scale = ctypes.c_void_p(problem.gate.data_ptr())

        def call() -> torch.Tensor:
            _check(
                self.lib.cublasLtMatmul(
                    self.handle,
                    handles["desc"],
                    scale,
                    weight,
                    handles["a"],
                    x,
                    handles["b"],
                    ctypes.byref(beta),
                    c,
                    handles["d"],
                    out,
                    handles["d"],
                    ctypes.byref(chosen),
                    ctypes.c_void_p(self.workspace.data_ptr()),
                    WORKSPACE_BYTES,
                    ctypes.c_void_p(torch.cuda.current_stream().cuda_stream),
                ),
                "cublasLtMatmul",
            )
            return problem.out

        return call


def problem_for(shape: Shape) -> tuple[Problem, Callable[[], torch.Tensor], torch.Tensor]:
    """The shape's tensors, torch's call on them as the worker makes it, and that call's result."""
    x, weight, bias = draws(shape)
    out = torch.zeros(shape.tokens, shape.outputs, device="cuda", dtype=torch.bfloat16)
    problem = Problem(shape, x, weight, bias, out)
    if shape.op == "accumulate":  # epilogues.accumulate_mm: cuBLAS's beta = 1 into the output
        accumulator = torch.zeros_like(out)
        return problem, lambda: accumulator.addmm_(x, weight.t()), torch.mm(x, weight.t())
    call = operation(shape)  # its own draws of the same values
    return problem, call, call().clone()


def sustained_us(fn: Callable[[], Any], seconds: float, calls: int = 20) -> float:
    """µs a call of ``fn`` replayed from a CUDA graph back to back for ``seconds`` (after a short warm
    stretch): the rate the card holds at its power cap, not a burst's."""
    graph, _ = captured(fn, calls)
    warm = time.perf_counter()
    while time.perf_counter() - warm < min(0.2, seconds / 4):
        graph.replay()
        torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    replays = 0
    started = time.perf_counter()
    start.record()
    while time.perf_counter() - started < seconds:
        graph.replay()
        replays += 1
        if replays % 4 == 0:  # keep the queue a few replays deep
            torch.cuda.synchronize()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / (replays * calls)


def worker_shapes(sequence_parallel: int) -> list[Shape]:
    """``gemm_check``'s shapes, the single blocks' ``proj_out`` MLP part as the worker runs it: added into
    the attention part's output (``accumulate_mm``), no bias."""
    return [
        dataclasses.replace(shape, op="accumulate") if shape.name == "single out, mlp part" else shape
        for shape in shapes(sequence_parallel)
    ]


def check_shape(lt: Lt, shape: Shape, count: int, seconds: float) -> dict[str, Any]:
    problem, torch_call, truth = problem_for(shape)
    flops = 2 * shape.tokens * shape.inputs * shape.outputs
    torch_us = sustained_us(torch_call, seconds)
    row: dict[str, Any] = {
        "tokens": shape.tokens,
        "inputs": shape.inputs,
        "outputs": shape.outputs,
        "op": shape.op,
        "calls_a_step": shape.calls,
        "torch": {"us": round(torch_us, 2), "tflop_s": round(flops / torch_us / 1e6, 1)},
        "torch_kernels": launched(torch_call),
        "candidates": [],
    }
    lt.describe(problem)
    for rank, result in enumerate(lt.candidates(problem, count)):
        call = lt.runner(problem, result.algo)
        entry: dict[str, Any] = {"rank": rank, **lt.config(result.algo), "waves": round(result.waves, 2)}
        try:
            problem.out.zero_()
            entry["max_abs_diff_vs_torch"] = (call().float() - truth.float()).abs().max().item()
            us = sustained_us(call, seconds)
            entry |= {"us": round(us, 2), "tflop_s": round(flops / us / 1e6, 1)}
            entry["kernels"] = launched(call)
        except RuntimeError as error:
            entry["error"] = str(error)[:160]
        row["candidates"].append(entry)
    timed = [entry for entry in row["candidates"] if "us" in entry]
    if timed:
        best = min(timed, key=lambda entry: entry["us"])
        row["best"] = {"rank": best["rank"], "us": best["us"], "vs_torch": round(best["us"] / torch_us, 4)}
    return row


def first_runner(lt: Lt, problem: Problem) -> tuple[Callable[[], torch.Tensor], str]:
    """cuBLASLt's own pick for ``problem`` as a call, and its kernel's name."""
    lt.describe(problem)
    candidates = lt.candidates(problem, 1)
    if not candidates:
        raise RuntimeError(f"cuBLASLt has no algorithm for {problem.shape.name}")
    call = lt.runner(problem, candidates[0].algo)
    kernels = [name for name in launched(call) if name != "Memset"]
    return call, kernels[0] if kernels else "?"


@dataclass
class GatedOperands:
    """A block's gated output projection: ``residual + gate * (cat(inputs) @ weight.T + bias)``, the weight
    as views over its input blocks (a single block's attention and MLP parts, or one feed-forward input)."""

    inputs: list[torch.Tensor]
    views: list[torch.Tensor]
    bias: torch.Tensor
    gate: torch.Tensor
    residual: torch.Tensor

    def worker(self, gating: Any) -> Callable[[], torch.Tensor]:
        """The worker's way: cuBLAS GEMMs (the later parts added into the first's output), then ``gating``
        (inductor's kernel for ``residual + gate * (projected + bias)``)."""

        def call() -> torch.Tensor:
            projected = torch.mm(self.inputs[0], self.views[0].t())
            for extra, view in zip(self.inputs[1:], self.views[1:], strict=True):
                projected.addmm_(extra, view.t())
            return gating(self.residual, self.gate, projected, self.bias)

        return call

    def truth(self) -> torch.Tensor:
        """The projection in fp32."""
        pairs = zip(self.inputs, self.views, strict=True)
        projections = sum(x.float() @ view.float().t() for x, view in pairs)
        return self.residual.float() + self.gate.float() * (projections + self.bias.float())


def gated_operands(rows: int, parts: tuple[int, ...]) -> GatedOperands:
    """Seeded operands for a gated projection over ``parts`` (its inputs' widths) at ``rows`` tokens."""
    generator = torch.Generator("cuda").manual_seed(0)
    kwargs: dict[str, Any] = {"generator": generator, "device": "cuda", "dtype": torch.bfloat16}
    inputs = [torch.randn(rows, width, **kwargs) for width in parts]
    weight = torch.randn(3072, sum(parts), **kwargs) * 0.02
    bias, gate = torch.randn(3072, **kwargs), torch.randn(3072, **kwargs) * 0.5
    residual = torch.randn(rows, 3072, **kwargs)
    starts = [sum(parts[:i]) for i in range(len(parts))]
    views = [weight[:, start : start + width] for start, width in zip(starts, parts, strict=True)]
    return GatedOperands(inputs, views, bias, gate, residual)


def gating_kernel() -> Any:
    """``residual + gate * (projected + bias)`` compiled: one inductor kernel, as in the worker's blocks."""
    return torch.compile(lambda residual, gate, projected, bias: residual + gate * (projected + bias))


def gated_case(lt: Lt, rows: int, parts: tuple[int, ...], seconds: float, gating: Any) -> dict[str, Any]:
    """One gated output projection at ``rows`` tokens, the worker's way and through cuBLASLt's alpha
    vector."""
    operands = gated_operands(rows, parts)
    worker = operands.worker(gating)
    gate32 = operands.gate.float()
    gated_bias = (gate32 * operands.bias.float()).to(torch.bfloat16)
    out = torch.empty(rows, 3072, device="cuda", dtype=torch.bfloat16)
    calls, kernels = [], []
    for index, (x, view) in enumerate(zip(operands.inputs, operands.views, strict=True)):
        op = "accumulate" if index else "linear"
        shape = Shape(f"gated part {index}", rows, x.shape[1], 3072, 1, op)
        residual = None if index else operands.residual
        problem = Problem(shape, x, view, gated_bias, out, gate=gate32, residual=residual)
        call, kernel = first_runner(lt, problem)
        calls.append(call)
        kernels.append(kernel)

    def gated() -> torch.Tensor:
        for call in calls:
            call()
        return out

    truth = operands.truth()
    worker_us, gated_us = sustained_us(worker, seconds), sustained_us(gated, seconds)
    return {
        "rows": rows,
        "worker_us": round(worker_us, 2),
        "worker_kernels": launched(worker),
        "gated_us": round(gated_us, 2),
        "gated_kernels": kernels,
        "gated_vs_worker": round(gated_us / worker_us, 4),
        "worker_max_abs_err": (worker().float() - truth).abs().max().item(),
        "gated_max_abs_err": (gated().float() - truth).abs().max().item(),
    }


def pointer_mode_support(lt: Lt, rows: int) -> dict[str, str]:
    """Whether cuBLASLt has any algorithm for a bf16 GEMM with a device vector as alpha (pointer modes 3,
    beta zero, and 4, beta on the host), for each epilogue the gated forms need: lease 97 found none."""
    kwargs: dict[str, Any] = {"device": "cuda", "dtype": torch.bfloat16}
    x, weight = torch.randn(rows, 3072, **kwargs), torch.randn(3072, 3072, **kwargs)
    bias, out, gate = (
        torch.randn(3072, **kwargs),
        torch.empty(rows, 3072, **kwargs),
        torch.ones(3072, device="cuda"),
    )
    support = {}
    for mode in (3, POINTER_MODE_ALPHA_DEVICE_VECTOR_BETA_HOST):
        for op in ("mm", "linear", "accumulate"):
            shape = Shape("probe", rows, 3072, 3072, 1, op)
            problem = Problem(shape, x, weight, bias, out, gate=gate, pointer_mode=mode)
            lt.describe(problem)
            try:
                support[f"mode {mode}, {op}"] = f"{len(lt.candidates(problem, 4))} algorithms"
            except RuntimeError as error:
                support[f"mode {mode}, {op}"] = str(error)
    return support


def gated_check(lt: Lt, tokens: int, seconds: float) -> dict[str, Any]:
    """A single block's ``residual + gate * proj_out(cat(attention, mlp))`` as the worker runs it (two GEMMs,
    the second accumulating, then inductor's gating kernel) against two gated GEMMs that leave nothing
    after them: ``gate * (attention @ W_a.T) + residual + gate * bias``, then ``gate * (mlp @ W_m.T)`` added
    in place. The same for a double block's feed-forward output (one GEMM and its gating kernel, or one
    gated GEMM). The gated forms' error against fp32 next to the worker's."""
    gating = gating_kernel()
    cases = {"single block": (tokens, (3072, 12288)), "double ff out": (tokens * 4096 // 4608, (12288,))}
    result: dict[str, Any] = {"alpha_vector_support": pointer_mode_support(lt, tokens)}
    for case, (rows, parts) in cases.items():
        try:
            result[case] = gated_case(lt, rows, parts, seconds, gating)
        except RuntimeError as error:  # no algorithm for the alpha vector, say
            result[case] = {"error": str(error)[:200]}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=12, help="how many of cuBLASLt's to ask for")
    parser.add_argument("--seconds", type=float, default=0.4, help="sustained stretch per timing")
    parser.add_argument("--sequence-parallel", type=int, action="append", help="1 (one GPU), 2, ...")
    parser.add_argument(
        "--gated", action="store_true", help="only the gated GEMMs against the worker's gating"
    )
    parser.add_argument("--output-file", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    lt = Lt()
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(), "seconds": args.seconds}
    heat = operation(shapes(1)[-1])
    sustained_us(heat, 3.0)  # the card at its power cap before the first timing
    if args.gated:
        for degree in args.sequence_parallel or [1]:
            result[f"gated_sequence_parallel_{degree}"] = gated_check(lt, 4608 // degree, args.seconds)
        report(result, args.output_file)
        return 0
    for degree in args.sequence_parallel or [1]:
        checked = [check_shape(lt, shape, args.candidates, args.seconds) for shape in worker_shapes(degree)]
        table = {shape.name: row for shape, row in zip(worker_shapes(degree), checked, strict=True)}
        torch_ms = sum(row["torch"]["us"] * row["calls_a_step"] for row in table.values()) / 1000
        best_ms = (
            sum(
                row.get("best", {"us": row["torch"]["us"]})["us"] * row["calls_a_step"]
                for row in table.values()
            )
            / 1000
        )
        result[f"sequence_parallel_{degree}"] = {
            "shapes": table,
            "step_gemm_ms_torch": round(torch_ms, 3),
            "step_gemm_ms_best": round(best_ms, 3),
        }
    report(result, args.output_file)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
