"""FLUX.2-dev at full size: one image's latency per layout, with 0, 1 and 4 reference images.

    # 2 GPUs: a worker group, fp8 transformer in Ulysses-2, Mistral sharded over both GPUs
    python -m bench.flux2 --num-gpus 2 --ulysses-degree 2 --tp-size 2 --quantize fp8 --compile \\
        --references 0,1,4 --output-file $OUT/u2.json --image-dir $OUT
    # 2 GPUs, lossless: the bf16 transformer and the Mistral both sharded (tensor parallel)
    python -m bench.flux2 --num-gpus 2 --dit-tp-size 2 --tp-size 2 --compile --references 0,1
    # 1 GPU: the transformer resident, the text encoder streamed from pinned CPU memory
    python -m bench.flux2 --text-encoder-cpu-offload --pin-cpu-memory --compile --output-file one.json

Random weights at FLUX.2-dev's shapes (``bench.random_flux2``), through the worker's own load path
(``FluxEngine.from_pipeline``: placement, fp8, sequence parallelism, text-encoder sharding, compile)
and, with ``--num-gpus`` > 1, a real worker group (``worker.group``: rank 0 shares each job, the ranks
run in lockstep). Reported per reference count: seconds per image (prompt to PIL image), the text
encoder's and the VAE decode's share (timed on rank 0 around their calls), peak GPU memory of rank 0
and the memory in use on every GPU. Each layout saves its images (``--image-dir``), so layouts with
the same seed can be compared afterwards (``python -m bench.flux2 --compare a.png b.png``): they draw
the same random weights. ``--smoke`` runs the tiny FLUX.2 on the CPU (gloo ranks for a group).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.parallel import psnr, synchronize
from worker.engine import FluxEngine, internal_params
from worker.options import EngineOptions

log = logging.getLogger("fluxgate.bench")
SEED = 0
PROMPT = "a lighthouse at dusk, photo, high quality"
REFERENCE_SIZE = 1024  # the largest a FLUX.2 reference is used at (its pipeline scales larger ones down)


def build_pipeline(smoke: bool) -> Any:
    torch.manual_seed(SEED)  # every rank and every layout draws the same weights
    if smoke:
        from worker.tiny_flux2 import build_tiny_flux2_pipeline

        return build_tiny_flux2_pipeline(seed=SEED)
    from bench.random_flux2 import build_flux2_dev

    return build_flux2_dev(f"cuda:{torch.cuda.current_device()}")


def group_loader(smoke: Any, options: EngineOptions, environ: Mapping[str, str]) -> FluxEngine:
    """Every rank's engine (module level: spawned ranks import it); ``smoke`` rides in the model argument."""
    device = torch.device("cpu") if smoke else torch.device("cuda", torch.cuda.current_device())
    engine = FluxEngine.from_pipeline(build_pipeline(bool(smoke)), options, device)
    engine.warmup(options.resolutions, [])
    return engine


class StageTimer:
    """Seconds spent in a module method on this rank, summed since the last ``take()``."""

    def __init__(self, owner: Any, method: str) -> None:
        self.seconds = 0.0
        original: Callable[..., Any] = getattr(owner, method)

        def timed(*args: Any, **kwargs: Any) -> Any:
            synchronize()
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                synchronize()
                self.seconds += time.perf_counter() - started

        setattr(owner, method, timed)

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return round(seconds, 3)


def reference_images(count: int, size: int) -> list[Image.Image]:
    rng = np.random.default_rng(SEED)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def gpu_memory_in_use_gb() -> list[float]:
    """Memory in use on each visible GPU, by every process (the group's other ranks included)."""
    used = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        used.append(round((total - free) / 1e9, 1))
    return used


def compare(paths: list[str]) -> dict[str, float]:
    a, b = (np.asarray(Image.open(path).convert("RGB")) for path in paths)
    return {"psnr_db": round(psnr(a, b), 2), "max_abs_difference": int(np.abs(a.astype(int) - b).max())}


