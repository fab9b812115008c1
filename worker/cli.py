"""``fluxgate worker``: load one pipeline, warm it, then consume its model's queue."""

from __future__ import annotations

import argparse
import logging
import secrets
import socket
from typing import Any

from shared.jobstore import JobStore
from shared.queue import create_celery
from shared.redis_client import connect
from shared.settings import Settings, load_settings
from shared.signing import file_signing_secret
from shared.storage import open_storage
from worker.options import EngineOptions

log = logging.getLogger("fluxgate.worker")


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-path", help="hub id or local directory (default: the configured model's path)"
    )
    parser.add_argument("--model-name", help="configured model to serve (default: the first configured)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"])
    parser.add_argument("--no-warmup", dest="warmup", action="store_false", default=None)


def engine_options(args: argparse.Namespace) -> EngineOptions:
    """Flags override ``FLUXGATE_`` environment settings."""
    overrides = {
        name: getattr(args, name)
        for name in ("model_path", "model_name", "device", "dtype", "warmup")
        if getattr(args, name, None) is not None
    }
    return EngineOptions(**overrides)


def run_worker(args: argparse.Namespace, settings: Settings | None = None) -> int:
    """Start a GPU worker; returns the exit code."""
    from worker.capabilities import check_capabilities
    from worker.engine import FluxEngine
    from worker.heartbeat import Heartbeat
    from worker.runner import WorkerRuntime
    from worker.tasks import register_generate_task

    settings = settings or load_settings()
    options = engine_options(args)
    model = settings.model(options.model_name) if options.model_name else settings.models[0]
    if model is None:
        names = ", ".join(m.name for m in settings.models)
        raise SystemExit(f"--model-name {options.model_name!r} is not a configured model ({names})")
    engine = FluxEngine.load(options.model_path or model.path, options)
    check_capabilities(engine.pipeline_class, model.name, model.capabilities)
    if options.warmup:
        engine.warmup()
    client = connect(settings.redis_url)
    storage = open_storage(
        settings.storage_url,
        settings.public_base_url,
        file_signing_secret(settings.file_signing_key, client),
        settings.s3_endpoint_url,
    )
    worker_id = f"{model.name}-{socket.gethostname()}-{secrets.token_hex(4)}"
    info: dict[str, Any] = {
        "model": model.name,
        "pipeline": engine.pipeline_class,
        "device": str(engine.device),
    }
    heartbeat = Heartbeat(
        client, worker_id, info, settings.heartbeat_interval_s, settings.heartbeat_timeout_s
    )
    runtime = WorkerRuntime(JobStore(client), storage, engine, worker_id, settings.max_attempts, heartbeat)
    app = create_celery(settings)
    register_generate_task(app, runtime)
    heartbeat.start()
    log.info("worker %s serving %s on queue %s", worker_id, model.name, model.queue)
    try:
        # Solo pool: the pipeline lives in this process; CUDA is never initialised before a fork.
        app.worker_main(
            [
                "worker",
                "--pool",
                "solo",
                "--queues",
                model.queue,
                "--concurrency",
                "1",
                "--prefetch-multiplier",
                "1",
                "--hostname",
                f"{worker_id}@%h",
                "--without-gossip",
                "--without-mingle",
                "--loglevel",
                "INFO",
            ]
        )
    finally:
        heartbeat.stop()
    return 0
