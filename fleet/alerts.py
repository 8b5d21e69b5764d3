"""The one place Sentry is initialised and alerts are raised.

Each entry point calls `init_sentry` once (the worker and beat with `celery=True`); with no
FLEET_SENTRY_DSN it does nothing and `alert` only writes a log line. Whatever is sent is scrubbed
first: values under secret-looking names, and strings shaped like keys, tokens or passwords in URLs,
anywhere in an event or breadcrumb. Local variables, argv and subprocess breadcrumbs are never sent.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable
from enum import Enum
from typing import Any

import structlog

from fleet import __version__, logs
from fleet.config import Settings
from fleet.errors import ConfigError

log = logs.get(__name__)

REDACTED = "[redacted]"
DEDUPE_WINDOW_S = 60.0
MAX_BREADCRUMBS = 30
# Crons margins (PITFALLS #16): beat sends on the minute but a busy queue or a leader hand-over
# delays the worker's check-in; a monitor only opens an issue after two misses. The watchdog stays
# the primary signal.
CRON_MARGINS = {"checkin_margin": 5, "max_runtime": 30, "failure_issue_threshold": 2, "recovery_threshold": 1}
# Agent ticks run on Fleet's own schedules, which Sentry Crons cannot read: only the sweeps are monitored.
UNMONITORED_BEAT_TASKS = [r"fleet\.tick:.*"]


class Kind(str, Enum):
    """What an alert is about. Callers raise one per transition."""

    DEAD_LETTER = "dead_letter"
    CRASH_LOOP = "crash_loop"
    CAP_REFUSAL = "cap_refusal"
    OVERSPEND = "overspend"
    BREAKER_OPENED = "breaker_opened"
    KILL_ENGAGED = "kill_engaged"
    RESUME_REFUSED = "resume_refused"
    WATCHDOG_RED = "watchdog_red"
    REDIS_RESTART = "redis_restart"


# ---------------------------------------------------------------- scrubbing

_SECRET_WORDS = "key|token|secret|password|passwd|auth|credential|cookie|dsn|session|payload"
_SECRET_NAME = re.compile(_SECRET_WORDS, re.IGNORECASE)
_TOKEN_CHARS = r"A-Za-z0-9_\-+/="
_NAME = rf"[A-Za-z0-9_.\-]*(?:{_SECRET_WORDS})[A-Za-z0-9_.\-]*"
_UNMASKED = rf"(?!{re.escape(REDACTED)})"  # scrubbing twice changes nothing
_VALUE_RULES: list[tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]]] = [
    # Credentials in a URL: redis://:pw@host, postgresql://user:pw@host, https://token@host.
    (re.compile(r"(\b[A-Za-z][A-Za-z0-9+.\-]*://)[^/@\s\"']+@"), rf"\1{REDACTED}@"),
    # Authorization schemes: Bearer abc, Basic dXNlcjpwdw==, Token abc.
    (re.compile(r"\b([Bb]earer)\s+[A-Za-z0-9\-._~+/]+=*|\b(Basic|Token)\s+[A-Za-z0-9\-._~+/]{12,}=*"),
     lambda m: f"{m.group(1) or m.group(2)} {REDACTED}"),
    # NAME=value, "name": "value", name: value, where the name looks secret (ANTHROPIC_API_KEY=...).
    (re.compile(rf"(\b{_NAME}[\"']?\s*[:=]\s*){_UNMASKED}(?:\"[^\"]*\"|'[^']*'|[^\s\"',;&)}}\]]+)", re.IGNORECASE),
     rf"\1{REDACTED}"),
    # --api-key value / --token=value on a command line.
    (re.compile(rf"(?<!\S)(--?{_NAME}[\s=]+){_UNMASKED}\S+", re.IGNORECASE), rf"\1{REDACTED}"),
    # Well-known key shapes: Anthropic/OpenAI sk-, Stripe, GitHub, Slack, AWS, GitLab, Google, JWTs.
    (re.compile(r"\b(?:sk-[A-Za-z0-9_\-]{8,}|[rs]k_(?:live|test)_[A-Za-z0-9]{8,}|gh[pousr]_[A-Za-z0-9]{20,}"
                r"|github_pat_[A-Za-z0-9_]{20,}|xox[abposr]-[A-Za-z0-9\-]{10,}|AKIA[0-9A-Z]{16}"
                r"|glpat-[A-Za-z0-9_\-]{20,}|AIza[0-9A-Za-z_\-]{35}"
                r"|eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,})"), REDACTED),
]
# Any other long mixed-case-and-digit run is treated as a token (run ids and trace ids are lowercase hex).
_LONG_RUN = re.compile(rf"(?<![{_TOKEN_CHARS}])[A-Za-z0-9_\-+=][{_TOKEN_CHARS}]{{31,}}(?![{_TOKEN_CHARS}])")
_ID_ARG = re.compile(r"^[A-Za-z0-9_.:@\-]{0,80}$")


def _high_entropy(text: str) -> bool:
    if not (re.search(r"[a-z]", text) and re.search(r"[A-Z]", text) and re.search(r"[0-9]", text)):
        return False
    counts = Counter(text)
    entropy = -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())
    return entropy >= 3.0


def scrub_text(text: str) -> str:
    """Mask anything in a string that looks like a credential."""
    for pattern, replacement in _VALUE_RULES:
        text = pattern.sub(replacement, text)
    return _LONG_RUN.sub(lambda m: REDACTED if _high_entropy(m.group()) else m.group(), text)


def secret_name(name: str) -> bool:
    """Whether a key, variable or header name suggests its value is a secret."""
    return bool(_SECRET_NAME.search(name))


def scrub(value: Any) -> Any:
    """A copy of `value` with secrets masked, recursively through dicts, lists and strings."""
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, dict):
        return {key: REDACTED if isinstance(key, str) and secret_name(key) and not _harmless(item) else scrub(item)
                for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [scrub(item) for item in value]
    if isinstance(value, bytes | bytearray):
        return scrub_text(bytes(value).decode("utf-8", "replace"))
    return value


def _harmless(value: Any) -> bool:
    return value is None or isinstance(value, bool) or value in ("", REDACTED, "[Filtered]")


def _scrub_job(job: Any) -> Any:
    """Celery task arguments: Fleet's carry ids and agent names; anything payload-like is masked."""
    if not isinstance(job, dict):
        return scrub(job)
    job = dict(job)
    if isinstance(job.get("args"), list | tuple):
        job["args"] = [_id_or_masked(arg) for arg in job["args"]]
    if isinstance(job.get("kwargs"), dict):
        job["kwargs"] = {name: REDACTED if secret_name(str(name)) else _id_or_masked(arg)
                         for name, arg in job["kwargs"].items()}
    return scrub(job)


