"""Messages that go missing: resending is always safe, losing is not, and nothing waits forever unseen."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from fleet import db, killswitch
from fleet.dispatch import DispatchRequest, dispatch
from fleet.errors import UnavailableError
from fleet.keys import GLOBAL
from fleet.models import DeadLetter, Run, RunStatus, SpendDay
from fleet.services import Services, utcnow
from tests.faults.conftest import FaultFleet, fault_fleet
from tests.faults.proxy import PASS, RESET
from tests.faults.servers import PrivateCluster
from tests.harness import children_of, wait_for
from tests.test_dispatch import run_of, wait_status

pytestmark = [pytest.mark.slow, pytest.mark.faults]


def later(services: Services, seconds: float) -> Services:
    """The same clients with a clock `seconds` ahead, as a reaper pass that much later sees it."""
    return dataclasses.replace(services, now=lambda: utcnow() + timedelta(seconds=seconds))


def drop(_run_id: str, _fence: int, _countdown: float = 0.0) -> None:
    """A send whose message is lost on the way (the dispatcher died after its commit, a failover ate it)."""


def request(agent: str = "quick") -> DispatchRequest:
    return DispatchRequest(agent, f"lost-{uuid.uuid4().hex}", actor="test")


def taken(faults: FaultFleet) -> None:
    """Wait until a worker took the run's message: out of the queue, into kombu's `unacked` hash."""
    redis = faults.fleet.redis
    wait_for(lambda: redis.llen("agents") == 0 and redis.hlen("unacked") >= 1, 30, "the worker to take the message")


@contextlib.contextmanager
def stalled_pool(faults: FaultFleet) -> Iterator[None]:
    """The worker's pool processes stopped (SIGSTOP) meanwhile: its main process still takes and answers."""
    pool = children_of(faults.fleet.workers[0].pid)
    assert pool, "the worker has no pool processes to stall"
    for pid in pool:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pool:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def assert_ran_once(faults: FaultFleet, run_id: str) -> None:
    """The run ends succeeded, its agent started once, and every invariant holds."""
    run = wait_status(faults.fleet, run_id, {"succeeded", "dead", "archived"}, timeout=60)
    assert run.status == RunStatus.SUCCEEDED
    assert len(faults.effects.starts(run_id)) == 1
    assert faults.violations() == []


def test_a_message_lost_after_the_commit_is_sent_again(faults: FaultFleet) -> None:
    result = dispatch(faults.fleet.services, request(), drop)
    assert result.status == "queued"
    faults.accepted.add(result.run_id)
    faults.fleet.reap(later(faults.fleet.services, 600))
    run = wait_status(faults.fleet, result.run_id, {"succeeded", "dead", "archived"}, timeout=60)
    assert run.status == RunStatus.SUCCEEDED and run.attempt == 1
    assert faults.violations() == []


def test_a_message_lost_twice_is_dead_lettered_as_lost(faults: FaultFleet) -> None:
    result = dispatch(faults.fleet.services, request(), drop)
    faults.accepted.add(result.run_id)
    for minutes in (10, 20, 30, 40, 80, 160):
        faults.fleet.reap(later(faults.fleet.services, minutes * 60), drop)
    run = run_of(faults.fleet, result.run_id)
    assert run.status == RunStatus.DEAD, f"a run whose every message was lost ended {run.status}"
    with db.session(faults.fleet.services.engine) as session:
        dead = session.exec(select(DeadLetter).where(DeadLetter.run_id == run.id)).one()
        day = session.exec(select(SpendDay).where(SpendDay.scope == "quick")).one()
    assert dead.reason == "lost"
    assert day.reserved_micros == 0  # its reservation came back
    assert faults.fleet.services.leases.holders("quick", 100) == []
    assert faults.violations() == []


def test_a_message_a_live_worker_holds_is_not_taken_for_lost(faults: FaultFleet) -> None:
    """The worker took the run's message, and its pool stalls before the claim for three resend windows: a
    message a live worker holds is on its way, not lost. The run keeps waiting, and runs once the pool resumes."""
    with stalled_pool(faults):
        result = dispatch(faults.fleet.services, request(), faults.fleet.send_execute)
        faults.accepted.add(result.run_id)
        for minutes in (10, 20, 30):
            taken(faults)
            faults.fleet.reap(later(faults.fleet.services, minutes * 60))
            run = run_of(faults.fleet, result.run_id)
            assert run.status == RunStatus.QUEUED, f"a run whose message a live worker holds ended {run.status}"
    assert_ran_once(faults, result.run_id)


