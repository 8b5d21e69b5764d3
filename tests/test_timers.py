"""The worker's main process must not keep a timer entry per finished task (workers/timers.py).

Every `fleet.execute` has a hard time limit (EXECUTE_TIME_LIMIT, 25.5 h), so the prefork pool's main
process schedules a hard-timeout entry in its event loop's timer for each task and cancels it when
the task ends. kombu cancels by flagging the entry: it stays in the timer's heap until its deadline,
25.5 h later. `bench.memory` measured the main process growing by ~0.5 MB per 1,000 runs because of it.
"""

from __future__ import annotations

from kombu.asynchronous.timer import Timer

from workers.app import EXECUTE_TIME_LIMIT


def _finished_tasks(timer: Timer, n: int) -> None:
    """What the pool does for each task that ends in time: a hard-limit entry scheduled, then cancelled."""
    for job in range(n):
        timer.call_after(EXECUTE_TIME_LIMIT, lambda _job: None, (job,)).cancel()


def test_kombu_keeps_cancelled_time_limit_entries_until_their_deadline() -> None:
    timer = Timer()
    _finished_tasks(timer, 1000)
    assert len(timer) == 1000  # the leak: nothing but the deadline removes them


def test_compaction_drops_cancelled_entries_and_keeps_live_ones_in_order() -> None:
    from workers.timers import compact

    timer = Timer()
    fired: list[int] = []
    running = [timer.call_after(0.001 * (i + 1), fired.append, (i,)) for i in range(5)]  # tasks still running
    _finished_tasks(timer, 1000)
    assert compact(timer) == 1000
    assert len(timer) == 5
    assert [entry for entry in running if entry.canceled] == []
    import time

    time.sleep(0.01)
    for _wait, entry in iter(timer):
        if entry is None:
            break
        entry()
    assert fired == [0, 1, 2, 3, 4]
    assert compact(timer) == 0
