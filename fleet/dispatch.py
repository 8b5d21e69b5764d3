"""The dispatch: five named steps, in a fixed order, each there because skipping it has a price.

1. archive_stale  - a unit's runs that never started and are superseded or stale become `archived`
2. create         - one Run row per idempotency key; a repeat gets the existing run (`duplicate`)
3. plan           - what would fire now and every gate's verdict (kill, pause, breaker, bounded, caps,
                    lock); `dry_run` stops here, writing nothing
4. dispatch_one   - a fenced slot lease, the spend reservation and the day's run count, status
                    `queued`, one execute message
5. watch          - the executor (fleet/executor.py) owns the run from there
Clients, the clock and the message sender are injected, so a test can run every step against a
fixed clock and count what each did. Expected outcomes (duplicate, busy, over cap) are results.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any

import redis
from sqlalchemy import delete, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col

from fleet import alerts, db, killswitch, ledger, pause, store
from fleet.config import AgentSpec, read_text
from fleet.errors import BadInputError, UnavailableError
from fleet.ledger import Caps
from fleet.locks import Lease
from fleet.models import NOT_STARTED, Run, RunStatus
from fleet.services import Services, as_fleet_error

WORK_KEY = re.compile(r"^[\x21-\x7e]{1,200}$")  # printable ASCII, no spaces: it is part of a unique key
MAX_PAYLOAD_BYTES = 32 * 1024  # it travels in the agent's environment, which the kernel limits

Sender = Callable[[str, int], None]  # (run_id, fence): enqueue exactly one fleet.execute


@dataclass(frozen=True)
class DispatchRequest:
    """What a caller asked for, validated by `validate`."""

    agent: str
    work_key: str | None = None
    payload: Any = None
    dry_run: bool = False
    actor: str = "unknown"
    prev_run_id: str | None = None  # a replay names the dead run it re-runs
    replay_of: int | None = None  # ... and its dead letter


@dataclass(frozen=True)
class Gate:
    """One gate's verdict."""

    ok: bool
    detail: str


@dataclass
class DispatchResult:
    """The dispatch's answer, returned as JSON by `fleet.dispatch`."""

    run_id: str | None
    status: str  # queued, duplicate, refused, misdispatch, dry_run
    would_fire: list[str] = field(default_factory=list)
    gates: dict[str, Gate] = field(default_factory=dict)
    reason: str | None = None
    archived: list[str] = field(default_factory=list)
    fence: int | None = None

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types only (Celery results, `--json` output)."""
        return asdict(self)


# ---------------------------------------------------------------- validation


def validate(services: Services, request: DispatchRequest) -> tuple[AgentSpec, str, str | None]:
    """The agent (69 when unknown), the work key and the payload as JSON text (65 when malformed)."""
    spec = services.config.agent(request.agent)
    work_key = request.work_key if request.work_key is not None else uuid.uuid4().hex
    if not isinstance(work_key, str) or not WORK_KEY.match(work_key):
        raise BadInputError("work key must be 1-200 printable ASCII characters without spaces "
                            "(no unicode, control characters or NUL)")
    return spec, work_key, _payload_text(request.payload)


def _payload_text(payload: Any) -> str | None:
    if payload is None:
        return None
    try:
        text = json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise BadInputError(f"payload must be JSON-serialisable: {exc}") from None
    if "\x00" in text:
        raise BadInputError("payload must not contain NUL characters")
    if len(text.encode()) > MAX_PAYLOAD_BYTES:
        raise BadInputError(f"payload is {len(text.encode())} bytes; the limit is {MAX_PAYLOAD_BYTES}")
    return text


def parse_payload(text: str | None) -> Any:
    """A payload given as JSON text on the command line (65 when it is not JSON)."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInputError(f"payload is not valid JSON: {exc.msg} at position {exc.pos}") from None


def payload_argument(value: str | None, stdin: IO[str]) -> Any:
    """`--payload`: JSON text, `@FILE` (read from the file) or `-` (read from stdin); 65 when unusable.

    The file and stdin forms keep the payload out of the command line, which every user of the
    machine can read (`ps`, /proc/PID/cmdline). JSON never starts with `@` and `-` alone is not JSON,
    so the forms cannot be mistaken for each other.
    """
    if value == "-":
        return parse_payload(stdin.read())
    if value is not None and value.startswith("@"):
        try:
            return parse_payload(read_text(Path(value[1:])))
        except ValueError as exc:
            raise BadInputError(f"payload: {exc}") from None
    return parse_payload(value)


# ---------------------------------------------------------------- the orchestrator