def test_a_message_a_dead_worker_held_is_sent_again(faults: FaultFleet) -> None:
    """The worker that took the run's message dies before the claim: its entry stays in kombu's `unacked`
    hash for hours, but nobody answers for it, so the reaper sends the message again and the run runs once."""
    with stalled_pool(faults):
        result = dispatch(faults.fleet.services, request(), faults.fleet.send_execute)
        faults.accepted.add(result.run_id)
        taken(faults)
        faults.fleet.stop_worker(faults.fleet.workers[0], signal.SIGKILL)
    assert faults.fleet.redis.hlen("unacked") >= 1  # what it held is still there, to the visibility timeout
    faults.fleet.start_worker()
    faults.fleet.wait_consuming(60)
    report = faults.fleet.reap(later(faults.fleet.services, 600))
    assert report.counts.get("resent") == 1, report
    assert_ran_once(faults, result.run_id)


def test_a_copy_a_dead_worker_took_by_a_clock_a_day_ahead_is_still_buried(faults: FaultFleet) -> None:
    """The resent copy went to a worker whose clock runs a day ahead, and that worker died holding it: kombu's
    `unacked_index` dates the take by that clock, tomorrow. Nobody answers for it and nobody will run it: the
    run must still be dead-lettered as lost now, not kept queued (its slot held) until that clock's tomorrow
    is three resend windows old."""
    redis = faults.fleet.redis
    with stalled_pool(faults):
        result = dispatch(faults.fleet.services, request(), drop)
        faults.accepted.add(result.run_id)
        first = faults.fleet.reap(later(faults.fleet.services, 600))
        assert first.counts.get("resent") == 1, first
        taken(faults)
        faults.fleet.stop_worker(faults.fleet.workers[0], signal.SIGKILL)
    (tag,) = redis.hkeys("unacked")
    redis.zadd("unacked_index", {tag: time.time() + 86400})  # as the dead worker's clock wrote it
    second = faults.fleet.reap(later(faults.fleet.services, 1200))
    run = run_of(faults.fleet, result.run_id)
    assert run.status == RunStatus.DEAD, f"a copy nobody holds kept the run {run.status}: {second}"


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    """A process stopped (SIGSTOP) meanwhile: a worker's main process that cannot answer the reaper's question."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def test_a_copy_a_live_worker_took_but_cannot_answer_for_is_not_buried(faults: FaultFleet) -> None:
    """The worker took the run's message and its pool stalls; its main process freezes at each reaper pass, so it
    never answers the reaper's question. The first pass sends the message again (harmless) and the worker takes
    the copy; at the second it is frozen again. A copy taken minutes ago and still in kombu's `unacked` hash is
    held, not lost: the run is not buried, and runs once the worker thaws."""
    main, redis = faults.fleet.workers[0].pid, faults.fleet.redis
    with stalled_pool(faults):
        result = dispatch(faults.fleet.services, request(), faults.fleet.send_execute)
        faults.accepted.add(result.run_id)
        taken(faults)
        with frozen(main):
            first = faults.fleet.reap(later(faults.fleet.services, 600))
        assert first.counts.get("resent") == 1, first
        wait_for(lambda: redis.llen("agents") == 0 and redis.hlen("unacked") >= 2, 30, "the worker to take the copy")
        with frozen(main):
            second = faults.fleet.reap(later(faults.fleet.services, 1200))
        run = run_of(faults.fleet, result.run_id)
        assert run.status == RunStatus.QUEUED, f"a copy a live worker holds was taken for lost: {second}"
    assert_ran_once(faults, result.run_id)


def test_a_dead_workers_open_connection_eats_a_canary_and_the_wait_sends_another(faults: FaultFleet) -> None:
    """A worker SIGKILLed while its BRPOP is still open at Redis (here: the proxy between them has not yet seen
    the close) takes the next message with it: Redis pops it into a dead connection, and it is gone, unacked.
    Waiting for consumption must outlast a lost canary (CI once timed out here, under load, after a SIGKILL)."""
    held, eaten = threading.Event(), threading.Event()
    redis = faults.fleet.redis

    async def hold_the_proxy() -> None:
        held.set()  # blocks the proxy's loop: nothing it forwards sees the worker's connection close
        with contextlib.suppress(AssertionError):
            wait_for(lambda: redis.get("test:canary-sent") and redis.llen("dispatch") == 0, 10, "the canary popped")
            eaten.set()

    asyncio.run_coroutine_threadsafe(hold_the_proxy(), faults.redis_proxy._loop)
    held.wait(5)
    faults.fleet.stop_worker(faults.fleet.workers[0], signal.SIGKILL)
    faults.fleet.start_worker()
    redis.set("test:canary-sent", 1)  # the canary wait_consuming sends next is the one the dead BRPOP takes
    faults.fleet.wait_consuming(30)
    assert eaten.is_set(), "the dead connection took no canary: the scenario did not happen"


def test_a_message_a_live_worker_holds_for_an_hour_is_sent_again(faults: FaultFleet) -> None:
    """The worker took the run's message and holds it for its countdown, an hour: a retry sent by a host whose
    clock ran an hour ahead (test_a_retry_sent_by_a_worker_an_hour_ahead_is_not_held_back_an_hour). A live
    worker answers for it all that hour; waiting for that clock is not harmless, sending again is. The reaper
    sends it again, and the run runs once, now."""
    def an_hour_off(run_id: str, fence: int) -> None:
        faults.fleet.send_execute(run_id, fence, countdown=3600)

    result = dispatch(faults.fleet.services, request(), an_hour_off)
    faults.accepted.add(result.run_id)
    taken(faults)
    report = faults.fleet.reap(later(faults.fleet.services, 600))
    assert report.counts.get("resent") == 1, report
    assert_ran_once(faults, result.run_id)


def test_an_earlier_attempts_message_a_live_worker_holds_is_not_the_retrys(faults: FaultFleet) -> None:
    """A live worker holds the first attempt's message (its pool stalls) while the run has moved on to a later
    attempt, whose message was lost. The held one starts nothing for that attempt (its fence is older): it must
    not keep the retry waiting, unsent, for as long as the worker holds it."""
    with stalled_pool(faults):
        result = dispatch(faults.fleet.services, request(), faults.fleet.send_execute)
        faults.accepted.add(result.run_id)
        taken(faults)
        run = run_of(faults.fleet, result.run_id)
        resent = Run(**{**run.model_dump(), "sends": 2})  # as the reaper sees it once sent again
        retry = Run(**{**resent.model_dump(), "fence": (run.fence or 0) + 1})
        assert faults.fleet.waiting([resent]) == {run.id}  # its own attempt's message: on its way
        assert faults.fleet.waiting([retry]) == set(), "an earlier attempt's message was taken for the retry's"
    assert_ran_once(faults, result.run_id)


def test_a_run_waiting_behind_a_busy_queue_is_never_archived(kind: str, tmp_path: Path,
                                                              pg_cluster: PrivateCluster | None) -> None:
    """No worker consumes the agents queue for two hours: the run waits, and runs once a worker comes."""
    with fault_fleet(kind, tmp_path, pg_cluster, start=False) as faults:
        result = dispatch(faults.fleet.services, request(), faults.fleet.send_execute)
        faults.accepted.add(result.run_id)
        for hours in (0.5, 1, 1.5, 2, 3):
            faults.fleet.reap(later(faults.fleet.services, hours * 3600))
        assert run_of(faults.fleet, result.run_id).status == RunStatus.QUEUED
        assert faults.fleet.redis.llen("agents") >= 1
        faults.fleet.start_worker()
        run = wait_status(faults.fleet, result.run_id, {"succeeded", "dead", "archived"}, timeout=60)
        assert run.status == RunStatus.SUCCEEDED
        assert len(faults.effects.starts(result.run_id)) == 1
        assert faults.violations() == []


def test_an_enqueue_failure_leaves_the_key_free(faults: FaultFleet) -> None:
    """The broker refuses the message: 75, nothing held, and the same key dispatches afterwards."""
    def refuse(_run_id: str, _fence: int) -> None:
        raise ConnectionError("broker down")

    asked = request()
    with pytest.raises(UnavailableError):
        dispatch(faults.fleet.services, asked, refuse)
    assert faults.fleet.services.leases.holders("quick", 100) == []
    again = dispatch(faults.fleet.services, asked, faults.fleet.send_execute)
    assert again.status == "queued", f"the retry that 75 invited was answered {again.status} ({again.reason})"
    faults.accepted.add(again.run_id)
    wait_status(faults.fleet, again.run_id, {"succeeded"}, timeout=60)
    with db.session(faults.fleet.services.engine) as session:
        assert len(session.exec(select(Run).where(Run.work_key == asked.work_key)).all()) == 1
    assert faults.violations() == []


def _as_kombu_restores_it(client: Any, queue: str, index: int = -1) -> None:
    """The message at `index` in `queue` (kombu pushes on the left: -1 is the oldest), marked as kombu's Redis
    transport marks a message it restores from its `unacked` hash (a worker that died, or lost its connection,
    before its acknowledgement got through)."""
    client.lset(queue, index, _restored(client.lindex(queue, index)))


def _restored(raw: str) -> str:
    """A message as kombu's `_do_restore_message` puts it back: the same payload, marked redelivered."""
    message = json.loads(raw)
    message["headers"]["redelivered"] = True
    message["properties"]["delivery_info"]["redelivered"] = True
    return json.dumps(message)


