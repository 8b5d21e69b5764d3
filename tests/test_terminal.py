"""What the CLI prints of stored text that an agent (or anyone but Fleet) wrote: a pause reason, a run's error, an
event's detail, a dead letter's output tail, a run's log. The security review found each reaching the operator's
terminal as it was: escape sequences (an OSC 8 hyperlink, a screen clear, colours), bidi overrides, and rich markup
that `out.print(f"...")` interpreted. Shown now through one helper (redaction.visible, cli.common.shown); --json
stays exact JSON. The real CLI (a subprocess) against real Redis and each database, no workers.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import pytest

from fleet import db, pause
from fleet.dispatch import DispatchRequest, dispatch
from fleet.models import DeadLetter, Run, RunLogChunk, RunStatus
from fleet.redaction import visible
from fleet.services import Services
from tests.harness import ROOT

MARKUP = "[bold red]MARKUP[/]"
# Markup first: `fleet dlq list` shows an error's first 60 characters.
HOSTILE = (f"{MARKUP} \x1b]8;;https://evil.example/\x1b\\click\x1b]8;;\x1b\\ \x1b[2J\x1b[31mred \u202egnp.exe "
           "\u2066x\u2069 \x9b31m \x07 \x7f")
# What must never reach the terminal as it is (newline and tab may: multi-line output stays multi-line).
UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
OUTPUT = f"step 1\r\n{HOSTILE}\n"  # what the agent printed: its log and its dead letter's output tail


@pytest.fixture
def stored(services: Services) -> dict[str, str]:
    """A dead run of `echo` whose error, dead letter, log and output tail hold HOSTILE, and a pause of `echo`
    whose reason and actor do (a flag set by hand, an old worker's): the ids to show. Written as the executor
    and the reaper write them, without running anything: what is stored is what matters here."""
    queued = dispatch(services, DispatchRequest("echo", uuid.uuid4().hex, actor="test"), lambda *_: None)
    run_id, now = queued.run_id or "", services.now()
    with db.session(services.engine) as session:
        run = session.get(Run, run_id)
        assert run is not None
        run.status, run.error, run.exit_code = RunStatus.DEAD, HOSTILE, 1
        dead = DeadLetter(run_id=run_id, agent="echo", reason="failed", attempts=1, exit_code=1,
                          last_error=HOSTILE, output_tail=OUTPUT, created_at=now)
        session.add_all([run, dead, *log_chunks(run_id, now)])
        session.commit()
        dead_id = str(dead.id)
    pause.engage(services.engine, services.redis, scope="echo", reason=HOSTILE, actor=HOSTILE[:200], now=now)
    return {"run": run_id, "dead": dead_id}


def log_chunks(run_id: str, at: datetime) -> list[RunLogChunk]:
    """OUTPUT as the shipper stores it, cut where a reader must join: inside a CRLF and inside a character."""
    data = OUTPUT.encode()
    cuts = [0, data.index(b"\n"), data.index("\u202e".encode()) + 1, len(data)]
    return [RunLogChunk(run_id=run_id, attempt=1, offset=start, at=at, data=data[start:end])
            for start, end in itertools.pairwise(cuts)]


def cli(services: Services, *calls: list[str]) -> list[subprocess.CompletedProcess[str]]:
    """`python -m fleet ARGS` for each call, side by side, on the fixture's Redis and database."""
    settings = services.settings
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")} | {
        "PYTHONPATH": str(ROOT), "FLEET_CONFIG": str(settings.config), "FLEET_REDIS_URL": settings.redis_url or "",
        "FLEET_DATABASE_URL": settings.database_url, "FLEET_LOG_DIR": str(settings.log_dir), "COLUMNS": "200"}

    def run(args: list[str]) -> subprocess.CompletedProcess[str]:
        # Bytes, decoded here: text mode would turn a CR the command printed into a newline.
        done = subprocess.run([sys.executable, "-m", "fleet", *args], env=env, cwd=settings.config.parent,
                              capture_output=True, timeout=90, stdin=subprocess.DEVNULL, check=False)
        proc = subprocess.CompletedProcess(args, done.returncode, done.stdout.decode(), done.stderr.decode())
        assert proc.returncode == 0, f"fleet {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


# ---------------------------------------------------------------- the helper


