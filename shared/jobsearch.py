"""Admin job search: filters over the time-ordered job indexes, with cursor pagination."""

from __future__ import annotations

from dataclasses import dataclass

from shared.jobrecord import JobRecord, text
from shared.jobstore import ALL_JOBS_KEY, PREFIX, JobStore, job_key


@dataclass(frozen=True)
class JobQuery:
    """Admin search filters; ``since_id``/``until_id`` bound creation time (ids sort by it)."""

    status: str | None = None
    model: str | None = None
    owner: str | None = None
    since_id: str | None = None
    until_id: str | None = None
    cursor: str | None = None
    limit: int = 50
    scan: int = 1000

    def matches(self, record: JobRecord) -> bool:
        return (self.status is None or record.status == self.status) and (
            self.model is None or record.model == self.model
        )


def search_jobs(store: JobStore, query: JobQuery) -> tuple[list[JobRecord], str | None]:
    """Jobs matching every given filter, newest first. Ids are time-ordered, so the time range is an
    id range; the other filters are checked while scanning at most ``query.scan`` ids per page."""
    index = f"{PREFIX}:owner:{query.owner}:jobs" if query.owner else ALL_JOBS_KEY
    if query.owner and query.status:
        index = f"{PREFIX}:owner:{query.owner}:status:{query.status}"
    upper = f"({query.cursor}" if query.cursor else (f"[{query.until_id}" if query.until_id else "+")
    lower = f"[{query.since_id}" if query.since_id else "-"
    ids = [text(i) for i in store.redis.zrevrangebylex(index, upper, lower, start=0, num=query.scan)]
    pipe = store.redis.pipeline(transaction=False)
    for job_id in ids:
        pipe.hgetall(job_key(job_id))
    matches: list[JobRecord] = []
    for job_id, fields in zip(ids, pipe.execute(), strict=True):
        record = JobRecord.from_hash(fields) if fields else None
        if record is not None and query.matches(record):
            matches.append(record)
            if len(matches) == query.limit:
                return matches, job_id
    return matches, (ids[-1] if len(ids) == query.scan else None)
