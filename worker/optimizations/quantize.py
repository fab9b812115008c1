"""fp8 weights and activations for the transformer's big GEMMs (``--quantize fp8``), through torchao.

An H100 runs fp8 GEMMs at ~1,250 TFLOP/s against ~700 for bf16 at FLUX's shapes
(``../shared/gpu/ceilings.h100.json``), and linear layers are 80% of a FLUX.1-dev step's FLOPs.
torchao's ``Float8DynamicActivationFloat8WeightConfig`` stores each selected weight in fp8 with
one scale per output channel and quantizes activations on the fly, one scale per token (per row);
under ``--compile`` the activation quantization fuses into the ops that produce it.

Which layers (``select_fp8_layers``), and why:

* **fp8:** the linear layers inside the transformer's repeated blocks (FLUX.1: 19 double-stream,
  38 single-stream blocks) — attention projections and MLPs over 4096 image, 512 text or 4608 joint
  tokens. They are >99.9% of the step's linear FLOPs.
* **kept in bf16:** the adaLN modulation linears (``norm1.linear``, ``norm.linear``): they run on one
  row (the timestep embedding), so there is no compute to save, and their output shifts, scales and
  gates every token of the block. Everything outside the blocks (embedders, ``norm_out``,
  ``proj_out``): small GEMMs (one row, K or N of 64, or 512 text tokens) that run eagerly outside
  the compiled regions, where per-call activation quantization costs more than it saves; they are
  the model's input and output layers. Layers whose in or out features are not multiples of 16
  (``torch._scaled_mm`` needs them).

torchao's default ``set_inductor_config=True`` switches on coordinate-descent tuning for every
later compile in the process, the likely cause of the stock recipe's 280 s compile (bf16 blocks
compile in ~25 s). We pass ``False``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal

import torch

log = logging.getLogger("fluxgate.engine")

# Set only by float8_on_cpu(): lets tests and the CPU smoke benchmark run the fp8 path.
_CPU_ALLOWED: ContextVar[bool] = ContextVar("fluxgate_fp8_on_cpu", default=False)


class QuantizeError(ValueError):
    """fp8 cannot run as configured; the message names ``--quantize``."""


@dataclass(frozen=True)
class Fp8Config:
    """``granularity``: scales per row (token / output channel) or one per tensor.

    ``layers``: ``"blocks"`` (the selection above) or ``"all"`` (every linear layer torchao accepts,
    as in the stock recipe). ``modulation``: with ``"blocks"``, the modulation linears too. The
    alternatives are kept for the benchmark to compare.
    """

    granularity: Literal["row", "tensor"] = "row"
    layers: Literal["blocks", "all"] = "blocks"
    modulation: bool = False


def check_fp8_supported(device: torch.device) -> None:
    """Raise ``QuantizeError`` unless fp8 GEMMs can run on ``device`` and torchao is installed."""
    try:
        import torchao.quantization  # noqa: F401
    except ImportError as error:
        raise QuantizeError(
            f"--quantize fp8 needs torchao (pip install 'fluxgate[worker]'): {error}"
        ) from error
    if device.type == "cpu" and _CPU_ALLOWED.get():
        return
    if device.type != "cuda":
        raise QuantizeError(
            f"--quantize fp8 needs a CUDA GPU with compute capability >= 8.9 (fp8 tensor cores: "
            f"L4, L40S, H100 or newer); this worker runs on {device.type}"
        )
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise QuantizeError(
            f"--quantize fp8 needs compute capability >= 8.9 (fp8 tensor cores: L4, L40S, H100 or newer); "
            f"{torch.cuda.get_device_name(device)} has {major}.{minor}"
        )


def fp8_compatible(linear: torch.nn.Linear) -> bool:
    """``torch._scaled_mm`` takes K and N that are multiples of 16."""
    return linear.in_features % 16 == 0 and linear.out_features % 16 == 0


def select_fp8_layers(transformer: torch.nn.Module, config: Fp8Config = Fp8Config()) -> list[str]:
    """Names (relative to ``transformer``) of the linear layers to quantize: see the module docstring."""
    linears = [
        name
        for name, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear) and fp8_compatible(module)
    ]
    if config.layers == "all":
        return sorted(linears)
    block_classes = set(getattr(transformer, "_repeated_blocks", ()))
    blocks = [name for name, module in transformer.named_modules() if type(module).__name__ in block_classes]
    excluded = set() if config.modulation else modulation_linears(transformer)
    return sorted(
        name
        for name in linears
        if any(name.startswith(f"{block}.") for block in blocks) and name not in excluded
    )


def modulation_linears(transformer: torch.nn.Module) -> set[str]:
    """Linears of the adaLN norms (``AdaLayerNormZero.linear``, ...): shift, scale, gate per block."""
    return {
        f"{name}.{child}"
        for name, module in transformer.named_modules()
        if type(module).__name__.startswith("AdaLayerNorm")
        for child, _ in module.named_modules()
        if child
    }


def apply_fp8(pipe: Any, config: Fp8Config, device: torch.device) -> list[str]:
    """Quantize the selected linears of ``pipe.transformer`` in place; returns their names.

    Call after placement (weights on the GPU: quantizing there takes seconds) and before compile.
    """
    check_fp8_supported(device)
    transformer = pipe.transformer
    if transformer.dtype != torch.bfloat16:
        raise QuantizeError(
            f"--quantize fp8 needs bfloat16 weights (--dtype bfloat16 or auto); got {transformer.dtype}"
        )
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_

    selected = set(select_fp8_layers(transformer, config))
    if not selected:
        raise QuantizeError(
            f"--quantize fp8 found no linear layer to quantize in {type(transformer).__name__}"
        )
    granularity = PerRow() if config.granularity == "row" else PerTensor()
    # set_inductor_config=False: see the module docstring (coordinate-descent tuning, 280 s compiles).
    quantize_(
        transformer,
        Float8DynamicActivationFloat8WeightConfig(granularity=granularity, set_inductor_config=False),
        filter_fn=lambda module, name: name in selected,
    )
    log.info("fp8 (%s scales, %s): %d linear layers", config.granularity, config.layers, len(selected))
    if device.type == "cuda":
        # The bf16 weights just replaced stay reserved by the caching allocator (FLUX.2-dev: 64.5 GB
        # reserved for 32 GB of fp8 weights); hand them back so the card shows, and others can use,
        # what the worker holds.
        torch.cuda.empty_cache()
    return sorted(selected)


@contextlib.contextmanager
def float8_on_cpu() -> Iterator[None]:
    """Let the fp8 path run on a CPU, for tests and the CPU smoke benchmark only.

    torchao refuses to quantize without an fp8-capable GPU (a hardware assertion), but torch's CPU
    ``_scaled_mm`` (torch 2.13: per-tensor and per-row scales) runs the quantized model, slowly:
    enough to check the wiring, not the speed.
    """
    from torchao.quantization import quant_api

    hardware_check = quant_api._check_hardware_support
    token = _CPU_ALLOWED.set(True)
    quant_api._check_hardware_support = lambda granularities: None
    try:
        yield
    finally:
        quant_api._check_hardware_support = hardware_check
        _CPU_ALLOWED.reset(token)
