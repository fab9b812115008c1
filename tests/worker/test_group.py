"""The multi-GPU group protocol on CPU ranks (gloo): job sharing, lockstep stops, a rank dying."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.support import wait_for
from tests.worker.group_support import drive_rank0, drive_tiny_group


def run_group(
    tmp_path: Path, prompts: list[str], stop_at: dict[str, int] | None = None, timeout_s: float = 20
) -> tuple[int, list[str]]:
    """Run rank 0 in its own process (the test process never joins a process group)."""
    process = multiprocessing.get_context("spawn").Process(
        target=drive_rank0, args=(str(tmp_path), 2, prompts, stop_at or {}, timeout_s)
    )
    process.start()
    process.join(timeout=120)
    assert process.exitcode is not None, "the group hung"
    outcomes_file = tmp_path / "outcomes.json"
    return process.exitcode, json.loads(outcomes_file.read_text()) if outcomes_file.exists() else []


def records(tmp_path: Path, rank: int) -> list[dict[str, object]]:
    lines = (tmp_path / f"rank{rank}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_followers_run_every_job_rank0_shares_with_the_same_parameters(tmp_path: Path) -> None:
    exitcode, outcomes = run_group(tmp_path, ["first", "second"])
    assert exitcode == 0 and outcomes == ["succeeded", "succeeded"]
    assert records(tmp_path, 1) == records(tmp_path, 0)
    assert [(r["prompt"], r["seed"], r["steps"]) for r in records(tmp_path, 1)] == [
        ("first", 0, 4),
        ("second", 1, 4),
    ]


def test_a_cancel_on_rank0_stops_every_rank_at_the_same_step(tmp_path: Path) -> None:
    exitcode, outcomes = run_group(tmp_path, ["canceled", "after"], stop_at={"canceled": 2})
    assert exitcode == 0 and outcomes == ["JobInterrupted", "succeeded"]
    # Rank 0 interrupts inside step 2's callback; every rank stops there, and the group goes on.
    assert [(r["prompt"], r["steps"]) for r in records(tmp_path, 1)] == [("canceled", 1), ("after", 4)]
    assert [(r["prompt"], r["steps"]) for r in records(tmp_path, 0)] == [("canceled", 1), ("after", 4)]


def test_a_failure_on_a_follower_fails_the_job_on_rank0_and_the_group_goes_on(tmp_path: Path) -> None:
    exitcode, outcomes = run_group(tmp_path, ["fail on rank 1", "next"])
    assert exitcode == 0 and outcomes == ["GroupError", "succeeded"]


def test_a_dead_follower_takes_the_group_down_and_hands_the_job_back(tmp_path: Path) -> None:
    exitcode, outcomes = run_group(tmp_path, ["die on rank 1", "never"])
    assert exitcode == 1
    assert (tmp_path / "rank_lost").read_text() == "yes"
    assert outcomes == []  # rank 0 never reported the job as finished: it goes back to the queue


def test_followers_exit_when_rank0_is_gone(tmp_path: Path) -> None:
    process = multiprocessing.get_context("spawn").Process(
        target=drive_rank0, args=(str(tmp_path), 2, ["slow"] * 200, {})
    )
    process.start()
    wait_for(lambda: (tmp_path / "rank1.jsonl").exists(), 60, "the follower to run a job")
    followers = [int(pid) for pid in _children(process.pid)]
    assert followers
    os.kill(process.pid, signal.SIGKILL)
    process.join(timeout=10)
    wait_for(lambda: not any(_alive(pid) for pid in followers), 30, "the followers to exit")


def _children(pid: int) -> list[str]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return path.read_text().split() if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text()


def test_keepalives_keep_idle_followers_waiting_longer_than_the_group_timeout(tmp_path: Path) -> None:
    """Idle for 12 s with a 6 s collective timeout: keep-alives every 1.5 s, and the next job runs."""
    exitcode, outcomes = run_group(tmp_path, ["idle 12 s", "after"], timeout_s=6)
    assert exitcode == 0 and outcomes == ["succeeded", "succeeded"]


def run_tiny_group(
    model_dir: Path,
    tmp_path: Path,
    jobs: list[tuple[int, str]],
    options: dict[str, Any],
    presets: tuple[str, ...] = (),
    environ: dict[str, str] | None = None,
    steps: int = 3,
) -> dict[str, Any]:
    """Run a tiny model on a two-rank CPU group (rank 0 in its own process), each job against one rank."""
    out = tmp_path / "result.json"
    process = multiprocessing.get_context("spawn").Process(
        target=drive_tiny_group, args=(str(model_dir), str(out), jobs, options, presets, environ, steps)
    )
    process.start()
    process.join(timeout=300)
    assert process.exitcode == 0
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def tiny_group(
    model_dir: Path, tmp_path: Path, sizes: list[int], tp_size: int = 1, runtime: str = "cache-dit"
) -> dict[int, Any]:
    """Uncached jobs of ``sizes`` on a Ulysses-2 group: per size, the largest pixel difference from one
    rank, or the type of the error the group raised."""
    options = {"tp_size": tp_size, "sp_runtime": runtime}
    result = run_tiny_group(model_dir, tmp_path, [(size, "off") for size in sizes], options)
    assert result["layout"] == f"ulysses=2,ring=1,tp={tp_size},runtime={runtime}"
    return {job["size"]: job.get("error", job.get("max_pixel_difference")) for job in result["jobs"]}


@pytest.mark.parametrize("runtime", ["cache-dit", "diffusers"])
def test_ulysses_on_two_cpu_ranks_draws_the_one_rank_image(
    tmp_path: Path, tiny_model_dir: Path, runtime: str
) -> None:
    """64x64 splits 16 image tokens evenly. 48x48 has 9: GPU groups take the uneven split (checked
    on the device); a CPU group, gloo gathering only equal shards, runs it on the unsplit replica."""
    differences = tiny_group(tiny_model_dir, tmp_path, [64, 48, 32], runtime=runtime)
    assert all(difference <= 1 for difference in differences.values()), differences


def test_a_text_encoder_sharded_over_two_ranks_draws_the_one_rank_image(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """The tiny T5's 37 FFN features do not split in two (T5-XXL's 10240 do): use a copy with 38."""
    from transformers import T5Config, T5EncoderModel

    model_dir = tmp_path / "tiny-even-ffn"
    shutil.copytree(tiny_model_dir, model_dir)
    config = T5Config.from_pretrained(model_dir / "text_encoder_2")
    config.d_ff = 38
    T5EncoderModel(config).save_pretrained(model_dir / "text_encoder_2")
    assert tiny_group(model_dir, tmp_path, [64], tp_size=2)[64] <= 1


def test_flux2_with_its_mistral_encoder_sharded_async_ulysses_a_split_decode_and_a_preset(
    tmp_path: Path,
) -> None:
    """FLUX.2 on every group feature at once, against one rank; its mask cached whole (static policy).
    48x48 (9 image tokens) runs on the unsplit replica. The tiny Mistral has one key/value head, which
    does not split in two: use a copy with two."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    from worker.tiny_flux2 import build_tiny_flux2_pipeline

    model_dir = tmp_path / "tiny-flux2"
    build_tiny_flux2_pipeline().save_pretrained(model_dir)
    config = Mistral3Config.from_pretrained(model_dir / "text_encoder")
    config.text_config.num_key_value_heads = 2
    Mistral3ForConditionalGeneration(config).save_pretrained(model_dir / "text_encoder")
    options = {"tp_size": 2, "ulysses_async": True, "parallel_vae": True}
    jobs = [(64, "off"), (128, "fast"), (128, "off"), (48, "fast")]
    static = {"FLUXGATE_CACHE_DIT_SCM_POLICY": "static"}
    result = run_tiny_group(model_dir, tmp_path, jobs, options, ("fast",), static, steps=8)
    assert result["layout"] == "ulysses=2,ring=1,tp=2,runtime=cache-dit,ulysses_async,parallel_vae"
    for job in result["jobs"]:
        assert "error" not in job, job
        assert job["max_pixel_difference"] <= 1 and job["cached_steps"][0] == job["cached_steps"][1], job
    assert [job["tiles"] for job in result["jobs"]] == [[1, 1], [2, 4], [2, 4], [2, 4]]
    assert result["jobs"][1]["cached_steps"][0] == result["jobs"][3]["cached_steps"][0] == 3  # "fast" mask