@pytest.mark.parametrize(("text", "lines", "expected"), [
    ("\x1b[2Jok", False, "\\x1b[2Jok"),
    ("a\u202eb\u2066c\u2069d\u200f", False, "a\\u202eb\\u2066c\\u2069d\\u200f"),
    ("a\x00b\x9bc\x7fd\x07", False, "a\\x00b\\x9bc\\x7fd\\x07"),
    ("one\ttwo\nthree", False, "one\\x09two\\x0athree"),  # a reason is one line
    ("one\ttwo\r\nthree\rfour\n", True, "one\ttwo\nthree\\x0dfour\n"),  # a log keeps its lines, not its CRs
    ("caf\u00e9 \u2014 \u65e5\u672c [b]x[/b] \\x1b", False, "caf\u00e9 \u2014 \u65e5\u672c [b]x[/b] \\x1b"),
])
def test_visible_escapes_what_could_drive_a_terminal_and_nothing_else(text: str, lines: bool, expected: str) -> None:
    assert visible(text, lines=lines) == expected


# ---------------------------------------------------------------- the commands


def test_status_events_runs_and_dlq_show_stored_text_inert(services: Services, stored: dict[str, str]) -> None:
    status, events, runs_show, dlq_list, dlq_show, plan = cli(
        services, ["status"], ["events", "--limit", "1000"], ["runs", "show", stored["run"]], ["dlq", "list"],
        ["dlq", "show", stored["dead"]], ["dispatch", "echo", "--dry-run"])
    for proc in (status, events, runs_show, dlq_list, dlq_show, plan):  # the plan's pause gate gives the reason
        printed = proc.stdout
        assert not UNSAFE.search(printed), f"fleet {' '.join(proc.args)} printed {printed!a}"
        assert MARKUP in printed, f"fleet {' '.join(proc.args)} interpreted the markup: {printed}"
    for proc in (status, runs_show, dlq_show):
        assert "\\x1b]8;;https://evil.example/" in proc.stdout and "\\u202e" in proc.stdout, proc.stdout
    assert dlq_show.stdout.count(MARKUP) == 2  # the error, and the output tail
    assert "step 1\n" in dlq_show.stdout  # the tail keeps its lines


def test_logs_show_the_output_inert_and_raw_gives_its_bytes(services: Services, stored: dict[str, str]) -> None:
    """`fleet logs` is the run's output as the agent printed it (masked): on a terminal, inert like the rest, its lines
    kept; `--raw` gives the bytes as they are, for a file or a pager that shows escapes itself."""
    shown, raw = cli(services, ["logs", stored["run"]], ["logs", stored["run"], "--raw"])
    assert not UNSAFE.search(shown.stdout), ascii(shown.stdout)
    assert shown.stdout == "step 1\n" + visible(HOSTILE) + "\n", ascii(shown.stdout)
    assert raw.stdout == OUTPUT


def test_json_output_stays_exact(services: Services, stored: dict[str, str]) -> None:
    status, runs_show, dlq_show = (json.loads(p.stdout) for p in cli(
        services, ["status", "--json"], ["runs", "show", stored["run"], "--json"],
        ["dlq", "show", stored["dead"], "--json"]))
    reasons: list[Any] = [p["reason"] for p in status["pauses"]]
    assert HOSTILE in reasons
    assert runs_show["error"] == HOSTILE and dlq_show["last_error"] == HOSTILE
    assert dlq_show["output_tail"] == OUTPUT


def test_the_up_screen_shows_a_pause_reason_inert() -> None:
    """`fleet up`'s status block builds rich Text (no markup), but the characters went to the terminal as they were."""
    from fleet.upscreen import _switches

    shown = _switches({"kill": [], "pauses": [{"scope": "echo", "actor": "agent:r1", "reason": HOSTILE}]}).plain
    assert not UNSAFE.search(shown) and "\\u202e" in shown and MARKUP in shown, ascii(shown)


def test_the_operators_own_reason_with_brackets_is_echoed_not_crashed_on(services: Services) -> None:
    """`fleet kill --reason "[/x]"` engaged the kill, then crashed echoing the reason as rich markup (exit 1: the
    operator would think the kill failed); pause and resume echo the same way (found by a new user's review)."""
    kill, paused, resumed = cli(services, ["kill", "echo", "--reason", "[/x] rotate"],
                                ["pause", "counter", "--reason", "[/x] rotate"], ["resume", "echo"])
    for done in (kill, paused, resumed):
        assert done.returncode == 0, done.stderr
    assert "[/x] rotate" in kill.stdout and "[/x] rotate" in paused.stdout
