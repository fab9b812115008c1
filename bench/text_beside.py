"""Does a double block's text stream hide beside its image stream? (``python -m bench.text_beside``)

FLUX.1's 19 double blocks carry the 512 text tokens in a stream of their own: after the joint attention,
the text tokens' output projection, feed-forward (in with its GELU, out) and gatings never read the image
tokens' until the next block's attention, and the image tokens' never read theirs. Their GEMMs have 512
rows, a wave or two of the H100's 132 SMs each. Run beside the image GEMMs on a second stream, their tiles
could fill the SMs the image GEMMs' last waves leave idle.

This times, replayed from CUDA graphs, each double block's chain after the attention and the projections
before it, at one GPU's shapes (the worker's GEMM calls, bias and GELU epilogues included):

* ``image`` and ``text`` alone, and one after the other (``serial``: the worker's order);
* ``beside``: the text chain on a high-priority side stream launched first, the image chain on the caller's;
* ``beside_low``: the text chain on a low-priority side stream (its tiles wait for free SMs).

``saved`` is ``serial`` less the better of the two: per double block, x 19 x 28 for an image.

Measured on an H100 (lease 110, docs/performance.md): the text chain after the attention takes 131 µs alone
(~660 TFLOP/s, the image GEMMs' rate) and beside the image chain costs 51 µs more than after it: cuBLAS's
cooperative GEMMs compete rather than fill each other's tails. Not a lever; the worker keeps one stream.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from bench.attention_probe import report
from bench.concurrency import graph_arguments, serial, timed
from bench.exchange import overlapped

TEXT, IMAGE, HIDDEN, MLP = 512, 4096, 3072, 12288
Chain = Callable[[], Any]


def linear(rows: int, inputs: int, outputs: int, device: torch.device, gelu: bool = False) -> Chain:
    """One of the worker's GEMM calls: ``x @ W^T + b``, with the GELU in cuBLASLt's epilogue if asked."""
    x = torch.randn(rows, inputs, device=device, dtype=torch.bfloat16)
    weight = torch.randn(outputs, inputs, device=device, dtype=torch.bfloat16) / inputs**0.5
    bias = torch.randn(outputs, device=device, dtype=torch.bfloat16)
    if gelu:
        return lambda: torch._addmm_activation(bias, x, weight.t(), use_gelu=True)
    return lambda: F.linear(x, weight, bias)


def stream_chains(rows: int, device: torch.device) -> dict[str, Chain]:
    """A stream's GEMMs in a double block: the projections before the attention (one GEMM for the query,
    key and value), and after it the output projection and the feed-forward."""
    return {
        "before": linear(rows, HIDDEN, 3 * HIDDEN, device),
        "after": serial(
            linear(rows, HIDDEN, HIDDEN, device),
            linear(rows, HIDDEN, MLP, device, gelu=True),
            linear(rows, MLP, HIDDEN, device),
        ),
    }


def measure(calls: int) -> dict[str, Any]:
    device = torch.device("cuda", torch.cuda.current_device())
    high = torch.cuda.Stream(device, priority=-1)
    low = torch.cuda.Stream(device, priority=0)
    image, text = stream_chains(IMAGE, device), stream_chains(TEXT, device)
    result: dict[str, Any] = {}
    for part in ("before", "after"):
        cases = {
            "image": image[part],
            "text": text[part],
            "serial": serial(image[part], text[part]),
            "beside": overlapped(image[part], text[part], high),
            "beside_low": overlapped(image[part], text[part], low),
        }
        us = timed(cases, calls, ("beside", "beside_low"))
        us["saved_ms_an_image"] = round(us["saved"] * 19 * 28 / 1000, 1)
        result[part] = us
    return result


def main(argv: list[str] | None = None) -> int:
    args = graph_arguments(__doc__, argv)
    result = {"device": torch.cuda.get_device_name(), **measure(args.calls)}
    result["sustained"] = measure(args.calls * 10)  # ~10x the work a graph: the card at its power cap
    report(result, args.output_file)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
