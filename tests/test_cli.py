"""The operator's surface as a new user tries it: every `fleet` command through the real CLI
(`python -m fleet`, a subprocess) against a real fleet (real Redis, real database, real workers).

Each exit code of DESIGN.md ("Operator surface") is reached through the command line, `--json` is
parsed and its keys checked, and the flows an operator follows at 2am (status while killed, the
dead-letter queue, logs) are walked end to end. Subprocesses are slow (~1-2 s each), so independent
read-only calls of one test run side by side (`cli_all`).
"""

from __future__ import annotations

import ast
import contextlib
import getpass
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from fleet import db, keys, killswitch
from fleet.models import DeadLetter, Run, WatchdogVerdict
from tests.harness import ROOT, SECRET_KEY, SECRET_TOKEN, Fleet, wait_for
from tests.test_dispatch import counts, run_of, send, wait_status
from tests.test_up import free_port

pytestmark = pytest.mark.slow

PY = sys.executable
ACTOR = f"cli:{getpass.getuser()}@{socket.gethostname()}"
WIDE = {"COLUMNS": "200"}  # a wide terminal, so tables are not squeezed (see test_tables_when_piped)

COMMANDS = ["init", "up", "doctor", "agents", "dispatch", "kill", "pause", "resume", "status", "runs", "runs show",
            "logs", "dlq list", "dlq show", "dlq replay", "dlq purge", "spend", "watchdog", "sweep", "web",
            "events", "db upgrade"]

# The keys a script relies on in each --json output (new keys may be added; these must stay).
DISPATCH_KEYS = {"run_id", "status", "would_fire", "gates", "reason", "archived", "fence"}
GATES = {"kill", "pause", "breaker", "bounded", "caps", "lock"}
RUN_KEYS = {"id", "idem_key", "agent", "work_key", "status", "attempt", "max_attempts", "fence", "slot",
            "payload", "budget_day", "reserved_micros", "cost_micros", "cost_usd", "exit_code", "error", "host",
            "pid", "dispatched_by", "prev_run_id", "replay_of", "created_at", "updated_at", "queued_at",
            "started_at", "heartbeat_at", "finished_at", "settled_at"}
EVENT_KEYS = {"id", "at", "kind", "run_id", "agent", "actor", "detail"}
DEAD_KEYS = {"id", "run_id", "agent", "reason", "attempts", "exit_code", "last_error", "output_tail",
             "created_at", "replayed_run_id", "replayed_at"}
SPEND_KEYS = {"day", "timezone", "scopes"}
SCOPE_KEYS = {"scope", "spent_usd", "reserved_usd", "cap_usd", "left_usd", "spent_micros", "reserved_micros"}
STATUS_KEYS = {"at", "kill", "runs_24h", "running", "recent", "dlq_depth", "dead_letters", "watchdog", "spend",
               "redis", "queues", "breakers", "paused", "canaries", "beat"}
KILL_KEYS = {"scope", "reason", "actor", "hard", "since"}
AGENT_KEYS = {"agent", "schedule", "next_fire", "daily_cap_usd", "est_cost_usd", "timeout_s", "concurrency",
              "breaker", "key_fingerprint"}
VERDICT_KEYS = {"status", "checks", "healed", "at"}
SWEEP_KEYS = {"sweep", "counts", "runs"}

BAD_TOML = """\
[fleet]
daily_cap_usd = "lots"

[agents.x]
command = "not a list"
"""


# ---------------------------------------------------------------- helpers


Call = Sequence[str] | tuple[Sequence[str], dict[str, str]]


def cli_all(fleet: Fleet, *calls: Call, env: dict[str, str] | None = None,
            timeout: float = 90) -> list[subprocess.CompletedProcess[str]]:
    """Run independent CLI calls side by side; results in the order given. A call is its arguments, or
    (arguments, extra environment) to change the environment of that call alone."""

    def run(call: Call) -> subprocess.CompletedProcess[str]:
        args, extra = call if isinstance(call, tuple) else (call, {})
        return fleet.cli(*args, env={**(env or {}), **extra}, timeout=timeout)

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def show(proc: subprocess.CompletedProcess[str]) -> str:
    """What a failed assertion should print about a CLI call."""
    return f"fleet {' '.join(proc.args[3:])} -> {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def assert_exit(proc: subprocess.CompletedProcess[str], code: int) -> None:
    """The exit code, a message for the operator and never a Python traceback."""
    assert proc.returncode == code, show(proc)
    assert "Traceback" not in proc.stderr + proc.stdout, show(proc)


def parse(proc: subprocess.CompletedProcess[str], code: int = 0) -> Any:
    """A --json call's output, which must be one JSON document."""
    assert_exit(proc, code)
    return json.loads(proc.stdout)


def new_key(label: str) -> str:
    return f"cli-{label}-{uuid.uuid4().hex[:12]}"


def dead_letter_of(fleet: Fleet, run_id: str) -> DeadLetter | None:
    with db.session(fleet.services.engine) as session:
        return session.exec(select(DeadLetter).where(DeadLetter.run_id == run_id)).first()


def dlq_depth(fleet: Fleet) -> int:
    with db.session(fleet.services.engine) as session:
        return len(session.exec(select(DeadLetter)).all())


def runs_with_key(fleet: Fleet, idem_key: str) -> list[Run]:
    with db.session(fleet.services.engine) as session:
        return list(session.exec(select(Run).where(Run.idem_key == idem_key)))


def plain_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The caller's environment without FLEET_*, for commands that fail before touching any service."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(PYTHONPATH=str(ROOT), FLEET_CONFIG=str(tmp_path / "fleet.toml"), FLEET_LOG_DIR=str(tmp_path / "logs"))
    env.update(extra)
    return env


def plain_cli(tmp_path: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "fleet", *args], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL, check=False)


@pytest.fixture
def bad_config(tmp_path: Path) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text(BAD_TOML)
    return path


def only_once(fleet: Fleet) -> None:
    """Tests that do not depend on the database kind run against one fleet only."""
    if not fleet.database_url.startswith("sqlite"):
        pytest.skip("does not depend on the database kind: covered by the SQLite fleet")


