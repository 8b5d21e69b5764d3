"""What kombu's Redis transport holds, seen from outside: which execute messages are still on their way.

The reaper asks this before it sends a quiet queued run's message again, or declares it lost. A
message waits in the queue's Redis list (one list per priority step) until a worker takes it; what
a worker took and has not acknowledged sits in kombu's `unacked` hash until it is acknowledged, or
its visibility timeout (hours) brings it back. A worker that died left its messages there, so an
entry alone proves nothing: the holder is asked (Celery's `query_task`), and a message counts as
on its way while a live worker answers for it (reserved, counting down, or running), or, unanswered,
for UNANSWERED_PASSES resend windows after a worker took it (kombu's `unacked_index` says when, by the
taker's clock; a take dated more than a window in the reaper's future is not believed): a live
worker whose main process is too busy or frozen to answer within QUERY_TIMEOUT_S still runs what it
took, and a dead one took it no earlier than the resend. Otherwise the run is sent again, which is
harmless (a duplicate delivery starts nothing), or buried as lost.

The workers are asked only about a run already sent again, the one the reaper would bury: a run not
sent again yet is sent again however its message is held, since a live holder may keep it for hours
(a stalled pool) while another worker could run it now. Only a message of the run's current attempt
counts (an older fence's starts nothing), and only one due within the resend window (a countdown by
a clock an hour ahead is not on its way).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime

import redis
from celery.app.control import Control

from fleet.models import Run
from fleet.sweeps import MAX_SENDS

# kombu.transport.redis: queue lists are `queue` and `queue\x06\x16N` for the priority steps 3, 6 and 9.
_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")
_TASK_ID = re.compile(r"fleet\.execute-([0-9a-f]{32})-")
_FULL_TASK_ID = re.compile(r"fleet\.execute-([0-9a-f]{32})-([0-9]+)-[0-9a-f]{8}")  # execute_task_id's
_UNACKED = "unacked"  # kombu.transport.redis Channel.unacked_key
_UNACKED_INDEX = "unacked_index"  # its delivery tag -> when a worker took the message (epoch seconds)
# How many resend windows a taken message nobody answers for still counts as on its way (see the docstring).
UNANSWERED_PASSES = 3
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


def on_their_way(client: redis.Redis, control: Control, queue: str, runs: Sequence[Run],
                 due_within_s: float) -> set[str]:
    """Which of these runs have an execute message waiting in `queue`, or, once sent again, held by a live
    worker and due within `due_within_s` (see the module's docstring)."""
    waiting = waiting_runs(client, queue, [run.id for run in runs])
    resent = {run.id: run.fence or 0 for run in runs if run.sends >= MAX_SENDS and run.id not in waiting}
    now = time.time()
    return waiting | held_runs(client, control, resent, due_by=now + due_within_s,
                               taken_after=now - UNANSWERED_PASSES * due_within_s, taken_by=now + due_within_s)


def held_runs(client: redis.Redis, control: Control, fences: Mapping[str, int], due_by: float,
              taken_after: float = float("inf"), timeout_s: float = QUERY_TIMEOUT_S,
              taken_by: float = float("inf")) -> set[str]:
    """Which of these runs (with their attempts' fences) have an execute message of that attempt, due by
    `due_by` (epoch seconds), that a live worker took and still answers for, or that a worker took after
    `taken_after` and by `taken_by` (epoch seconds) whether or not it answers. The take is dated by the
    taker's clock: one further ahead than `taken_by` is a clock not to be trusted (a dead worker's copy would
    keep its run queued for as long as that clock is ahead), and its message counts only if answered for."""
    held = _held_task_ids(client, fences, due_by)
    if not held:
        return set()  # nothing held: no broadcast, no wait
    replies = control.inspect(timeout=timeout_s).query_task(*held) or {}
    answered = {task_id for tasks in replies.values() if isinstance(tasks, dict) for task_id in tasks}
    unanswered = {task_id: tag for task_id, (_run, tag) in held.items() if task_id not in answered}
    recent = _taken_after(client, unanswered, taken_after, taken_by)
    return {held[task_id][0] for task_id in answered | recent if task_id in held}


def _taken_after(client: redis.Redis, tags: Mapping[str, str], after: float, by: float = float("inf")) -> set[str]:
    """Which of these task ids (with their delivery tags) a worker took after `after` and by `by`, by kombu's
    index."""
    if not tags or after == float("inf"):
        return set()
    pipe = client.pipeline(transaction=False)
    for tag in tags.values():
        pipe.zscore(_UNACKED_INDEX, tag)
    return {task_id for task_id, taken in zip(tags, pipe.execute(), strict=True)
            if taken is not None and after < float(taken) <= by}


def _held_task_ids(client: redis.Redis, fences: Mapping[str, int], due_by: float) -> dict[str, tuple[str, str]]:
    """The task ids, with their runs and delivery tags, of these attempts' execute messages in kombu's
    `unacked` hash that are due by `due_by`. An entry is `[message, exchange, routing_key]`; Celery's headers
    name the task and its ETA."""
    found: dict[str, tuple[str, str]] = {}
    if not fences:
        return found
    for tag, raw in client.hscan_iter(_UNACKED, count=500):
        try:
            headers = json.loads(raw)[0]["headers"]
            task_id, eta = str(headers["id"]), headers.get("eta")
            due = _epoch(eta) if eta else 0.0
        except (ValueError, TypeError, KeyError, IndexError):
            continue  # not a Celery message of this shape: nothing of ours
        match = _FULL_TASK_ID.fullmatch(task_id)
        if match is not None and fences.get(match.group(1)) == int(match.group(2)) and due <= due_by:
            found[task_id] = (match.group(1), tag if isinstance(tag, str) else tag.decode("utf-8", "replace"))
    return found


def _epoch(eta: str) -> float:
    """A Celery ETA (ISO 8601; naive means UTC, Fleet's Celery timezone) as epoch seconds."""
    moment = datetime.fromisoformat(eta)
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
