"""What kombu's Redis transport holds, seen from outside: which execute messages still wait in a queue.

The reaper asks this before it declares a quiet queued run lost. A message waits in the queue's
Redis list (one list per priority step) until a worker takes it; what a worker took and has not
acknowledged sits in kombu's `unacked` hash, possibly held by a worker that died: that one does
not count as waiting, so the run is sent again (a duplicate delivery starts nothing).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable

import redis

# kombu.transport.redis: queue lists are `queue` and `queue\x06\x16N` for the priority steps 3, 6 and 9.
_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")
_TASK_ID = re.compile(r"fleet\.execute-([0-9a-f]{32})-")


def execute_task_id(run_id: str, fence: int) -> str:
    """The Celery task id of one execute message: it names its run, so a waiting message can be found."""
    return f"fleet.execute-{run_id}-{fence}-{uuid.uuid4().hex[:8]}"


def waiting_runs(client: redis.Redis, queue: str, run_ids: Iterable[str]) -> set[str]:
    """Which of these runs have an execute message waiting in `queue`'s lists."""
    wanted = set(run_ids)
    found: set[str] = set()
    for suffix in _PRIORITY_SUFFIXES:
        for raw in client.lrange(queue + suffix, 0, -1):
            text = raw if isinstance(raw, str) else raw.decode("utf-8", "replace")
            found.update(m for m in _TASK_ID.findall(text) if m in wanted)
    return found
