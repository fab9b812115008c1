"""The double blocks' image-stream query/key/value projection as quack's GEMM (a benchmark's; not adopted).

With the fused projections (``worker.optimizations.fused_qkv``) a double block's image stream is one GEMM of
4,096 rows, 3,072 -> 9,216, written into its rows of the joint buffer. cuBLAS runs it in 192 x 192 tiles
(4,096 rows are 21.3 of them): 374.2 µs on an H100, 620 TFLOP/s. quack's GEMM with the bias in its epilogue
(``quack_epilogues.biased``) in 256 x 128 cooperative tiles, 2 x 1 clusters, takes 350.6 µs, the same output
bit for bit (``bench.quack_check --parts qkv``, lease 117). At the single blocks' 4,608 rows quack only
matches cuBLAS (382.3 against 382.9 µs), so those keep cuBLAS.

In the image it gained nothing: 3.484 and 3.497 s against the default's 3.472 and 3.472 s, interleaved on
one H100 (lease 118, ``compiled-quack-projection``). It stays a benchmark's variant.

``fluxgate::quack_linear_into`` is ``joint_value.linear_into`` with quack's GEMM where it takes the operands
(CUDA, bf16, aligned rows: ``quack_gelu.takes``) and cuBLAS's elsewhere; opaque to the compiler, as that op.
"""

from __future__ import annotations

import torch

from worker.optimizations.quack_gelu import takes

# (tile rows, tile columns, pingpong, cluster rows, cluster columns): the fastest of six at 4,096 rows
# (lease 117)
TILES = (256, 128, False, 2, 1)


@torch.library.custom_op("fluxgate::quack_linear_into", mutates_args=("out",))
def quack_linear_into(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """``out[b] = x[b] @ weight^T + bias`` for each batch element, its rows of a larger buffer: quack's GEMM
    on CUDA where it takes the operands, cuBLAS's otherwise."""
    for index in range(out.shape[0]):
        rows, target = x[index], out[index]
        if rows.is_cuda and takes(rows, weight) and target.stride(1) == 1 and target.stride(0) % 8 == 0:
            from worker.optimizations.quack_epilogues import biased
            from worker.optimizations.quack_qk import hopper_config

            config = hopper_config(*TILES)
            biased(rows, weight.t(), out={"D": target}, config=config, tuned=False, bias=bias)
        else:
            torch.addmm(bias, rows, weight.t(), out=target)


@quack_linear_into.register_fake
def _(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
    return None