def _fleet_killed(services: Services) -> tuple[bool, bool]:
    """Whether the fleet-wide kill holds (in Redis, in the database mirror)."""
    with db.session(services.engine) as session:
        return killswitch.check_redis(services.redis, None).killed, killswitch.check_mirror(session, None).killed


def test_a_resume_delivered_again_after_a_later_kill_lifts_nothing(kind: str, tmp_path: Path,
                                                                   pg_cluster: PrivateCluster | None) -> None:
    """`celery call fleet.resume` ran, but its acknowledgement was lost (a Redis blip as it acked: workers/transport.py
    leaves it to the visibility timeout), and the operator killed the fleet again since. kombu restores the old
    resume and a worker runs it again: it must not lift the kill that came after it."""
    with fault_fleet(kind, tmp_path, pg_cluster, start=False) as faults:
        services = faults.fleet.services
        killswitch.engage(services.engine, services.redis, scope=GLOBAL, reason="2am: stop everything",
                          actor="test", hard=False, now=services.now())
        again = faults.fleet.celery.send_task("fleet.resume", queue="dispatch")
        _as_kombu_restores_it(faults.fleet.redis, "dispatch")
        faults.fleet.start_worker()
        answer = again.get(timeout=60)
        assert _fleet_killed(services) == (True, True), f"the old resume lifted the kill: {answer}"
        assert answer["engaged"] is True and "again" in answer["reason"], answer


