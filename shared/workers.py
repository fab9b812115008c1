"""Worker registry and heartbeats in Redis (read by the gateway, written by workers)."""

from __future__ import annotations

import redis

WORKERS_KEY = "fg:workers"


def worker_key(worker_id: str) -> str:
    return f"fg:worker:{worker_id}"


def alive_key(worker_id: str) -> str:
    return f"fg:worker:{worker_id}:alive"


def live_worker_counts(client: redis.Redis) -> dict[str, int]:
    """Live workers per model: registered workers whose heartbeat key has not expired."""
    counts: dict[str, int] = {}
    for worker in live_workers(client):
        model = worker.get("model")
        if worker["alive"] and model:
            counts[str(model)] = counts.get(str(model), 0) + 1
    return counts


def live_workers(client: redis.Redis) -> list[dict[str, object]]:
    """Every registered worker as it last reported (model, device, options, current job, heartbeat)."""
    worker_ids = sorted(str(worker_id) for worker_id in client.smembers(WORKERS_KEY))
    pipe = client.pipeline(transaction=False)
    for worker_id in worker_ids:
        pipe.hgetall(worker_key(worker_id))
        pipe.exists(alive_key(worker_id))
    replies = pipe.execute()
    workers: list[dict[str, object]] = []
    for worker_id, fields, alive in zip(worker_ids, replies[::2], replies[1::2], strict=True):
        if fields:
            workers.append({"id": worker_id, **fields, "alive": bool(alive)})
    return workers
