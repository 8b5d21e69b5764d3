"""The one place Celery is configured: `celery -A workers.app worker|beat|flower|call ...`.

Settings are read once here; clients are built per worker process after the fork, never at import.
"""

from __future__ import annotations

import sys
from typing import Any

from celery import Celery
from celery.signals import setup_logging, worker_process_init, worker_process_shutdown
from kombu.entity import Queue

from fleet import alerts, logs
from fleet.config import load_settings
from fleet.services import Services, build

DISPATCH_QUEUE = "dispatch"
AGENTS_QUEUE = "agents"
# An agent may run at most this long (fleet.toml refuses more), so the broker's visibility timeout
# below always exceeds the longest run and a still-running task is never redelivered (PITFALLS #1).
MAX_AGENT_SECONDS = 24 * 3600
EXECUTE_TIME_LIMIT = MAX_AGENT_SECONDS + 1800
VISIBILITY_TIMEOUT = EXECUTE_TIME_LIMIT + 3600

settings = load_settings()
# The one Sentry initialisation of every Celery process, at import: before the prefork pool forks
# (children inherit it) and before beat's scheduler starts (its check-ins are patched in).
alerts.init_sentry(settings, next((a for a in sys.argv[1:] if a in ("worker", "beat", "flower")), "celery"),
                   celery=True)

app = Celery("fleet", broker=settings.broker_url, backend=settings.broker_url, include=["workers.tasks"])
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],  # pickle refused
    result_accept_content=["json"],
    result_expires=3600,  # a window onto recent decisions; the database is the record
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    worker_cancel_long_running_tasks_on_connection_loss=True,
    worker_deduplicate_successful_tasks=True,
    worker_max_tasks_per_child=1000,
    worker_max_memory_per_child=512_000,  # KiB
    worker_soft_shutdown_timeout=10,
    worker_send_task_events=True,
    task_send_sent_event=True,
    task_track_started=True,
    broker_connection_retry_on_startup=True,
    broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT},
    result_backend_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT},
    task_default_queue=DISPATCH_QUEUE,
    task_queues=(Queue(DISPATCH_QUEUE, routing_key=DISPATCH_QUEUE), Queue(AGENTS_QUEUE, routing_key=AGENTS_QUEUE)),
    task_routes={"fleet.execute": {"queue": AGENTS_QUEUE}, "fleet.canary.agents": {"queue": AGENTS_QUEUE}},
    worker_hijack_root_logger=False,
    beat_scheduler="workers.beat:LeaderScheduler",
    beat_max_loop_interval=1,  # the leader lease is renewed every loop and lives 10 s
    timezone="UTC",
    enable_utc=True,
)

_services: Services | None = None


def services() -> Services:
    """This process's clients, built on first use after the fork."""
    global _services
    if _services is None:
        _services = build(settings)
    _services.refresh_config()  # a changed fleet.toml is picked up without a restart
    return _services


@setup_logging.connect
def _setup_logging(**_: Any) -> None:
    # Connecting here replaces Celery's own logging set-up: every line, Celery's included, is JSON.
    logs.configure("celery")


@worker_process_init.connect
def _init_process(**_: Any) -> None:
    # A pool child inherits the parent's sockets through fork: start with fresh clients of its own.
    global _services
    _services = None
    services()


@worker_process_shutdown.connect
def _close_process(**_: Any) -> None:
    if _services is not None:
        _services.close()


@app.on_after_finalize.connect
def _import_tasks(sender: Celery, **_: Any) -> None:
    # The tasks are named by import path (`include`), never imported here: workers.tasks imports this
    # module, not the reverse. The worker, beat and Flower import `include` as they start; anything
    # else that reads `app.tasks` (a script, `celery result --task`) finalizes the app first, and this
    # loads the same list then, so every process sees every task.
    sender.loader.import_default_modules()
