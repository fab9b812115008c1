"""quack (CuTe DSL) GEMM epilogues: the gating of a block's output projection inside its GEMM.

Imported only where ``quack-kernels`` and the CuTe DSL are installed (they come with the ``fa4-attention``
extra) and a Hopper GPU runs them: ``worker.optimizations.quack_gating`` decides. The mods are module-level
functions, which gives quack's kernel cache an importable anchor.
"""

from __future__ import annotations

from typing import Any

from quack.epilogue.frontend import gemm_epilogue
from quack.epilogue.ops import RowVecLoad


@gemm_epilogue(ops={"bias": RowVecLoad("bias"), "gate": RowVecLoad("gate")})
def gated_residual(acc: Any, c: Any, bias: Any, gate: Any) -> dict[str, Any]:
    """A block's output projection with its gating: ``residual + gate * (x @ W.T + bias)``, the residual as
    the GEMM's C and the gate read from the fp32 accumulator."""
    return {"D": c + gate * (acc + bias)}


@gemm_epilogue(ops={"gate": RowVecLoad("gate")})
def gated(acc: Any, gate: Any) -> dict[str, Any]:
    """``gate * (x @ W.T)``, for adding into an output (quack's ``add_to_output``)."""
    return {"D": acc * gate}