@pytest.mark.parametrize("kind", ["flux1", "flux2"])
def test_a_transformer_sharded_over_two_ranks_draws_the_one_rank_image_at_any_size(
    tmp_path: Path, tiny_model_dir: Path, kind: str
) -> None:
    """--dit-tp-size splits weights, not the sequence: 48x48 (9 image tokens) runs too."""
    from worker.tiny_flux2 import build_tiny_flux2_pipeline

    model_dir = tiny_model_dir
    if kind == "flux2":
        model_dir = tmp_path / "tiny-flux2"
        build_tiny_flux2_pipeline().save_pretrained(model_dir)
    result = run_tiny_group(model_dir, tmp_path, [(64, "off"), (48, "off")], {"dit_tp_size": 2})
    assert result["layout"] == "ulysses=1,ring=1,tp=1,dit_tp=2"
    for job in result["jobs"]:
        assert "error" not in job and job["max_pixel_difference"] <= 1, job


# Threshold knobs loose enough that random weights cache some steps: the "default" preset decides by
# threshold alone, "fast"/"medium" (the default "dynamic" policy) by threshold on their mask's cache steps.
LOOSE_THRESHOLD = {
    "FLUXGATE_CACHE_DIT_RDT": "0.6",
    "FLUXGATE_CACHE_DIT_WARMUP": "2",
    "FLUXGATE_CACHE_DIT_MC": "-1",
}