def test_a_kill_delivered_again_after_the_resume_does_not_kill_again(kind: str, tmp_path: Path,
                                                                      pg_cluster: PrivateCluster | None) -> None:
    """`celery call fleet.kill` ran and its acknowledgement was lost; the operator resumed in the morning. kombu
    restores the old kill (hours later: the visibility timeout) and a worker runs it again: it was carried out
    once, and must not stop the fleet a second time. A kill whose first delivery never ran still engages."""
    with fault_fleet(kind, tmp_path, pg_cluster, start=False) as faults:
        services = faults.fleet.services
        task_id = f"kill-{uuid.uuid4().hex}"
        first = faults.fleet.celery.send_task("fleet.kill", kwargs={"reason": "2am"}, queue="dispatch",
                                              task_id=task_id)
        (sent,) = faults.fleet.redis.lrange("dispatch", 0, -1)  # the message itself, as kombu keeps it in `unacked`
        faults.fleet.start_worker()
        first.get(timeout=60)
        assert killswitch.check_redis(services.redis, None).killed
        faults.fleet.stop_worker(faults.fleet.workers[0])
        killswitch.release(services.engine, services.redis, scope=GLOBAL, actor="test", now=services.now())
        faults.fleet.celery.backend.forget(task_id)  # the first delivery's result: the wait is for the second's
        faults.fleet.redis.rpush("dispatch", sent)  # kombu's restore puts back the very message (RPUSH: next out)
        again = faults.fleet.celery.AsyncResult(task_id)
        _as_kombu_restores_it(faults.fleet.redis, "dispatch")
        never_ran = faults.fleet.celery.send_task("fleet.kill", args=["quick"], queue="dispatch")
        _as_kombu_restores_it(faults.fleet.redis, "dispatch", index=0)
        faults.fleet.start_worker()
        answer = again.get(timeout=60)
        assert _fleet_killed(services) == (False, False), f"the old kill stopped it again: {answer}"
        assert answer["engaged"] is False and "already" in answer["reason"], answer
        assert never_ran.get(timeout=60)["engaged"] is True  # its first delivery: carried out
        assert killswitch.check_redis(services.redis, "quick").killed


