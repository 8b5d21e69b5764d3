"""Thin Celery tasks: ids in, a call into `fleet.*`, a JSON-able result out. No business logic here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from celery import Task

from fleet import dispatch as dispatching
from fleet import executor, killswitch, sweeps, ticks, watchdog
from fleet.keys import GLOBAL
from fleet.models import Run
from workers import broker, control
from workers.app import AGENTS_QUEUE, EXECUTE_TIME_LIMIT, app, services


def send_execute(run_id: str, fence: int, countdown: float = 0.0) -> None:
    """Enqueue exactly one fleet.execute for a run on the agents queue (its task id names the run)."""
    execute.apply_async((run_id, fence), queue=AGENTS_QUEUE, countdown=countdown or None,
                        task_id=broker.execute_task_id(run_id, fence))


def waiting_in_agents_queue(runs: Sequence[Run]) -> set[str]:
    """Which of these queued runs have a message on its way: waiting in the agents queue, or, once sent again,
    held by a live worker that has not claimed it yet (a stalled pool, a short countdown)."""
    svc = services()
    return broker.on_their_way(svc.redis, app.control, AGENTS_QUEUE, runs,
                               due_within_s=svc.config.fleet.resend_after_s)


def _actor(task: Task) -> str:
    return f"celery:{task.request.hostname or 'client'}:{task.request.id}"  # killswitch.carried_out reads the id


def _delivery_tag(task: Task) -> str | None:
    """kombu's tag of this message: drawn anew for every send (a task id may be reused by its sender), and kept
    when kombu restores the message."""
    tag = (task.request.properties or {}).get("delivery_tag")
    return None if tag is None else str(tag)


def _redelivered(task: Task) -> bool:
    """Whether kombu restored this message (its acknowledgement was lost): it may have run before."""
    return bool((task.request.delivery_info or {}).get("redelivered"))


@app.task(name="fleet.dispatch", bind=True)
def dispatch(self: Task, agent: str, work_key: str | None = None, payload: Any = None,
             dry_run: bool = False) -> dict[str, Any]:
    """Dispatch one run of an agent (five steps); `dry_run=True` shows the plan and writes nothing."""
    key = dispatching.message_work_key(work_key, self.request.id)  # a redelivered message asks for the same run
    request = dispatching.DispatchRequest(agent, key, payload, dry_run, actor=_actor(self))
    return dispatching.dispatch(services(), request, send_execute).to_json()


# No result stored: the run's row is the execute's outcome (`fleet runs show RUN`) and Flower shows the task from its
# events; its STARTED and SUCCESS states were two Redis writes per run that nobody read. A caller that wants the
# answer anyway sends the task with ignore_result=False.
@app.task(name="fleet.execute", time_limit=EXECUTE_TIME_LIMIT, ignore_result=True)
def execute(run_id: str, fence: int) -> dict[str, Any]:
    """Run one attempt of a queued run; a stale or redelivered message starts nothing."""
    result = executor.execute(services(), run_id, fence, send_execute)
    if result.status == "deferred":  # Redis or the database blinked between delivery and start: try again shortly
        send_execute(run_id, fence, countdown=5.0)
    return result.to_json()


@app.task(name="fleet.kill", bind=True)
def kill(self: Task, agent: str | None = None, reason: str | None = None, hard: bool = False) -> dict[str, Any]:
    """Engage the kill switch for the fleet (no agent) or one agent."""
    svc = services()
    scope = agent or GLOBAL
    if agent is not None:
        svc.config.agent(agent)
    if _redelivered(self):  # restored by kombu: carried out already, maybe resumed since
        done = killswitch.carried_out(svc.engine, message_id=str(self.request.id), delivery_tag=_delivery_tag(self))
        if done is not None:
            # A hard kill's first delivery may have died in its grace, before it revoked anything: while its kill
            # is still in force, the revoke is done again (it terminates only executes of runs still running).
            again = hard and killswitch.still_in_force(svc.engine, svc.redis, scope=scope,
                                                       message_id=str(self.request.id),
                                                       delivery_tag=_delivery_tag(self))
            return {"scope": scope, "engaged": False, "reason": done,
                    "revoked": control.hard_stop(svc, agent) if again else 0}
    engaged = killswitch.engage(svc.engine, svc.redis, scope=scope, reason=reason, actor=_actor(self), hard=hard,
                                now=svc.now(), delivery_tag=_delivery_tag(self))
    revoked = control.hard_stop(svc, agent) if hard else 0
    return {"scope": scope, "engaged": True, "reason": reason, "hard": hard, "revoked": revoked,
            "in_redis": engaged.in_redis, "mirrored": engaged.mirrored, "problem": engaged.problem}


@app.task(name="fleet.resume", bind=True)
def resume(self: Task, agent: str | None = None) -> dict[str, Any]:
    """Release the kill switch for the fleet (no agent) or one agent."""
    svc = services()
    scope = agent or GLOBAL
    if _redelivered(self):  # restored by kombu: maybe older than the kill in force
        refused = killswitch.stale_resume(svc.engine, svc.redis, scope=scope)
        if refused is not None:
            return {"scope": scope, "engaged": True, "reason": refused}
    killswitch.release(svc.engine, svc.redis, scope=scope, actor=_actor(self), now=svc.now())
    return {"scope": scope, "engaged": False}


@app.task(name="fleet.tick", bind=True, ignore_result=True)
def tick(self: Task, agent: str) -> dict[str, Any]:
    """Beat's tick for one agent: dispatch its current schedule slot (at most once per slot)."""
    return ticks.tick(services(), agent, send_execute, actor=f"beat:{self.request.id}").to_json()


