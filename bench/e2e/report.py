"""What the end-to-end run concludes from its reports: stack overhead, encoding cost, throughput, stock.

Pure functions over ``fluxgate bench serving`` documents (``{"summary": ..., "requests": [...]}``), the
encoding probe and the stock script's ``baseline.json``; standard library only.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

# The serving-benchmark issue's targets on one H100 (FLUX.1-dev, 1024x1024).
OVERHEAD_TARGET_S = 0.150  # at c=1, measured with JPEG output
THROUGHPUT_TARGETS = {"c20-28steps": 0.28, "c20-50steps": 0.16}  # req/s at c=20, lossless
FP8_THROUGHPUT_TARGETS = {"c20-50steps": 0.22}  # req/s at c=20 with --quantize fp8 (none set at 28 steps)


def _stats(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "mean": round(statistics.fmean(values), 4),
        "median": round(statistics.median(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
    }


def overhead_breakdown(requests: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per successful request: the stack's time on top of the engine's (latency - inference_s), split into
    queue wait (submission to claim), upload (encode and store) and the rest (HTTP, notification, polling)."""
    done = [r for r in requests if r.get("success") and r.get("inference_s") is not None]
    overhead = [r["latency_s"] - r["inference_s"] for r in done]
    queue = [r.get("queue_s") or 0.0 for r in done]
    upload = [r.get("upload_s") or 0.0 for r in done]
    rest = [o - q - u for o, q, u in zip(overhead, queue, upload, strict=True)]
    return {
        "requests": len(done),
        "latency_s": _stats([r["latency_s"] for r in done]),
        "inference_s": _stats([r["inference_s"] for r in done]),
        "overhead_s": _stats(overhead),
        "queue_s": _stats(queue),
        "upload_s": _stats(upload),
        "rest_s": _stats(rest),
    }


def engine_bound(document: dict[str, Any]) -> tuple[float | None, float]:
    """The rate one worker's engine time allows, and the mean batch size of the requests.

    A job that ran in a batch of ``b`` (``--max-batch-size``) shares its ``inference_s`` with ``b - 1``
    others, so the engine spent ``inference_s / b`` on it: the bound is jobs / the sum of those (1 / mean
    inference when nothing was batched, or when the requests carry no metrics)."""
    done = [r for r in document.get("requests", []) if r.get("success") and r.get("inference_s")]
    if done:
        sizes = [r.get("batch_size") or 1 for r in done]
        engine_s = sum(r["inference_s"] / size for r, size in zip(done, sizes, strict=True))
        return len(done) / engine_s, statistics.fmean(sizes)
    inference = document["summary"].get("inference_mean_s")
    return (1 / inference if inference else None), 1.0


def throughput(document: dict[str, Any]) -> dict[str, Any]:
    """Requests per second, against the bound one worker's engine time sets (:func:`engine_bound`)."""
    summary = document["summary"]
    rate = summary["request_throughput"]
    bound, batch = engine_bound(document)
    return {
        "request_throughput": round(rate, 4),
        "engine_bound_throughput": round(bound, 4) if bound else None,
        "stack_efficiency": round(rate / bound, 4) if bound else None,
        "mean_batch_size": round(batch, 2),
        "completed": summary["completed"],
        "failed": summary["failed"],
        "duration_s": round(summary["duration_s"], 2),
    }


def _stock_compiled_s(stock: dict[str, Any] | None) -> float | None:
    runs = (stock or {}).get("compiled_s")
    return min(runs) if runs else None


