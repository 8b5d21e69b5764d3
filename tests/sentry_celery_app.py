"""The fleet's own Celery app with Sentry on, for tests: `celery -A tests.sentry_celery_app worker|beat`.

It does what workers/app.py does once `alerts.init_sentry` is wired there, and adds two tasks that
raise an alert or crash from inside a worker, the way Fleet's own code will.
"""

from __future__ import annotations

import sys
from typing import Any

from fleet import alerts, db, executor, store
from workers.app import app, services, settings

alerts.init_sentry(settings, next((a for a in sys.argv[1:] if a in ("worker", "beat", "flower")), "celery"),
                   celery=True)


@app.task(name="tests.sentry.alert_run")
def alert_run(kind: str, run_id: str) -> str:
    """Raise an alert about a run, carelessly passing the agent's whole environment as context."""
    svc = services()
    with db.session(svc.engine) as session:
        run = store.get_run(session=session, run_id=run_id)
        assert run is not None
        session.expunge(run)
    env = executor.agent_environment(run, svc.config.agent(run.agent))
    alerts.alert(kind, f"run {run.id} of {run.agent}: {env}", agent=run.agent, run_id=run.id, env=env,
                 note=f"FLEET_AGENT_KEY={env.get('FLEET_AGENT_KEY')}")
    return run.id


@app.task(name="tests.sentry.crash_with_key")
def crash_with_key(run_id: str) -> Any:
    """Crash while a local variable holds the agent's key (Sentry must not send locals)."""
    svc = services()
    with db.session(svc.engine) as session:
        run = store.get_run(session=session, run_id=run_id)
        assert run is not None
        session.expunge(run)
    key = executor.agent_environment(run, svc.config.agent(run.agent))["FLEET_AGENT_KEY"]
    raise RuntimeError(f"crashed while holding a key of {len(key)} characters")