def test_cache_dit_presets_in_a_group_draw_the_one_rank_cached_image_and_count_the_same_steps(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """Presets switch between jobs on top of the parallelism enabled once at load; every rank takes the
    one-rank engine's decisions, including the threshold's, whose residual difference cache-dit averages
    over the group."""
    jobs = [(64, "off"), (64, "fast"), (64, "off"), (64, "medium"), (64, "default"), (64, "fast")]
    presets = ("fast", "medium", "default")
    result = run_tiny_group(tiny_model_dir, tmp_path, jobs, {}, presets, LOOSE_THRESHOLD, steps=8)
    assert result["layout"] == "ulysses=2,ring=1,tp=1,runtime=cache-dit"  # presets: cache-dit's
    for job in result["jobs"]:
        assert "error" not in job, job
        group, single = job["cached_steps"]
        assert job["max_pixel_difference"] <= 1 and group == single, job
        assert (group == 0) == (job["preset"] == "off"), job


def test_cache_dit_presets_on_a_transformer_sharded_over_two_ranks_cache_the_one_rank_steps(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    jobs = [(64, "fast"), (64, "off"), (64, "default")]
    result = run_tiny_group(
        tiny_model_dir, tmp_path, jobs, {"dit_tp_size": 2}, ("fast", "default"), LOOSE_THRESHOLD, steps=8
    )
    for job in result["jobs"]:
        assert "error" not in job and job["max_pixel_difference"] <= 1, job
        assert job["cached_steps"][0] == job["cached_steps"][1], job
    assert [job["cached_steps"][0] > 0 for job in result["jobs"]] == [True, False, True]


# One group, async Ulysses with a split decode and the `fast` preset, serves the next two tests: the first
# three jobs are the first test's, the last three the second's (a group start costs ~35 s on a CPU).
SPLIT_DECODE_JOBS = [(128, "fast"), (128, "off"), (64, "off"), (112, "fast"), (112, "off"), (128, "fast")]


@pytest.fixture(scope="module")
def split_decode_group(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    options = {"ulysses_async": True, "parallel_vae": True}
    tmp_path = tmp_path_factory.mktemp("split-decode-group")
    return run_tiny_group(tiny_model_dir, tmp_path, SPLIT_DECODE_JOBS, options, ("fast",), steps=8)


def test_async_ulysses_and_a_split_decode_draw_the_one_rank_image(split_decode_group: dict[str, Any]) -> None:
    """At 128x128 the decode is split into four tiles, rank 0 decoding two; the one-rank engine decodes
    the same four. At 64x64 the latent is too small to split: every rank decodes it whole."""
    assert (
        split_decode_group["layout"] == "ulysses=2,ring=1,tp=1,runtime=cache-dit,ulysses_async,parallel_vae"
    )
    jobs = split_decode_group["jobs"][:3]
    assert [(job["size"], job["preset"]) for job in jobs] == SPLIT_DECODE_JOBS[:3]
    for job in jobs:
        assert "error" not in job, job
        assert job["max_pixel_difference"] <= 1, job
        assert job["cached_steps"][0] == job["cached_steps"][1], job
    assert [job["tiles"] for job in jobs] == [[2, 4], [2, 4], [1, 1]]
    assert jobs[0]["cached_steps"][0] > 0


def test_sizes_the_group_cannot_split_run_replicated_with_presets_and_a_split_decode(
    split_decode_group: dict[str, Any],
) -> None:
    """112x112 has 49 image tokens, which no CPU group splits: every rank runs the unsplit replica, with
    its own cache controller (the same cached steps as one rank), the decode still split; the next job,
    which divides, is back on the split transformer and its cache."""
    jobs = split_decode_group["jobs"][3:]
    assert [(job["size"], job["preset"]) for job in jobs] == SPLIT_DECODE_JOBS[3:]
    for job in jobs:
        assert "error" not in job, job
        assert job["max_pixel_difference"] <= 1, job
        assert job["cached_steps"][0] == job["cached_steps"][1], job
    assert [job["cached_steps"][0] > 0 for job in jobs] == [True, False, True]
    assert [job["tiles"] for job in jobs] == [[2, 4], [2, 4], [2, 4]]


def test_a_group_on_diffusers_context_parallelism_refuses_cache_dit_presets_at_start(
    tiny_model_dir: Path,
) -> None:
    """Measured on CPU ranks: a cached step under diffusers' context parallelism returns the whole
    sequence where the scheduler expects this rank's shard, so the combination is refused, not run."""
    from shared.settings import ModelConfig
    from worker.options import EngineOptions
    from worker.startup import StartupError, load_engine

    model = ModelConfig(
        name="flux-tiny", path=str(tiny_model_dir), cache_presets=["fast"], default_cache="fast"
    )
    options = EngineOptions(num_gpus=2, device="cpu", warmup=False, sp_runtime="diffusers")
    with pytest.raises(StartupError, match="--sp-runtime cache-dit"):
        load_engine(model, options, {})


def test_auto_runtime_resolves_with_the_models_presets_before_the_engine_loads(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ring group takes diffusers' runtime by default, cache-dit's when the model offers presets."""
    from shared.settings import ModelConfig
    from worker import engine as engine_module
    from worker.options import EngineOptions
    from worker.startup import load_engine

    loaded: list[str] = []

    def load(path: str, options: EngineOptions, cache: object) -> None:
        loaded.append(options.sp_runtime)
        raise ValueError("stop here")  # load_engine turns it into a StartupError

    monkeypatch.setattr(engine_module.FluxEngine, "load", staticmethod(load))
    options = EngineOptions(num_gpus=2, ring_degree=2, device="cpu", warmup=False)
    cached = ModelConfig(
        name="flux-tiny", path=str(tiny_model_dir), cache_presets=["fast"], default_cache="fast"
    )
    plain = ModelConfig(name="flux-tiny", path=str(tiny_model_dir))
    for model in (cached, plain):
        with pytest.raises(Exception, match="stop here"):
            load_engine(model, options, {})
    assert loaded == ["cache-dit", "diffusers"]
