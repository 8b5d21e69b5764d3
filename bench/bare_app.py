"""The baseline: what a user would write instead of Fleet, a bare Celery task running the same command.

Worker settings match Fleet's workers (workers/app.py): JSON only, acks_late, reject on worker lost,
prefetch 1, a Redis result backend; the benchmark starts it with prefork `-c 2 -O fair`.
The broker is `BENCH_BROKER_URL` (a private redis-server started by the benchmark).

`BENCH_AS_FLEET=1` adds what Fleet's workers also turn on for Flower (task events, sent events), and
`bare.hop` is a task that only sends `bare.run`: the two together are the floor of Fleet's design,
in which a run is two Celery messages (the dispatch, then the execute it sends once the run is
durable), before any of Fleet's own work.
"""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any

from celery import Celery

BROKER = os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/0")
QUEUE = "bare"

app = Celery("bare", broker=BROKER, backend=BROKER)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
    result_expires=3600,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    task_default_queue=QUEUE,
    worker_hijack_root_logger=False,
)
if os.environ.get("BENCH_AS_FLEET") == "1":
    app.conf.update(worker_send_task_events=True, task_send_sent_event=True)


@app.task(name="bare.run")
def run() -> dict[str, Any]:
    """Run the no-op command; report when the task started and ended (Unix seconds)."""
    started = time.time()
    subprocess.run(["true"], check=False)
    return {"start": started, "end": time.time()}


@app.task(name="bare.hop")
def hop() -> str:
    """Send one bare.run, as fleet.dispatch sends one fleet.execute; its task id is the result."""
    return str(run.apply_async().id)
