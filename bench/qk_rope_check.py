"""The fused query/key norm + rotary kernel at FLUX.1's shapes on the GPU: its output against eager's
and its time against inductor's fusion of the same math (``python -m bench.qk_rope_check``).

Two calls per attention: the single blocks' (4608 image tokens) and the double blocks' (512 text + 4096
image tokens, two norm weights). Each is timed as the Triton kernel, as ``torch.compile`` of the eager
reference, and eagerly; the effective bandwidth counts one read and one write of the projection. The
``pair_*`` cases: the query and key as the fused projections leave them, a launch each against one launch
for both (``--pair-only``: those alone).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from bench.attention_probe import graph_ms, report, time_ms
from worker.optimizations import qk_norm_rope as qk_module
from worker.optimizations.qk_norm_rope import qk_norm_rope, qk_pair_norm_rope, reference

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


def pair_case(text_tokens: int, image_tokens: int) -> dict[str, Any]:
    """The query and key as the fused projections leave them (views of one (tokens, 3 x features) GEMM
    output, ``worker.optimizations.fused_qkv``), token-major: a launch each (``qk_norm_rope``) against one
    for both (``qk_pair_norm_rope``), their outputs compared and each form replayed from a CUDA graph."""
    device, bf16 = torch.device("cuda"), torch.bfloat16
    generator = torch.Generator(device).manual_seed(1)
    features, tokens = HEADS * HEAD_DIM, text_tokens + image_tokens
    joint = torch.randn(1, tokens, 3 * features, generator=generator, device=device, dtype=bf16)
    weights = [
        1 + 0.1 * torch.randn(HEAD_DIM, generator=generator, device=device, dtype=bf16) for _ in range(4)
    ]
    angles = torch.randn(tokens, HEAD_DIM, generator=generator, device=device)
    cos, sin = angles.cos(), angles.sin()
    text, image = joint[:, :text_tokens], joint[:, text_tokens:]

    def one(index: int) -> torch.Tensor:  # the query (0) or the key (1), as the processor did it before
        features_of = slice(index * features, (index + 1) * features)
        text_part, image_part = text[..., features_of], image[..., features_of]
        return qk_norm_rope(
            text_part, weights[index], image_part, weights[2 + index], cos, sin, 1e-6, HEAD_DIM, None, True
        )

    def separately() -> tuple[torch.Tensor, torch.Tensor]:
        return one(0), one(1)

    def together() -> torch.Tensor:
        qk = slice(0, 2 * features)
        return qk_pair_norm_rope(
            text[..., qk], *weights[:2], image[..., qk], *weights[2:], cos, sin, 1e-6, HEAD_DIM, True
        )

    (query, key), pair = separately(), together()
    two_ms, _ = graph_ms(separately, calls=50)
    one_ms, _ = graph_ms(together, calls=50)
    moved = 2 * 2 * tokens * features * 2  # bytes: one bf16 read and one write of the query and the key
    return {
        "text_tokens": text_tokens,
        "image_tokens": image_tokens,
        "equal": bool(torch.equal(pair[0], query) and torch.equal(pair[1], key)),
        "same_strides": pair[0].stride() == query.stride(),
        "two_launches_ms": round(two_ms, 4),
        "one_launch_ms": round(one_ms, 4),
        "two_launches_tb_s": round(moved / two_ms / 1e9, 2),
        "one_launch_tb_s": round(moved / one_ms / 1e9, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output-file")
    parser.add_argument("--pair-only", action="store_true", help="only the query-and-key cases")
    args = parser.parse_args(argv)
    result: dict[str, Any] = {"device": torch.cuda.get_device_name()}
    if not args.pair_only:
        result.update(single=case(0, 4608), double=case(512, 4096))
    result.update(pair_single=pair_case(0, 4608), pair_double=pair_case(512, 4096))
    report(result, args.output_file)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
