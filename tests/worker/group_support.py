"""Processes for the worker-group tests: rank 0 drivers and fake engines (importable by spawned ranks)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from shared.schemas import GenerationParams
from worker.types import GenerationOutput, StepCallback


class RecordingEngine:
    """Runs ``num_inference_steps`` steps and records, per rank, how far each job got."""

    def __init__(self, records: Path, rank: int) -> None:
        self.records = records
        self.rank = rank
        self.layout = None

    def generate(
        self, params: GenerationParams, on_step: StepCallback, references: Sequence[Image.Image] = ()
    ) -> GenerationOutput:
        done = 0
        try:
            for step in range(1, params.num_inference_steps + 1):
                if params.prompt == f"die on rank {self.rank}" and step == 2:
                    os._exit(3)
                if params.prompt == f"fail on rank {self.rank}":
                    raise RuntimeError("this rank's pipeline failed")
                if params.prompt == "slow":
                    time.sleep(0.2)
                on_step(step, params.num_inference_steps)
                done = step
        finally:
            entry = {"prompt": params.prompt, "seed": params.seed, "steps": done}
            with (self.records / f"rank{self.rank}.jsonl").open("a") as file:
                file.write(json.dumps(entry) + "\n")
        return GenerationOutput(images=[Image.new("RGB", (8, 8))])


def recording_loader(model: Any, options: Any, environ: Mapping[str, str]) -> RecordingEngine:
    """The engine loader of every rank: ``model`` is the records folder here."""
    import torch.distributed as dist

    return RecordingEngine(Path(model), dist.get_rank())


def drive_rank0(
    records: str, world: int, prompts: list[str], stop_at: dict[str, int], timeout_s: float = 20
) -> None:
    """Rank 0 of a CPU group: run one job per prompt through ``GroupEngine``; write each outcome.

    ``stop_at[prompt] = k`` makes rank 0's step callback interrupt that job at step k, as the runner's
    does when the job store says the job was canceled. When a follower dies, the supervisor writes
    ``rank_lost`` and ends this process.
    """
    from tests.support import generation_params
    from worker.group import GroupEngine, GroupLauncher
    from worker.runner import JobInterrupted

    folder = Path(records)
    launcher = GroupLauncher.local(world, "cpu", timeout_s=timeout_s)
    channel = launcher.start(records, None, recording_loader)
    engine = GroupEngine(RecordingEngine(folder, 0), channel, launcher.spec.keepalive_s, launcher)
    launcher.supervise(lambda: (folder / "rank_lost").write_text("yes"))
    engine.start()
    outcomes = []
    for index, prompt in enumerate(prompts):

        def on_step(step: int, total: int, prompt: str = prompt) -> None:
            if stop_at.get(prompt) == step:
                raise JobInterrupted(canceled=True)

        if prompt.startswith("idle "):  # "idle 10 s": no job for longer than the group timeout
            time.sleep(float(prompt.split()[1]))
        params = generation_params(prompt=prompt, seed=index, num_inference_steps=4)
        try:
            engine.generate(params, on_step)
            outcomes.append("succeeded")
        except Exception as error:
            outcomes.append(type(error).__name__)
        (folder / "outcomes.json").write_text(json.dumps(outcomes))
    engine.stop()
    launcher.join()


def drive_tiny_group(
    tiny_model_dir: str,
    out: str,
    jobs: list[tuple[int, str]],
    options: dict[str, Any],
    presets: tuple[str, ...] = (),
    environ: dict[str, str] | None = None,
    steps: int = 3,
) -> None:
    """Rank 0 of a 2-rank CPU group running the tiny FLUX model: one job per (size, cache preset), each
    compared with the same job on one rank. Writes, per job, the largest pixel difference (or the
    error's type), both engines' cached steps, and how many tiles each VAE decoder ran.

    ``presets`` are the model's Cache-DiT presets, tuned by ``environ`` (every rank reads the same knobs,
    from the environment they inherit). With ``parallel_vae`` the one-rank engine decodes with the same
    tiles, unsplit.
    """
    import numpy as np

    from shared.settings import ModelConfig
    from tests.support import generation_params
    from worker.group import GroupEngine, GroupLauncher
    from worker.options import EngineOptions
    from worker.parallel_vae import split_decode_tiles
    from worker.startup import load_engine

    os.environ.update(environ or {})
    model = ModelConfig(name="flux-tiny", path=tiny_model_dir, cache_presets=list(presets))
    group_options = EngineOptions(num_gpus=2, device="cpu", warmup=False, **options)
    all_params = [
        generation_params(width=size, height=size, num_inference_steps=steps, seed=7, cache=preset)
        for size, preset in jobs
    ]
    # The one-rank jobs run before this process joins the group: with a process group of two formed,
    # cache-dit would average a one-rank engine's residual difference with a rank that is not running it.
    single = load_engine(model, EngineOptions(device="cpu", warmup=False), os.environ)
    if group_options.parallel_vae:
        split_decode_tiles(single.pipeline.vae, single.pipeline.vae.use_tiling)
    expected = [_run_counting_tiles(single, params) for params in all_params]
    del single

    launcher = GroupLauncher.local(2, "cpu", timeout_s=60)
    channel = launcher.start(model, group_options, None)
    local = load_engine(model, group_options, os.environ)
    group = GroupEngine(local, channel, launcher.spec.keepalive_s)
    group.start()
    results: list[dict[str, Any]] = []
    for params, (whole, single_tiles) in zip(all_params, expected, strict=True):
        job = {"size": params.width, "preset": params.cache}
        try:
            split, group_tiles = _run_counting_tiles(local, params, group)
        except Exception as error:
            results.append({**job, "error": type(error).__name__})
            continue
        difference = np.abs(
            np.asarray(split.images[0], dtype=np.int16) - np.asarray(whole.images[0], dtype=np.int16)
        )
        job["max_pixel_difference"] = int(difference.max())
        job["cached_steps"] = [split.cached_steps, whole.cached_steps]
        job["tiles"] = [group_tiles, single_tiles]
        results.append(job)
    Path(out).write_text(json.dumps({"layout": group.layout.describe, "jobs": results}))
    group.stop()
    launcher.join()


def _run_counting_tiles(engine: Any, params: GenerationParams, runner: Any = None) -> tuple[Any, int]:
    """Run one job (through ``runner``, else ``engine``); its output and how many tiles ``engine``'s
    VAE decoder ran (1 for a whole decode)."""
    tiles = [0]
    hook = engine.pipeline.vae.decoder.register_forward_hook(lambda *_: tiles.__setitem__(0, tiles[0] + 1))
    try:
        output = (runner or engine).generate(params, lambda step, total: None)
    finally:
        hook.remove()
    return output, tiles[0]