def test_a_new_kill_reusing_a_task_id_restored_before_it_ran_still_engages(kind: str, tmp_path: Path,
                                                                           pg_cluster: PrivateCluster | None) -> None:
    """A script stops the fleet with a fixed task id (`celery call fleet.kill --task-id nightly-stop`), and the
    operator resumed Monday's kill. Tuesday's kill, the same id, waits prefetched by a worker that is stopped
    warm: kombu restores it, marked redelivered, though it never ran. It is a new message, not Monday's delivered
    again, and must stop the fleet."""
    with fault_fleet(kind, tmp_path, pg_cluster) as faults:
        services = faults.fleet.services
        task_id = "nightly-stop"
        faults.fleet.celery.send_task("fleet.kill", kwargs={"reason": "monday"}, queue="dispatch",
                                      task_id=task_id).get(timeout=60)
        faults.fleet.stop_worker(faults.fleet.workers[0])
        killswitch.release(services.engine, services.redis, scope=GLOBAL, actor="test", now=services.now())
        faults.fleet.celery.backend.forget(task_id)
        tuesday = faults.fleet.celery.send_task("fleet.kill", kwargs={"reason": "tuesday"}, queue="dispatch",
                                                task_id=task_id)
        _as_kombu_restores_it(faults.fleet.redis, "dispatch")
        faults.fleet.start_worker()
        answer = tuesday.get(timeout=60)
        assert _fleet_killed(services) == (True, True), f"Tuesday's kill engaged nothing: {answer}"
        assert answer["engaged"] is True, answer


@pytest.mark.parametrize("mirrored_by_watchdog", [True, False], ids=["watchdog-mirrored", "resumed-first"])
def test_a_kill_that_reached_only_redis_delivered_again_after_the_resume_does_not_kill_again(
        tmp_path: Path, pg_cluster: PrivateCluster | None, mirrored_by_watchdog: bool) -> None:
    """The worker host loses the network just after `celery call fleet.kill` set the flag in Redis: the mirror
    cannot be written (Redis only, exit 75's case) and the acknowledgement is lost too. The watchdog mirrors the
    flag (or not yet), the operator resumes in the morning, and kombu restores the old kill: carried out once, it
    must not stop the fleet a second time."""
    with fault_fleet("postgresql", tmp_path, pg_cluster, start=False) as faults:
        services, proxy = faults.fleet.services, faults.db_proxy
        assert proxy is not None
        task_id = f"kill-{uuid.uuid4().hex}"
        first = faults.fleet.celery.send_task("fleet.kill", kwargs={"reason": "2am"}, queue="dispatch",
                                              task_id=task_id)
        (sent,) = faults.fleet.redis.lrange("dispatch", 0, -1)
        proxy.set(RESET)  # the worker's database is gone; Redis still answers
        try:
            faults.fleet.start_worker()
            answer = first.get(timeout=60)
        finally:
            proxy.set(PASS)
        assert answer["in_redis"] is True and answer["mirrored"] is False, answer
        if mirrored_by_watchdog:
            assert killswitch.repair_mirror(services.engine, services.redis, [GLOBAL], services.now()) == [GLOBAL]
        killswitch.release(services.engine, services.redis, scope=GLOBAL, actor="operator", now=services.now())
        assert not killswitch.check_redis(services.redis, None).killed
        faults.fleet.celery.backend.forget(task_id)
        faults.fleet.redis.rpush("dispatch", _restored(sent))  # kombu's restore of the unacknowledged kill, hours later
        again = faults.fleet.celery.AsyncResult(task_id).get(timeout=60)
        assert _fleet_killed(services) == (False, False), f"the old kill stopped it again: {again}"
        assert again["engaged"] is False and "already" in again["reason"], again