def dispatch(services: Services, request: DispatchRequest, send: Sender) -> DispatchResult:
    """Run the five steps for one request. Raises UnavailableError (75) when Redis or the DB is down."""
    spec, work_key, payload = validate(services, request)
    idem_key = f"{spec.name}:{work_key}"
    try:
        services.redis.ping()  # fail before anything is written when Redis is away
        if request.dry_run:
            return dry_run(services, spec, work_key, idem_key)
        archived = archive_stale(services, spec, work_key, idem_key)
        run, created = create(services, spec, work_key, idem_key, payload, request)
    except (redis.RedisError, SQLAlchemyError) as exc:
        raise as_fleet_error(exc) from None
    if not created:
        return DispatchResult(run.id, "duplicate", reason=f"already {run.status}", archived=archived, fence=run.fence)
    try:
        result = plan(services, spec, run.id, work_key, idem_key)
        result.archived = archived
        if result.status != "ok":
            return _abort(services, run, result)
        return dispatch_one(services, spec, run, result, send)
    except (redis.RedisError, SQLAlchemyError, UnavailableError) as exc:
        # Undo the row, so the retry that 75 invites is not answered "duplicate" for work never done.
        with contextlib.suppress(SQLAlchemyError):
            _abort(services, run, DispatchResult(run.id, "failed", reason=exc.__class__.__name__))
        raise (exc if isinstance(exc, UnavailableError) else as_fleet_error(exc)) from None


# ---------------------------------------------------------------- step 1: archive-stale


def archive_stale(services: Services, spec: AgentSpec, work_key: str, idem_key: str) -> list[str]:
    """Archive the unit's never-started runs that another key superseded or that are older than stale_after."""
    now = services.now()
    cutoff = now - timedelta(seconds=services.config.fleet.stale_after_s)
    with db.session(services.engine) as session:
        stale = [r for r in store.pending_runs(session=session, agent=spec.name, work_key=work_key)
                 if r.idem_key != idem_key or r.created_at < cutoff]
        for run in stale:
            archive(session, services, run, reason="superseded" if run.idem_key != idem_key else "stale")
        if stale:
            session.commit()  # nothing to archive (the usual case) commits nothing
    return [run.id for run in stale]


def archive(session: Session, services: Services, run: Run, *, reason: str) -> bool:
    """End a never-started run: its late execute message becomes a no-op, its slot and money come back."""
    now = services.now()
    changed = session.execute(update(Run).where(col(Run.id) == run.id, col(Run.status).in_(NOT_STARTED))
                           .values(status=RunStatus.ARCHIVED, finished_at=now, updated_at=now, error=reason))
    if db.rowcount(changed) != 1:
        return False
    run.status = RunStatus.ARCHIVED
    ledger.settle(session, run=run, now=now)
    store.add_event(session=session, at=now, kind="run.archived", run_id=run.id, agent=run.agent, reason=reason)
    if run.fence is not None and run.slot is not None:
        services.leases.release(Lease(run.agent, run.slot, run.id, run.fence))
    services.breakers.forfeit(run.agent, run.id)  # a trial that never ran frees the half-open breaker
    return True


# ---------------------------------------------------------------- step 2: create


def create(services: Services, spec: AgentSpec, work_key: str, idem_key: str, payload: str | None,
           request: DispatchRequest) -> tuple[Run, bool]:
    """Insert the run unless its key exists; returns (run, created). Never a second row for a key."""
    now = services.now()
    run_id = uuid.uuid4().hex
    with db.session(services.engine) as session:
        insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
        row = {"id": run_id, "idem_key": idem_key, "agent": spec.name, "work_key": work_key,
               "status": RunStatus.CREATED.value, "attempt": 0, "max_attempts": 2, "payload": payload,
               "reserved_micros": 0, "cost_micros": 0, "dispatched_by": request.actor[:255],
               "prev_run_id": request.prev_run_id, "replay_of": request.replay_of,
               "created_at": now, "updated_at": now}
        inserted = session.execute(insert(Run).values(row).on_conflict_do_nothing().returning(col(Run.id))).first()
        if inserted is not None:
            store.add_event(session=session, at=now, kind="run.created", run_id=run_id, agent=spec.name,
                            actor=request.actor, work_key=work_key, replay_of=request.replay_of)
            session.commit()
            run = store.get_run(session=session, run_id=run_id)
            assert run is not None
            return run, True
        session.rollback()
        existing = store.get_run_by_key(session=session, idem_key=idem_key)
        if existing is None:  # created and refused (deleted) in between: the caller may try again
            raise UnavailableError(f"run for {idem_key!r} vanished while deduplicating; retry")
        return existing, False


