"""One process of a dispatch storm: N dispatches from 8 threads, results to a JSON file.

Run by tests as `python -m tests.storm CONFIG REDIS_URL DATABASE_URL AGENT WORK_KEY N OUT START_AT
[--tolerate-outages]`; with the flag, a dispatch that answers 75 (a service down) is recorded as
`unavailable` instead of failing the storm.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from celery import Celery

from fleet.config import Settings, load_fleet_config
from fleet.dispatch import DispatchRequest, dispatch
from fleet.errors import UnavailableError
from fleet.services import build
from workers import broker


def main() -> None:
    config, redis_url, database_url, agent, work_key, n, out, start_at = sys.argv[1:9]
    tolerate = "--tolerate-outages" in sys.argv[9:]
    # 64 writers at once queue on SQLite's one write lock: on a loaded 2-core machine the last one can wait
    # past the default 10 s. The storm is about races, not about that wait (unless it tolerates outages).
    settings = Settings(config=Path(config), redis_url=redis_url, database_url=database_url,
                        db_timeout_s=10.0 if tolerate else 60.0)
    services = build(settings, load_fleet_config(Path(config)))
    celery = Celery("storm", broker=redis_url)
    celery.conf.update(task_serializer="json", accept_content=["json"])

    def send(run_id: str, fence: int) -> None:
        celery.send_task("fleet.execute", args=[run_id, fence], queue="agents",
                         task_id=broker.execute_task_id(run_id, fence))

    def one(_: int) -> dict[str, object]:
        # "@distinct" gives every dispatch a key of its own (a cap race), anything else one key for all.
        key = f"race-{uuid.uuid4().hex}" if work_key == "@distinct" else work_key
        try:
            result = dispatch(services, DispatchRequest(agent, key, actor="storm"), send)
        except UnavailableError as exc:
            if not tolerate:
                raise
            return {"run_id": None, "status": "unavailable", "reason": str(exc)}
        return {"run_id": result.run_id, "status": result.status, "reason": result.reason}

    # A start barrier: every process of the storm fires at the same moment, after its imports.
    time.sleep(max(0.0, float(start_at) - time.time()))
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(int(n))))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
