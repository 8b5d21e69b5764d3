"""Fixtures of the multi-host bed: the network and infra once per test process, fresh hosts per test.

Every test gets its own database on infra's PostgreSQL, an empty Redis, and hosts booted afresh
(new PID namespaces, so nothing of an earlier test can still be running there).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from sqlmodel import select

from fleet import db
from fleet.dispatch import DispatchRequest, DispatchResult, dispatch
from fleet.models import TERMINAL, Run
from fleet.services import Services
from tests.faults.effects import (
    Effect,
    EffectsLog,
    check_caps,
    check_ledger,
    check_no_overlap,
    check_terminal,
)
from tests.harness import Fleet, wait_for
from tests.hosts.bed import Bed, FleetHost, Host, hosts_up, missing_tools

BED_AGENTS = """
[fleet]
daily_cap_usd = 100.0
lease_ttl_s = 3
heartbeat_s = 0.5
kill_poll_s = 0.1
kill_grace_s = 1
retry_backoff_s = 0.2
breaker_threshold = 1000
kill_unreachable_grace_s = 2
resend_after_s = 3
outcome_retry_s = 60

[agents.work]
command = ["python", "-m", "fleet.examples.effects_agent", "--log", "{tmp}/effects.log", "--seconds", "6",
           "--steps", "6", "--cost", "0.01", "--child"]
est_cost_usd = 0.06
timeout_s = 60
concurrency = 50

[agents.stubborn]
command = ["python", "-m", "fleet.examples.effects_agent", "--log", "{tmp}/effects.log", "--seconds", "8",
           "--steps", "8", "--cost", "0.01", "--child", "--ignore-term"]
est_cost_usd = 0.08
timeout_s = 60
concurrency = 50

[agents.quick]
command = ["python", "-m", "fleet.examples.effects_agent", "--log", "{tmp}/effects.log", "--seconds", "0.5",
           "--cost", "0.01"]
est_cost_usd = 0.01
timeout_s = 60
concurrency = 50

[agents.long]
command = ["python", "-m", "fleet.examples.effects_agent", "--log", "{tmp}/effects.log", "--seconds", "40",
           "--steps", "40", "--cost", "0.01", "--child"]
est_cost_usd = 0.40
timeout_s = 60
concurrency = 50

[agents.stubborn-long]
command = ["python", "-m", "fleet.examples.effects_agent", "--log", "{tmp}/effects.log", "--seconds", "40",
           "--steps", "40", "--cost", "0.01", "--child", "--ignore-term"]
est_cost_usd = 0.40
timeout_s = 60
concurrency = 50

[agents.ticker]
command = ["python", "-m", "fleet.examples.effects_agent", "--log", "{tmp}/effects.log", "--seconds", "0.2",
           "--cost", "0.001"]
schedule = "every 3s"
est_cost_usd = 0.001
timeout_s = 60
concurrency = 5

[agents.talk]
command = ["python", "-c", "import socket; print('hello from', socket.gethostname(), flush=True); print('x' * 70000)"]
est_cost_usd = 0.001
timeout_s = 60
concurrency = 50
"""

HOST_ENV = {"FLEET_DB_TIMEOUT_S": "3"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test here is a slow, multi-host one."""
    for item in items:
        if "tests/hosts/" in str(item.fspath):
            item.add_marker(pytest.mark.hosts)
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    """The bridge, three network namespaces and infra's servers, for this test process."""
    why = missing_tools()
    if why is not None:
        pytest.skip(why)
    network = Bed(tmp_path_factory.mktemp("bed"))
    try:
        network.build()
        yield network
    finally:
        network.destroy()


