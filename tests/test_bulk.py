"""A beat pass in one batch (fleet/bulk.py) answers what one tick per agent would, gate by gate, and keeps
the ledger, the leases and the keys exact, also when a second pass races it or the fleet cap is reached."""

from __future__ import annotations

import dataclasses
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event
from sqlmodel import col, select

import beat_schedule
from fleet import db, keys, killswitch, pause, ticks
from fleet.breaker import Outcome
from fleet.models import Run, RunEvent, RunStatus, SpendDay
from fleet.services import Services
from tests.harness import AGENTS

EVERY = 'schedule = "every 60s"\nest_cost_usd = 0.01\ncommand = ["true"]\ntimeout_s = 30\n'
GATED = ("b-plain-a", "b-plain-b", "b-capped", "b-bounded", "b-busy", "b-tripped", "b-killed", "b-paused")


@pytest.fixture
def services_agents() -> str:
    toml = AGENTS + "".join(f"\n[agents.{name}]\n{EVERY}" for name in ("b-plain-a", "b-plain-b", "b-busy", "b-tripped",
                                                                       "b-killed", "b-paused"))
    toml += f"\n[agents.b-capped]\n{EVERY}daily_cap_usd = 0.015\nconcurrency = 2\n"
    toml += f"\n[agents.b-bounded]\n{EVERY}max_runs_per_day = 1\nconcurrency = 2\n"
    return toml


class Sent(list[tuple[str, int]]):
    """The execute messages a pass sent."""

    def __call__(self, run_id: str, fence: int) -> None:
        self.append((run_id, fence))


def _frozen(services: Services, at: datetime) -> None:
    services.now = lambda: at  # type: ignore[method-assign]


def _runs(services: Services) -> list[Run]:
    with db.session(services.engine) as session:
        return list(session.exec(select(Run)))


def _ledger_matches_runs(services: Services) -> None:
    """Every micro-dollar reserved in the ledger is a queued run's, and every run is counted once."""
    runs = _runs(services)
    with db.session(services.engine) as session:
        rows = {row.scope: row for row in session.exec(select(SpendDay))}
    queued = [r for r in runs if r.status == RunStatus.QUEUED]
    assert rows["*"].reserved_micros == sum(r.reserved_micros for r in queued)
    for agent in {r.agent for r in runs}:
        mine = [r for r in runs if r.agent == agent]
        assert rows[agent].reserved_micros == sum(r.reserved_micros for r in mine if r.status == RunStatus.QUEUED)
        assert rows[agent].runs == len(mine)


def test_a_batch_answers_each_gate_as_a_single_tick_would(services: Services) -> None:
    now = datetime(2026, 12, 1, 10, 0, 30, tzinfo=UTC)
    _frozen(services, now)
    sent = Sent()
    # Before the pass: busy's one slot taken by a run of another key; tripped's breaker open; a kill and a
    # pause on one agent each; bounded and capped each have room for one run today.
    assert services.leases.acquire("b-busy", 1, "someone-else", ttl_s=60) is not None
    services.breakers.record("b-tripped", "r0", Outcome.AUTH, threshold=3, attempt=1)
    killswitch.engage(services.engine, services.redis, scope="b-killed", reason="test", actor="test", hard=False,
                      now=now)
    pause.engage(services.engine, services.redis, scope="b-paused", reason="test", actor="test", now=now)
    first = ticks.tick_many(services, list(GATED), sent, at=services.now())
    assert {name: (r.status, r.reason) for name, r in first.items()} == {
        "b-plain-a": ("queued", None), "b-plain-b": ("queued", None), "b-capped": ("queued", None),
        "b-bounded": ("queued", None), "b-busy": ("refused", "busy"), "b-tripped": ("refused", "breaker_open"),
        "b-killed": ("refused", "killed"), "b-paused": ("refused", "paused")}
    queued = {r.run_id for r in first.values() if r.status == "queued"}
    assert {run_id for run_id, _ in sent} == queued and len(sent) == 4
    runs = {r.id: r for r in _runs(services)}
    assert set(runs) == queued  # a refusal leaves no row
    for name in ("b-plain-a", "b-capped"):
        run = runs[first[name].run_id or ""]
        assert run.work_key == "schedule:2026-12-01T10:00:00+00:00" and run.fence == first[name].fence
        assert [(h.run_id, h.fence) for h in services.leases.holders(name, 1)] == [(run.id, run.fence)]
    _ledger_matches_runs(services)
    # The same slot again: duplicates, answered from the key alone; nothing new is sent.
    again = ticks.tick_many(services, list(GATED), sent, at=services.now())
    assert {name for name, r in again.items() if r.status == "duplicate"} == {
        "b-plain-a", "b-plain-b", "b-capped", "b-bounded"}
    assert len(sent) == 4
    # The next slot, with the first runs still queued: capped is over its cap, bounded past its bound, and
    # plain agents (concurrency 1) busy behind their own first runs.
    _frozen(services, now + timedelta(seconds=60))
    later = ticks.tick_many(services, ["b-plain-a", "b-capped", "b-bounded"], sent, at=services.now())
    assert {name: r.reason for name, r in later.items()} == {"b-plain-a": "busy", "b-capped": "over_cap",
                                                             "b-bounded": "bounded"}
    _ledger_matches_runs(services)
    with db.session(services.engine) as session:
        kinds = [e.kind for e in session.exec(select(RunEvent).where(col(RunEvent.agent) == "b-plain-a"))]
    assert kinds.count("run.created") == kinds.count("run.queued") == 1 and "dispatch.refused" in kinds


