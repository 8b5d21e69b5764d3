"""The set-up commands as a user runs them: `fleet init`, `fleet db upgrade`, `fleet doctor`, each a real
subprocess with a controlled environment in a folder of its own."""

from __future__ import annotations

import os
import socket
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_lib

from fleet.config import load_fleet_config
from fleet.errors import ExitCode
from fleet.starter import STARTER_TOML


def cli_env(tmp_path: Path, redis_url: str, **extra: str) -> dict[str, str]:
    """The caller's environment minus every FLEET_* variable, plus settings that point into tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(FLEET_CONFIG=str(tmp_path / "fleet.toml"), FLEET_REDIS_URL=redis_url,
               FLEET_DATABASE_URL=f"sqlite:///{tmp_path / 'fleet.db'}", FLEET_LOG_DIR=str(tmp_path / "logs"))
    env.update(extra)
    return env


def fleet(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleet", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=120, check=False)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(autouse=True)
def _flushed_redis(request: pytest.FixtureRequest) -> Iterator[None]:
    """The tests here share this xdist worker's Redis database (`redis_url`): each starts from an empty one and
    leaves one (a kill flag raised in the wrong folder, a pause, would otherwise stop the next test's agents)."""
    if "redis_url" not in request.fixturenames:
        yield
        return
    client = redis_lib.Redis.from_url(request.getfixturevalue("redis_url"))
    client.flushdb()
    yield
    client.flushdb()
    client.close()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port bound but never listening: connecting is refused, and no one else can take it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_init_then_db_upgrade_then_doctor_passes(tmp_path: Path, redis_url: str) -> None:
    target = tmp_path / "myfleet"
    env = cli_env(target, redis_url)
    result = fleet("init", str(target), env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    config, key = target / "fleet.toml", target / "keys" / "echo.key"
    assert f"wrote {config}" in result.stdout
    assert "next steps" in result.stdout and "doctor" in result.stdout and "db upgrade" in result.stdout
    assert mode(target / "keys") == 0o700
    assert mode(key) == 0o600
    secret = key.read_text()
    assert len(secret) >= 32
    assert secret not in result.stdout + result.stderr
    agent = load_fleet_config(config).agent("echo")
    assert agent.command[1:3] == ["-m", "fleet.examples.echo_agent"]
    assert agent.key_file == key

    result = fleet("db", "upgrade", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    result = fleet("--config", str(config), "doctor", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout
    assert f"ok    config    {config}: 5 agent(s): batch, echo, exit-with, flaky, sleeper" in result.stdout
    assert "ok    schema" in result.stdout
    assert secret not in result.stdout + result.stderr


def test_the_commented_claude_agent_is_a_valid_agent_once_uncommented(tmp_path: Path) -> None:
    """The starter's `claude -p` example never rots: uncommented (one "# " off each line) with its key file in
    place, it loads as a token-priced agent under a cap, with an estimate and its key for itself alone."""
    start = STARTER_TOML.index("# [prices.")
    lines = [line[2:] if line.startswith("# ") else "" if line == "#" else line
             for line in STARTER_TOML[start:].splitlines()]
    (tmp_path / "keys").mkdir(mode=0o700)
    key = tmp_path / "keys" / "fixer.anthropic"
    key.write_text("sk-ant-not-a-real-key\n")
    key.chmod(0o600)
    config = tmp_path / "fleet.toml"
    (tmp_path / "keys" / "echo.key").write_text("x" * 32)
    (tmp_path / "keys" / "echo.key").chmod(0o600)
    config.write_text(STARTER_TOML[:start] + "\n".join(lines) + "\n")
    fixer = load_fleet_config(config).agent("fixer")
    assert fixer.command[:2] == ["claude", "-p"] and "stream-json" in fixer.command and "--verbose" in fixer.command
    assert (fixer.usage_format, fixer.models) == ("claude-stream-json", ["claude-sonnet-4-5-20250929"])
    assert fixer.daily_cap_usd == 2.0 and fixer.est_cost_usd == 0.5
    assert fixer.secret_env == {"ANTHROPIC_API_KEY": key}
    assert "# run_as = " in "\n".join(lines)  # still a comment: the user must exist first


def test_doctor_before_db_upgrade_fails_78_naming_db_upgrade(tmp_path: Path, redis_url: str) -> None:
    """Every other command fails (78) until the tables exist: the doctor must not call that "ready". `fleet init`
    offers the doctor as a first look before `fleet up`, so its FAIL must say that `fleet up` makes the database
    too, as every other command does, not send a newcomer off to `fleet db upgrade` as if something were wrong."""
    env = cli_env(tmp_path, redis_url)
    assert fleet("init", env=env, cwd=tmp_path).returncode == 0  # into the current folder by default
    result = fleet("doctor", env=env, cwd=tmp_path)
    assert result.returncode == ExitCode.CONFIG, result.stdout + result.stderr
    assert "FAIL  database" in result.stdout and "fleet db upgrade" in result.stdout
    assert "`fleet up` makes it" in result.stdout, result.stdout
    assert "ready" not in result.stdout


@pytest.mark.parametrize("command", [("status",), ("runs",), ("spend",), ("events",), ("dlq", "list"), ("agents",),
                                     ("watchdog",), ("dispatch", "echo", "--key", "k1", "--dry-run")])
def test_commands_before_db_upgrade_exit_78_naming_db_upgrade(tmp_path: Path, redis_url: str,
                                                               command: tuple[str, ...]) -> None:
    """A database file without the tables (`fleet db upgrade` never ran): not "unreachable ... safe to retry" (75),
    which never helps."""
    env = cli_env(tmp_path, redis_url)
    assert fleet("init", env=env, cwd=tmp_path).returncode == 0
    sqlite3.connect(tmp_path / "fleet.db").close()
    result = fleet(*command, env=env, cwd=tmp_path)
    assert result.returncode == ExitCode.CONFIG, result.stdout + result.stderr
    assert "the database has no Fleet tables (or is behind): run `fleet db upgrade`" in result.stderr
    assert "safe to retry" not in result.stderr


@pytest.mark.parametrize("command", [("status",), ("runs",), ("spend",), ("events",), ("dlq", "list"), ("agents",),
                                     ("watchdog",), ("dispatch", "echo", "--key", "k1", "--dry-run"),
                                     ("pause", "echo", "--reason", "r")])
def test_commands_where_no_database_is_say_so_and_leave_no_file_behind(tmp_path: Path, redis_url: str,
                                                                       command: tuple[str, ...]) -> None:
    """`fleet status` in a folder where no fleet ever ran (the wrong folder, or before `fleet up`): 78 naming the
    file that is not there, and no empty fleet.db made in passing (the next command would find "no tables")."""
    env = cli_env(tmp_path, redis_url)
    assert fleet("init", env=env, cwd=tmp_path).returncode == 0
    result = fleet(*command, env=env, cwd=tmp_path)
    assert result.returncode == ExitCode.CONFIG, result.stdout + result.stderr
    assert f"{tmp_path / 'fleet.db'} does not exist yet" in result.stderr, result.stderr
    assert "fleet db upgrade" in result.stderr and "fleet up" in result.stderr
    assert not (tmp_path / "fleet.db").exists(), "a command that only looked made an empty database"


def test_a_kill_in_a_folder_where_no_fleet_ran_says_so_and_leaves_no_database_behind(tmp_path: Path,
                                                                                    redis_url: str) -> None:
    """`fleet kill` in the wrong folder at 2am: the flag still goes up at once (a kill never waits), but the
    command says that no fleet ran here (78, naming the file), not "the watchdog writes the mirror on its next
    pass, or run `fleet kill` again" (there is no watchdog here), and it makes no empty fleet.db that every
    later command would read as "no Fleet tables: run `fleet db upgrade`"."""
    env = cli_env(tmp_path, redis_url)
    result = fleet("kill", "--reason", "going to bed", env=env, cwd=tmp_path)
    assert result.returncode == ExitCode.CONFIG, result.stdout + result.stderr
    assert f"{tmp_path / 'fleet.db'} does not exist" in result.stderr, result.stderr
    assert "your fleet's folder" in result.stderr and "IS up in Redis" in result.stderr, result.stderr
    assert "watchdog writes it" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "fleet.db").exists(), "the kill made an empty database in the wrong folder"
    assert "going to bed" in (redis_lib.Redis.from_url(redis_url).get("fleet:kill:*") or b"").decode()


def test_runs_of_a_misspelt_agent_is_69_naming_the_known_ones_not_an_empty_table(tmp_path: Path,
                                                                                 redis_url: str) -> None:
    """`fleet runs --agent ehco` at 2am: an empty table and exit 0 read as "echo never ran". An agent the file
    does not name and no run remembers is a typo: 69 with the known names, as `fleet dispatch ehco` says."""
    env = cli_env(tmp_path, redis_url)
    assert fleet("init", env=env, cwd=tmp_path).returncode == 0
    assert fleet("db", "upgrade", env=env, cwd=tmp_path).returncode == 0
    result = fleet("runs", "--agent", "ehco", env=env, cwd=tmp_path)
    assert result.returncode == ExitCode.NOT_FOUND, result.stdout + result.stderr
    assert "unknown agent 'ehco'" in result.stderr and "echo" in result.stderr, result.stderr
    known = fleet("runs", "--agent", "echo", env=env, cwd=tmp_path)  # named in the file, no runs yet: a table
    assert known.returncode == 0, known.stdout + known.stderr


def test_one_agents_kill_refused_by_a_broken_fleet_toml_names_the_kill_that_still_works(tmp_path: Path,
                                                                                       redis_url: str) -> None:
    """A fleet.toml that is not even TOML (a key given twice in a hurried edit) cannot tell `fleet kill echo`
    from a typo, so that kill is refused (78). At the moment a kill is needed the refusal must say what does
    work without the file: the whole fleet's kill, or fixing the file."""
    env = cli_env(tmp_path, redis_url)
    assert fleet("init", env=env, cwd=tmp_path).returncode == 0
    assert fleet("db", "upgrade", env=env, cwd=tmp_path).returncode == 0
    config = tmp_path / "fleet.toml"
    config.write_text(config.read_text().replace("timeout_s = 60\n", "timeout_s = 60\ntimeout_s = 61\n", 1))
    result = fleet("kill", "echo", "--reason", "runaway", env=env, cwd=tmp_path)
    assert result.returncode == ExitCode.CONFIG, result.stdout + result.stderr
    assert "invalid TOML" in result.stderr, result.stderr
    assert "`fleet kill` without an agent" in result.stderr, result.stderr
    assert redis_lib.Redis.from_url(redis_url).get("fleet:kill:echo") is None


def test_status_of_a_fleet_that_is_not_running_says_so_and_which_redis_it_read(tmp_path: Path,
                                                                              redis_url: str) -> None:
    """`fleet status` after `fleet up` stopped (or in a folder whose embedded Redis is gone, so the command reads
    127.0.0.1:6379): "beat: leader none, last tick never" and exit 0 beside the runs of last night, with no word
    that nothing runs or of which Redis was read. It should say that no beat answers on that Redis (masked) and
    how the fleet is started or reached."""
    env = cli_env(tmp_path, redis_url)
    assert fleet("init", env=env, cwd=tmp_path).returncode == 0
    assert fleet("db", "upgrade", env=env, cwd=tmp_path).returncode == 0
    result = fleet("status", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "beat: leader none, last tick never" in result.stdout, result.stdout
    assert "is the fleet running?" in result.stdout and "fleet up" in result.stdout, result.stdout
    assert redis_url.split("@")[-1].split("/")[0] in result.stdout, result.stdout


def test_a_postgresql_role_that_does_not_exist_is_77_not_safe_to_retry(tmp_path: Path, redis_url: str,
                                                                      pg_server: str) -> None:
    """A misspelt user in FLEET_DATABASE_URL: PostgreSQL refuses the connection (`role "..." does not exist`), which
    the commands called "database unreachable ... safe to retry" (75): a cron retries it forever. Refused
    credentials are 77, as a wrong password is."""
    from sqlalchemy.engine import make_url

    url = make_url(f"{pg_server}/postgres").set(username="fleet_no_such_role", password="hunter2-never-shown")
    env = cli_env(tmp_path, redis_url, FLEET_DATABASE_URL=url.render_as_string(hide_password=False))
    assert fleet("init", env=env, cwd=tmp_path).returncode == 0
    result = fleet("status", env=env, cwd=tmp_path)
    assert result.returncode == ExitCode.AUTH, result.stdout + result.stderr
    assert 'role "fleet_no_such_role" does not exist' in result.stderr, result.stderr
    assert "safe to retry" not in result.stderr, result.stderr
    doctor = fleet("doctor", env=env, cwd=tmp_path)  # not "unreachable: start PostgreSQL" (75)
    assert doctor.returncode == ExitCode.AUTH, doctor.stdout + doctor.stderr
    assert "FAIL  database" in doctor.stdout and "refused" in doctor.stdout, doctor.stdout
    assert "start PostgreSQL" not in doctor.stdout, doctor.stdout
    assert "hunter2-never-shown" not in doctor.stdout + doctor.stderr + result.stderr


def test_resuming_one_agent_killed_while_fleet_toml_is_broken_says_what_lifts_it(tmp_path: Path,
                                                                                 redis_url: str) -> None:
    """`fleet kill echo` goes through a fleet.toml that does not validate (the file still names echo), but
    `fleet resume echo` is refused (78) with the file's problem alone: the operator who killed it a minute ago is
    not told that the file must validate first, nor that the kill holds meanwhile."""
    env = cli_env(tmp_path, redis_url)
    assert fleet("init", env=env, cwd=tmp_path).returncode == 0
    assert fleet("db", "upgrade", env=env, cwd=tmp_path).returncode == 0
    config = tmp_path / "fleet.toml"
    config.write_text(config.read_text().replace("timeout_s = 120\n", "timeout_s = -5\n", 1))  # sleeper's
    killed = fleet("kill", "echo", "--reason", "runaway", env=env, cwd=tmp_path)
    assert killed.returncode == 0, killed.stdout + killed.stderr
    resumed = fleet("resume", "echo", env=env, cwd=tmp_path)
    assert resumed.returncode == ExitCode.CONFIG, resumed.stdout + resumed.stderr
    assert "timeout_s" in resumed.stderr, resumed.stderr
    assert "still in force" in resumed.stderr and "fleet doctor" in resumed.stderr, resumed.stderr
    assert redis_lib.Redis.from_url(redis_url).get("fleet:kill:echo") is not None


def test_init_twice_refuses_without_force_and_keeps_everything(tmp_path: Path, redis_url: str) -> None:
    env = cli_env(tmp_path, redis_url)
    assert fleet("init", str(tmp_path), env=env, cwd=tmp_path).returncode == 0
    config, key = tmp_path / "fleet.toml", tmp_path / "keys" / "echo.key"
    edited = config.read_text() + "# my own edit\n"
    config.write_text(edited)
    secret = key.read_text()

    result = fleet("init", str(tmp_path), env=env, cwd=tmp_path)
    assert result.returncode == ExitCode.USAGE
    assert f"{config} already exists" in result.stderr and "--force" in result.stderr
    assert config.read_text() == edited
    assert key.read_text() == secret

    key.chmod(0o644)
    result = fleet("init", "--force", str(tmp_path), env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert config.read_text() == STARTER_TOML  # the config is rewritten...
    assert key.read_text() == secret  # ...but a key in use is never replaced
    assert mode(key) == 0o600  # and its mode is tightened again
    assert "kept the existing key" in result.stdout


@pytest.mark.parametrize(("blocker", "why"), [("keys", "is not a folder"), ("keys/echo.key", "is not a file"),
                                            (".", "is not a folder"), ("..", "is not a folder")])
def test_init_over_something_in_the_way_is_a_clear_65_and_writes_nothing(tmp_path: Path, redis_url: str,
                                                                          blocker: str, why: str) -> None:
    """`touch keys; fleet init` crashed with a FileExistsError traceback (exit 1): now 65 naming the path,
    and neither fleet.toml nor a key is written (as when fleet.toml is already there)."""
    target = tmp_path / "myfleet"
    if blocker in (".", ".."):  # the folder itself, or its parent, is a file
        target.write_text("a file where the folder should be")
        target = target / "inner" if blocker == ".." else target
    else:
        target.mkdir()
        if blocker == "keys/echo.key":
            (target / "keys" / "echo.key").mkdir(parents=True)
        else:
            (target / blocker).write_text("")
    result = fleet("init", str(target), env=cli_env(target, redis_url), cwd=tmp_path)
    assert result.returncode == ExitCode.USAGE, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    named = {".": target, "..": target.parent}.get(blocker, target / blocker)
    assert f"{named} exists and {why}" in result.stderr
    assert not (target / "fleet.toml").exists()
    assert not list(tmp_path.glob("**/.fleet.toml.*"))


def test_init_keeps_a_linked_key_and_never_changes_a_file_outside_its_folder(tmp_path: Path, redis_url: str) -> None:
    """keys/echo.key a symlink to a file elsewhere (a secrets store, or by mistake /etc/hostname): `fleet init`
    said "kept the existing key (mode 600)" and chmodded the link's target to 0600, a file outside the folder it
    was asked to set up (tried here: /etc/hostname became unreadable to every other user). It keeps the link, leaves
    the target's mode alone and says so; the fleet's own check of the key's mode still applies at load."""
    target, outside = tmp_path / "myfleet", tmp_path / "elsewhere" / "shared.txt"
    outside.parent.mkdir()
    outside.write_text("not mine to chmod")
    outside.chmod(0o644)
    (target / "keys").mkdir(parents=True)
    (target / "keys" / "echo.key").symlink_to(outside)
    result = fleet("init", str(target), env=cli_env(target, redis_url), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert mode(outside) == 0o644 and outside.read_text() == "not mine to chmod"
    assert "kept the existing key" in result.stdout and "link" in result.stdout, result.stdout
    assert "(mode 600)" not in result.stdout, result.stdout


def test_each_init_makes_a_different_key(tmp_path: Path, redis_url: str) -> None:
    env = cli_env(tmp_path, redis_url)
    for name in ("one", "two"):
        assert fleet("init", str(tmp_path / name), env=env, cwd=tmp_path).returncode == 0
    assert (tmp_path / "one/keys/echo.key").read_text() != (tmp_path / "two/keys/echo.key").read_text()


def test_doctor_exits_75_when_redis_is_down(tmp_path: Path, redis_url: str, closed_port: int) -> None:
    env = cli_env(tmp_path, f"redis://127.0.0.1:{closed_port}/0")
    assert fleet("init", env=env, cwd=tmp_path).returncode == 0
    assert fleet("db", "upgrade", env=env, cwd=tmp_path).returncode == 0  # else no tables (78) outranks 75
    result = fleet("doctor", env=env, cwd=tmp_path)
    assert result.returncode == ExitCode.TRANSIENT, result.stdout + result.stderr
    assert f"FAIL  redis     redis://127.0.0.1:{closed_port}/0 does not answer" in result.stdout
    assert f"redis-server --port {closed_port}" in result.stdout


def test_doctor_exits_75_when_postgresql_is_down(tmp_path: Path, redis_url: str, closed_port: int) -> None:
    env = cli_env(tmp_path, redis_url,
                  FLEET_DATABASE_URL=f"postgresql://fleet:hunter2-secret@127.0.0.1:{closed_port}/fleet")
    assert fleet("init", env=env, cwd=tmp_path).returncode == 0
    result = fleet("doctor", env=env, cwd=tmp_path)
    assert result.returncode == ExitCode.TRANSIENT, result.stdout + result.stderr
    assert "FAIL  database" in result.stdout and "start PostgreSQL" in result.stdout
    assert "hunter2" not in result.stdout + result.stderr


def test_doctor_against_migrated_postgresql(tmp_path: Path, redis_url: str, pg_server: str) -> None:
    from tests.conftest import drop_pg_database, new_pg_database

    url = new_pg_database(pg_server)
    try:
        env = cli_env(tmp_path, redis_url, FLEET_DATABASE_URL=url)
        assert fleet("init", env=env, cwd=tmp_path).returncode == 0
        assert fleet("db", "upgrade", env=env, cwd=tmp_path).returncode == 0
        result = fleet("doctor", env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "ok    schema" in result.stdout
    finally:
        drop_pg_database(url)


def test_the_tours_hand_dispatch_of_echo_is_not_refused_while_its_scheduled_run_holds_a_slot(
        tmp_path: Path, redis_url: str, database_url: str) -> None:
    """The README's tour dispatches echo by hand while beat runs it every 30 s: with one slot, a tick running
    at that moment refused the newcomer's `fleet dispatch echo --key hello --wait` as busy (seen in CI)."""
    from fleet import db
    from fleet.config import Settings
    from fleet.dispatch import DispatchRequest, dispatch
    from fleet.services import build

    config = tmp_path / "fleet.toml"
    config.write_text(STARTER_TOML)
    (tmp_path / "keys").mkdir(mode=0o700)
    (tmp_path / "keys" / "echo.key").write_text("x" * 32)
    (tmp_path / "keys" / "echo.key").chmod(0o600)
    services = build(Settings(config=config, redis_url=redis_url, database_url=database_url,
                              log_dir=tmp_path / "logs"), load_fleet_config(config))
    try:
        services.redis.flushdb()
        db.upgrade(services.engine)
        nowhere = lambda _run_id, _fence: None  # noqa: E731 - no worker: each run keeps its slot
        tick = dispatch(services, DispatchRequest("echo", "tick:2026-12-01T00:00:00", actor="beat"), nowhere)
        by_hand = dispatch(services, DispatchRequest("echo", "hello", actor="cli"), nowhere)
    finally:
        services.close()
    assert (tick.status, by_hand.status) == ("queued", "queued"), by_hand.reason