# ---------------------------------------------------------------- step 3: dry-run (the plan)


def plan(services: Services, spec: AgentSpec, run_id: str | None, work_key: str, idem_key: str) -> DispatchResult:
    """What would fire now for this unit and each gate's verdict. Reads only."""
    with db.session(services.engine) as session:
        pending = [r.id for r in store.pending_runs(session=session, agent=spec.name, work_key=work_key)
                   if r.status == RunStatus.CREATED]
        gates = _gates(services, session, spec)
    would_fire = pending if run_id is not None else [*pending, f"new:{idem_key}"]
    result = DispatchResult(run_id, "ok", would_fire=would_fire, gates=gates)
    expected = [run_id] if run_id is not None else [f"new:{idem_key}"]
    if would_fire != expected:
        result.status, result.reason = "misdispatch", f"expected to fire {expected}, would fire {would_fire}"
    else:
        closed = [name for name, gate in gates.items() if not gate.ok]
        if closed:
            result.status, result.reason = "refused", _REFUSAL[closed[0]]
    return result


_REFUSAL = {"kill": "killed", "pause": "paused", "breaker": "breaker_open", "bounded": "bounded",
            "caps": "over_cap", "lock": "busy"}


def _gates(services: Services, session: Session, spec: AgentSpec) -> dict[str, Gate]:
    # Either store saying "killed" wins. Redis unreachable raises: the dispatch refuses with 75.
    kill = killswitch.check(session, services.redis, spec.name)
    paused = pause.check(session, services.redis, spec.name)
    fleet = services.config.fleet
    verdict = services.breakers.peek(spec.name, now=services.now().timestamp(),
                                     cooldown_s=spec.breaker_settings(fleet)[1])
    caps = caps_of(services, spec)
    estimate = ledger.to_micros(spec.est_cost_usd) or 0
    day = ledger.budget_day(session, fleet.timezone)
    room = ledger.headroom(session, day=day, agent=spec.name, caps=caps)
    free = services.leases.free_slots(spec.name, spec.concurrency)
    counted = ledger.runs_counted(session, day=day, agent=spec.name)
    bound = spec.max_runs_per_day
    return {
        "kill": Gate(not kill.killed, kill.describe()),
        "pause": Gate(not paused.paused, paused.describe()),
        "breaker": Gate(verdict.allowed, verdict.state),
        "bounded": Gate(bound is None or counted < bound,
                        f"{counted} run(s) today, no bound" if bound is None else f"{counted} of {bound} run(s) today"),
        "caps": Gate(room is None or estimate <= room,
                     "no cap" if room is None else f"needs ${ledger.to_usd(estimate):.2f}, "
                                                   f"${ledger.to_usd(max(room, 0)):.2f} left today"),
        "lock": Gate(free > 0, f"{free} of {spec.concurrency} slot(s) free"),
    }


def caps_of(services: Services, spec: AgentSpec) -> Caps:
    """The agent's and the fleet's daily caps in micro-dollars."""
    return Caps(agent=ledger.to_micros(spec.daily_cap_usd), fleet=ledger.to_micros(services.config.fleet.daily_cap_usd))


def dry_run(services: Services, spec: AgentSpec, work_key: str, idem_key: str) -> DispatchResult:
    """The plan alone: no row, no Redis key, no message."""
    with db.session(services.engine) as session:
        existing = store.get_run_by_key(session=session, idem_key=idem_key)
    if existing is not None:
        return DispatchResult(existing.id, "dry_run", reason=f"duplicate: already {existing.status}")
    result = plan(services, spec, None, work_key, idem_key)
    result.reason = result.reason if result.status != "ok" else "would fire"
    result.status = "dry_run"
    return result


# ---------------------------------------------------------------- step 4: dispatch-one