def test_a_fleet_cap_that_cannot_take_the_batch_decides_one_run_at_a_time(services: Services) -> None:
    """$0.025 left for the fleet and five $0.01 runs: exactly two go, as five single ticks would decide."""
    now = datetime(2026, 12, 1, 10, 0, 30, tzinfo=UTC)
    _frozen(services, now)
    services.config = dataclasses.replace(services.config,
                                          fleet=services.config.fleet.model_copy(update={"daily_cap_usd": 0.025}))
    sent = Sent()
    agents = ["b-plain-a", "b-plain-b", "b-busy", "b-tripped", "b-killed"]
    results = ticks.tick_many(services, agents, sent, at=services.now())
    statuses = [results[name].status for name in ("b-plain-a", "b-plain-b", "b-busy", "b-tripped", "b-killed")]
    assert statuses == ["queued", "queued", "refused", "refused", "refused"]
    assert {r.reason for r in results.values() if r.status == "refused"} == {"over_cap"}
    assert len(sent) == 2
    _ledger_matches_runs(services)


def test_two_passes_racing_over_one_slot_make_one_run_per_agent(services: Services) -> None:
    """Two beats (a leader handover) tick the same slot at once: one run per agent, reserved once."""
    _frozen(services, datetime(2026, 12, 1, 10, 0, 30, tzinfo=UTC))
    agents = ["b-plain-a", "b-plain-b", "b-busy", "b-tripped", "b-killed", "b-paused", "b-capped", "b-bounded"]
    sent = Sent()
    answers: list[dict[str, Any]] = []
    barrier = threading.Barrier(2)

    def one_pass() -> None:
        barrier.wait()
        answers.append(ticks.tick_many(services, agents, sent, at=services.now()))

    threads = [threading.Thread(target=one_pass) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(answers) == 2
    runs = _runs(services)
    assert sorted(r.agent for r in runs) == sorted(agents) and len(sent) == len(agents)
    for agent in agents:
        (run,) = [r for r in runs if r.agent == agent]
        won, lost = sorted((answers[0][agent], answers[1][agent]), key=lambda r: r.status != "queued")
        assert won.status == "queued" and won.run_id == run.id
        # The loser waited on the key (a duplicate), or found the slot or the money taken by the winner's
        # uncommitted run, as two single dispatches racing can (refused, and nothing of it kept).
        assert (lost.status, lost.run_id) == ("duplicate", run.id) or (
            lost.status == "refused" and lost.reason in {"busy", "over_cap"}), (won, lost)
    _ledger_matches_runs(services)


def test_a_message_that_cannot_be_sent_undoes_its_run_only(services: Services) -> None:
    _frozen(services, datetime(2026, 12, 1, 10, 0, 30, tzinfo=UTC))
    sent = Sent()
    calls: list[str] = []

    def flaky(run_id: str, fence: int) -> None:
        calls.append(run_id)
        if len(calls) == 2:
            raise ConnectionError("broker went away")
        sent(run_id, fence)

    results = ticks.tick_many(services, ["b-plain-a", "b-plain-b", "b-capped"], flaky, at=services.now())
    assert sorted(r.status for r in results.values()) == ["queued", "queued", "unavailable"]
    (lost,) = [name for name, r in results.items() if r.status == "unavailable"]
    assert lost not in {r.agent for r in _runs(services)} and services.leases.holders(lost, 1) == []
    _ledger_matches_runs(services)
    again = ticks.tick_many(services, [lost], sent, at=services.now())  # its key may be dispatched again
    assert again[lost].status == "queued"


def test_beat_ticks_agents_that_share_a_schedule_in_one_message(services: Services) -> None:
    entries = beat_schedule.build(services.config)
    ticks_entries = {name: entry for name, entry in entries.items() if entry["task"] == "fleet.ticks"}
    assert list(ticks_entries) == ["fleet.ticks:every 60s"]
    (names,) = ticks_entries["fleet.ticks:every 60s"]["args"]
    assert sorted(names) == sorted(GATED)


def _no_lease_or_trial_left(services: Services, agents: list[str]) -> None:
    """Nothing of a pass that kept nothing stays in Redis: no slot held, no breaker trial taken."""
    for agent in agents:
        assert services.leases.holders(agent, 2) == [], agent
        assert not services.breakers.state(agent).get("trial"), agent


def test_a_failure_while_judging_one_agent_gives_back_every_lease_and_trial(services: Services,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The database goes away as the batch reads b-paused's pause (its Redis flag lost, the mirror holds it):
    the pass keeps nothing, so the agents judged after it must not keep their slots or the breaker's trial."""
    from sqlalchemy.exc import OperationalError

    from fleet import bulk, keys

    now = datetime(2026, 12, 1, 10, 0, 30, tzinfo=UTC)
    _frozen(services, now)
    pause.engage(services.engine, services.redis, scope="b-paused", reason="test", actor="test", now=now)
    services.redis.delete(keys.paused("b-paused"))  # Redis restarted: only the mirror pauses it
    services.redis.hset(keys.breaker("b-tripped"), mapping={"state": "open", "opened_at": "0"})  # cooled down

    def lost(*_args: Any, **_kwargs: Any) -> Any:
        raise OperationalError("SELECT pauses", {}, Exception("server closed the connection unexpectedly"))

    monkeypatch.setattr(bulk.pause, "check", lost)
    agents = ["b-paused", "b-plain-a", "b-plain-b", "b-tripped"]
    with pytest.raises(Exception, match="unreachable"):
        ticks.tick_many(services, agents, Sent())
    assert _runs(services) == []
    _no_lease_or_trial_left(services, agents)


def test_a_database_error_after_the_commit_still_sends_every_accepted_run(services: Services,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch committed; then the database is locked (or gone) when the refused keys are looked at again.
    The runs it accepted are kept, so their messages must go now, not after a lost pass and the reaper."""
    from sqlalchemy.exc import OperationalError

    from fleet import bulk

    _frozen(services, datetime(2026, 12, 1, 10, 0, 30, tzinfo=UTC))
    assert services.leases.acquire("b-busy", 1, "someone-else", ttl_s=60) is not None  # one refusal to re-answer
    opened = []
    real = bulk.db.session

    def session_then_locked(engine: Any) -> Any:
        opened.append(engine)
        if len(opened) == 2:  # the first is the batch's own transaction
            raise OperationalError("BEGIN IMMEDIATE", {}, Exception("database is locked"))
        return real(engine)

    monkeypatch.setattr(bulk.db, "session", session_then_locked)
    sent = Sent()
    results = ticks.tick_many(services, ["b-busy", "b-plain-a", "b-plain-b"], sent, at=services.now())
    assert {name: r.status for name, r in results.items()} == {"b-busy": "refused", "b-plain-a": "queued",
                                                               "b-plain-b": "queued"}
    assert sorted(run_id for run_id, _ in sent) == sorted(r.id for r in _runs(services))
    _ledger_matches_runs(services)


def test_a_message_that_cannot_be_sent_on_the_slow_path_undoes_its_run_only(services: Services) -> None:
    """$0.035 left for the fleet and four $0.01 runs sends the pass one at a time; the broker refuses the first
    message. As four single ticks would, that run is undone and the three others still go (they fit)."""
    _frozen(services, datetime(2026, 12, 1, 10, 0, 30, tzinfo=UTC))
    services.config = dataclasses.replace(services.config,
                                          fleet=services.config.fleet.model_copy(update={"daily_cap_usd": 0.035}))
    sent = Sent()
    calls: list[str] = []

    def flaky(run_id: str, fence: int) -> None:
        calls.append(run_id)
        if len(calls) == 1:
            raise ConnectionError("broker went away")
        sent(run_id, fence)

    agents = ["b-plain-a", "b-plain-b", "b-busy", "b-tripped"]
    results = ticks.tick_many(services, agents, flaky)
    assert [results[name].status for name in agents] == ["unavailable", "queued", "queued", "queued"]
    assert sorted(r.id for r in _runs(services)) == sorted(run_id for run_id, _ in sent)
    assert services.leases.holders("b-plain-a", 1) == []
    _ledger_matches_runs(services)


def test_one_agents_failing_admission_keeps_nothing_of_the_others(services: Services) -> None:
    """b-tripped's breaker key holds a string (written by hand, or by an older version): its admission script
    fails. The leases the other scripts of the pipeline took must not be lost with that error; like single
    ticks, the others are dispatched and b-tripped alone is answered unavailable."""
    from fleet import keys

    _frozen(services, datetime(2026, 12, 1, 10, 0, 30, tzinfo=UTC))
    services.redis.set(keys.breaker("b-tripped"), "corrupt")
    sent = Sent()
    results = ticks.tick_many(services, ["b-plain-a", "b-plain-b", "b-tripped"], sent)
    assert {name: r.status for name, r in results.items()} == {"b-plain-a": "queued", "b-plain-b": "queued",
                                                               "b-tripped": "unavailable"}
    assert sorted(r.agent for r in _runs(services)) == ["b-plain-a", "b-plain-b"] and len(sent) == 2
    assert services.leases.holders("b-tripped", 1) == []
    _ledger_matches_runs(services)


def _held_by_the_mirror_only(services: Services, flag: str, scope: str) -> None:
    """A kill or pause engaged for `scope`, then Redis flushed (restarted): only the mirror holds it."""
    if flag == "kill":
        killswitch.engage(services.engine, services.redis, scope=scope, reason="runaway", actor="cli:ops",
                          hard=False, now=services.now())
    else:
        pause.engage(services.engine, services.redis, scope=scope, reason="runaway", actor="cli:ops",
                     now=services.now())
    services.redis.flushdb()


@pytest.mark.parametrize(("flag", "scope"), [("kill", "*"), ("kill", "b-plain-a"), ("pause", "*"),
                                             ("pause", "b-plain-a")])
def test_a_flag_released_while_a_pass_reads_its_mirror_is_never_refused_as_not_held(
        services: Services, flag: str, scope: str) -> None:
    """A batch's kill and pause refusals, like a single dispatch's (tests/test_pause.py): the mirror read says
    held, a `fleet resume` commits before the detail is read (PostgreSQL: two statements, two snapshots), and
    the refusal read "not killed". The detail read decides: still held refuses with its reason; released goes on."""
    if services.engine.dialect.name != "postgresql":
        pytest.skip("SQLite's write lock (BEGIN IMMEDIATE) holds the release until the pass ends")
    module, table, reason = (killswitch, "kill_switches", "killed") if flag == "kill" else (pause, "pauses", "paused")
    _held_by_the_mirror_only(services, flag, scope)
    released: list[str] = []

    def release_after_the_mirror_read(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if not released and table in statement:
            released.append(statement)
            module.release(services.engine, services.redis, scope=scope, actor="cli:ops", now=services.now())

    event.listen(services.engine, "after_cursor_execute", release_after_the_mirror_read)
    try:
        answers = ticks.tick_many(services, ["b-plain-a", "b-plain-b"], Sent(), at=services.now())
    finally:
        event.remove(services.engine, "after_cursor_execute", release_after_the_mirror_read)
    assert released, "the pass never read the mirror"
    for name, answer in answers.items():
        assert (answer.status, answer.reason) in {("refused", reason), ("queued", None)}, (name, answer)
        if answer.status == "refused":
            assert "runaway" in answer.gates[flag].detail, (name, answer.gates[flag].detail)


@pytest.mark.parametrize("flag", ["kill", "pause"])
def test_a_resume_committed_while_a_pass_puts_a_lost_flag_back_is_not_undone(services: Services, flag: str) -> None:
    """Found by review: a pass reads the mirror (held) to put back the flag Redis lost; `fleet resume` commits
    its release and deletes the flag; the pass then set the flag again from what it had read. The mirror said
    released, Redis said killed (or paused), and every later tick was refused with nothing left to repair it.
    A flag put back is taken back when the mirror, read again, says released."""
    if services.engine.dialect.name != "postgresql":
        pytest.skip("SQLite's write lock (BEGIN IMMEDIATE) holds the release until the pass ends")
    module, table = (killswitch, "kill_switches") if flag == "kill" else (pause, "pauses")
    scope = "b-plain-a"
    _held_by_the_mirror_only(services, flag, scope)
    reads: list[str] = []

    def release_after_the_put_backs_read(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if table in statement and statement.lstrip().upper().startswith("SELECT"):
            reads.append(statement)
            if len(reads) == 2:  # the read the flag is put back from (the gate's mirror read was the first)
                module.release(services.engine, services.redis, scope=scope, actor="cli:ops", now=services.now())

    event.listen(services.engine, "after_cursor_execute", release_after_the_put_backs_read)
    try:
        ticks.tick_many(services, ["b-plain-a", "b-plain-b"], Sent(), at=services.now())
    finally:
        event.remove(services.engine, "after_cursor_execute", release_after_the_put_backs_read)
    assert len(reads) >= 2, reads
    key = keys.kill(scope) if flag == "kill" else keys.paused(scope)
    assert not services.redis.exists(key), f"resumed (its mirror released), but Redis holds {key} again"
    with db.session(services.engine) as session:
        assert not (killswitch.check(session, services.redis, scope).killed if flag == "kill"
                    else pause.check(session, services.redis, scope).paused)
