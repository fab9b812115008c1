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


def drive_tiny_ulysses(tiny_model_dir: str, out: str, sizes: list[int], tp_size: int = 1) -> None:
    """Rank 0 of a 2-rank CPU group running the tiny FLUX model with Ulysses; writes, per size, the
    largest pixel difference from the same job on one rank."""
    import numpy as np

    from shared.settings import ModelConfig
    from tests.support import generation_params
    from worker.engine import FluxEngine
    from worker.group import GroupEngine, GroupLauncher
    from worker.options import EngineOptions
    from worker.startup import load_engine

    model = ModelConfig(name="flux-tiny", path=tiny_model_dir)
    options = EngineOptions(num_gpus=2, device="cpu", warmup=False, tp_size=tp_size)
    launcher = GroupLauncher.local(2, "cpu", timeout_s=60)
    channel = launcher.start(model, options, None)
    group = GroupEngine(load_engine(model, options, {}), channel, launcher.spec.keepalive_s)
    group.start()
    single = FluxEngine.load(tiny_model_dir, EngineOptions(device="cpu", warmup=False))
    differences: dict[str, int | str] = {}
    for size in sizes:
        params = generation_params(width=size, height=size, num_inference_steps=3, seed=7)
        try:
            split = np.asarray(group.generate(params, lambda step, total: None).images[0], dtype=np.int16)
        except Exception as error:
            differences[str(size)] = type(error).__name__
            continue
        whole = np.asarray(single.generate(params, lambda step, total: None).images[0], dtype=np.int16)
        differences[str(size)] = int(np.abs(split - whole).max())
    Path(out).write_text(json.dumps({"layout": group.layout.describe, "max_pixel_difference": differences}))
    group.stop()
    launcher.join()
