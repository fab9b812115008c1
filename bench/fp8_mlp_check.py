"""The one-pass fp8 MLP quantization at FLUX.1's shapes on the GPU: its rows and scales against torchao's
eager math and its time against inductor's fusion of it (``python -m bench.fp8_mlp_check``).

Three calls per step and block: the single blocks' ``proj_out`` input (4608 rows: 3,072 attention and
12,288 GELU'd MLP features) and the double blocks' feed-forward outputs (4096 image and 512 text rows of
12,288). Each is timed as the Triton kernel, as ``torch.compile`` of the eager reference and eagerly; the
effective bandwidth counts one bf16 read and one fp8 write of each row.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from bench.attention_probe import report, time_ms
from worker.optimizations.fp8_mlp import fp8_quantize_rows, reference


def case(rows: int, head: int, tail: int) -> dict[str, Any]:
    device, bf16 = torch.device("cuda"), torch.bfloat16
    generator = torch.Generator(device).manual_seed(0)

    def draw(*shape: int) -> torch.Tensor:
        return (3 * torch.randn(*shape, generator=generator, device=device)).to(bf16)

    args = (draw(1, rows, head) if head else None, draw(1, rows, tail), True)
    (expected, expected_scale), (got, scale) = reference(*args), fp8_quantize_rows(*args)
    compiled = torch.compile(reference, fullgraph=True)
    dequantized = (got.float() * scale - expected.float() * expected_scale).abs()
    times = {
        "triton_ms": time_ms(lambda: fp8_quantize_rows(*args)),
        "compiled_reference_ms": time_ms(lambda: compiled(*args)),
        "eager_reference_ms": time_ms(lambda: reference(*args)),
    }
    moved = rows * (head + tail) * (2 + 1)  # bytes: one bf16 read, one fp8 write
    return {
        "rows": rows,
        "features": head + tail,
        "scales_equal": int((scale == expected_scale).sum().item()),
        "bytes_differing": int((got.view(torch.uint8) != expected.view(torch.uint8)).sum().item()),
        "elements": got.numel(),
        "dequantized_max_abs_diff": dequantized.max().item(),
        **{name: round(ms, 4) for name, ms in times.items()},
        "triton_tb_s": round(moved / times["triton_ms"] / 1e9, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output-file")
    args = parser.parse_args(argv)
    result = {
        "device": torch.cuda.get_device_name(),
        "single": case(4608, 3072, 12288),
        "feed_forward": case(4096, 0, 12288),
        "text_feed_forward": case(512, 0, 12288),
    }
    report(result, args.output_file)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
