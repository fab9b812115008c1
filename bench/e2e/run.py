"""``python -m bench.e2e``: the whole stack on one GPU, end to end, in one call of the device machine.

    python3 -m bench.e2e --out $OUT --wheels .whl .whl-serve          # on the GPU machine
    .venv/bin/python -m bench.e2e --out /tmp/e2e --smoke              # here: tiny model, CPU, small sizes

Installs the carried wheels into a private folder, unpacks and starts Debian's redis-server, starts the
gateway (``fluxgate serve``), the GPU worker (``bench.gpu_worker``: FLUX.1-dev's architecture with
random weights through the production worker path) and the sweeper, creates an API key, waits for a
warm worker, then runs ``fluxgate bench serving`` for each scenario of ``bench.e2e.scenarios``. After
the stack stops it times PNG and JPEG encoding alone and runs stock diffusers on the same GPU. Writes
``e2e.json`` (every report, the stack overhead per request, the answers to the issue's targets) and
``e2e_logs.tar.gz`` under ``--out``; scenarios that would not fit ``--budget-s`` are skipped, saying so.
Standard library only until the wheels are installed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

from bench.e2e.record import Run
from bench.e2e.redis_debs import RedisServer, install_redis, redis_command
from bench.e2e.report import engine_bound
from bench.e2e.scenarios import Plan, gpu_plan, run_scenario, smoke_plan
from bench.e2e.stack import (
    REPO_ROOT,
    Stack,
    create_api_key,
    environment_checked,
    free_port,
    http_json,
    live_workers,
    python_path,
    redis_pings,
    service_env,
)

PROMPT_FILES = (
    REPO_ROOT / ".data" / "vbench_all_dimension.txt",
    REPO_ROOT.parent / "shared" / "data" / "vbench_all_dimension.txt",
)
STOCK_SCRIPT = REPO_ROOT / ".gpu" / "stock_diffusers_flux1_dev.py"
WORKER_TIMINGS = {
    "build_s": re.compile(r"built \S+ with random weights .* in ([\d.]+)s"),
    "warmup_s": re.compile(r"warmed .* in ([\d.]+)s"),
}


def install_wheels(folders: list[Path], site: Path, log: Path) -> None:
    """``pip install --no-index --no-deps --target`` every carried wheel (one version of each)."""
    wheels = sorted(path for folder in folders for path in folder.glob("*.whl"))
    names = [path.name.split("-")[0].lower().replace("_", "-") for path in wheels]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if not wheels or duplicated:
        raise SystemExit(
            f"wheels in {[str(f) for f in folders]}: {len(wheels)} found, duplicated: {duplicated}"
        )
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    command += ["--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)]
    with open(log, "wb") as output:
        subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, check=True, timeout=300)


def worker_command(args: argparse.Namespace, plan: Plan) -> list[str]:
    resolution = f"--warmup-resolutions={plan.size}x{plan.size}"
    device = ["--smoke", "--device", "cpu"] if args.smoke else ["--device", "cuda"]
    return ["-m", "bench.gpu_worker", *device, resolution, *shlex.split(args.worker_flags)]


def worker_timings(log: Path) -> dict[str, float]:
    """Build and warm-up seconds as the worker logged them."""
    text = log.read_text(errors="replace") if log.exists() else ""
    found = {name: pattern.search(text) for name, pattern in WORKER_TIMINGS.items()}
    return {name: float(match[1]) for name, match in found.items() if match}


def start_services(run: Run, stack: Stack, redis: RedisServer, ports: tuple[int, int], plan: Plan) -> str:
    """Redis, gateway, worker and sweeper up and one warm worker live; returns a new user's API key."""
    redis_port, gateway_port = ports
    base_url = f"http://127.0.0.1:{gateway_port}"
    (run.work / "redis").mkdir(exist_ok=True)
    command = redis_command(redis, redis_port, run.work / "redis", run.logs / "redis-server.log")
    stack.start("redis", command, env=redis.env())
    stack.wait(lambda: redis_pings(redis_port), 20, "redis-server")
    stack.python("gateway", "-m", "shared.cli", "serve", "--port", str(gateway_port))
    stack.python("worker", *worker_command(run.args, plan))
    stack.python("sweeper", "-m", "shared.cli", "sweeper")
    stack.wait(lambda: http_json(f"{base_url}/readyz")[0] == 200, 60, "the gateway to be ready")
    api_key = create_api_key(stack.env, owner="e2e-bench")
    run.mark("gateway ready")
    model = plan.model["name"]
    stack.wait(
        lambda: live_workers(base_url, api_key, model) >= 1, run.args.worker_timeout_s, "a warm worker"
    )
    run.report["worker"] = worker_timings(run.logs / "worker.log")
    run.mark("worker ready")
    return api_key


def image_step_s(document: dict[str, Any], steps: int) -> float | None:
    """One image's share of a step as a scenario ran it (each batch's time split over its jobs), to size
    the next scenarios; an over-estimate: text encoding and decoding are in it."""
    bound, _ = engine_bound(document)
    return 1 / bound / steps if bound else None