def headline(
    scenarios: dict[str, dict[str, Any]],
    encode: dict[str, Any] | None,
    stock: dict[str, Any] | None,
    fp8: bool = False,
) -> dict[str, Any]:
    """The issue's questions answered from the run; a question whose scenario did not run is left out.
    ``fp8``: the worker ran ``--quantize fp8``, judged against the fp8 targets."""
    result: dict[str, Any] = {}
    if "c1-jpeg" in scenarios:
        breakdown = overhead_breakdown(scenarios["c1-jpeg"]["requests"])
        median = (breakdown["overhead_s"] or {}).get("median")
        result["c1_jpeg"] = {
            **breakdown,
            "target_overhead_s": OVERHEAD_TARGET_S,
            "met": median is not None and median < OVERHEAD_TARGET_S,
        }
    if "c1-png" in scenarios:
        result["c1_png"] = overhead_breakdown(scenarios["c1-png"]["requests"])
    if "c1_jpeg" in result and "c1_png" in result:
        png, jpeg = result["c1_png"]["upload_s"], result["c1_jpeg"]["upload_s"]
        if png and jpeg:
            result["png_minus_jpeg_upload_s"] = round(png["median"] - jpeg["median"], 4)
    if encode:
        result["encode_probe"] = encode
    targets = FP8_THROUGHPUT_TARGETS if fp8 else THROUGHPUT_TARGETS
    for name in THROUGHPUT_TARGETS:
        if name in scenarios:
            measured = throughput(scenarios[name])
            target = targets.get(name)
            met = None if target is None else measured["request_throughput"] >= target
            measured.update(target_throughput=target, met=met)
            result[name.replace("-", "_")] = measured
    stock_s = _stock_compiled_s(stock)
    if stock_s and "c1_jpeg" in result and result["c1_jpeg"]["inference_s"]:
        ours = result["c1_jpeg"]["inference_s"]["median"]
        result["engine_vs_stock"] = {
            "engine_inference_median_s": ours,
            "stock_compiled_s": stock_s,
            "stock_over_engine": round(stock_s / ours, 3),
        }
    return result


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f} s"


def format_headline(result: dict[str, Any]) -> str:
    """A short table of the answers, printed last (the device reply carries the end of the output)."""
    lines = ["=" * 72, "End-to-end serving: the issue's questions", "-" * 72]
    for key, label in (("c1_jpeg", "c=1 JPEG"), ("c1_png", "c=1 PNG")):
        if key in result:
            row = result[key]
            over, lat, inf = row["overhead_s"] or {}, row["latency_s"] or {}, row["inference_s"] or {}
            parts = [
                f"latency {_seconds(lat.get('median'))}",
                f"engine {_seconds(inf.get('median'))}",
                f"stack adds {_seconds(over.get('median'))} (median)",
                f"upload {_seconds((row['upload_s'] or {}).get('median'))}",
                f"queue {_seconds((row['queue_s'] or {}).get('median'))}",
            ]
            if "met" in row:
                parts.append(
                    f"target < {row['target_overhead_s'] * 1000:.0f} ms: {'met' if row['met'] else 'NOT met'}"
                )
            lines.append(f"{label:<14}" + "; ".join(parts))
    if "png_minus_jpeg_upload_s" in result:
        lines.append(
            f"{'PNG - JPEG':<14}upload (encode + store) {_seconds(result['png_minus_jpeg_upload_s'])} more"
        )
    probe = (result.get("encode_probe") or {}).get("noise_1024")
    if probe:
        lines.append(
            f"{'encode probe':<14}1024x1024 noise: "
            f"PNG {_seconds(probe['png_s'])}, JPEG {_seconds(probe['jpeg_s'])}"
        )
    for key, label in (("c20_28steps", "c=20, 28 st"), ("c20_50steps", "c=20, 50 st")):
        if key in result:
            row = result[key]
            verdict = "no target" if row["met"] is None else "met" if row["met"] else "NOT met"
            lines.append(
                f"{label:<14}{row['request_throughput']:.4f} req/s "
                f"({row['completed']} ok, {row['failed']} failed); mean batch {row['mean_batch_size']}; "
                f"engine bound {row['engine_bound_throughput']} req/s; target >= {row['target_throughput']}: "
                f"{verdict}"
            )
    if "engine_vs_stock" in result:
        row = result["engine_vs_stock"]
        lines.append(
            f"{'vs stock':<14}engine {_seconds(row['engine_inference_median_s'])} in the stack, "
            "stock diffusers "
            f"compiled {_seconds(row['stock_compiled_s'])} alone (stock/engine {row['stock_over_engine']})"
        )
    lines.append("=" * 72)
    return "\n".join(lines)
