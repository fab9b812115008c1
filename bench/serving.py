"""Serving benchmark: drive a running Fluxgate deployment over HTTP and report latency and throughput.

    fluxgate bench serving --base-url http://127.0.0.1:8000 --api-key fg-local-admin \\
        --dataset vbench --num-prompts 50 --max-concurrency 4 --request-rate inf --output-file out.json

Mirrors SGLang-diffusion's ``bench_serving``: prompts from a dataset, Poisson arrivals at
``--request-rate`` bounded by ``--max-concurrency``, one image per request through the native jobs
API (``--backend jobs``: submit with ``Prefer: wait``, then follow the job's events) or the OpenAI
Images route (``--backend openai``). Latency is measured by the client; queue wait, inference, upload
and peak memory come from each job's ``metrics`` as the workers reported them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

from bench.serving_report import RequestRecord, Summary, format_table, summarize

REPO_ROOT = Path(__file__).resolve().parents[1]
VBENCH_PATH = REPO_ROOT.parent / "shared" / "data" / "vbench_all_dimension.txt"
TERMINAL = frozenset({"succeeded", "failed", "canceled"})
TERMINAL_EVENTS = frozenset(f"job.{status}" for status in TERMINAL)
MAX_PREFER_WAIT_S = 60
_SUBJECTS = ["a lighthouse", "a red fox", "an old tram", "a glass teapot", "a mountain village", "a robot"]
_PLACES = ["at dusk", "in the snow", "under neon lights", "on a foggy morning", "in a sunflower field"]
_STYLES = ["oil painting", "35mm photograph", "watercolor", "isometric render", "charcoal sketch"]


class RequestFailed(Exception):
    """An HTTP answer that ends the request: its status and the error code of its body."""

    def __init__(self, http_status: int, code: str, message: str, job_id: str | None = None) -> None:
        super().__init__(message)
        self.http_status, self.code, self.job_id = http_status, code, job_id


def random_prompts(count: int, seed: int) -> list[str]:
    """``count`` generated prompts, the same for the same seed."""
    rng = random.Random(seed)
    return [f"{rng.choice(_SUBJECTS)} {rng.choice(_PLACES)}, {rng.choice(_STYLES)}" for _ in range(count)]


def read_prompt_file(path: Path) -> list[str]:
    """One prompt a line; blank lines are skipped."""
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [prompt for prompt in prompts if prompt]


def load_prompts(dataset: str, num_prompts: int, seed: int = 0, vbench_path: Path = VBENCH_PATH) -> list[str]:
    """``num_prompts`` prompts from ``vbench``, ``random`` or a file, cycling through a short file."""
    if dataset == "random":
        return random_prompts(num_prompts, seed)
    if dataset == "vbench":
        if not vbench_path.is_file():
            raise SystemExit(f"the vbench prompts are not at {vbench_path}: pass --dataset <path> instead")
        path = vbench_path
    else:
        path = Path(dataset)
        if not path.is_file():
            raise SystemExit(f"no prompt file at {path} (--dataset takes vbench, random or a path)")
    prompts = read_prompt_file(path)
    if not prompts:
        raise SystemExit(f"{path} holds no prompts")
    return [prompts[i % len(prompts)] for i in range(num_prompts)]


def inter_arrival_times(count: int, rate: float, seed: int = 0) -> list[float]:
    """Poisson arrivals: exponential gaps with mean ``1/rate`` seconds; all zero when rate is inf."""
    if math.isinf(rate):
        return [0.0] * count
    if rate <= 0:
        raise ValueError("the request rate must be positive (or inf)")
    rng = random.Random(seed)
    return [rng.expovariate(rate) for _ in range(count)]


def _error_of(response: httpx.Response) -> RequestFailed:
    """The failure an error response stands for (code from its OpenAI-style body)."""
    try:
        error = response.json().get("error") or {}
    except ValueError:
        error = {}
    code = error.get("code") or f"http_{response.status_code}"
    message = error.get("message") or response.text[:200]
    return RequestFailed(response.status_code, code, message, response.headers.get("X-Fluxgate-Job-Id"))


def _apply_job(record: RequestRecord, job: dict[str, Any]) -> None:
    """Copy a job object's status, error and metrics into the record."""
    record.job_id = job.get("id", record.job_id)
    record.status = job.get("status", record.status)
    record.success = record.status == "succeeded"
    error = job.get("error") or {}
    if not record.success:
        record.error_code = error.get("code") or record.status
        record.error_message = error.get("message")
    metrics = job.get("metrics") or {}
    for name in ("queue_s", "inference_s", "upload_s", "peak_memory_mb", "batch_size"):
        setattr(record, name, metrics.get(name))