@dataclass
class MultiFleet:
    """The fleet on two hosts, seen from this process (the test's assertions and the reaper)."""

    bed: Bed
    database_url: str
    infra: FleetHost
    a: FleetHost
    b: FleetHost
    services: Services
    accepted: set[str] = field(default_factory=set)

    @property
    def hosts(self) -> list[FleetHost]:
        """The worker hosts."""
        return [self.a, self.b]

    def host(self, name: str) -> FleetHost:
        """A worker host by its name."""
        return {"hostA": self.a, "hostB": self.b, "infra": self.infra}[name]

    def dispatch(self, agent: str, key: str) -> DispatchResult:
        """Dispatch from this process, as `fleet dispatch` on infra would."""
        result = dispatch(self.services, DispatchRequest(agent, key, actor="test"), self.a.fleet.send_execute)
        assert result.status == "queued", result
        assert result.run_id is not None
        self.accepted.add(result.run_id)
        return result

    def run(self, run_id: str) -> Run:
        """A run's row as it stands."""
        with db.session(self.services.engine) as session:
            row = session.get(Run, run_id)
            assert row is not None
            return row

    def reap(self) -> Any:
        """One reaper pass, from this process (the reaper kills nothing: it only re-queues)."""
        return self.a.fleet.reap(self.services)

    def reap_until(self, condition: Any, timeout: float, what: str) -> Any:
        """Run the reaper every 0.3 s until `condition` holds."""
        def step() -> Any:
            self.reap()
            return condition()

        return wait_for(step, timeout, what, interval=0.3)

    def effects(self) -> EffectsLog:
        """Both hosts' effects logs merged, in time order (the agents write real time on every host)."""
        merged = [e for h in self.hosts for e in EffectsLog.read(h.effects_path).effects]
        return EffectsLog(sorted(merged, key=lambda e: e.t))

    def host_of_effect(self) -> dict[tuple[str, str], str]:
        """Which host wrote each run attempt's START."""
        return {(e.run, e.attempt): h.host.name for h in self.hosts
                for e in EffectsLog.read(h.effects_path).of("START")}

    def starts(self, run_id: str) -> list[tuple[str, Effect]]:
        """A run's STARTs with the host of each."""
        return sorted(((h.host.name, e) for h in self.hosts for e in EffectsLog.read(h.effects_path).starts(run_id)),
                      key=lambda item: item[1].t)

    def survivors(self) -> list[str]:
        """I4 across hosts: no process of a terminal run alive on the host that ran it (pids are per host)."""
        with db.session(self.services.engine) as session:
            terminal = {r.id for r in session.exec(select(Run)) if r.status in TERMINAL}
        problems = []
        for h in self.hosts:
            log, alive = EffectsLog.read(h.effects_path), h.host.alive_pids()
            for run in terminal:
                left = sorted(log.pids(run) & alive)
                if left:
                    problems.append(f"I4: run {run} is terminal but its processes {left} still live on {h.host.name}")
        return problems

    def violations(self) -> list[str]:
        """I1-I5 over both hosts' effects logs and the database."""
        log, engine = self.effects(), self.services.engine
        return [*check_no_overlap(log), *check_caps(log, engine, fleet_cap=100_000_000, agent_caps={}),
                *check_terminal(engine, self.accepted or None), *self.survivors(), *check_ledger(log, engine)]


def _fleet_host(bed: Bed, host: Host, tmp: Path, redis_url: str, database_url: str, agents: str,
                env: dict[str, str] | None = None) -> FleetHost:
    home = tmp / host.name
    home.mkdir()
    fleet = Fleet(home, redis_url, database_url, agents=agents)
    fleet.env.update(HOST_ENV)
    fleet.env.update(env or {})
    return FleetHost(host, fleet)


@contextlib.contextmanager
def multi_fleet(bed: Bed, tmp: Path, agents: str = BED_AGENTS, workers: bool = True,
                env_b: dict[str, str] | None = None, concurrency: int = 2) -> Iterator[MultiFleet]:
    """A fresh database, an empty Redis, hostA and hostB booted, a worker on each (unless `workers` is False)."""
    database = bed.new_database()
    redis_url = bed.redis_url(0)
    client = redis_lib.Redis.from_url(redis_url)
    client.flushall()
    client.close()
    with hosts_up(bed, ("hostA", "hostB")):
        infra = _fleet_host(bed, bed.infra, tmp, redis_url, database, agents)
        a = _fleet_host(bed, bed.hosts["hostA"], tmp, redis_url, database, agents)
        b = _fleet_host(bed, bed.hosts["hostB"], tmp, redis_url, database, agents, env_b)
        services = a.fleet.services
        multi = MultiFleet(bed, database, infra, a, b, services)
        try:
            if workers:
                db.upgrade(services.engine)
                a.start_worker(concurrency)
                b.start_worker(concurrency)
                wait_consuming(multi)
            yield multi
        finally:
            for fh in (infra, a, b):
                fh.fleet.workers.clear()  # their host is lost below, with every process of it
                with contextlib.suppress(Exception):
                    fh.fleet.stop()


def wait_consuming(multi: MultiFleet, names: tuple[str, ...] = ("hostA", "hostB"), timeout: float = 60) -> None:
    """Each named host's worker answers a ping (by its host name) and the queues are consumed."""
    celery = multi.a.fleet.celery

    def answered() -> bool:
        replies = celery.control.ping(timeout=1.0) or []
        seen = {name.rsplit("@", 1)[-1] for reply in replies for name in reply}
        return set(names) <= seen

    wait_for(answered, timeout, f"workers on {', '.join(names)} to answer", interval=0.2)
    multi.a.fleet.wait_consuming(timeout)


@pytest.fixture
def fleet2(bed: Bed, tmp_path: Path) -> Iterator[MultiFleet]:
    """The fleet on hostA and hostB, a worker each (concurrency 2), sharing infra's Redis and PostgreSQL."""
    with multi_fleet(bed, tmp_path) as multi:
        yield multi