def _id_or_masked(arg: Any) -> Any:
    if arg is None or isinstance(arg, bool | int | float):
        return arg
    return arg if isinstance(arg, str) and _ID_ARG.match(arg) else REDACTED


def scrub_event(event: Any, _hint: Any = None) -> Any:
    """`before_send`: scrub the whole event; give Crons check-ins their margins."""
    extra = event.get("extra") if isinstance(event, dict) else None
    if isinstance(extra, dict) and "celery-job" in extra:
        extra["celery-job"] = _scrub_job(extra["celery-job"])
    event = scrub(event)
    config = event.get("monitor_config") if event.get("type") == "check_in" else None
    if isinstance(config, dict) and config.get("schedule"):
        for name, value in CRON_MARGINS.items():
            config.setdefault(name, value)
    return event


def scrub_breadcrumb(crumb: Any, _hint: Any = None) -> Any:
    """`before_breadcrumb`: drop subprocess and HTTP crumbs (argv and URLs carry secrets); scrub the rest."""
    if not isinstance(crumb, dict) or crumb.get("category") in ("subprocess", "httplib") \
            or crumb.get("type") == "subprocess":
        return None
    return scrub(crumb)


# ---------------------------------------------------------------- initialisation

_init_lock = threading.Lock()
_initialised = False


def init_sentry(settings: Settings, process: str, *, celery: bool = False) -> bool:
    """Start Sentry for this process when FLEET_SENTRY_DSN is set; a second call does nothing.

    `process` tags every event (worker, beat, flower, web, or the CLI command's name); `web` adds the
    Tornado integration, `beat` sends trace headers with its tasks (see below). Returns whether
    Sentry is on. A malformed DSN is a configuration error (exit 78).
    """
    global _initialised
    with _init_lock:
        if _initialised or not settings.sentry_dsn:
            return _initialised
        # Imported only with a DSN: sentry_sdk costs ~0.1 s at start that a CLI command without one
        # (`fleet kill` above all) should not pay.
        import sentry_sdk
        from sentry_sdk.integrations.argv import ArgvIntegration
        from sentry_sdk.integrations.logging import LoggingIntegration
        from sentry_sdk.integrations.stdlib import StdlibIntegration
        from sentry_sdk.utils import BadDsn

        # Log records become breadcrumbs only: errors are reported on purpose (alerts, crashes),
        # never by a log line that a Redis outage would repeat every second.
        integrations: list[Any] = [LoggingIntegration(event_level=None)]
        if celery:
            from sentry_sdk.integrations.celery import CeleryIntegration

            # No Sentry trace headers on Fleet's task messages, except beat's: they carry the start
            # time that gives the worker's `ok` check-in its duration.
            integrations.append(CeleryIntegration(monitor_beat_tasks=True, propagate_traces=process == "beat",
                                                  exclude_beat_tasks=UNMONITORED_BEAT_TASKS))
        if process == "web":
            from sentry_sdk.integrations.tornado import TornadoIntegration

            integrations.append(TornadoIntegration())  # a handler's unhandled exception is a crash
        try:
            sentry_sdk.init(
                dsn=settings.sentry_dsn,
                release=f"fleet@{__version__}",
                environment=getattr(settings, "sentry_environment", None),  # None: $SENTRY_ENVIRONMENT or production
                server_name=socket.gethostname(),
                send_default_pii=False,
                include_local_variables=False,
                max_breadcrumbs=MAX_BREADCRUMBS,
                max_request_body_size="never",
                before_send=scrub_event,
                before_send_transaction=scrub_event,
                before_breadcrumb=scrub_breadcrumb,
                auto_enabling_integrations=False,  # nothing unasked: Celery only where it is wanted
                integrations=integrations,
                # stdlib records subprocess argv (and HTTP URLs) in breadcrumbs; argv may carry payloads.
                disabled_integrations=[StdlibIntegration(), ArgvIntegration()],
                shutdown_timeout=2,
            )
        except BadDsn:
            raise ConfigError("FLEET_SENTRY_DSN is not a valid Sentry DSN") from None
        sentry_sdk.get_global_scope().set_tag("process", process)
        _initialised = True
        return True


