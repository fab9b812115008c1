"""The end-to-end run's record: its report, written under ``--out`` after every step, and its clock."""

from __future__ import annotations

import argparse
import json
import re
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.e2e.report import format_headline, headline
from bench.e2e.scenarios import Scenario


class Run:
    """The report (``e2e.json``, rewritten after every step so a cut-off run keeps what it measured),
    the logs and the clock against ``--budget-s``."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.started = args, time.monotonic()
        self.out = Path(args.out)
        self.work = Path(args.work or tempfile.mkdtemp(prefix="fluxgate-e2e-"))
        self.logs = self.work / "logs"
        for folder in (self.out, self.logs):
            folder.mkdir(parents=True, exist_ok=True)
        self.documents: dict[str, dict[str, Any]] = {}
        self.report: dict[str, Any] = {"smoke": args.smoke, "timeline": {}, "scenarios": {}, "skipped": {}}

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def remaining(self) -> float:
        return self.args.budget_s - self.elapsed()

    def log(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {message}", flush=True)

    def mark(self, step: str) -> None:
        self.report["timeline"][step] = round(self.elapsed(), 1)
        self.log(step)

    def add_scenario(self, scenario: Scenario, document: dict[str, Any]) -> None:
        self.documents[scenario.name] = document
        self.report["scenarios"][scenario.name] = {"scenario": vars(scenario), **document}
        summary = document["summary"]
        self.log(
            f"{scenario.name}: {summary['completed']} ok, {summary['failed']} failed, "
            f"{summary['request_throughput']:.4f} req/s"
        )
        self.save()

    def skip(self, name: str, reason: str) -> None:
        self.report["skipped"][name] = reason
        self.log(f"skipped {name}: {reason}")

    def save(self) -> None:
        fp8 = re.search(r"--quantize[= ]fp8", self.args.worker_flags or "") is not None
        self.report["headline"] = headline(
            self.documents, self.report.get("encode"), self.report.get("stock"), fp8=fp8
        )
        self.report["timeline"]["saved"] = round(self.elapsed(), 1)
        (self.out / "e2e.json").write_text(json.dumps(self.report, indent=1) + "\n", encoding="utf-8")

    def finish(self) -> None:
        self.save()
        with tarfile.open(self.out / "e2e_logs.tar.gz", "w:gz") as archive:
            archive.add(self.logs, arcname="logs")
        print(format_headline(self.report["headline"]), flush=True)
        if self.args.smoke:
            print("(smoke run: tiny model on the CPU; the targets are the H100's and mean nothing here)")
