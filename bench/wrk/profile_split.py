"""Split a py-spy raw profile (``py-spy record -f raw``) of the gateway into where the time goes.

    python -m bench.wrk.profile_split PROFILE.txt

Each sample is counted once, under the first category whose marker appears in its stack (the order
below: most specific first); idle samples (threads waiting for work) are left out of the total.
"""

from __future__ import annotations

import sys
from collections import Counter

IDLE = ("wait (threading.py", "_worker (concurrent", "select (selectors.py", "run_forever", "_run_once")
CATEGORIES = [
    ("connection checkout (redis-py get/release_connection)", ("get_connection", "release (redis")),
    ("Celery/kombu publish", ("send_task", "kombu", "publish (celery")),
    ("Redis round trips (send, wait, parse)", ("read_response", "send_packed_command", "execute_command")),
    ("pydantic validation/serialisation", ("pydantic", "model_dump", "serialize_response", "validate")),
    ("FastAPI/Starlette routing and dependencies", ("fastapi", "starlette")),
    ("HTTP server (uvicorn, httptools)", ("uvicorn", "httptools")),
]


def split(lines: list[str]) -> tuple[Counter[str], int]:
    """Samples per category, and the total of busy samples."""
    tally: Counter[str] = Counter()
    total = 0
    for line in lines:
        stack, _, count_text = line.rstrip().rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = stack.split(";")
        leaf = frames[-1]
        if any(marker in leaf for marker in IDLE):
            continue
        count = int(count_text)
        total += count
        name = next((name for name, markers in CATEGORIES if any(m in stack for m in markers)), "other")
        tally[name] += count
    return tally, total


def main() -> None:
    with open(sys.argv[1]) as handle:
        tally, total = split(handle.readlines())
    for name, count in tally.most_common():
        print(f"{100 * count / max(total, 1):5.1f}%  {name}")
    print(f"{total} busy samples")


if __name__ == "__main__":
    main()
