"""``fluxgate worker``: load one pipeline, warm it, then consume its model's queue."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from shared.queue import create_celery
from shared.redis_client import connect
from shared.settings import ModelConfig, Settings, load_settings
from shared.signing import file_signing_secret
from shared.storage import open_storage
from worker.endings import Endings
from worker.options import EngineOptions

if TYPE_CHECKING:  # the metrics module is imported when a worker runs, like the rest of its runtime
    from worker.metrics import WorkerMetrics

log = logging.getLogger("fluxgate.worker")
ENDING_THREADS = 4  # a one-job worker still overlaps the previous jobs' uploads with the next


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """The worker's flags (mirroring ``sglang serve``); unset flags fall back to ``FLUXGATE_`` settings."""
    add = parser.add_argument
    add("--model-path", help="hub id or local directory (default: the configured model's path)")
    add("--model-name", help="configured model to serve (default: the first configured)")
    add("--device", choices=["auto", "cpu", "cuda"])
    add("--dtype", choices=["auto", "bfloat16", "float16", "float32"])
    add("--no-warmup", dest="warmup", action="store_false", default=None, help="skip warm-up generations")
    add("--warmup-resolutions", help="comma list of WIDTHxHEIGHT compiled and warmed at start")
    add("--vae-path", help="custom VAE or tiny autoencoder (hub id or directory), e.g. madebyollin/taef1")
    add(
        "--vae-trust-remote-code",
        action="store_true",
        default=None,
        help="allow a VAE's own code (FLUX.2 tiny AE)",
    )
    add("--vae-tiling", action="store_true", default=None, help="decode in tiles (bounded memory)")
    add("--dit-cpu-offload", action="store_true", default=None, help="stream the transformer from CPU")
    add("--text-encoder-cpu-offload", action="store_true", default=None, help="stream text encoders from CPU")
    add("--vae-cpu-offload", action="store_true", default=None, help="stream the VAE from CPU")
    add("--pin-cpu-memory", action="store_true", default=None, help="pin offloaded weights (faster copies)")
    add("--gpu-memory-budget-gb", type=float, help="keep resident what fits this budget, stream the rest")
    add("--offload-blocks-per-group", type=int, help="transformer blocks streamed together (default 2)")
    add("--attention-backend", help="diffusers attention backend, e.g. native, _native_cudnn, flash, sage")
    add("--compile", action="store_true", default=None, help="regionally compile the transformer blocks")
    add("--compile-mode", help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    add(
        "--no-gemm-epilogues",
        dest="gemm_epilogues",
        action="store_false",
        default=None,
        help="with --compile, keep FLUX.1's MLP GELUs out of the GEMMs' epilogues (diffusers' own forward)",
    )
    add(
        "--no-fused-qk-norm-rope",
        dest="fused_qk_norm_rope",
        action="store_false",
        default=None,
        help="with --compile, keep diffusers' query/key norm and rotary embedding (not the fused kernel, "
        "which runs on one GPU and in Ulysses groups on diffusers' runtime)",
    )
    add(
        "--no-fa4-attention",
        dest="fa4_attention",
        action="store_false",
        default=None,
        help="with --compile, attend through SDPA's cuDNN kernel, not FlashAttention-4's (used where "
        "flash-attn-4 is installed and the GPU is a Hopper)",
    )
    add(
        "--no-fa4-waves",
        dest="fa4_waves",
        action="store_false",
        default=None,
        help="attend through FlashAttention-4 in one call, not split so that its tiles fill the last wave "
        "of the GPU's SMs",
    )
    add(
        "--no-fused-qkv",
        dest="fused_qkv",
        action="store_false",
        default=None,
        help="with --compile on one GPU, project the attention's query, key and value with three GEMMs per "
        "stream, not one over their weights' shared buffer",
    )
    add(
        "--quack-gating",
        action="store_true",
        default=None,
        help="with --compile on one Hopper GPU, gate the double blocks' feed-forward inside its output GEMM "
        "(quack's epilogue; needs the fa4-attention extra; the default)",
    )
    add(
        "--no-quack-gating",
        dest="quack_gating",
        action="store_false",
        default=None,
        help="gate the double blocks' feed-forward in a kernel of its own after cuBLAS's GEMM",
    )
    add(
        "--quack-qk",
        action="store_true",
        default=None,
        help="with --compile on one Hopper GPU, norm and rotate the attention's query and key inside their "
        "projection GEMMs (quack's epilogue; needs the fa4-attention extra)",
    )
    add(
        "--quack-gelu",
        action="store_true",
        default=None,
        help="with --compile on one Hopper GPU, run the feed-forwards' GELU in quack's GEMM epilogue instead "
        "of cuBLAS's (needs the fa4-attention extra; the default)",
    )
    add(
        "--no-quack-gelu",
        dest="quack_gelu",
        action="store_false",
        default=None,
        help="run the feed-forwards' GELU in cuBLAS's GEMM epilogue",
    )
    add(
        "--no-image-rows-last",
        dest="image_rows_last",
        action="store_false",
        default=None,
        help="compute the last single block's text rows too, which the model discards",
    )
    add(
        "--no-deferred-gating",
        dest="deferred_gating",
        action="store_false",
        default=None,
        help="gate each single block's output in its own kernel, not in the next block's norm kernel",
    )
    add(
        "--no-vae-group-stats",
        dest="vae_group_stats",
        action="store_false",
        default=None,
        help="the compiled VAE decoder's GroupNorm statistics from inductor's reduction, not the kernel",
    )
    add(
        "--no-vae-gemm-attention",
        dest="vae_gemm_attention",
        action="store_false",
        default=None,
        help="the compiled VAE decoder's attention on SDPA's kernel, not two GEMMs around a softmax",
    )
    add(
        "--no-compile-vae",
        dest="compile_vae",
        action="store_false",
        default=None,
        help="with --compile, keep the VAE's decoder eager",
    )
    add(
        "--no-cuda-graphs",
        dest="cuda_graphs",
        action="store_false",
        default=None,
        help="with --compile, launch the transformer's kernels one by one (no CUDA graph replay)",
    )
    add(
        "--no-precompute-modulation",
        dest="precompute_modulation",
        action="store_false",
        default=None,
        help="project FLUX.1's adaLN modulation at every step instead of once per job for all steps",
    )
    add(
        "--one-pass-rows",
        type=int,
        help="with --compile, inductor reduces rows of up to this many elements in one pass "
        "(default 4096; 0: inductor's 1,024)",
    )
    add("--compile-cache-dir", help="persistent torch compile cache (survives restarts)")
    add("--quantize", choices=["none", "fp8"], help="fp8 transformer blocks (GPU compute capability >= 8.9)")
    add(
        "--attention-fp8",
        action="store_true",
        default=None,
        help="with --compile, FLUX.1's attention in fp8 through cuDNN (lossy; H100 or newer, one GPU)",
    )
    add("--num-gpus", type=int, help="GPUs of this worker group, one process each (default 1)")
    add("--sp-degree", type=int, help="sequence-parallel degree, ulysses x ring (default: --num-gpus)")
    add("--ulysses-degree", type=int, help="Ulysses (all-to-all attention) degree")
    add("--ring-degree", type=int, help="Ring attention degree")
    add("--tp-size", type=int, help="tensor-parallel degree of the text encoder within the group")
    add("--dit-tp-size", type=int, help="shard the transformer over the whole group (no Ulysses/Ring)")
    add(
        "--sp-runtime",
        choices=["auto", "cache-dit", "diffusers"],
        help="a group's sequence parallelism: cache-dit's (runs Cache-DiT presets) or diffusers'; auto "
        "(default): diffusers', cache-dit's where a cache-dit feature is asked for (presets, async Ulysses, "
        "split decode)",
    )
    add(
        "--ulysses-async",
        action="store_true",
        default=None,
        help="overlap Ulysses' all-to-all with the attention projections (cache-dit)",
    )
    add("--parallel-vae", action="store_true", default=None, help="split the VAE decode over the group")
    add(
        "--no-symmetric-exchange",
        dest="symmetric_exchange",
        action="store_false",
        default=None,
        help="Ulysses' exchanges through NCCL's all-to-all, not symmetric memory (where containers cannot "
        "map a peer GPU's memory)",
    )
    add("--group-timeout-s", type=float, help="how long a group collective may wait for a peer (default 300)")
    add(
        "--max-batch-size",
        type=int,
        help="run up to N compatible queued jobs in one pipeline call (default 1: off; one GPU only)",
    )


def engine_options(args: argparse.Namespace) -> EngineOptions:
    """Flags override ``FLUXGATE_`` environment settings; bad values and combinations raise, naming them."""
    fields = EngineOptions.model_fields
    overrides = {name: value for name, value in vars(args).items() if name in fields and value is not None}
    try:
        return EngineOptions(**overrides)
    except ValidationError as error:
        problems = "; ".join(_describe(issue) for issue in error.errors())
        raise SystemExit(f"invalid worker options: {problems}") from None


def _describe(issue: Any) -> str:
    message = str(issue["msg"]).removeprefix("Value error, ")
    flag = "-".join(str(part) for part in issue["loc"]).replace("_", "-")
    return f"--{flag}: {message}" if flag else message


EngineLoader = Callable[[ModelConfig, EngineOptions, Mapping[str, str]], Any]


def run_worker(
    args: argparse.Namespace, settings: Settings | None = None, loader: EngineLoader | None = None
) -> int:
    """Start a GPU worker: load and warm the engine, then consume the model's queue; returns the exit code.

    ``loader`` replaces ``worker.startup.load_engine`` (the GPU serving benchmark builds random
    weights in place of ``from_pretrained``); everything after the load is the production path.
    """
    from worker.group import GroupEngine
    from worker.heartbeat import Heartbeat
    from worker.metrics import WorkerMetrics
    from worker.resilience import RetryingJobStore
    from worker.runner import WorkerRuntime
    from worker.tasks import register_generate_task

    settings = settings or load_settings()
    options = engine_options(args)
    model = settings.model(options.model_name) if options.model_name else settings.models[0]
    if model is None:
        names = ", ".join(m.name for m in settings.models)
        raise SystemExit(f"--model-name {options.model_name!r} is not a configured model ({names})")
    metrics = WorkerMetrics()
    if settings.worker_metrics_port:  # up before the load, which can take minutes
        metrics.serve(settings.worker_metrics_port)
    group = _start_group(model, options, loader, settings) if options.num_gpus > 1 else None
    engine = _load_engine(model, options, metrics, loader)
    if group is not None:
        engine = GroupEngine(engine, group[1], group[0].spec.keepalive_s, supervisor=group[0])
    client = connect(settings.redis_url)
    secret = file_signing_secret(settings.file_signing_key, client)
    storage = open_storage(settings.storage_url, settings.public_base_url, secret, settings.s3_endpoint_url)
    worker_id = f"{model.name}-{socket.gethostname()}-{secrets.token_hex(4)}"
    info = {
        "model": model.name,
        "pipeline": engine.pipeline_class,
        "device": str(engine.device),
        "offloaded": ",".join(sorted(engine.offloaded)),
        "cache_presets": ",".join(model.cache_choices),
        "gpus": str(options.num_gpus),
        "parallel": engine.layout.describe,
        "max_batch_size": str(options.max_batch_size),
    }
    heartbeat = Heartbeat(
        client, worker_id, info, settings.heartbeat_interval_s, settings.heartbeat_timeout_s
    )
    # one thread per job of the largest batch: their uploads overlap (worker.batching)
    endings = Endings(threads=max(ENDING_THREADS, options.max_batch_size))
    runtime = WorkerRuntime(
        RetryingJobStore(client),
        storage,
        engine,
        worker_id,
        settings.max_attempts,
        heartbeat,
        metrics,
        model=model.name,
        max_batch_size=options.max_batch_size,
        endings=endings,
    )
    app = create_celery(settings)
    register_generate_task(app, runtime)
    heartbeat.start()
    if group is not None:
        group[0].supervise(lambda: _hand_back_running_job(heartbeat, RetryingJobStore(client), app, settings))
        engine.start()
    log.info("worker %s serving %s on queue %s", worker_id, model.name, model.queue)
    try:
        consume(app, model.queue, worker_id)
    finally:
        # a warm shutdown ends what the last jobs started; the sweeper requeues any left running
        endings.close(settings.heartbeat_timeout_s)
        heartbeat.stop()
        if group is not None:
            engine.stop()
            group[0].join()
    return 0


def _start_group(
    model: ModelConfig, options: EngineOptions, loader: EngineLoader | None, settings: Settings
) -> tuple[Any, Any]:
    """Start ranks 1..N-1 of a multi-GPU group and join it as rank 0; returns (launcher, channel)."""
    import torch

    from worker.engine import resolve_device
    from worker.group import GroupLauncher

    try:
        device_type = resolve_device(options.device).type
    except ValueError as error:
        raise SystemExit(str(error)) from None
    if device_type == "cuda" and torch.cuda.device_count() < options.num_gpus:
        raise SystemExit(
            f"--num-gpus {options.num_gpus}: only {torch.cuda.device_count()} CUDA device(s) are visible"
        )
    json_logs = settings.log_format == "json"
    launcher = GroupLauncher.local(options.num_gpus, device_type, options.group_timeout_s, json_logs)
    channel = launcher.start(model, options, loader)
    log.info("worker group of %d ranks on %s formed", options.num_gpus, device_type)
    return launcher, channel


def _hand_back_running_job(heartbeat: Any, store: Any, app: Any, settings: Settings) -> None:
    """A rank died: deregister, then requeue this worker's running job as the sweeper would (attempt + 1)."""
    from shared.sweeper import sweep_lost_workers

    heartbeat.stop()
    sweep_lost_workers(store, app, settings)


def _load_engine(
    model: ModelConfig, options: EngineOptions, metrics: WorkerMetrics, loader: EngineLoader | None
) -> Any:
    """Load and warm the engine, recording how long it took; a configuration problem exits, naming it."""
    from worker.startup import StartupError, load_engine

    started = time.perf_counter()
    try:
        engine = (loader or load_engine)(model, options, os.environ)
    except StartupError as error:
        raise SystemExit(f"worker for {model.name!r} cannot start: {error}") from None
    if options.max_batch_size > 1 and options.warmup:
        resolutions = options.resolutions or [(model.defaults.width, model.defaults.height)]
        seconds = engine.warmup_batches(resolutions, model.cache_choices, options.max_batch_size)
        log.info("warmed batches of 2 to %d in %.1fs", options.max_batch_size, seconds)
    metrics.load_seconds.set(time.perf_counter() - started)
    return engine


def consume(app: Any, queue: str, worker_id: str) -> None:
    """Run the Celery worker in this process (solo pool: the pipeline lives here, CUDA never forks)."""
    app.worker_main(
        [
            "worker",
            "--pool",
            "solo",
            "--queues",
            queue,
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