@app.task(name="fleet.ticks", bind=True, ignore_result=True)
def tick_many(self: Task, agents: list[str]) -> dict[str, Any]:
    """Beat's tick for every agent sharing a schedule: their current slots, dispatched in one batch."""
    results = ticks.tick_many(services(), agents, send_execute, actor=f"beat:{self.request.id}")
    counts: dict[str, int] = {}
    for result in results.values():
        counts[result.status] = counts.get(result.status, 0) + 1
    return {"agents": len(results), **counts}


@app.task(name="fleet.sweep.reaper")
def sweep_reaper() -> dict[str, Any]:
    """Recover runs whose worker died and queued runs whose message was lost."""
    return sweeps.reap(services(), send_execute, waiting_in_agents_queue).to_json()


@app.task(name="fleet.sweep.orphans")
def sweep_orphans() -> dict[str, Any]:
    """Every worker host kills and reports its own orphaned agents (a remote-control broadcast)."""
    replies = app.control.broadcast("fleet_orphans", reply=True, timeout=3.0)
    found = [r.get("ok") for reply in replies or [] for r in reply.values() if isinstance(r, dict)]
    return {"sweep": "orphans", "hosts": [f for f in found if f]}


@app.task(name="fleet.sweep.idempotency")
def sweep_idempotency() -> dict[str, Any]:
    """Release idempotency keys past their TTL."""
    return sweeps.release_keys(services()).to_json()


@app.task(name="fleet.sweep.retention")
def sweep_retention() -> dict[str, Any]:
    """Prune old runs, events and logs."""
    return sweeps.prune(services()).to_json()


def send_canary(queue: str, sent_at: str) -> None:
    """One canary through a queue; it marks itself returned when a worker runs it."""
    task = canary_dispatch if queue == "dispatch" else canary_agents
    task.apply_async((sent_at,), queue=queue, expires=watchdog.CANARY_DEADLINE_S * 5)


@app.task(name="fleet.watchdog")
def run_watchdog() -> dict[str, Any]:
    """Zero-token health check of the fleet; stores and returns the verdict."""
    return watchdog.run_watchdog(services(), send_canary).to_json()


@app.task(name="fleet.canary.dispatch")
def canary_dispatch(sent_at: str) -> str:
    """Comes straight back: proves the dispatch queue is being consumed."""
    watchdog.canary_returned(services().redis, "dispatch", sent_at)
    return sent_at


@app.task(name="fleet.canary.agents")
def canary_agents(sent_at: str) -> str:
    """Comes straight back: proves the agents queue is being consumed."""
    watchdog.canary_returned(services().redis, "agents", sent_at)
    return sent_at