def enabled() -> bool:
    """Whether this process sends to Sentry."""
    return _initialised


def flush(timeout_s: float = 2.0) -> None:
    """Send what is queued before a short-lived process (the CLI) exits; a no-op when Sentry is off."""
    if not _initialised:
        return
    import sentry_sdk

    try:
        sentry_sdk.flush(timeout=timeout_s)
    except Exception:  # noqa: BLE001 - losing an alert must never fail the command
        log.warning("alerts.flush_failed")


# ---------------------------------------------------------------- alerts


class Deduper:
    """Says yes to the first sighting of a key, then no until `window_s` has passed."""

    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic, max_keys: int = 4096) -> None:
        self.window_s, self.clock, self.max_keys = window_s, clock, max_keys
        self._seen: dict[Hashable, float] = {}
        self._lock = threading.Lock()

    def first(self, key: Hashable) -> bool:
        """True when `key` was not seen within the window (and remember it now)."""
        now = self.clock()
        with self._lock:
            last = self._seen.get(key)
            if last is not None and now - last < self.window_s:
                return False
            if len(self._seen) >= self.max_keys:
                self._seen = {k: t for k, t in self._seen.items() if now - t < self.window_s}
            self._seen[key] = now
            return True

    def after_fork(self) -> None:
        """Give a forked child a fresh lock (it keeps what its parent had seen)."""
        self._lock = threading.Lock()


def _logger() -> Any:
    """The process's structured log; before `logs.configure` (a CLI command), a plain one on stderr,
    since unconfigured structlog prints to stdout, where `--json` output goes."""
    if structlog.is_configured():
        return log
    return structlog.wrap_logger(structlog.PrintLogger(sys.__stderr__ or sys.stderr)).bind(logger=__name__)


_recent = Deduper(DEDUPE_WINDOW_S)
# A prefork child must not inherit the lock held by another thread of its parent.
os.register_at_fork(after_in_child=_recent.after_fork)
_LEVELS = {"fatal": "fatal", "critical": "fatal", "error": "error", "warning": "warning", "warn": "warning",
           "info": "info", "debug": "debug"}


def alert(kind: str, message: str, *, agent: str | None = None, run_id: str | None = None, level: str = "error",
          **context: Any) -> None:
    """Raise one alert: a Sentry event tagged alert/agent/run_id, and a log line (the only trace when Sentry is off).

    Callers call it on a transition; a repeat of the same (kind, agent, run_id) within
    DEDUPE_WINDOW_S is dropped. It never raises.
    """
    try:
        kind = str(getattr(kind, "value", kind))
        if not _recent.first((kind, agent, run_id)):
            return
        level = _LEVELS.get(str(level).lower(), "error")
        safe = scrub(context)
    except Exception:  # noqa: BLE001 - an alert must never break the caller
        return
    # Two independent tries: a context that cannot be logged must not stop the event, nor the reverse.
    out = _logger()
    try:
        getattr(out, "critical" if level == "fatal" else level)(
            "alert", kind=kind, message=scrub_text(message), agent=agent, run_id=run_id, context=safe)
    except Exception:  # noqa: BLE001
        with contextlib.suppress(Exception):
            out.error("alert", kind=kind, message=scrub_text(message), agent=agent, run_id=run_id,
                      context="(could not be rendered)")
    if not _initialised:
        return
    import sentry_sdk

    try:
        tags = {"alert": kind} | ({"agent": agent} if agent else {}) | ({"run_id": run_id} if run_id else {})
        sentry_sdk.capture_message(message, level=level, tags=tags,  # type: ignore[arg-type]
                                   fingerprint=[kind, agent or "fleet"],
                                   contexts={"alert": {"kind": kind, **safe}})
    except Exception:  # noqa: BLE001
        with contextlib.suppress(Exception):
            log.warning("alerts.capture_failed", kind=kind, agent=agent, run_id=run_id)
