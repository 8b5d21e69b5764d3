"""Dropping the event loop's cancelled timer entries, so a worker's main process stays flat.

The prefork pool schedules a hard time-limit entry for every task that has one (`fleet.execute`:
25.5 h) and cancels it when the task ends. kombu's timer cancels by flagging: the entry stays in
its heap until its deadline, so the main process (never recycled, unlike the pool children) held
one entry per run of the last 25.5 h, ~0.5 MB per 1,000 runs (`bench.memory`). Every minute the
worker rebuilds the heap without them. Only the event loop's own timer, which runs in the main
thread like every cancellation, is touched; the time limits themselves are unchanged.
"""

from __future__ import annotations

import heapq
from typing import Any

from kombu.asynchronous.timer import Timer

COMPACT_EVERY_S = 60.0


def compact(timer: Timer) -> int:
    """Remove the cancelled entries from the timer's heap, in place; how many were removed."""
    queue: list[Any] = timer._queue  # kombu keeps (eta, priority, entry) tuples in a heap
    live = [item for item in queue if not item[2].canceled]
    removed = len(queue) - len(live)
    if removed:
        heapq.heapify(live)
        queue[:] = live  # in place: the loop iterating the timer holds this same list
    return removed


def schedule_compaction(timer: Any) -> bool:
    """Compact the event loop's timer every minute; False (nothing scheduled) for any other timer."""
    if type(timer) is not Timer:  # a thread-driven timer (solo, threads pools) is cancelled from other threads
        return False
    timer.call_repeatedly(COMPACT_EVERY_S, compact, (timer,))
    return True
