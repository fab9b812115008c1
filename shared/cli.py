"""The ``fluxgate`` command: gateway, worker, tiny models and API keys.

Worker commands import ``worker`` lazily, so the gateway's install (no torch) runs the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from shared.keys import KeyStore
from shared.redis_client import connect
from shared.settings import load_settings


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from api.app import create_app

    settings = load_settings()
    port = args.port or int(os.environ.get("PORT", "8000"))
    # log_config=None keeps the root logger's formatter (JSON when FLUXGATE_LOG_FORMAT=json) for uvicorn too.
    extra: dict[str, Any] = {"log_config": None} if settings.log_format == "json" else {}
    options = {"host": args.host, "port": port, "log_level": "info", "access_log": False, **extra}
    if args.workers > 1:  # separate processes, each building the app from the same environment
        uvicorn.run("api.app:create_app", factory=True, workers=args.workers, **options)
    else:
        uvicorn.run(create_app(settings), **options)
    return 0


def _worker(args: argparse.Namespace) -> int:
    try:
        from worker.cli import run_worker
    except ImportError as error:  # the gateway image has no torch
        raise SystemExit(
            f"the worker needs the 'worker' extra (pip install 'fluxgate[worker]'): {error}"
        ) from error
    return run_worker(args)


def _sweeper(args: argparse.Namespace) -> int:
    import signal
    import threading

    from shared.jobstore import JobStore
    from shared.queue import create_celery
    from shared.redis_client import connect
    from shared.sweeper import run_sweeper

    settings = load_settings()
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    from shared.signing import file_signing_secret
    from shared.storage import open_storage

    client = connect(settings.redis_url)
    secret = file_signing_secret(settings.file_signing_key, client)
    storage = open_storage(settings.storage_url, settings.public_base_url, secret, settings.s3_endpoint_url)
    run_sweeper(JobStore(client), storage, create_celery(settings), settings, args.interval, stop)
    return 0


def _make_tiny_model(args: argparse.Namespace) -> int:
    from worker.tiny_model import save_tiny_model

    path = save_tiny_model(args.directory, kind=args.kind, seed=args.seed)
    print(path)
    return 0


def _key_store() -> KeyStore:
    return KeyStore(connect(load_settings().redis_url))


def _keys_list(args: argparse.Namespace) -> int:
    for key in _key_store().all_keys():
        print(json.dumps(key))
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    if not _key_store().revoke(args.key_id):
        print(f"no key {args.key_id!r}", file=sys.stderr)
        return 1
    print(f"revoked {args.key_id}")
    return 0


def _keys_create(args: argparse.Namespace) -> int:
    print(_key_store().create(args.owner, args.role))
    return 0


def _webhooks(args: argparse.Namespace) -> int:
    """The webhook process: the data of a delivery is the job object the gateway serves."""
    from api.presenters import job_public
    from api.services import Services
    from worker.webhooks import run_webhook_service  # torch-free

    settings = load_settings()
    services = Services(settings)
    return run_webhook_service(
        settings, lambda record: job_public(record, services).model_dump(mode="json"), args.concurrency
    )


def _bench_serving(args: argparse.Namespace) -> int:
    """``fluxgate bench serving ARGS``: the serving benchmark, with every further argument its own."""
    from bench.serving import main as serving_main

    return serving_main(args.forwarded)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fluxgate", description="FLUX image generation as a job-queue API")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP gateway")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=None, help="default: $PORT or 8000")
    serve.add_argument("--workers", type=int, default=1, help="gateway processes (e.g. one per core)")
    serve.set_defaults(handler=_serve)

    worker = commands.add_parser("worker", help="run a GPU worker for one model")
    from worker.cli import add_worker_arguments  # torch-free: the engine is imported only when it runs

    add_worker_arguments(worker)
    worker.set_defaults(handler=_worker)

    sweeper = commands.add_parser(
        "sweeper", help="run the periodic sweeper (deadlines, lost workers, retention)"
    )
    sweeper.add_argument("--interval", type=float, default=1.0, help="seconds between passes")
    sweeper.set_defaults(handler=_sweeper)

    tiny = commands.add_parser("make-tiny-model", help="build a tiny random-weight FLUX pipeline in DIR")
    tiny.add_argument("directory")
    from worker.tiny_model import TINY_KINDS  # imports torch lazily, only when a model is built

    tiny.add_argument("--kind", default="flux1", choices=TINY_KINDS)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(handler=_make_tiny_model)

    webhooks = commands.add_parser(
        "webhooks", help="deliver webhooks (outbox dispatcher + CPU delivery worker)"
    )
    webhooks.add_argument(
        "--concurrency", type=int, default=None, help="delivery threads (default: settings)"
    )
    webhooks.set_defaults(handler=_webhooks)

    keys = commands.add_parser("keys", help="manage API keys").add_subparsers(
        dest="keys_command", required=True
    )
    create = keys.add_parser("create", help="create a key and print it once")
    create.add_argument("--owner", required=True)
    create.add_argument("--role", choices=["user", "admin"], default="user")
    create.set_defaults(handler=_keys_create)
    keys.add_parser("list", help="list keys (ids, owners, roles; never the keys)").set_defaults(
        handler=_keys_list
    )
    revoke = keys.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")
    revoke.set_defaults(handler=_keys_revoke)

    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(
        dest="bench_command", required=True
    )
    serving = bench.add_parser(
        "serving", add_help=False, help="drive a deployment over HTTP (--help: its flags)"
    )
    serving.set_defaults(handler=_bench_serving, forwards=True)
    return parser


def _configure_logging() -> None:
    """Text or JSON lines per ``FLUXGATE_LOG_FORMAT``; text when the settings are invalid (the command
    that needs them reports why)."""
    from pydantic import ValidationError

    from shared.logging import configure_logging

    try:
        log_format = load_settings().log_format
    except ValidationError:
        log_format = "text"
    configure_logging(json=log_format == "json")


def main(argv: list[str] | None = None) -> int:
    _configure_logging()
    parser = build_parser()
    args, forwarded = parser.parse_known_args(argv)  # only a forwarding command takes unknown ones
    if forwarded and not getattr(args, "forwards", False):
        parser.error(f"unrecognized arguments: {' '.join(forwarded)}")
    args.forwarded = forwarded
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
