"""quack (CuTe DSL) GEMM epilogues: the gating of a block's output projection, the query/key norms and RoPE,
and the feed-forward's tanh GELU inside their GEMMs.

Imported only where ``quack-kernels`` and the CuTe DSL are installed (they come with the ``fa4-attention``
extra) and a Hopper GPU runs them: ``worker.optimizations.quack_gating`` decides. The mods are module-level
functions, which gives quack's kernel cache an importable anchor.
"""

from __future__ import annotations

import math
from typing import Any

import cutlass.cute as cute
from quack.epilogue.frontend import gemm_epilogue
from quack.epilogue.head_rmsnorm import HeadRstd
from quack.epilogue.math import F2, pack, unpack
from quack.epilogue.ops import RowVecLoad
from quack.epilogue.rotary import rotary_cos_sin_load


@gemm_epilogue(ops={"bias": RowVecLoad("bias"), "gate": RowVecLoad("gate")})
def gated_residual(acc: Any, c: Any, bias: Any, gate: Any) -> dict[str, Any]:
    """A block's output projection with its gating: ``residual + gate * (x @ W.T + bias)``, the residual as
    the GEMM's C and the gate read from the fp32 accumulator."""
    return {"D": c + gate * (acc + bias)}


@gemm_epilogue(ops={"gate": RowVecLoad("gate")})
def gated(acc: Any, gate: Any) -> dict[str, Any]:
    """``gate * (x @ W.T)``, for adding into an output (quack's ``add_to_output``)."""
    return {"D": acc * gate}


def _biased_squares(acc: Any, bias: Any) -> dict[str, Any]:
    """The per-head RMSNorm's statistic input: the projection's output, its bias included, squared."""
    biased = acc + bias
    return {"head_rstd": biased * biased}


@gemm_epilogue(
    ops={
        "table": rotary_cos_sin_load("table"),
        "head_rstd": HeadRstd("head_rstd", eps=1e-6),
        "weight": RowVecLoad("weight"),
        "bias": RowVecLoad("bias"),
    },
    prepass=_biased_squares,
    prepass_outs=("head_rstd",),
    mode="acc_pair",
)
def normed_rotated(acc: Any, table: Any, head_rstd: Any, weight: Any, bias: Any) -> dict[str, Any]:
    """FLUX.1's query or key projection with its per-head RMSNorm (eps 1e-6) and interleaved RoPE:
    ``rope(rms_norm(x @ W.T + bias) * weight)``, from the fp32 accumulator. ``table`` is (tokens, head_dim),
    cos at even columns and sin at odd ones; ``weight`` the norm's weight repeated per head; ``head_rstd``
    the head width."""
    first, second = unpack((acc + bias) * head_rstd * weight)
    cos, sin = unpack(table)
    return {"D": pack(first * cos - second * sin, first * sin + second * cos)}


def fast_tanh(value: Any) -> Any:
    """``tanh`` on the SFU (``tanh.approx.f32``, relative error below 2^-10.9, under a bf16 output's
    rounding), lane-wise over packed pairs."""
    if isinstance(value, tuple):
        return F2(fast_tanh(value[0]), fast_tanh(value[1]))
    return cute.math.tanh(value, fastmath=True)


SQRT_2_OVER_PI = math.sqrt(2 / math.pi)
CUBIC = 0.044715 * SQRT_2_OVER_PI


@gemm_epilogue(ops={"bias": RowVecLoad("bias")})
def gelu_biased(acc: Any, bias: Any) -> dict[str, Any]:
    """A feed-forward's input projection with its tanh GELU: ``gelu(x @ W.T + bias, approximate="tanh")``
    from the fp32 accumulator. quack's own ``gemm_act`` GELU fails its epilogue fingerprint in 0.6.5 (a
    ContextVar it refers to, lease 99); this one refers to nothing but ``cute`` and ``F2``."""
    x = acc + bias
    inner = x * (SQRT_2_OVER_PI + CUBIC * (x * x))
    return {"D": 0.5 * (x + x * fast_tanh(inner))}


@gemm_epilogue(ops={"bias": RowVecLoad("bias")})
def biased(acc: Any, bias: Any) -> dict[str, Any]:
    """``x @ W.T + bias``: quack's GEMM with the bias alone, the bound its GELU epilogue is timed against."""
    return {"D": acc + bias}