async def _get_job(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    response = await client.get(f"/v1/jobs/{job_id}")
    if response.status_code != 200:
        raise _error_of(response)
    job: dict[str, Any] = response.json()
    return job


def _model(args: argparse.Namespace) -> dict[str, str]:
    """The ``model`` field when one was named (else the gateway's default model)."""
    return {"model": args.model} if args.model else {}


async def jobs_request(
    client: httpx.AsyncClient, args: argparse.Namespace, prompt: str, index: int
) -> dict[str, Any]:
    """Submit on ``/v1/jobs`` with ``Prefer: wait``; a job still going after the wait is followed on its
    event stream to its terminal event, then read. Polling instead would add up to a poll interval to
    each such latency (0.1 s on the run's last job: 0.1% of a 125 s run)."""
    body = {
        "prompt": prompt,
        "width": args.width,
        "height": args.height,
        "num_inference_steps": args.steps,
        "seed": args.seed + index,
        "output_format": args.output_format,
    } | _model(args)
    wait = min(args.prefer_wait, int(args.request_timeout))
    headers = {"Prefer": f"wait={wait}"} if wait > 0 else {}
    response = await client.post("/v1/jobs", json=body, headers=headers)
    if response.status_code not in (200, 202):
        raise _error_of(response)
    job: dict[str, Any] = response.json()
    while job["status"] not in TERMINAL:
        ended = await _follow_events(client, job["id"])
        if not ended:  # the stream closed before the terminal event: read the job, then follow again
            await asyncio.sleep(args.poll_interval)
        job = await _get_job(client, job["id"])
    return job


async def _follow_events(client: httpx.AsyncClient, job_id: str) -> bool:
    """Read the job's Server-Sent Events until its terminal one; whether it came."""
    async with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        if response.status_code != 200:
            await response.aread()
            raise _error_of(response)
        async for line in response.aiter_lines():
            if line.startswith("event:") and line.removeprefix("event:").strip() in TERMINAL_EVENTS:
                return True
    return False


async def openai_request(
    client: httpx.AsyncClient, args: argparse.Namespace, prompt: str, index: int
) -> tuple[dict[str, Any], float]:
    """One image on ``/v1/images/generations``; the job (for metrics) is fetched after the clock stops."""
    body = {
        "prompt": prompt,
        "size": f"{args.width}x{args.height}",
        "n": 1,
        "response_format": "url",
        "output_format": args.output_format,
        "num_inference_steps": args.steps,
        "seed": args.seed + index,
    } | _model(args)
    started = time.perf_counter()
    response = await client.post("/v1/images/generations", json=body)
    latency = time.perf_counter() - started
    if response.status_code != 200:
        raise _error_of(response)
    job_id = response.headers.get("X-Fluxgate-Job-Id")
    job = await _get_job(client, job_id) if job_id else {"status": "succeeded"}
    return job, latency


async def run_request(
    client: httpx.AsyncClient, args: argparse.Namespace, prompt: str, index: int, t0: float
) -> RequestRecord:
    """Run one request under ``--request-timeout``; every outcome becomes a record, never an exception."""
    record = RequestRecord(index=index, prompt=prompt, start_s=time.perf_counter() - t0)
    started = time.perf_counter()
    try:
        if args.backend == "openai":
            job, latency = await asyncio.wait_for(
                openai_request(client, args, prompt, index), args.request_timeout
            )
        else:
            job = await asyncio.wait_for(jobs_request(client, args, prompt, index), args.request_timeout)
            latency = time.perf_counter() - started
        _apply_job(record, job)
        record.latency_s = latency
    except RequestFailed as error:
        record.status, record.error_code, record.error_message = "error", error.code, str(error)
        record.http_status, record.job_id = error.http_status, error.job_id
    except TimeoutError:
        record.status, record.error_code = "error", "client_timeout"
        record.error_message = f"no terminal status within {args.request_timeout} s"
    except httpx.HTTPError as error:
        record.status, record.error_code = "error", "transport_error"
        record.error_message = f"{type(error).__name__}: {error}"
    if not record.success:
        record.latency_s = time.perf_counter() - started
    return record


class Progress:
    """A progress bar on stderr: tqdm when installed, else a counter line."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.done, self.enabled, self._bar = total, 0, enabled, None
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, file=sys.stderr, unit="req")
            except ImportError:
                pass

    def update(self) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.update(1)
        elif self.enabled:
            print(f"\r{self.done}/{self.total} requests", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            print(file=sys.stderr)


async def run_benchmark(
    args: argparse.Namespace, prompts: list[str], transport: httpx.AsyncBaseTransport | None = None
) -> tuple[list[RequestRecord], float]:
    """Send every prompt on the Poisson schedule, at most ``--max-concurrency`` in flight."""
    gaps = inter_arrival_times(len(prompts), args.request_rate, args.seed)
    limit = asyncio.Semaphore(args.max_concurrency)
    progress = Progress(len(prompts), enabled=not args.disable_progress)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = httpx.Timeout(args.request_timeout + 5, connect=10)
    limits = httpx.Limits(max_connections=args.max_concurrency + 4)
    async with httpx.AsyncClient(
        base_url=args.base_url, headers=headers, timeout=timeout, limits=limits, transport=transport
    ) as client:

        async def one(index: int, prompt: str) -> RequestRecord:
            async with limit:
                record = await run_request(client, args, prompt, index, t0)
            progress.update()
            return record

        t0 = time.perf_counter()
        tasks = []
        for index, (prompt, gap) in enumerate(zip(prompts, gaps, strict=True)):
            if gap > 0:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(one(index, prompt)))
        records = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    progress.close()
    return list(records), duration


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line of ``fluxgate bench serving``."""
    parser = argparse.ArgumentParser(prog="fluxgate bench serving", description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--base-url", default="http://127.0.0.1:8000")
    add("--api-key", default=os.environ.get("FLUXGATE_API_KEY"), help="default: $FLUXGATE_API_KEY")
    add("--backend", choices=["jobs", "openai"], default="jobs")
    add("--model", default=None, help="default: the deployment's first model")
    add("--dataset", default="vbench", help=f"vbench ({VBENCH_PATH}), random, or a file of prompts")
    add("--num-prompts", type=int, default=50)
    add("--max-concurrency", type=int, default=1)
    add("--request-rate", type=float, default=math.inf, help="Poisson arrivals, req/s (default inf)")
    add("--width", type=int, default=1024)
    add("--height", type=int, default=1024)
    add("--steps", type=int, default=28, help="num_inference_steps")
    add("--output-format", choices=["png", "jpeg", "webp"], default="png")
    add("--seed", type=int, default=0, help="schedule, random prompts and image seeds (seed + index)")
    add("--request-timeout", type=float, default=600.0, help="seconds per request, end to end")
    add(
        "--prefer-wait",
        type=int,
        default=MAX_PREFER_WAIT_S,
        help=f"Prefer: wait=N on each submission, 0 to {MAX_PREFER_WAIT_S} (0: none, every job followed on "
        "its events)",
    )
    add(
        "--poll-interval",
        type=float,
        default=0.1,
        help="seconds before reading a job again when its event stream closed early",
    )
    add("--output-file", type=Path, default=None, help="write the summary and every request as JSON")
    add("--disable-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.num_prompts < 1 or args.max_concurrency < 1:
        parser.error("--num-prompts and --max-concurrency must be at least 1")
    if not args.request_rate > 0:
        parser.error("--request-rate must be positive (or inf)")
    if not 0 <= args.prefer_wait <= MAX_PREFER_WAIT_S:
        parser.error(f"--prefer-wait must be 0 to {MAX_PREFER_WAIT_S} seconds")
    return args


def write_output(path: Path, summary: Summary, records: list[RequestRecord]) -> None:
    """The summary and every request record as one JSON document."""
    document = {"summary": asdict(summary), "requests": [asdict(record) for record in records]}
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when every request succeeded, 1 otherwise."""
    args = parse_args(argv)
    for name in ("httpx", "httpcore"):  # ``fluxgate`` logs at INFO: one line a request would drown the bar
        logging.getLogger(name).setLevel(logging.WARNING)
    prompts = load_prompts(args.dataset, args.num_prompts, args.seed)
    records, duration = asyncio.run(run_benchmark(args, prompts))
    summary = summarize(records, duration, vars(args))
    print(format_table(summary))
    if args.output_file is not None:
        write_output(args.output_file, summary, records)
    return 0 if summary.failed == 0 else 1
