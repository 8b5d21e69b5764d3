"""The one place Celery is configured: `celery -A workers.app worker|beat|flower|call ...`.

Settings are read once here; clients are built per worker process after the fork, never at import.
Every Celery process is made non-dumpable at import (fleet/hardening.py), and a task parameter named
`payload` is sent to the broker but withheld from every event, log line and `inspect` answer, so
Flower never shows one (the sender's `task-sent` event and the worker's `task-received` alike).
"""

from __future__ import annotations

import functools
import inspect
import sys
from typing import Any

from celery import Celery, Task
from celery.signals import setup_logging, worker_process_init, worker_process_shutdown, worker_ready
from celery.utils.saferepr import saferepr
from celery.worker.request import Request
from kombu.entity import Queue

from fleet import alerts, hardening, logs
from fleet.config import MAX_OUTCOME_RETRY_S, load_settings, with_embedded_pointer
from fleet.services import Services, build
from workers import timers

# First, before any secret is read: a same-uid process (an agent) cannot read this one's memory or environ.
hardening.make_undumpable()

DISPATCH_QUEUE = "dispatch"
AGENTS_QUEUE = "agents"
# An agent may run at most this long (fleet.toml refuses more), so the broker's visibility timeout
# below always exceeds the longest run and a still-running task is never redelivered (PITFALLS #1).
MAX_AGENT_SECONDS = 24 * 3600
# The longest agent, then its outcome's retries through a database outage (fleet.toml's bound on outcome_retry_s),
# then half an hour for the rest (a poll, the kill grace, the log).
EXECUTE_TIME_LIMIT = MAX_AGENT_SECONDS + MAX_OUTCOME_RETRY_S + 1800
VISIBILITY_TIMEOUT = EXECUTE_TIME_LIMIT + 3600

settings = with_embedded_pointer(load_settings())  # `celery call` in the folder of a `fleet up --embedded`


# Without socket timeouts a publish to a frozen or silently gone Redis waits for ever (kombu's
# default): a dispatch would hang instead of answering 75. One retry, so a call stays near 10 s.
SOCKET_OPTIONS = {"socket_timeout": 5.0, "socket_connect_timeout": 3.0}
PUBLISH_RETRY_POLICY = {"max_retries": 1, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0}


def _transport_options() -> dict[str, float]:
    """The broker's redelivery timeout; a short one set by hand is also looked at often (kombu scans for
    messages past it every interval x throttle seconds: 100 s by default)."""
    if settings.visibility_timeout_s is None:
        return {"visibility_timeout": VISIBILITY_TIMEOUT, **SOCKET_OPTIONS}
    return {"visibility_timeout": settings.visibility_timeout_s, **SOCKET_OPTIONS,
            "unacked_restore_interval": max(1.0, settings.visibility_timeout_s / 2), "unacked_restore_throttle": 1}

# The one Sentry initialisation of every Celery process, at import: before the prefork pool forks
# (children inherit it) and before beat's scheduler starts (its check-ins are patched in).
alerts.init_sentry(settings, next((a for a in sys.argv[1:] if a in ("worker", "beat", "flower")), "celery"),
                   celery=True)

WITHHELD_PARAMS = frozenset({"payload"})  # task parameters never shown in events, logs, Flower or inspect


class _Withheld:
    def __repr__(self) -> str:
        return "<payload withheld>"


WITHHELD = _Withheld()


@functools.lru_cache(maxsize=256)
def _withheld_positions(task: Task) -> tuple[tuple[int, str], ...]:
    return tuple((i, name) for i, name in enumerate(inspect.signature(task.run).parameters)
                 if name in WITHHELD_PARAMS)


def withheld_reprs(task: Task | None, args: Any, kwargs: Any) -> tuple[str, str] | None:
    """(argsrepr, kwargsrepr) of a call with its withheld parameters masked; None when it has none."""
    positions = _withheld_positions(task) if task is not None else ()
    if not positions:
        return None
    shown_args, shown_kwargs = list(args or ()), dict(kwargs or {})
    for index, name in positions:
        if index < len(shown_args) and shown_args[index] is not None:
            shown_args[index] = WITHHELD
        if shown_kwargs.get(name) is not None:
            shown_kwargs[name] = WITHHELD
    return saferepr(shown_args), saferepr(shown_kwargs)


class WithheldRequest(Request):
    """The worker's view of a message, with withheld parameters masked in whatever the sender put in its
    headers: the `task-received` event, log lines and `inspect active/reserved` read these."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Decode as Celery does, then replace the reprs."""
        super().__init__(*args, **kwargs)
        reprs = withheld_reprs(self._task, self._args, self._kwargs)
        if reprs is not None:
            self._argsrepr, self._kwargsrepr = reprs
            self._request_dict["argsrepr"], self._request_dict["kwargsrepr"] = reprs

    def info(self, safe: bool = False) -> dict[str, Any]:
        """Always the reprs, never the raw arguments (`inspect active` asks for those by default)."""
        return dict(super().info(safe=True))


class FleetTask(Task):
    """Every task's worker-side request masks withheld parameters."""

    Request = WithheldRequest


class FleetCelery(Celery):
    """Celery whose sends (`apply_async`, `send_task`, `celery call`) mask withheld parameters in the
    message headers and in the `task-sent` event; the arguments themselves travel unchanged."""

    def send_task(self, name: str, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        """Send as Celery does, with the reprs computed here."""
        reprs = withheld_reprs(self.tasks.get(name), args, kwargs)
        if reprs is not None:
            options["argsrepr"], options["kwargsrepr"] = reprs
        return super().send_task(name, args, kwargs, **options)


app = FleetCelery("fleet", broker=settings.broker_url, backend=settings.broker_url, include=["workers.tasks"],
                  task_cls=FleetTask)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],  # pickle refused
    result_accept_content=["json"],
    result_expires=3600,  # a window onto recent decisions; the database is the record
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    # Not True (PITFALLS #5): on any broker blip it SIGTERMs every busy pool process, killing every running
    # agent and using up its retry. A redelivered execute is harmless anyway: its claim is fenced.
    worker_cancel_long_running_tasks_on_connection_loss=False,
    worker_deduplicate_successful_tasks=True,
    worker_max_tasks_per_child=1000,
    worker_max_memory_per_child=512_000,  # KiB
    worker_soft_shutdown_timeout=10,
    worker_send_task_events=True,
    task_send_sent_event=True,
    # No STARTED state in the result backend: Flower has the task-started event, a dispatch's state is its
    # result a few milliseconds later, and an execute keeps no result (workers/tasks.py). It was one more Redis
    # write before every task's body.
    task_track_started=False,
    broker_connection_retry_on_startup=True,
    broker_transport="workers.transport:Transport",  # kombu's Redis transport, surviving a lost connection
    broker_transport_options=_transport_options(),
    result_backend_transport_options=_transport_options(),
    redis_socket_timeout=SOCKET_OPTIONS["socket_timeout"],
    redis_socket_connect_timeout=SOCKET_OPTIONS["socket_connect_timeout"],
    task_publish_retry_policy=PUBLISH_RETRY_POLICY,
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


@worker_ready.connect
def _compact_timers(sender: Any, **_: Any) -> None:
    # The main process would keep every finished task's cancelled time-limit entry for 25.5 h.
    timers.schedule_compaction(getattr(sender, "timer", None))


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