def dispatch_one(services: Services, spec: AgentSpec, run: Run, result: DispatchResult,
                 send: Sender) -> DispatchResult:
    """Take a slot, reserve the estimate, mark queued, send exactly one execute message."""
    now = services.now()
    fleet = services.config.fleet
    kill = killswitch.check_redis(services.redis, spec.name)  # intake stops at once, at every step
    if kill.killed:
        return _refuse(services, run, result, "killed")
    cooldown = spec.breaker_settings(fleet)[1]
    if not services.breakers.admit(spec.name, run.id, now=now.timestamp(), cooldown_s=cooldown).allowed:
        return _refuse(services, run, result, "breaker_open")
    # Queued runs wait in the broker, so the lease must outlive the wait: the reaper renews the
    # leases of runs still waiting, and the executor shortens it to the lease TTL once the run starts.
    lease = services.leases.acquire(spec.name, spec.concurrency, run.id, ttl_s=fleet.queued_lease_ttl_s)
    if lease is None:
        services.breakers.forfeit(spec.name, run.id)
        return _refuse(services, run, result, "busy")
    queued = _reserve_and_queue(services, spec, run, lease, now)
    if queued != "queued":
        services.leases.release(lease)
        services.breakers.forfeit(spec.name, run.id)
        if queued == "ended":  # another dispatcher ended the row in between: it is not ours to queue
            result.status, result.reason = "misdispatch", "the run was ended by another dispatcher before it queued"
            return result
        if queued == "over_cap":
            alerts.alert("cap_refusal", f"dispatch of {spec.name} refused: its daily cap or the fleet's is reached",
                         agent=spec.name, level="warning")
        return _refuse(services, run, result, queued)
    try:
        send(run.id, lease.fence)
    except Exception as exc:  # noqa: BLE001 - whatever the broker raised, nothing may stay half-done
        _unsend(services, run, lease)
        raise UnavailableError(f"could not enqueue the run ({exc.__class__.__name__}); nothing was kept: "
                               "its slot and reservation were returned, and the same key may be dispatched "
                               "again") from None
    result.status, result.fence, result.reason = "queued", lease.fence, None
    return result


def _reserve_and_queue(services: Services, spec: AgentSpec, run: Run, lease: Lease, now: datetime) -> str:
    """Reserve the estimate, count the run and mark it queued, in one transaction: `queued` when done,
    `over_cap` or `bounded` when refused, `ended` when the row is no longer `created` (another
    dispatcher archived it)."""
    estimate = ledger.to_micros(spec.est_cost_usd) or 0
    with db.session(services.engine) as session:
        day = ledger.budget_day(session, services.config.fleet.timezone)
        if not ledger.reserve(session, day=day, agent=spec.name, amount=estimate, caps=caps_of(services, spec),
                              now=now):
            session.rollback()
            return "over_cap"
        if not ledger.count_run(session, day=day, agent=spec.name, limit=spec.max_runs_per_day, now=now):
            session.rollback()  # the reservation goes with it
            return "bounded"
        moved = session.execute(update(Run).where(col(Run.id) == run.id, col(Run.status) == RunStatus.CREATED)
                                .values(status=RunStatus.QUEUED, fence=lease.fence, slot=lease.slot, budget_day=day,
                                        reserved_micros=estimate, queued_at=now, updated_at=now, sends=1))
        if db.rowcount(moved) != 1:
            session.rollback()  # the reservation and the count go with it
            return "ended"
        store.add_event(session=session, at=now, kind="run.queued", run_id=run.id, agent=spec.name,
                        fence=lease.fence, slot=lease.slot, reserved_micros=estimate)
        session.commit()
    run.status, run.fence, run.slot, run.budget_day, run.reserved_micros = (
        RunStatus.QUEUED, lease.fence, lease.slot, day, estimate)
    return "queued"


def _unsend(services: Services, run: Run, lease: Lease) -> None:
    """The message could not be sent: return the reservation and the slot and delete the row, so the
    retry that 75 invites dispatches the key afresh (a message that did get through finds no run)."""
    now = services.now()
    with db.session(services.engine) as session:
        fresh = store.get_run(session=session, run_id=run.id)
        if fresh is not None and fresh.status == RunStatus.QUEUED and fresh.fence == lease.fence:
            ledger.settle(session, run=fresh, now=now)
            if fresh.budget_day is not None:
                ledger.uncount_run(session, day=fresh.budget_day, agent=fresh.agent)
            session.execute(delete(Run).where(col(Run.id) == run.id, col(Run.status) == RunStatus.QUEUED,
                                              col(Run.fence) == lease.fence))
            store.add_event(session=session, at=now, kind="dispatch.enqueue_failed", run_id=run.id, agent=run.agent)
        session.commit()
    services.leases.release(lease)
    services.breakers.forfeit(run.agent, run.id)


def _refuse(services: Services, run: Run, result: DispatchResult, reason: str) -> DispatchResult:
    result.status, result.reason = "refused", reason
    return _abort(services, run, result)


def _abort(services: Services, run: Run, result: DispatchResult) -> DispatchResult:
    """Undo the created row (it never happened, so the same key may be dispatched later); keep the event."""
    now = services.now()
    with db.session(services.engine) as session:
        session.execute(delete(Run).where(col(Run.id) == run.id, col(Run.status) == RunStatus.CREATED))
        store.add_event(session=session, at=now, kind=f"dispatch.{result.status}", run_id=run.id, agent=run.agent,
                        reason=result.reason)
        session.commit()
    return result
