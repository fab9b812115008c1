"""Queue inspection for operators: depth per model and priority, and how long the oldest job waited."""

from __future__ import annotations

import time

import redis

from shared.ids import job_id_millis
from shared.settings import Settings

# Scores in fg:queue:{model} are band * 1e13 + fair-share round (see store_scripts.enqueue).
BANDS = {"high": 0, "normal": 1, "low": 2}
BAND_WIDTH = 10**13


def queue_stats(client: redis.Redis, settings: Settings) -> list[dict[str, object]]:
    """For each configured model: queued jobs by priority and the age of the oldest one."""
    now_ms = time.time() * 1000
    stats: list[dict[str, object]] = []
    for model in settings.models:
        key = f"fg:queue:{model.name}"
        by_priority = {
            name: int(client.zcount(key, band * BAND_WIDTH, (band + 1) * BAND_WIDTH - 1))
            for name, band in BANDS.items()
        }
        queued = [str(job_id) for job_id in client.zrange(key, 0, -1)]
        oldest = min((job_id_millis(job_id) for job_id in queued), default=None)
        stats.append(
            {
                "model": model.name,
                "queue": model.queue,
                "depth": sum(by_priority.values()),
                "by_priority": by_priority,
                "oldest_waiting_s": None if oldest is None else round((now_ms - oldest) / 1000, 3),
            }
        )
    return stats
