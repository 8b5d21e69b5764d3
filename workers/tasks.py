"""Thin Celery tasks: ids in, a call into `fleet.*`, a JSON-able result out. No business logic here."""

from __future__ import annotations

from typing import Any

from celery import Task

from fleet import dispatch as dispatching
from fleet import executor, killswitch
from fleet.keys import GLOBAL
from workers.app import AGENTS_QUEUE, EXECUTE_TIME_LIMIT, app, services


def send_execute(run_id: str, fence: int, countdown: float = 0.0) -> None:
    """Enqueue exactly one fleet.execute for a run on the agents queue."""
    execute.apply_async((run_id, fence), queue=AGENTS_QUEUE, countdown=countdown or None)


def _actor(task: Task) -> str:
    return f"celery:{task.request.hostname or 'client'}:{task.request.id}"


@app.task(name="fleet.dispatch", bind=True)
def dispatch(self: Task, agent: str, work_key: str | None = None, payload: Any = None,
             dry_run: bool = False) -> dict[str, Any]:
    """Dispatch one run of an agent (five steps); `dry_run=True` shows the plan and writes nothing."""
    request = dispatching.DispatchRequest(agent, work_key, payload, dry_run, actor=_actor(self))
    return dispatching.dispatch(services(), request, send_execute).to_json()


@app.task(name="fleet.execute", time_limit=EXECUTE_TIME_LIMIT)
def execute(run_id: str, fence: int) -> dict[str, Any]:
    """Run one attempt of a queued run; a stale or redelivered message starts nothing."""
    return executor.execute(services(), run_id, fence, send_execute).to_json()


@app.task(name="fleet.kill", bind=True)
def kill(self: Task, agent: str | None = None, reason: str | None = None, hard: bool = False) -> dict[str, Any]:
    """Engage the kill switch for the fleet (no agent) or one agent."""
    svc = services()
    scope = agent or GLOBAL
    if agent is not None:
        svc.config.agent(agent)
    killswitch.engage(svc.engine, svc.redis, scope=scope, reason=reason, actor=_actor(self), hard=hard,
                      now=svc.now())
    return {"scope": scope, "engaged": True, "reason": reason, "hard": hard}


@app.task(name="fleet.resume", bind=True)
def resume(self: Task, agent: str | None = None) -> dict[str, Any]:
    """Release the kill switch for the fleet (no agent) or one agent."""
    svc = services()
    scope = agent or GLOBAL
    killswitch.release(svc.engine, svc.redis, scope=scope, actor=_actor(self), now=svc.now())
    return {"scope": scope, "engaged": False}


@app.task(name="fleet.canary.dispatch")
def canary_dispatch(sent_at: str) -> str:
    """Comes straight back: proves the dispatch queue is being consumed."""
    return sent_at


@app.task(name="fleet.canary.agents")
def canary_agents(sent_at: str) -> str:
    """Comes straight back: proves the agents queue is being consumed."""
    return sent_at
