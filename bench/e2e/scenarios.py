"""The scenarios of the end-to-end run, each one ``fluxgate bench serving`` against the live stack."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.e2e.stack import REPO_ROOT


@dataclass(frozen=True)
class Scenario:
    """One ``fluxgate bench serving`` run: how many prompts, how many in flight, steps and format."""

    name: str
    prompts: int
    concurrency: int
    steps: int
    output_format: str

    def serving_args(self, size: int) -> list[str]:
        return [
            *("--num-prompts", str(self.prompts), "--max-concurrency", str(self.concurrency)),
            *("--width", str(size), "--height", str(size), "--steps", str(self.steps)),
            *("--output-format", self.output_format),
        ]


@dataclass(frozen=True)
class Plan:
    """What one run measures: the model served, its resolution, the warm-up and the scenarios in order."""

    model: dict[str, Any]
    size: int
    warmup: Scenario
    scenarios: tuple[Scenario, ...]


def gpu_plan(throughput_format: str = "jpeg") -> Plan:
    """The issue's measurements on FLUX.1-dev at 1024x1024: stack overhead at c=1 (JPEG, then PNG for the
    encoding time), throughput at c=20 for 28 and 50 steps."""
    model = {
        "name": "flux1-dev-random",
        "path": "random-weights:flux1-dev",
        "defaults": {"width": 1024, "height": 1024, "num_inference_steps": 28},
    }
    return Plan(
        model=model,
        size=1024,
        warmup=Scenario("warmup", 1, 1, 2, "jpeg"),
        scenarios=(
            Scenario("c1-jpeg", 5, 1, 28, "jpeg"),
            Scenario("c1-png", 5, 1, 28, "png"),
            Scenario("c20-28steps", 20, 20, 28, throughput_format),
            Scenario("c20-50steps", 20, 20, 50, throughput_format),
        ),
    )


def smoke_plan(throughput_format: str = "jpeg") -> Plan:
    """The same scenarios, small: the tiny model on the CPU at 64x64, a few prompts each."""
    model = {
        "name": "flux-tiny-random",
        "path": "random-weights:tiny",
        "defaults": {"width": 64, "height": 64, "num_inference_steps": 3},
    }
    return Plan(
        model=model,
        size=64,
        warmup=Scenario("warmup", 1, 1, 2, "jpeg"),
        scenarios=(
            Scenario("c1-jpeg", 2, 1, 3, "jpeg"),
            Scenario("c1-png", 2, 1, 3, "png"),
            Scenario("c20-28steps", 3, 3, 3, throughput_format),
            Scenario("c20-50steps", 3, 3, 5, throughput_format),
        ),
    )


def run_scenario(
    scenario: Scenario,
    plan: Plan,
    base_url: str,
    api_key: str,
    dataset: str,
    env: dict[str, str],
    work: Path,
    timeout_s: float,
) -> dict[str, Any]:
    """Run ``fluxgate bench serving`` as a user would; its JSON document (summary and every request).

    Raises when it wrote none; a run with failed requests still returns its document (it says so).
    """
    output = work / f"{scenario.name}.json"
    command = [
        *(sys.executable, "-m", "shared.cli", "bench", "serving"),
        *("--base-url", base_url, "--api-key", api_key, "--model", plan.model["name"]),
        *("--dataset", dataset, "--request-timeout", str(int(max(timeout_s, 10)))),
        *scenario.serving_args(plan.size),
        *("--output-file", str(output), "--disable-progress"),
    ]
    with open(work / "logs" / f"bench-{scenario.name}.log", "wb") as log:
        subprocess.run(
            command, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s + 60
        )
    if not output.exists():
        raise RuntimeError(
            f"bench serving wrote no report for {scenario.name} (see logs/bench-{scenario.name}.log)"
        )
    document: dict[str, Any] = json.loads(output.read_text(encoding="utf-8"))
    return document
