"""The fused GEMM epilogues ``bench.quack_check`` times, as quack (CuTe DSL) epilogue mods.

Imported only on the device, where ``quack-kernels`` and the CuTe DSL are installed (``bench/fa4_site.sh``
brings them with FlashAttention-4). Module-level functions give quack's kernel cache an importable anchor.
"""

from __future__ import annotations

from typing import Any

from quack.epilogue.frontend import gemm_epilogue
from quack.epilogue.ops import RowVecLoad


@gemm_epilogue(ops={"bias": RowVecLoad("bias"), "gate": RowVecLoad("gate")})
def gated_residual(acc: Any, c: Any, bias: Any, gate: Any) -> dict[str, Any]:
    """A block's output projection with its gating: ``residual + gate * (x @ W.T + bias)``."""
    return {"D": c + gate * (acc + bias)}


@gemm_epilogue(ops={"gate": RowVecLoad("gate")})
def gated(acc: Any, gate: Any) -> dict[str, Any]:
    """``gate * (x @ W.T)``, to be added into the output (quack's ``add_to_output``)."""
    return {"D": acc * gate}