def run_scenarios(run: Run, stack: Stack, plan: Plan, base_url: str, api_key: str, dataset: str) -> None:
    """The warm-up request, then every scenario that fits the budget (the stock run's reserve kept)."""
    reserve = run.args.stock_reserve_s if run.args.stock else 0.0
    run_scenario(plan.warmup, plan, base_url, api_key, dataset, stack.env, run.work, run.remaining())
    run.mark("warm-up request done")
    step_s: float | None = None
    for scenario in plan.scenarios:
        if run.args.only and scenario.name not in run.args.only:
            continue
        left = run.remaining() - reserve
        estimate = scenario.prompts * scenario.steps * step_s + 10 if step_s else None
        if estimate is not None and estimate > left:
            run.skip(scenario.name, f"needs about {estimate:.0f} s, {left:.0f} s left in the budget")
            continue
        stack.check_alive()
        timeout = max(left, 30)
        document = run_scenario(scenario, plan, base_url, api_key, dataset, stack.env, run.work, timeout)
        run.add_scenario(scenario, document)
        if step_s is None:
            step_s = image_step_s(document, scenario.steps)


def measure(run: Run, env: dict[str, str], plan: Plan, dataset: str) -> None:
    """Start the deployment, run the scenarios; the processes are stopped whatever happens."""
    redis = install_redis(Path(run.args.debs), run.work / "redis-prefix")
    run.report["redis"] = {"version": redis.version(), "substituted_libraries": redis.substituted}
    ports = free_port(), free_port()
    stack = Stack(service_env(env, *ports, run.work / "data", plan.model), run.logs)
    try:
        api_key = start_services(run, stack, redis, ports, plan)
        run_scenarios(run, stack, plan, f"http://127.0.0.1:{ports[1]}", api_key, dataset)
    finally:
        stack.stop()
        run.mark("stack stopped")


def encode_probe(run: Run, env: dict[str, str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.e2e.encode_probe", "--size", "1024"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    run.report["encode"] = json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr[-2000:]}
    run.mark("encode probe done")


def stock_diffusers(run: Run, env: dict[str, str], script: Path) -> None:
    """Stock diffusers on the same GPU, after the stack has given it back (``../shared/gpu``'s script)."""
    if run.remaining() < 60:
        run.skip("stock", f"{run.remaining():.0f} s left in the budget")
        return
    out = run.work / "stock"
    out.mkdir(exist_ok=True)
    with open(run.logs / "stock.log", "wb") as log:
        done = subprocess.run(
            [sys.executable, script.name],
            env={**env, "OUT": str(out)},
            cwd=script.parent,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=max(run.remaining(), 60),
        )
    baseline = out / "baseline.json"
    run.report["stock"] = (
        json.loads(baseline.read_text())
        if baseline.exists()
        else {"error": f"exit {done.returncode}, see logs/stock.log"}
    )
    run.mark("stock diffusers done")


def default_dataset() -> str:
    return next((str(path) for path in PROMPT_FILES if path.is_file()), "random")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.e2e", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add(
        "--out",
        default=os.environ.get("OUT", "e2e-out"),
        help="where e2e.json and the logs go (default: $OUT)",
    )
    add("--smoke", action="store_true", help="tiny model on the CPU, 64x64, a few prompts: checks the kit")
    add(
        "--wheels",
        nargs="*",
        type=Path,
        default=[],
        help="folders of wheels to install first (the device has none)",
    )
    add("--site", type=Path, default=Path("/tmp/site"), help="where the wheels are installed")
    add("--debs", default=str(REPO_ROOT / ".debs"), help="the redis-server .debs (bench/e2e/fetch.sh)")
    add("--work", help="scratch folder (default: a new temporary one)")
    add(
        "--dataset", default=default_dataset(), help="prompt file, vbench or random (default: carried vbench)"
    )
    add("--worker-flags", default=None, help="fluxgate worker flags (default: --compile on the GPU)")
    add(
        "--throughput-format", choices=["jpeg", "png", "webp"], default="jpeg", help="output of the c=20 runs"
    )
    add("--only", type=lambda text: set(text.split(",")), default=None, help="comma list of scenario names")
    add(
        "--stock",
        type=Path,
        default=None,
        help=f"stock diffusers script (default: {STOCK_SCRIPT.name} in .gpu/)",
    )
    add("--no-stock", action="store_true", help="skip stock diffusers (always skipped with --smoke)")
    add("--budget-s", type=float, default=540, help="skip what would not finish within this many seconds")
    add("--stock-reserve-s", type=float, default=100, help="seconds kept for the stock run")
    add(
        "--worker-timeout-s",
        type=float,
        default=600,
        help="start-up allowance of the worker (build, compile)",
    )
    args = parser.parse_args(argv)
    if args.worker_flags is None:
        args.worker_flags = "" if args.smoke else "--compile"
    if args.no_stock or args.smoke:
        args.stock = None
    elif args.stock is None and STOCK_SCRIPT.is_file():
        args.stock = STOCK_SCRIPT
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A call stopped at its time limit gets SIGTERM: still stop the stack and write what was measured.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    run = Run(args)
    plan = smoke_plan(args.throughput_format) if args.smoke else gpu_plan(args.throughput_format)
    run.report["config"] = {key: str(value) for key, value in vars(args).items()}
    failed = True
    try:
        if args.wheels:
            install_wheels(args.wheels, args.site, run.logs / "pip.log")
            run.mark("wheels installed")
        env = {
            **os.environ,
            "PYTHONPATH": python_path(args.site if args.wheels else None),
            "PYTHONUNBUFFERED": "1",
        }
        run.report["environment"] = environment_checked(env)
        measure(run, env, plan, args.dataset)
        encode_probe(run, env)
        if args.stock:
            stock_diffusers(run, env, Path(args.stock).resolve())
        failed = any(doc["summary"]["failed"] for doc in run.documents.values())
    except BaseException as error:
        run.report["error"] = f"{type(error).__name__}: {error}"
        run.log(traceback.format_exc())
        if not isinstance(error, Exception):
            raise
    finally:
        run.finish()
    return 1 if failed else 0
