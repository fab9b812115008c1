"""A FLUX-shaped GEMM and attention run back to back for a while: their rate second by second, beside the
card's SM clock, power draw and the reasons it gives for holding its clock down.

``../shared/gpu/ceilings.py`` measures the kernels in short bursts (triton's ``do_bench``: a few hundred
milliseconds). An image keeps the card busy for seconds; whether the kernels slow down over that time (a
power or thermal limit lowering the clock) decides which rates a 28-step image can reach.

    python -m bench.sustained --seconds 15 --output-file sustained.json
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from collections.abc import Callable
from typing import Any

import torch

from bench.attention_probe import report as report_result

# the clock-event reasons' field has its newer name first; older drivers know only the second
QUERIES = (
    "clocks.sm,power.draw,temperature.gpu,clocks_event_reasons.active",
    "clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active",
)


def card_state() -> dict[str, Any]:
    """The first visible card's SM clock (MHz), power (W), temperature (C) and clock-event reasons (a bit
    mask: 0x4 the software power cap, 0x20/0x40 thermal slowdowns; nvidia-smi -q -d PERFORMANCE)."""
    card = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    error: Exception | None = None
    for query in QUERIES:
        try:
            line = subprocess.run(
                ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits", "-i", card],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError) as failed:
            error = failed
            continue
        clock, power, temperature, reasons = (field.strip() for field in line.split(","))
        return {"sm_mhz": clock, "power_w": power, "temp_c": temperature, "reasons": reasons}
    return {"error": str(error)[:120]}


def windows(work: Callable[[], object], flops: float, seconds: float) -> list[dict[str, Any]]:
    """``work`` repeated for ``seconds``: TFLOP/s in one-second windows, the card's state after each."""
    for _ in range(5):
        work()
    torch.cuda.synchronize()
    results = []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        calls = 0
        window = time.perf_counter()
        start.record()
        while time.perf_counter() - window < 1.0:
            for _ in range(20):
                work()
            calls += 20
            torch.cuda.synchronize()  # the window is the host's second: keep the queue short
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end) / calls
        results.append(
            {
                "t_s": round(time.perf_counter() - started, 1),
                "tflops": round(flops / ms / 1e9, 1),
                **card_state(),
            }
        )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=15.0, help="per kernel")
    parser.add_argument("--output-file")
    args = parser.parse_args(argv)
    dtype = torch.bfloat16
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "idle": card_state()}
    # the single blocks' MLP part of proj_out (4608 x 12288 -> 3072) and FLUX's attention (24 x 128, 4608)
    a = torch.randn(4608, 12288, device="cuda", dtype=dtype)
    b = torch.randn(3072, 12288, device="cuda", dtype=dtype)
    report["gemm_4608x12288x3072"] = windows(lambda: a @ b.t(), 2 * 4608 * 12288 * 3072, args.seconds)
    q, k, v = (torch.randn(1, 24, 4608, 128, device="cuda", dtype=dtype) for _ in range(3))
    attention = torch.nn.functional.scaled_dot_product_attention
    report["attention_24x4608x128"] = windows(
        lambda: attention(q, k, v), 4 * 24 * 4608**2 * 128, args.seconds
    )
    report_result(report, args.output_file)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
