"""Orphans are visible while they live, and killed by the host that owns them (the live form of I4)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
from prometheus_client import generate_latest

from fleet import launcher, orphans
from fleet.metrics import registry
from fleet.process import LAUNCHER_PATH
from tests.faults.conftest import FaultFleet
from tests.faults.effects import pid_alive
from tests.harness import wait_for
from tests.test_dispatch import send, wait_status

pytestmark = [pytest.mark.slow, pytest.mark.faults]


def test_an_orphaned_agent_is_seen_killed_by_its_host_and_reported(faults: FaultFleet) -> None:
    """A launcher group alive for a run that is over (as if its executor's stop had failed): the host's sweep
    kills it, the watchdog turns red, /metrics counts it; a live run next to it is left alone."""
    fleet = faults.fleet
    done = send(fleet, "quick", f"orphan-{uuid.uuid4().hex}")
    finished = wait_status(fleet, done.run_id, {"succeeded"}, timeout=60)
    live = send(fleet, "long", f"alive-{uuid.uuid4().hex}")
    wait_for(lambda: faults.effects.starts(live.run_id), 60, "the live run's agent")
    orphan, foreign = (subprocess.Popen([sys.executable, "-I", "-S", str(LAUNCHER_PATH), f"parent={os.getpid()}",
                                         f"lc={launcher.UNSET}", f"run={tag}", "--", "/bin/sleep", "120"],
                                        start_new_session=True)
                       for tag in (f"{finished.id}:{finished.fence}", f"{uuid.uuid4().hex}:1"))
    try:
        wait_for(lambda: any(a.pid == orphan.pid for a in orphans.scan()), 10, "the orphan to be visible")
        replies = fleet.celery.control.broadcast("fleet_orphans", reply=True, timeout=10)
        reports = [r["ok"] for reply in replies for r in reply.values()]
        assert reports and f"{finished.id}:{finished.fence}" in reports[0]["orphans"]
        assert live.run_id not in json.dumps(reports)  # a running run's own agent is no orphan
        wait_for(lambda: orphan.poll() is not None, 10, "the orphan to be killed by its host")
        assert foreign.poll() is None  # a run this fleet does not know is another fleet's: left alone
        assert faults.effects.starts(live.run_id) and all(pid_alive(p) for p in faults.effects.pids(live.run_id))
        proc = fleet.cli("watchdog", "--json")
        verdict = json.loads(proc.stdout)
        check = next(c for c in verdict["checks"] if c["name"] == "orphans")
        assert (proc.returncode, check["status"]) == (1, "red"), proc.stdout
        assert finished.id in check["reason"]
        text = generate_latest(registry(fleet.services)).decode()
        assert [line for line in text.splitlines() if line.startswith("fleet_orphan_agents{")
                and line.endswith(" 1.0")], text
    finally:
        for proc in (orphan, foreign):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