def measure(
    engine: Any, timers: dict[str, StageTimer], args: argparse.Namespace, count: int, image_dir: Path | None
) -> dict[str, Any]:
    """Warm this reference count up (a new sequence length compiles), then time ``--repeats`` images."""
    size = args.res
    references = reference_images(count, args.reference_size)
    warm = internal_params(size, size, 2, "off", prompt=PROMPT)
    warm_image = engine.generate(warm, lambda step, total: None, references=references).images[0]
    if image_dir is not None:  # two steps: where layouts differ before the random weights amplify it
        warm_image.save(image_dir / f"{args.tag}_refs{count}_2steps.png")
    for timer in timers.values():
        timer.take()
    params = internal_params(size, size, args.steps, "off", prompt=PROMPT)
    seconds, stages, image = [], [], None
    repeats = args.repeats if count < 4 else max(1, args.repeats // 2)
    for _ in range(repeats):
        synchronize()
        started = time.perf_counter()
        output = engine.generate(params, lambda step, total: None, references=references)
        synchronize()
        seconds.append(round(time.perf_counter() - started, 3))
        stages.append({name: timer.take() for name, timer in timers.items()})
        image = output.images[0]
    median = statistics.median(seconds)
    result: dict[str, Any] = {"seconds": seconds, "median_s": median, "stages_s": stages}
    other = (
        median
        - statistics.median(s["text_encoder"] for s in stages)
        - statistics.median(s["vae_decode"] for s in stages)
    )
    result["denoise_step_s"] = round(other / args.steps, 4)
    if torch.cuda.is_available():
        result["peak_memory_gb_rank0"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        result["memory_in_use_gb_per_gpu"] = gpu_memory_in_use_gb()
    if image_dir is not None and image is not None:
        image.save(image_dir / f"{args.tag}_refs{count}.png")
    return result


def engine_options(args: argparse.Namespace) -> EngineOptions:
    return EngineOptions(
        num_gpus=args.num_gpus,
        ulysses_degree=args.ulysses_degree,
        ring_degree=args.ring_degree,
        tp_size=args.tp_size,
        dit_tp_size=args.dit_tp_size,
        quantize=args.quantize,
        compile=args.compile,
        text_encoder_cpu_offload=args.text_encoder_cpu_offload,
        pin_cpu_memory=args.pin_cpu_memory,
        device="cpu" if args.smoke else "cuda",
        warmup_resolutions=f"{args.res}x{args.res}",
    )


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.flux2", description=__doc__)
    parser.add_argument("--num-gpus", type=int, default=1)
    parser.add_argument("--ulysses-degree", type=int)
    parser.add_argument("--ring-degree", type=int)
    parser.add_argument("--tp-size", type=int, default=1, help="shard the Mistral text encoder")
    parser.add_argument("--dit-tp-size", type=int, default=1, help="shard the transformer (no Ulysses)")
    parser.add_argument("--quantize", default="none", choices=["none", "fp8"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--text-encoder-cpu-offload", action="store_true")
    parser.add_argument("--pin-cpu-memory", action="store_true")
    parser.add_argument("--res", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--references", default="0,1,4", help="reference-image counts to time")
    parser.add_argument("--reference-size", type=int, default=REFERENCE_SIZE)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tag", default="layout", help="names the saved images")
    parser.add_argument("--image-dir")
    parser.add_argument("--output-file")
    parser.add_argument("--compare", nargs=2, metavar="PNG", help="PSNR of two saved images, then exit")
    parser.add_argument("--smoke", action="store_true", help="the tiny FLUX.2 on the CPU, to check")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from worker.group import GroupEngine, GroupLauncher

    args = parse(argv)
    if args.compare:
        print(json.dumps(compare(args.compare)))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    options = engine_options(args)
    gpus = torch.cuda.device_count()
    report: dict[str, Any] = {
        "device": f"{gpus}x {torch.cuda.get_device_name(0)}" if gpus else "cpu",
        "torch": torch.__version__,
        "options": options.model_dump(
            include={
                "num_gpus",
                "ulysses_degree",
                "ring_degree",
                "tp_size",
                "dit_tp_size",
                "quantize",
                "compile",
                "text_encoder_cpu_offload",
                "pin_cpu_memory",
            }
        ),
        "resolution": args.res,
        "steps": args.steps,
        "reference_size": args.reference_size,
    }
    image_dir = Path(args.image_dir) if args.image_dir else None
    if image_dir is not None:
        image_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    launcher = None
    if args.num_gpus > 1:
        launcher = GroupLauncher.local(args.num_gpus, "cpu" if args.smoke else "cuda", timeout_s=900)
        channel = launcher.start(args.smoke, options, group_loader)
        local = group_loader(args.smoke, options, {})
        engine: Any = GroupEngine(local, channel, launcher.spec.keepalive_s, launcher)
        engine.start()
    else:
        if not args.smoke:
            torch.cuda.set_device(0)
        local = engine = group_loader(args.smoke, options, {})
    report["load_and_warmup_s"] = round(time.perf_counter() - started, 1)
    timers = {
        "text_encoder": StageTimer(local.pipeline.text_encoder, "forward"),
        "vae_decode": StageTimer(local.pipeline.vae, "decode"),
    }
    for count in (int(item) for item in args.references.split(",")):
        report[f"refs{count}"] = measure(engine, timers, args, count, image_dir)
        print(json.dumps({f"refs{count}": report[f"refs{count}"]}), flush=True)
    print("RESULT " + json.dumps(report), flush=True)
    if args.output_file:
        Path(args.output_file).write_text(json.dumps(report, indent=2))
    if launcher is not None:
        engine.stop()
        launcher.join()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
