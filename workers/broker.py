"""What kombu's Redis transport holds, seen from outside: which execute messages are still on their way.

The reaper asks this before it sends a quiet queued run's message again, or declares it lost. A
message waits in the queue's Redis list (one list per priority step) until a worker takes it; what
a worker took and has not acknowledged sits in kombu's `unacked` hash until it is acknowledged, or
its visibility timeout (hours) brings it back. A worker that died left its messages there, so an
entry alone proves nothing: the holder is asked (Celery's `query_task`), and a message counts as
on its way only while a live worker answers for it (reserved, counting down, or running). Otherwise
the run is sent again, which is harmless (a duplicate delivery starts nothing), or buried as lost.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime

import redis
from celery.app.control import Control

# kombu.transport.redis: queue lists are `queue` and `queue\x06\x16N` for the priority steps 3, 6 and 9.
_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")
_TASK_ID = re.compile(r"fleet\.execute-([0-9a-f]{32})-")
_FULL_TASK_ID = re.compile(r"fleet\.execute-([0-9a-f]{32})-[0-9]+-[0-9a-f]{8}")  # execute_task_id's
_UNACKED = "unacked"  # kombu.transport.redis Channel.unacked_key
# How long the workers have to answer for the messages they hold: a worker that answers later is taken
# for gone, and its run is sent again (harmless) or, after its resend, buried as lost.
QUERY_TIMEOUT_S = 2.0


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


def on_their_way(client: redis.Redis, control: Control, queue: str, run_ids: Iterable[str],
                 due_within_s: float) -> set[str]:
    """Which of these runs have an execute message waiting in `queue`, or held by a live worker and due
    within `due_within_s` (a countdown due later, such as one sent by a clock an hour ahead, is not)."""
    wanted = set(run_ids)
    waiting = waiting_runs(client, queue, wanted)
    return waiting | held_runs(client, control, wanted - waiting, due_by=time.time() + due_within_s)


def held_runs(client: redis.Redis, control: Control, run_ids: Iterable[str], due_by: float,
              timeout_s: float = QUERY_TIMEOUT_S) -> set[str]:
    """Which of these runs have an execute message due by `due_by` (epoch seconds) that a live worker took
    and still answers for."""
    held = _held_task_ids(client, set(run_ids), due_by)
    if not held:
        return set()  # nothing held: no broadcast, no wait
    replies = control.inspect(timeout=timeout_s).query_task(*held) or {}
    answered = {task_id for tasks in replies.values() if isinstance(tasks, dict) for task_id in tasks}
    return {held[task_id] for task_id in answered if task_id in held}


def _held_task_ids(client: redis.Redis, wanted: set[str], due_by: float) -> dict[str, str]:
    """The task ids, with their runs, of these runs' execute messages in kombu's `unacked` hash that are due
    by `due_by`. An entry is `[message, exchange, routing_key]`; Celery's headers name the task and its ETA."""
    found: dict[str, str] = {}
    if not wanted:
        return found
    for _tag, raw in client.hscan_iter(_UNACKED, count=500):
        try:
            headers = json.loads(raw)[0]["headers"]
            task_id, eta = str(headers["id"]), headers.get("eta")
            due = _epoch(eta) if eta else 0.0
        except (ValueError, TypeError, KeyError, IndexError):
            continue  # not a Celery message of this shape: nothing of ours
        match = _FULL_TASK_ID.fullmatch(task_id)
        if match is not None and match.group(1) in wanted and due <= due_by:
            found[task_id] = match.group(1)
    return found


def _epoch(eta: str) -> float:
    """A Celery ETA (ISO 8601; naive means UTC, Fleet's Celery timezone) as epoch seconds."""
    moment = datetime.fromisoformat(eta)
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