# ---------------------------------------------------------------- 1. help


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command: str) -> None:
    from typer.testing import CliRunner

    from fleet.cli import app

    result = CliRunner().invoke(app, [*command.split(), "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert any(line.strip().startswith("Example:") for line in result.output.splitlines()), result.output


def test_top_level_help_lists_every_command(tmp_path: Path) -> None:
    proc = plain_cli(tmp_path, "--help", env=plain_env(tmp_path, **WIDE))
    assert_exit(proc, 0)
    for command in {c.split()[0] for c in COMMANDS}:
        assert f" {command} " in proc.stdout, (command, proc.stdout)


def test_usage_errors_exit_65_without_a_traceback(tmp_path: Path) -> None:
    env = plain_env(tmp_path)
    for args in (["dispatch"],                                  # missing argument
                 ["dlq", "show", "seven"],                      # not an integer
                 ["runs", "--limit", "0"],                      # out of range
                 ["no-such-command"]):
        proc = plain_cli(tmp_path, *args, env=env)
        assert_exit(proc, 65)
        assert proc.stderr.strip()
    # DESIGN: every command takes --config, after the command name too (here a missing file: 78, named).
    late = plain_cli(tmp_path, "dispatch", "echo", "--config", "elsewhere.toml", env=env)
    assert_exit(late, 78)
    assert "elsewhere.toml" in late.stderr


# ---------------------------------------------------------------- 2. exit codes


def test_exit_0_dispatch_wait_then_logs_events_and_runs(fleet: Fleet) -> None:
    """0: `dispatch --wait` of echo; then everything an operator reads about that run."""
    fleet.reset_agent("echo")
    key = new_key("ok")
    result = parse(fleet.cli("dispatch", "echo", "--key", key, "--payload", '{"topic": "cli"}', "--wait", "--json"))
    assert set(result) >= DISPATCH_KEYS and result["status"] == "queued", result
    assert set(result["gates"]) == GATES and all(set(g) == {"ok", "detail"} for g in result["gates"].values())
    run_id = result["run_id"]
    assert run_of(fleet, run_id).status == "succeeded"

    logs, events, shown, runs = cli_all(
        fleet, ["logs", run_id], ["events", "--json", "--limit", "1000"], ["runs", "show", run_id, "--json"],
        ["runs", "--agent", "echo", "--limit", "20", "--json"])

    # 6. logs prints the agent's own output.
    assert_exit(logs, 0)
    assert f"echo agent: run {run_id}" in logs.stdout and '"topic":"cli"' in logs.stdout
    assert "fleet_usage" in logs.stdout

    # 8. the audit trail, one JSON object per line, with who dispatched it.
    assert_exit(events, 0)
    rows = [json.loads(line) for line in events.stdout.splitlines() if line.strip()]
    assert rows and all(set(r) >= EVENT_KEYS for r in rows)
    mine = [r for r in rows if r["run_id"] == run_id]
    assert [r["kind"] for r in mine] == ["run.created", "run.queued", "run.started", "run.succeeded"], mine
    assert mine[0]["actor"] == ACTOR and mine[0]["agent"] == "echo"
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)  # oldest first, as a trail reads

    # runs show --json: the run, its events and where its log is.
    data = parse(shown)
    assert RUN_KEYS | {"events", "log"} <= set(data), set(data) ^ (RUN_KEYS | {"events", "log"})
    assert (data["id"], data["status"], data["exit_code"], data["work_key"]) == (run_id, "succeeded", 0, key)
    assert data["dispatched_by"] == ACTOR and data["cost_usd"] == pytest.approx(0.01)
    assert [e["kind"] for e in data["events"]] == [r["kind"] for r in mine]
    assert all(set(e) >= EVENT_KEYS for e in data["events"])
    assert Path(data["log"]).read_text() == logs.stdout

    listed = parse(runs)
    assert isinstance(listed, list) and all(set(r) >= RUN_KEYS for r in listed)
    assert run_id in [r["id"] for r in listed] and {r["agent"] for r in listed} == {"echo"}


def test_exit_3_busy_and_idle(fleet: Fleet) -> None:
    """3: nothing done. Refused busy (every slot taken: no row, not queued behind), and a run that ends idle."""
    fleet.reset_agent("counter")
    fleet.reset_agent("exit3")
    holder = fleet.services.leases.acquire("counter", 1, "held-by-test-cli", ttl_s=120)
    assert holder is not None
    busy_key = new_key("busy")
    try:
        busy, busy_table, idle = cli_all(fleet, ["dispatch", "counter", "--key", busy_key, "--json"],
                                         ["dispatch", "counter", "--key", new_key("busy-table")],
                                         ["dispatch", "exit3", "--key", new_key("idle"), "--wait"])
    finally:
        fleet.services.leases.release(holder)
    refused = parse(busy, 3)
    assert refused["status"] == "refused" and refused["reason"] == "busy", refused
    assert not refused["gates"]["lock"]["ok"] and "0 of 1" in refused["gates"]["lock"]["detail"]
    assert runs_with_key(fleet, f"counter:{busy_key}") == []
    # Said as why and what to do, naming the run that holds the slot (not "would fire: <id>").
    assert_exit(busy_table, 3)
    assert busy_table.stdout.splitlines()[0] == (
        "refused: busy — 1 of 1 slots taken by run held-by-test-cli; try again when it ends"), show(busy_table)
    assert "would fire" not in busy_table.stdout
    assert_exit(idle, 3)
    assert "ended idle" in idle.stdout


def test_kill_shows_in_status_refuses_dispatch_with_3_and_resume_lifts_it(fleet: Fleet) -> None:
    """3 when killed; `status` (table and JSON) shows who and why while engaged, spend against caps, DLQ depth."""
    agent = "env"
    fleet.reset_agent(agent)
    reason = f"cli test {uuid.uuid4().hex[:8]}"
    key = new_key("killed")
    depth_before = dlq_depth(fleet)
    assert_exit(fleet.cli("kill", agent, "--reason", reason), 0)
    try:
        table, as_json, refused, refused_table = cli_all(
            fleet, ["status"], ["status", "--json"], ["dispatch", agent, "--key", key, "--json"],
            ["dispatch", agent, "--key", new_key("killed-table")], env=WIDE)
    finally:
        resumed = fleet.cli("resume", agent)
    assert_exit(resumed, 0)
    assert f"resumed agent {agent}" in resumed.stdout

    result = parse(refused, 3)
    assert (result["status"], result["reason"]) == ("refused", "killed")
    assert not result["gates"]["kill"]["ok"] and reason in result["gates"]["kill"]["detail"]
    assert runs_with_key(fleet, f"{agent}:{key}") == []
    assert_exit(refused_table, 3)
    assert refused_table.stdout.splitlines()[0] == (
        f"refused: killed — the kill switch is engaged for agent {agent} by {ACTOR}: {reason}; "
        f"`fleet resume {agent}` lifts it when it is safe"), show(refused_table)

    depths = range(depth_before, dlq_depth(fleet) + 1)  # a run of an earlier test may dead-letter meanwhile
    assert_exit(table, 0)
    assert f"KILLED {agent} since " in table.stdout and f"by {ACTOR}: {reason}" in table.stdout
    assert "1,000.00" in table.stdout  # the fleet's cap, next to what was spent
    assert any(f"dead letters: {n}\n" in table.stdout for n in depths), table.stdout

    picture = parse(as_json)
    assert set(picture) >= STATUS_KEYS, STATUS_KEYS - set(picture)
    (kill,) = [k for k in picture["kill"] if k["scope"] == agent]
    assert set(kill) >= KILL_KEYS and (kill["actor"], kill["reason"], kill["hard"]) == (ACTOR, reason, False)
    assert picture["dlq_depth"] in depths and picture["redis"] == "ok"
    assert set(picture["spend"]) >= SPEND_KEYS and all(set(s) >= SCOPE_KEYS for s in picture["spend"]["scopes"])
    fleet_scope = next(s for s in picture["spend"]["scopes"] if s["scope"] == "*")
    assert fleet_scope["cap_usd"] == 1000.0 and fleet_scope["left_usd"] is not None

    with db.session(fleet.services.engine) as session:
        assert agent not in [k.scope for k in killswitch.engaged(session)]
    assert not fleet.redis.exists(keys.kill(agent))


def test_exit_65_bad_arguments(fleet: Fleet) -> None:
    only_once(fleet)
    before = counts(fleet)
    procs = cli_all(fleet, ["dispatch", "echo", "--payload", "{not json"], ["runs", "--status", "exploded"],
                    ["spend", "--day", "2026-13-45"], ["dlq", "purge"])
    for proc in procs:
        assert_exit(proc, 65)
        assert proc.stderr.startswith("fleet: "), show(proc)
    assert "payload is not valid JSON" in procs[0].stderr
    assert "unknown status 'exploded'" in procs[1].stderr
    assert "YYYY-MM-DD" in procs[2].stderr
    assert "--all" in procs[3].stderr
    assert counts(fleet) == before


def test_exit_69_not_found(fleet: Fleet) -> None:
    before = counts(fleet)
    procs = cli_all(fleet, ["dispatch", "no-such-agent"], ["kill", "no-such-agent"], ["resume", "no-such-agent"],
                    ["runs", "show", "0" * 32], ["logs", "0" * 32], ["dlq", "show", "987654321"],
                    ["dlq", "replay", "987654321"])
    for proc in procs:
        assert_exit(proc, 69)
    for proc in procs[:3]:
        assert "unknown agent 'no-such-agent'" in proc.stderr and "echo" in proc.stderr  # says what exists
    assert all("no run" in p.stderr for p in procs[3:5])
    assert all("no dead letter 987654321" in p.stderr for p in procs[5:])
    assert counts(fleet) == before


def test_an_argument_that_is_not_utf8_is_not_found_or_bad_input_not_a_traceback(fleet: Fleet) -> None:
    """A Latin-1 terminal's "café" reaches Python as a lone surrogate (argv's surrogateescape), which no database
    encodes: `fleet logs`, `runs show` and `runs --agent` ended in a UnicodeEncodeError traceback (exit 1)."""
    only_once(fleet)
    procs = cli_all(fleet, ["runs", "show", "caf\udce9"], ["logs", "caf\udce9"], ["logs", "-f", "caf\udce9"],
                    ["runs", "--agent", "caf\udce9"])
    for proc in procs[:3]:
        assert_exit(proc, 69)
        assert "no run" in proc.stderr, show(proc)
    assert_exit(procs[3], 65)
    assert "--agent" in procs[3].stderr, show(procs[3])


def test_exit_75_when_redis_is_down_and_soft_fail(fleet: Fleet, closed_port: int, tmp_path: Path) -> None:
    """75 for dispatch and watchdog; status prints what it could read (it reports Redis down), then exits 75 too;
    --soft-fail makes 75 a 0 with a JSON line in <FLEET_LOG_DIR>/soft-fail.jsonl."""
    only_once(fleet)
    log_dir = tmp_path / "cron-logs"
    env = {"FLEET_REDIS_URL": f"redis://127.0.0.1:{closed_port}/0", "FLEET_LOG_DIR": str(log_dir)}
    dispatched, watchdog, status, soft_dispatch, soft_watchdog = cli_all(
        fleet, ["dispatch", "echo", "--key", new_key("down")], ["watchdog", "--wait", "2"], ["status", "--json"],
        ["--soft-fail", "dispatch", "echo", "--key", new_key("down-soft")], ["--soft-fail", "watchdog", "--wait", "2"],
        env=env)
    assert_exit(dispatched, 75)
    assert "Redis unreachable" in dispatched.stderr
    assert_exit(watchdog, 75)
    assert "Redis unreachable" in watchdog.stderr

    picture = parse(status, 75)  # status is a report: it says Redis is down, then fails as the table says
    assert picture["redis"].startswith("unreachable"), picture["redis"]
    assert {"kill", "spend", "dlq_depth"} <= set(picture)

    for proc in (soft_dispatch, soft_watchdog):
        assert_exit(proc, 0)
        assert "Redis unreachable" in proc.stderr  # still said, just not failed
    lines = [json.loads(line) for line in (log_dir / "soft-fail.jsonl").read_text().splitlines()]
    assert sorted(line["argv"][1] for line in lines) == ["dispatch", "watchdog"]
    assert all(line["exit_code"] == 75 and "Redis unreachable" in line["error"] and line["at"] for line in lines)
    assert all(line["argv"][0] == "--soft-fail" for line in lines)


def test_redis_down_dispatch_writes_nothing_so_a_retry_runs(fleet: Fleet, closed_port: int) -> None:
    fleet.reset_agent("echo")
    key = new_key("retry")
    down = fleet.cli("dispatch", "echo", "--key", key, env={"FLEET_REDIS_URL": f"redis://127.0.0.1:{closed_port}/0"})
    assert_exit(down, 75)
    leftovers = runs_with_key(fleet, f"echo:{key}")
    try:
        assert leftovers == [], [(r.id, r.status) for r in leftovers]
    finally:
        result = send(fleet, "echo", key)  # the retry, Redis back
        if result.status == "queued":
            wait_status(fleet, result.run_id, {"succeeded", "dead"})
    assert result.status == "queued", result


def test_commands_refuse_a_redis_another_fleet_marks_and_act_on_their_own(fleet: Fleet) -> None:
    """A terminal pointed at another fleet's Redis (FLEET_REDIS_URL left over, a file not exported): pause,
    resume, dispatch and a dead letter's replay refuse (78) before writing anything there, naming the other
    fleet; status shows what it read and exits 78; a kill (raised before anything is checked: the kill must
    never wait) says that the Redis it raised its flag in is another fleet's. With this fleet's own mark,
    they act as always."""
    agent = "env"
    fleet.reset_agent(agent)
    held = fleet.redis.get(keys.owner())
    fleet.redis.set(keys.owner(), "f" * 32, ex=300)
    key = new_key("foreign")
    try:
        paused, paused_all, resumed, dispatched, status = cli_all(
            fleet, ["pause", agent, "--reason", "x"], ["pause", "--reason", "x"], ["resume"],
            ["dispatch", agent, "--key", key], ["status"])
        for proc in (paused, paused_all, resumed, dispatched, status):
            assert_exit(proc, 78)
            assert "another fleet (id ffffffff" in proc.stderr, show(proc)
        assert "dead letters:" in status.stdout, show(status)
        assert fleet.redis.get(keys.paused(agent)) is None and fleet.redis.get(keys.paused("*")) is None
        assert runs_with_key(fleet, f"{agent}:{key}") == []
        killed = fleet.cli("kill", agent, "--reason", "foreign")
        assert_exit(killed, 78)
        assert "another fleet (id ffffffff" in killed.stderr, show(killed)
    finally:
        if held is None:
            fleet.redis.delete(keys.owner())
        else:
            fleet.redis.set(keys.owner(), held, ex=300)
        assert_exit(fleet.cli("resume", agent), 0)
        assert_exit(fleet.cli("resume"), 0)  # a fleet-wide pause that got through must not outlive the test
    fleet.redis.set(keys.owner(), fleet.services.fleet_id, ex=300)
    try:
        assert_exit(fleet.cli("pause", agent, "--reason", "ours"), 0)
        assert_exit(fleet.cli("resume", agent), 0)
    finally:
        if held is None:
            fleet.redis.delete(keys.owner())


def test_kill_and_resume_with_redis_down_give_an_exit_code_not_a_traceback(fleet: Fleet, closed_port: int) -> None:
    only_once(fleet)
    agent = "exit78"
    env = {"FLEET_REDIS_URL": f"redis://127.0.0.1:{closed_port}/0"}
    try:
        killed = fleet.cli("kill", agent, "--reason", "redis down test", env=env)
        resumed = fleet.cli("resume", agent, env=env)
    finally:
        fleet.cli("resume", agent, check=True)  # Redis up: both places released
    for proc in (killed, resumed):
        assert "Traceback" not in proc.stderr, show(proc)
        assert proc.returncode in (0, 75), show(proc)


def test_a_kill_that_could_not_reach_redis_does_not_go_back_to_ask_whose_it_is(tmp_path: Path) -> None:
    """A Redis that accepts connections and never answers (hung, a half-dead failover): the kill's flag and
    engage's write each wait out their timeout, the mirror holds the kill, and the command should end. The
    other-fleet check then opened a third connection to the same hung Redis, to read a mark it could not
    have: 5 s more before the operator hears the kill is in force (6.7 s -> 11.7 s measured)."""
    (tmp_path / "fleet.toml").write_text('[agents.echo]\ncommand = ["true"]\n')
    held: list[socket.socket] = []
    with socket.socket() as hung:  # never accepts while the kill runs: the kernel completes each connection
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        env = plain_env(tmp_path, FLEET_DATABASE_URL=f"sqlite:///{tmp_path / 'fleet.db'}",
                        FLEET_REDIS_URL=f"redis://127.0.0.1:{hung.getsockname()[1]}/0")
        assert_exit(plain_cli(tmp_path, "db", "upgrade", env=env), 0)
        killed = plain_cli(tmp_path, "kill", "echo", "--reason", "hung redis", env=env)
        hung.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:  # every connection the kill made is queued here, closed or not
                held.append(hung.accept()[0])
    opened = len(held)
    for conn in held:
        conn.close()
    assert_exit(killed, 0)
    assert "in the database only" in killed.stdout, show(killed)
    assert opened == 2, f"{opened} connections: the flag's, engage's, and one more to a Redis that never answered"


def test_the_other_fleet_check_waits_no_longer_than_a_quick_look_on_a_hung_redis(tmp_path: Path) -> None:
    """Every acting command and status read the mark with the command's 5 s client: on a Redis that accepts
    connections and never answers, that was 5 s more before the command itself waited out the same Redis
    (status 5.9 s -> 10.8 s, pause 10.8 s -> 15.7 s measured). A mark that cannot be read is left to the
    command anyway: a quick look (the 1 s client) is all it is worth."""
    from fleet.cli.common import another_fleets_redis
    from fleet.config import Settings, load_fleet_config
    from fleet.services import build

    (tmp_path / "fleet.toml").write_text('[agents.echo]\ncommand = ["true"]\n')
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        settings = Settings(config=tmp_path / "fleet.toml", redis_url=f"redis://127.0.0.1:{hung.getsockname()[1]}/0",
                            database_url=f"sqlite:///{tmp_path / 'fleet.db'}")
        svc = build(settings, load_fleet_config(settings.config))
        began = time.monotonic()
        another_fleets_redis(svc)
        took = time.monotonic() - began
    assert took < 3.0, f"{took:.1f} s on a Redis that never answers"


def test_database_down_is_75_not_a_traceback(tmp_path: Path, closed_port: int) -> None:
    (tmp_path / "fleet.toml").write_text('[agents.echo]\ncommand = ["true"]\n')
    env = plain_env(tmp_path, FLEET_DATABASE_URL=f"postgresql+psycopg://postgres@127.0.0.1:{closed_port}/fleet",
                    FLEET_REDIS_URL=f"redis://127.0.0.1:{closed_port}/0")
    for args in (["status"], ["runs"], ["kill", "echo"]):
        assert_exit(plain_cli(tmp_path, *args, env=env), 75)


def test_a_postgresql_database_that_does_not_exist_is_78_saying_create_it(tmp_path: Path, pg_server: str,
                                                                         redis_url: str) -> None:
    """A FLEET_DATABASE_URL naming a database never created (or misspelt) was "database unreachable ... safe to
    retry" (75), and `fleet doctor` said "start PostgreSQL" of a server that answers: a cron retries it all night,
    and the operator restarts a healthy server. It is configuration (78): create the database."""
    (tmp_path / "fleet.toml").write_text('[agents.echo]\ncommand = ["true"]\n')
    name = f"fleet_absent_{uuid.uuid4().hex[:12]}"
    env = plain_env(tmp_path, FLEET_DATABASE_URL=f"{pg_server}/{name}", FLEET_REDIS_URL=redis_url,
                    FLEET_WEB_PORT=str(free_port()), FLEET_FLOWER_PORT=str(free_port()))
    procs = [plain_cli(tmp_path, *args, env=env) for args in (["doctor"], ["status"], ["dispatch", "echo"],
                                                               ["db", "upgrade"], ["up"])]
    for proc in procs:
        assert_exit(proc, 78)
        said = proc.stdout + proc.stderr
        assert f'"{name}" does not exist' in said and "create" in said, show(proc)
        assert "start PostgreSQL" not in said and "safe to retry" not in said, show(proc)


def test_status_and_pause_with_redis_down_say_so(tmp_path: Path, closed_port: int) -> None:
    """`fleet status` exited 0 with Redis down ("Redis unreachable" in its body only), and `fleet pause` said
    "paused the whole fleet" as if Redis had it. Status prints what the database holds, then exits 75 as the
    exit-code table says; pause, held by the mirror alone, says "in the database only" and exits 0, as
    `fleet kill` does in the same case."""
    (tmp_path / "fleet.toml").write_text('[agents.echo]\ncommand = ["true"]\n')
    env = plain_env(tmp_path, FLEET_DATABASE_URL=f"sqlite:///{tmp_path / 'fleet.db'}",
                    FLEET_REDIS_URL=f"redis://127.0.0.1:{closed_port}/0", **WIDE)
    assert_exit(plain_cli(tmp_path, "db", "upgrade", env=env), 0)
    paused = plain_cli(tmp_path, "pause", "--reason", "redis down test", env=env)
    killed = plain_cli(tmp_path, "kill", "echo", env=env)
    assert_exit(paused, 0)
    assert_exit(killed, 0)
    assert "paused the whole fleet, in the database only (Redis unreachable" in paused.stdout, show(paused)
    assert "in the database only" in killed.stdout, show(killed)
    status, as_json, soft = (plain_cli(tmp_path, *args, env=env) for args in
                             (["status"], ["status", "--json"], ["--soft-fail", "status"]))
    assert_exit(status, 75)
    assert "PAUSED *" in status.stdout and "redis down test" in status.stdout  # what the database holds
    assert "Redis unreachable" in status.stdout and "Redis unreachable" in status.stderr
    picture = parse(as_json, 75)
    assert picture["redis"].startswith("unreachable") and picture["paused"] == {"*": "redis down test"}
    assert_exit(soft, 0)


def test_a_pointer_left_by_a_fleet_up_that_died_is_named_when_its_redis_does_not_answer(
        tmp_path: Path, closed_port: int) -> None:
    """`fleet up --embedded` killed by SIGKILL cannot take its `.fleet-redis-url` away: the folder's commands
    then find nothing at that URL. They say so (75) and name the file and what to do, not only "Redis
    unreachable" about a URL the operator never set."""
    (tmp_path / "fleet.toml").write_text('[agents.echo]\ncommand = ["true"]\n')
    pointer = tmp_path / ".fleet-redis-url"
    pointer.write_text(f"redis://:pw@127.0.0.1:{closed_port}/0")
    pointer.chmod(0o600)
    env = plain_env(tmp_path, FLEET_DATABASE_URL=f"sqlite:///{tmp_path / 'fleet.db'}", **WIDE)
    assert_exit(plain_cli(tmp_path, "db", "upgrade", env=env), 0)
    for args in (["status"], ["dispatch", "echo"], ["resume"]):
        proc = plain_cli(tmp_path, *args, env=env)
        assert_exit(proc, 75)
        assert f"{pointer}" in proc.stderr and "delete it" in proc.stderr, show(proc)
        assert "pw@" not in proc.stdout + proc.stderr


def test_ctrl_c_on_dispatch_wait_says_the_run_goes_on_and_how_to_follow_it(tmp_path: Path, redis_url: str,
                                                                          redis: Any) -> None:
    """Ctrl-C stops the waiting, not the run: it exited 130 saying nothing, and the operator could not tell
    whether the run was cancelled. No worker consumes here, so the run stays queued (`redis`: a flushed
    database, so no other test's kill flag refuses it)."""
    (tmp_path / "fleet.toml").write_text('[agents.echo]\ncommand = ["true"]\n')
    env = plain_env(tmp_path, FLEET_DATABASE_URL=f"sqlite:///{tmp_path / 'fleet.db'}", FLEET_REDIS_URL=redis_url,
                    **WIDE)
    assert_exit(plain_cli(tmp_path, "db", "upgrade", env=env), 0)
    proc = subprocess.Popen([PY, "-m", "fleet", "dispatch", "echo", "--key", new_key("ctrl-c"), "--wait"], env=env,
                            cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # printed before the waiting starts
        assert first.startswith("queued run "), first
        run_id = first.split()[2]
        time.sleep(0.5)  # well into follow_run's polling
        proc.send_signal(signal.SIGINT)
        rest, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 130, (first + rest, stderr)
    assert "Traceback" not in stderr
    said = [line for line in (rest + stderr).splitlines() if run_id in line and "stopped waiting" in line]
    assert said, (rest, stderr)
    assert "still queued" in said[0] and f"fleet runs show {run_id}" in said[0] and f"fleet logs -f {run_id}" in said[0]


def test_soft_fail_covers_doctor_75(fleet: Fleet, closed_port: int, tmp_path: Path) -> None:
    only_once(fleet)
    env = {"FLEET_REDIS_URL": f"redis://127.0.0.1:{closed_port}/0", "FLEET_LOG_DIR": str(tmp_path / "logs")}
    plain = fleet.cli("doctor", env=env)
    assert plain.returncode == 75, show(plain)
    assert_exit(fleet.cli("--soft-fail", "doctor", env=env), 0)


def test_exit_77_auth(fleet: Fleet) -> None:
    """77: an agent that exits 77 (a revoked key) through `dispatch --wait`; `doctor` when Redis refuses us."""
    fleet.reset_agent("exit77")
    wrong = fleet.redis_url.replace("redis://", "redis://nobody:wrong-password@")
    agent, doctor = cli_all(fleet, ["dispatch", "exit77", "--key", new_key("auth"), "--wait"],
                            (["doctor"], {"FLEET_REDIS_URL": wrong}))
    assert_exit(agent, 77)
    assert "ended dead, exit 77" in agent.stdout
    assert_exit(doctor, 77)
    assert "refused us" in doctor.stdout


def test_wrong_redis_credentials_are_77_and_stay_loud(fleet: Fleet, tmp_path: Path) -> None:
    only_once(fleet)
    env = {"FLEET_REDIS_URL": fleet.redis_url.replace("redis://", "redis://nobody:wrong-password@"),
           "FLEET_LOG_DIR": str(tmp_path / "logs")}
    # `fleet status` said "Redis unreachable" and exited 75 ("safe to retry"): a cron that retries on 75 would
    # retry a wrong password all night.
    procs = cli_all(fleet, ["dispatch", "echo", "--key", new_key("creds")], ["watchdog", "--wait", "1"],
                    ["--soft-fail", "dispatch", "echo", "--key", new_key("creds-soft")], ["status"],
                    ["--soft-fail", "status"], env=env)
    for proc in procs:
        assert_exit(proc, 77)
    assert "refused the credentials" in procs[3].stdout + procs[3].stderr, show(procs[3])


def test_exit_78_bad_config(fleet: Fleet, bad_config: Path) -> None:
    """78 for a bad fleet.toml given with --config, file:line and why; --soft-fail keeps 78 loud."""
    only_once(fleet)
    procs = cli_all(fleet, ["--config", str(bad_config), "dispatch", "echo"], ["--config", str(bad_config), "status"],
                    ["--config", str(bad_config), "agents"], ["--config", str(bad_config), "doctor"],
                    ["--soft-fail", "--config", str(bad_config), "status"])
    for proc in procs:
        assert_exit(proc, 78)
        assert f"{bad_config}:2" in proc.stdout + proc.stderr and f"{bad_config}:5" in proc.stdout + proc.stderr
    assert "FAIL  config" in procs[3].stdout


def test_exit_1_failure_and_the_dead_letter_queue(fleet: Fleet) -> None:
    """1: `dispatch --wait` of `fail` ends dead. Then the DLQ: list, show, replay twice (once), purge."""
    fleet.reset_agent("fail")
    result = parse(fleet.cli("dispatch", "fail", "--key", new_key("dead"), "--wait", "--json"), 1)
    dead_run = result["run_id"]
    assert run_of(fleet, dead_run).status == "dead"
    dead = dead_letter_of(fleet, dead_run)
    assert dead is not None and dead.id is not None
    dead_id = str(dead.id)

    listed, shown, shown_json = cli_all(fleet, ["dlq", "list", "--json"], ["dlq", "show", dead_id],
                                        ["dlq", "show", dead_id, "--json"])
    rows = parse(listed)
    assert all(set(r) >= DEAD_KEYS for r in rows)
    (row,) = [r for r in rows if r["id"] == dead.id]
    assert (row["run_id"], row["agent"], row["attempts"], row["exit_code"]) == (dead_run, "fail", 2, 1)
    assert_exit(shown, 0)
    assert "exit code 1" in shown.stdout  # the error
    assert "--- output tail ---" in shown.stdout and "boom: the failing agent" in shown.stdout
    data = parse(shown_json)
    assert set(data) >= DEAD_KEYS and data["id"] == dead.id and "boom: the failing agent" in data["output_tail"]

    first = parse(fleet.cli("dlq", "replay", dead_id, "--json"))
    second = parse(fleet.cli("dlq", "replay", dead_id, "--json"))
    assert set(first) >= DISPATCH_KEYS and first["status"] == "queued", first
    assert second["status"] == "duplicate" and second["run_id"] == first["run_id"], second
    with db.session(fleet.services.engine) as session:
        replays = session.exec(select(Run).where(Run.replay_of == dead.id)).all()
    assert [(r.id, r.prev_run_id) for r in replays] == [(first["run_id"], dead_run)]
    wait_status(fleet, first["run_id"], {"dead", "succeeded"})  # the replay fails too: leave nothing running

    purged = fleet.cli("dlq", "purge", dead_id)
    assert_exit(purged, 0)
    assert "purged 1 dead letter(s)" in purged.stdout
    assert_exit(fleet.cli("dlq", "show", dead_id), 69)
    assert dead_letter_of(fleet, dead_run) is None


def test_dlq_purge_refuses_ids_with_all(fleet: Fleet) -> None:
    """`fleet dlq purge 7 --all` purged every dead letter, the named one and all the others, where the
    operator named one (found by a new user's walk through the README): ids and --all together are refused (65)
    and nothing is purged."""
    only_once(fleet)
    fleet.reset_agent("fail")
    dead_run = parse(fleet.cli("dispatch", "fail", "--key", new_key("purge-all"), "--wait", "--json"), 1)["run_id"]
    dead = dead_letter_of(fleet, dead_run)
    assert dead is not None and dead.id is not None
    before = counts(fleet)

    both = fleet.cli("dlq", "purge", str(dead.id), "--all")
    assert_exit(both, 65)
    assert both.stderr.startswith("fleet: ") and "--all" in both.stderr, show(both)
    assert counts(fleet) == before and dead_letter_of(fleet, dead_run) is not None
    assert_exit(fleet.cli("dlq", "purge", str(dead.id)), 0)  # leave nothing behind


# ---------------------------------------------------------------- logs -f


def test_logs_follow_a_running_run_until_it_ends(fleet: Fleet, tmp_path: Path) -> None:
    fleet.reset_agent("long")
    result = send(fleet, "long", new_key("follow"))
    assert result.status == "queued", result
    log = fleet.log_dir / "runs" / f"{result.run_id}.log"
    lines = lambda: log.read_text().count("\n") if log.exists() else 0  # noqa: E731
    wait_status(fleet, result.run_id, {"running"}, timeout=30)
    wait_for(lambda: lines() >= 1, 15, "the sleeper's first line")
    out = tmp_path / "logs-f.out"
    follower = None
    try:
        with out.open("w") as handle:
            follower = subprocess.Popen([PY, "-m", "fleet", "logs", result.run_id, "-f"], env=fleet.env, cwd=fleet.tmp,
                                        stdout=handle, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        at_start = lines()
        # It keeps following: lines the agent writes after it started reach its output, while it still runs.
        wait_for(lambda: out.read_text().count("\n") >= at_start + 2, 20, "`fleet logs -f` to print new lines")
        assert follower.poll() is None, "logs -f ended while the run was still running"
        assert_exit(fleet.cli("kill", "long", "--reason", "end the followed run"), 0)
        stderr = follower.communicate(timeout=30)[1]
    finally:
        if follower is not None and follower.poll() is None:
            follower.kill()
            follower.wait(5)
        fleet.cli("resume", "long", check=True)
    assert follower.returncode == 0, stderr
    assert run_of(fleet, result.run_id).status == "killed"
    printed = out.read_text()
    assert printed == log.read_text() and printed.count("sleeper") >= 3
    # How it ended, on stderr (the output stays the agent's own): a follower must not take a kill for the end.
    assert f"run {result.run_id} ended killed" in stderr, stderr


# ---------------------------------------------------------------- dry run, also through celery


def test_dry_run_writes_nothing_and_shows_the_gates(fleet: Fleet) -> None:
    fleet.reset_agent("echo")
    key = new_key("dry")
    before = counts(fleet)
    as_json, table = cli_all(fleet, ["dispatch", "echo", "--key", key, "--dry-run", "--json"],
                             ["dispatch", "echo", "--key", key, "--dry-run"])
    plan = parse(as_json)
    assert set(plan) >= DISPATCH_KEYS
    assert (plan["status"], plan["run_id"], plan["would_fire"]) == ("dry_run", None, [f"new:echo:{key}"])
    assert set(plan["gates"]) == GATES and all(g["ok"] for g in plan["gates"].values()), plan["gates"]
    assert_exit(table, 0)
    assert f"would fire: new:echo:{key}" in table.stdout
    for gate in GATES:
        assert f"gate {gate}" in table.stdout
    assert counts(fleet) == before
    assert runs_with_key(fleet, f"echo:{key}") == []


def test_dry_run_of_an_existing_key_says_duplicate(fleet: Fleet) -> None:
    fleet.reset_agent("echo")
    key = new_key("dry-dup")
    first = send(fleet, "echo", key)
    wait_status(fleet, first.run_id, {"succeeded"})
    plan = parse(fleet.cli("dispatch", "echo", "--key", key, "--dry-run", "--json"))
    assert (plan["status"], plan["run_id"]) == ("dry_run", first.run_id)
    assert plan["reason"] == "duplicate: already succeeded"


def test_celery_call_then_result_shows_the_plan(fleet: Fleet) -> None:
    """DESIGN: `celery call` then `celery result ID` shows what a dispatch decided."""
    only_once(fleet)
    fleet.reset_agent("echo")
    key = new_key("celery")
    before = counts(fleet)
    kwargs = json.dumps({"agent": "echo", "work_key": key, "dry_run": True})
    call = subprocess.run([PY, "-m", "celery", "-A", "workers.app", "call", "fleet.dispatch", "--kwargs", kwargs],
                          env=fleet.env, cwd=fleet.tmp, capture_output=True, text=True, timeout=60, check=False)
    assert call.returncode == 0, call.stderr
    task_id = call.stdout.strip().splitlines()[-1]
    assert uuid.UUID(task_id)
    got = subprocess.run([PY, "-m", "celery", "-A", "workers.app", "result", task_id], env=fleet.env, cwd=fleet.tmp,
                         capture_output=True, text=True, timeout=60, check=False)
    assert got.returncode == 0, got.stderr
    plan = ast.literal_eval(got.stdout.strip())  # celery prints the result dict (Python repr)
    assert set(plan) >= DISPATCH_KEYS
    assert (plan["status"], plan["would_fire"]) == ("dry_run", [f"new:echo:{key}"])
    assert set(plan["gates"]) == GATES and all(g["ok"] for g in plan["gates"].values())
    assert counts(fleet) == before


# ---------------------------------------------------------------- agents, spend, watchdog, sweep


def test_agents_spend_watchdog_sweep_json_and_the_key_never_shows(fleet: Fleet) -> None:
    expected = "sha256:" + hashlib.sha256(SECRET_KEY.encode()).hexdigest()[:12]
    agents_json, agents_table, spend, other_day, watchdog, reaper = cli_all(
        fleet, ["agents", "--json"], ["agents"], ["spend", "--json"], ["spend", "--day", "2020-01-01", "--json"],
        ["watchdog", "--wait", "15", "--json"], ["sweep", "reaper", "--json"], env=WIDE)

    rows = parse(agents_json)
    assert all(set(r) >= AGENT_KEYS for r in rows)
    by_name = {r["agent"]: r for r in rows}
    assert set(by_name) == set(fleet.services.config.agents)
    assert by_name["secret"]["key_fingerprint"] == expected and by_name["echo"]["key_fingerprint"] is None
    assert by_name["long"]["concurrency"] == 20 and by_name["capped"]["daily_cap_usd"] == 5.0
    assert_exit(agents_table, 0)
    assert expected in agents_table.stdout
    for proc in (agents_json, agents_table):
        for secret in (SECRET_KEY, SECRET_TOKEN):
            assert secret not in proc.stdout + proc.stderr

    today = parse(spend)
    assert set(today) >= SPEND_KEYS and all(set(s) >= SCOPE_KEYS for s in today["scopes"])
    scopes = {s["scope"]: s for s in today["scopes"]}
    assert {"*", "echo", "capped"} <= set(scopes) and scopes["capped"]["cap_usd"] == 5.0
    assert today["scopes"][0]["scope"] == "*"
    old = parse(other_day)
    assert old["day"] == "2020-01-01" and all(s["spent_micros"] == 0 for s in old["scopes"])

    assert watchdog.returncode in (0, 1), show(watchdog)  # 1 is a red verdict (e.g. DLQ growth from other tests)
    verdict = json.loads(watchdog.stdout)
    assert set(verdict) >= VERDICT_KEYS and verdict["status"] in {"green", "amber", "red"}
    assert (watchdog.returncode == 1) == (verdict["status"] == "red")
    assert verdict["checks"] and all(set(c) == {"name", "status", "reason"} for c in verdict["checks"])
    checks = {c["name"]: c for c in verdict["checks"]}
    assert checks["consumption:dispatch"]["status"] == checks["consumption:agents"]["status"] == "green"

    report = parse(reaper)
    assert set(report) == SWEEP_KEYS and report["sweep"] == "reaper"


# ---------------------------------------------------------------- what piped output looks like


def test_tables_when_piped_keep_ids_and_fingerprints_whole(fleet: Fleet) -> None:
    only_once(fleet)
    fleet.reset_agent("echo")
    result = send(fleet, "echo", new_key("piped"))
    wait_status(fleet, result.run_id, {"succeeded", "dead"})
    env = {"COLUMNS": ""}  # as under cron or a pipe: no terminal width
    runs, agents = cli_all(fleet, ["runs", "--limit", "5"], ["agents"], env=env)
    assert_exit(runs, 0)
    assert_exit(agents, 0)
    assert result.run_id in runs.stdout, runs.stdout
    assert "sha256:" + hashlib.sha256(SECRET_KEY.encode()).hexdigest()[:12] in agents.stdout, agents.stdout


def test_runs_json_prints_no_warnings(fleet: Fleet) -> None:
    only_once(fleet)
    fleet.reset_agent("echo")
    result = send(fleet, "echo", new_key("warn"))
    wait_status(fleet, result.run_id, {"succeeded", "dead"})
    listed, shown = cli_all(fleet, ["runs", "--limit", "3", "--json"], ["runs", "show", result.run_id])
    for proc in (listed, shown):
        assert_exit(proc, 0)
        assert "Warning" not in proc.stderr, proc.stderr


# ---------------------------------------------------------------- what a command prints, and nothing else


def test_kill_prints_one_clean_line_and_its_alert_goes_to_the_log_file(fleet: Fleet) -> None:
    """The kill's alert (and any log line on the way) is JSON in <log_dir>/cli.jsonl, not in the command's output."""
    only_once(fleet)
    agent = "exit3"
    fleet.reset_agent(agent)
    reason = f"clean output {uuid.uuid4().hex[:8]}"
    try:
        killed = fleet.cli("kill", agent, "--reason", reason)
    finally:
        resumed = fleet.cli("resume", agent)
    assert_exit(killed, 0)
    assert (killed.stdout, killed.stderr) == (f"kill switch engaged for agent {agent}: {reason}\n", ""), show(killed)
    assert_exit(resumed, 0)
    assert (resumed.stdout, resumed.stderr) == (f"resumed agent {agent} (kill switch released)\n", ""), show(resumed)
    logged = [json.loads(line) for line in (fleet.log_dir / "cli.jsonl").read_text().splitlines()]
    (alert,) = [line for line in logged if line["event"] == "alert" and reason in line["message"]]
    assert (alert["kind"], alert["process"], alert["level"]) == ("kill_engaged", "cli", "warning")


def test_a_bad_sentry_dsn_or_fleet_toml_does_not_stop_a_fleet_wide_kill(fleet: Fleet, bad_config: Path) -> None:
    """The kill needs only Redis (and the mirror): a typo elsewhere is reported, and the kill goes on."""
    only_once(fleet)
    try:
        killed = fleet.cli("--config", str(bad_config), "kill", "--reason", "config broken",
                           env={"FLEET_SENTRY_DSN": "not-a-dsn"})
        in_force = bool(fleet.redis.exists(keys.kill()))
    finally:
        resumed = fleet.cli("resume")
    assert_exit(killed, 0)
    assert killed.stdout == "kill switch engaged for the whole fleet: config broken\n", show(killed)
    assert in_force
    assert "FLEET_SENTRY_DSN" in killed.stderr and f"{bad_config}:2" in killed.stderr, show(killed)
    assert_exit(resumed, 0)
    # One agent's kill still needs a valid fleet.toml: it cannot tell an agent from a typo without one.
    assert_exit(fleet.cli("--config", str(bad_config), "kill", "echo"), 78)


def test_emptying_an_agents_key_does_not_stop_that_agent_being_killed(tmp_path: Path, redis_url: str,
                                                                       redis: Any) -> None:
    """`: > keys/a.key` is how one revokes a key in a hurry, and an empty key file is now a configuration error.
    A one-agent kill refused (78, nothing done) whenever fleet.toml did not validate, so emptying agent a's key
    stopped `fleet kill a` and `fleet kill b` alike. The file still names the agent: the kill goes on, saying
    what is wrong; a name the file does not have is still refused."""
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    (keys_dir / "a.key").write_text("")
    (keys_dir / "a.key").chmod(0o600)
    (tmp_path / "fleet.toml").write_text('[agents.a]\ncommand = ["true"]\nkey_file = "keys/a.key"\n\n'
                                         '[agents.b]\ncommand = ["true"]\n')
    env = plain_env(tmp_path, FLEET_DATABASE_URL=f"sqlite:///{tmp_path / 'fleet.db'}", FLEET_REDIS_URL=redis_url)
    assert_exit(plain_cli(tmp_path, "db", "upgrade", env=env), 0)
    for agent in ("a", "b"):
        killed = plain_cli(tmp_path, "kill", agent, "--reason", "key revoked", env=env)
        assert_exit(killed, 0)
        assert "is empty" in killed.stderr, show(killed)
        assert redis.get(keys.kill(agent)) is not None, show(killed)
    assert_exit(plain_cli(tmp_path, "kill", "typo", env=env), 78)
    assert redis.get(keys.kill("typo")) is None


def test_a_bad_fleet_toml_still_lets_the_state_be_seen_and_the_fleet_resumed(fleet: Fleet, bad_config: Path) -> None:
    """At 2am with a fleet.toml broken by an edit (the running fleet keeps its last good one), `fleet kill` worked
    but status, runs, dead letters, events and spend exited 78 and showed nothing, and the fleet could not be
    resumed. They show what the database and Redis hold, say why the file is refused, and still exit 78; a
    fleet-wide resume lifts the kill (0)."""
    only_once(fleet)
    fleet.reset_agent("echo")
    done = send(fleet, "echo", new_key("seen"))
    wait_status(fleet, done.run_id, {"succeeded"})
    bad = ["--config", str(bad_config)]
    assert_exit(fleet.cli(*bad, "kill", "--reason", "at 2am"), 0)
    try:
        status, runs, dead, events, spend = cli_all(fleet, [*bad, "status", "--json"], [*bad, "runs", "--json"],
                                                    [*bad, "dlq", "list", "--json"], [*bad, "events", "--json"],
                                                    [*bad, "spend", "--json"])
    finally:
        resumed = fleet.cli(*bad, "resume")
    for proc in (status, runs, dead, events, spend):
        assert_exit(proc, 78)
        assert f"{bad_config}:2" in proc.stderr, show(proc)
    assert [k["scope"] for k in parse(status, 78)["kill"]] == ["*"], show(status)
    assert done.run_id in {row["id"] for row in parse(runs, 78)}
    assert isinstance(parse(dead, 78), list)
    assert any(json.loads(line)["kind"] == "kill.engaged" for line in events.stdout.splitlines()), show(events)
    assert_exit(resumed, 0)
    assert not fleet.redis.exists(keys.kill()), show(resumed)


def test_a_bad_fleet_toml_still_lets_the_whole_fleet_be_paused(fleet: Fleet, bad_config: Path) -> None:
    """Maintenance is when fleet.toml is being edited, and a pause is what the README prescribes for it ("nothing
    new starts, what runs finishes"); with the file broken mid-edit `fleet pause` exited 78 and paused nothing,
    leaving `fleet kill` (which stops the running runs) as the only brake. A fleet-wide pause needs no agents."""
    only_once(fleet)
    bad = ["--config", str(bad_config)]
    try:
        paused = fleet.cli(*bad, "pause", "--reason", "editing fleet.toml")
        in_force = fleet.redis.get(keys.paused(keys.GLOBAL))
    finally:
        fleet.cli(*bad, "resume")
    assert_exit(paused, 0)
    assert f"{bad_config}:2" in paused.stderr, show(paused)  # why the file is refused, said on the way
    assert in_force is not None and "editing fleet.toml" in in_force, show(paused)
    assert_exit(fleet.cli(*bad, "pause", "echo"), 78)  # one agent's name cannot be told from a typo without it


def test_runs_table_shows_exit_0_as_0(fleet: Fleet) -> None:
    only_once(fleet)
    fleet.reset_agent("echo")
    result = send(fleet, "echo", new_key("exit0"))
    wait_status(fleet, result.run_id, {"succeeded", "dead"})
    runs = fleet.cli("runs", "--agent", "echo", "--limit", "5", env=WIDE)
    assert_exit(runs, 0)
    (row,) = [line for line in runs.stdout.splitlines() if result.run_id in line]
    cells = [cell.strip() for cell in row.split("│")[1:-1]]
    assert cells[3:6] == ["succeeded", "1", "0"], row  # status, attempt, exit


@pytest.mark.parametrize(("age", "said"), [(timedelta(seconds=20), None), (timedelta(hours=2, minutes=5), "2 h 5 min")])
def test_status_shows_a_stale_watchdog_verdict_as_stale(tmp_path: Path, closed_port: int, age: timedelta,
                                                       said: str | None) -> None:
    """A verdict nobody renewed (beat or the cron watchdog stopped) must not read as today's health."""
    (tmp_path / "fleet.toml").write_text('[agents.echo]\ncommand = ["true"]\n')
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    env = plain_env(tmp_path, FLEET_DATABASE_URL=url, FLEET_REDIS_URL=f"redis://127.0.0.1:{closed_port}/0", **WIDE)
    assert_exit(plain_cli(tmp_path, "db", "upgrade", env=env), 0)
    engine = db.make_engine(url)
    try:
        with db.session(engine) as session:
            session.add(WatchdogVerdict(at=datetime.now(UTC) - age, status="green", host="elsewhere", checks="[]"))
            session.commit()
    finally:
        engine.dispose()
    status = plain_cli(tmp_path, "status", env=env)
    assert_exit(status, 75)  # Redis down (closed_port): the rest of the picture is printed all the same
    (line,) = [line for line in status.stdout.splitlines() if line.startswith("watchdog:")]
    if said is None:
        assert "stale" not in line.lower(), line
    else:
        assert "green" in line and f"STALE: {said} old" in line, line


def test_watchdog_with_no_worker_reports_the_canarys_real_age(tmp_path: Path, redis: Any, redis_url: str) -> None:
    """No worker consumes: red, saying how long the canary has really been out (it said "sent 1796182771s
    ago", from a send time set back to 1970, and Redis kept that date for status and /health)."""
    import re

    (tmp_path / "fleet.toml").write_text('[agents.echo]\ncommand = ["true"]\n')
    env = plain_env(tmp_path, FLEET_DATABASE_URL=f"sqlite:///{tmp_path / 'fleet.db'}", FLEET_REDIS_URL=redis_url,
                    **WIDE)
    assert_exit(plain_cli(tmp_path, "db", "upgrade", env=env), 0)
    started = datetime.now(UTC)
    verdict = parse(plain_cli(tmp_path, "watchdog", "--wait", "1", "--json", env=env), 1)
    reasons = {c["name"]: c["reason"] for c in verdict["checks"] if c["name"].startswith("consumption:")}
    assert reasons, verdict
    for name, reason in reasons.items():
        said = re.search(r"canary sent (\d+)s ago has not come back", reason)
        assert said and 1 <= int(said.group(1)) < 60, f"{name}: {reason}"
        queue = name.removeprefix("consumption:")
        sent = datetime.fromisoformat(redis.get(keys.canary_sent(queue)))
        assert started - timedelta(seconds=5) <= sent <= datetime.now(UTC), sent  # the real send time


# ---------------------------------------------------------------- how the command is put together


def test_cli_modules_import_no_one_above_them() -> None:
    """fleet/cli/__init__.py assembles the commands; the command modules import only what is below them."""
    package = ROOT / "fleet" / "cli"
    below = {"fleet.cli.common"}
    for path in sorted(package.glob("*.py")):
        if path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module} | {
            alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        upward = {name for name in imported if name == "fleet.cli" or name.startswith("fleet.cli.")} - below
        assert not upward, f"{path.name} imports {upward}"
    app_module = (ROOT / "workers" / "app.py").read_text()
    assert "import workers.tasks" not in app_module and "from workers.tasks" not in app_module


def test_the_other_fleet_check_loads_nothing_of_fleet_up_when_the_mark_is_ours(tmp_path: Path) -> None:
    """Every acting command (and kill, right after its flag, before its database mirror) asks whose mark its Redis
    holds. It imported fleet.supervisor (rich.live, fleet up's screen, ~50 ms) for the masked URL of a refusal,
    on every call: it is needed only when the mark is another fleet's."""
    probe = (
        "import sys\n"
        "from types import SimpleNamespace\n"
        "from fleet.cli.common import another_fleets_redis\n"
        "class Pipe:\n"
        "    def get(self, key): pass\n"
        "    def ttl(self, key): pass\n"
        "    def execute(self): return ['ours', 300]\n"
        "class Client:\n"
        "    def pipeline(self, transaction=True): return Pipe()\n"
        "another_fleets_redis(SimpleNamespace(redis=Client(), fast_redis=Client(), fleet_id='ours'))\n"
        "another_fleets_redis(SimpleNamespace(redis=Client(), fast_redis=Client(), fleet_id='ours'), refuse=False)\n"
        "print(sorted(m for m in sys.modules if m in ('fleet.supervisor', 'fleet.upscreen', 'rich.live')))\n")
    proc = subprocess.run([PY, "-c", probe], env=plain_env(tmp_path), cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout


def test_help_loads_no_heavy_library_and_every_task_is_registered_by_name(tmp_path: Path) -> None:
    """`fleet --help` imports none of the libraries that made it slow; `workers.app` names its tasks by
    import path and still lists all of them for anyone who reads `app.tasks` (the contract, scripts)."""
    probe = (
        "import runpy, sys\n"
        "sys.argv = ['fleet', '--help']\n"
        "try:\n"
        "    runpy.run_module('fleet', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = ('sqlalchemy', 'sqlmodel', 'redis', 'sentry_sdk', 'alembic', 'pydantic', 'celery', 'structlog')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(heavy)), file=sys.stderr)\n")
    proc = subprocess.run([PY, "-c", probe], env=plain_env(tmp_path), cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0 and "Usage" in proc.stdout, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "[]", proc.stderr
    tasks = ("from workers.app import app; import sys; loaded = 'workers.tasks' in sys.modules; "
             "print(loaded, sorted(t for t in app.tasks if t.startswith('fleet.')))")
    listed = subprocess.run([PY, "-c", tasks], env=plain_env(tmp_path), cwd=ROOT, capture_output=True, text=True,
                            timeout=60, check=True).stdout
    assert listed.startswith("False "), listed  # not imported by workers.app itself...
    for name in ("fleet.dispatch", "fleet.execute", "fleet.tick", "fleet.sweep.reaper", "fleet.sweep.idempotency",
                 "fleet.sweep.retention", "fleet.watchdog", "fleet.kill", "fleet.resume"):
        assert f"'{name}'" in listed, listed  # ...yet registered once the app is finalized


def test_dispatching_the_key_of_a_run_that_failed_says_how_to_run_that_work_again(fleet: Fleet) -> None:
    """`fleet dispatch fail --key K` after K's run was dead-lettered (or killed): "duplicate run ID (already dead)"
    and exit 0, and a tired operator who resumed the agent runs the same line again and again. The same key
    never runs twice by design; the answer must say what does run it again."""
    fleet.reset_agent("fail")
    key = new_key("failed-once")
    assert_exit(fleet.cli("dispatch", "fail", "--key", key, "--wait"), 1)
    again = fleet.cli("dispatch", "fail", "--key", key)
    assert_exit(again, 0)
    assert "(already dead)" in again.stdout, show(again)
    assert "a new --key runs it again" in again.stdout and "fleet dlq replay" in again.stdout, show(again)
