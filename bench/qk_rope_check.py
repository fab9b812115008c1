"""The fused query/key norm + rotary kernel at FLUX.1's shapes on the GPU: its output against eager's
and its time against inductor's fusion of the same math (``python -m bench.qk_rope_check``).

Two calls per attention: the single blocks' (4608 image tokens) and the double blocks' (512 text + 4096
image tokens, two norm weights). Each is timed as the Triton kernel, as ``torch.compile`` of the eager
reference, and eagerly; the effective bandwidth counts one read and one write of the projection.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from bench.attention_probe import graph_ms, report, time_ms
from worker.optimizations import qk_norm_rope as qk_module
from worker.optimizations.qk_norm_rope import qk_norm_rope, reference

HEADS, HEAD_DIM = 24, 128


def case(text_tokens: int, image_tokens: int) -> dict[str, Any]:
    device, bf16 = torch.device("cuda"), torch.bfloat16
    generator = torch.Generator(device).manual_seed(0)

    def draw(*shape: int, dtype: torch.dtype = bf16) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

    features = HEADS * HEAD_DIM
    tokens = text_tokens + image_tokens
    args = (
        draw(1, text_tokens, features),
        1 + 0.1 * draw(HEAD_DIM),
        draw(1, image_tokens, features),
        1 + 0.1 * draw(HEAD_DIM),
        draw(tokens, HEAD_DIM, dtype=torch.float32).cos(),
        draw(tokens, HEAD_DIM, dtype=torch.float32).sin(),
        1e-6,
        HEAD_DIM,
    )
    expected, got = reference(*args), qk_norm_rope(*args)
    token_major = (*args, None, True)  # the layout the bf16 processor asks for since lease 49
    compiled = torch.compile(reference, fullgraph=True)
    difference = (got.float() - expected.float()).abs()
    times = {
        "triton_ms": time_ms(lambda: qk_norm_rope(*args)),
        "triton_token_major_ms": time_ms(lambda: qk_norm_rope(*token_major)),
        "compiled_reference_ms": time_ms(lambda: compiled(*args)),
        "eager_reference_ms": time_ms(lambda: reference(*args)),
    }
    moved = 2 * tokens * features * 2  # bytes: one bf16 read and one write of the projection
    return {
        "text_tokens": text_tokens,
        "image_tokens": image_tokens,
        "same_strides": got.stride() == expected.stride(),
        "token_major_equal": bool(torch.equal(qk_norm_rope(*token_major), got)),
        "max_abs_diff": difference.max().item(),
        "elements_differing": int((difference > 0).sum().item()),
        "elements": difference.numel(),
        **{name: round(ms, 4) for name, ms in times.items()},
        "triton_tb_s": round(moved / times["triton_ms"] / 1e9, 2),
        "triton_token_major_tb_s": round(moved / times["triton_token_major_ms"] / 1e9, 2),
        "tokens_per_program": tokens_per_program(token_major, moved),
    }


def tokens_per_program(args: tuple[Any, ...], moved: int) -> dict[str, Any]:
    """The token-major kernel with 1, 2, 4 and 8 tokens a program (``TOKENS_PER_PROGRAM``): each form's
    output against the one-token kernel's, and its time replayed from a CUDA graph (the kernel's alone:
    ``time_ms`` above includes the op's host time, several times the kernel's)."""
    forms: dict[str, Any] = {}
    worker_tokens = qk_module.TOKENS_PER_PROGRAM
    try:
        baseline = qk_norm_rope(*args)
        for tokens in (1, 2, 4, 8):
            qk_module.TOKENS_PER_PROGRAM = tokens
            ms, _ = graph_ms(lambda: qk_norm_rope(*args), calls=50)
            forms[str(tokens)] = {
                "equal": bool(torch.equal(qk_norm_rope(*args), baseline)),
                "ms": round(ms, 4),
                "tb_s": round(moved / ms / 1e9, 2),
            }
    finally:
        qk_module.TOKENS_PER_PROGRAM = worker_tokens
    return forms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output-file")
    args = parser.parse_args(argv)
    result = {"device": torch.cuda.get_device_name(), "single": case(0, 4608), "double": case(512, 4096)}
    report(result, args.output_file)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
