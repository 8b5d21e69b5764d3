"""`fleet doctor` in-process against real servers: what it passes, warns about, fails on, and never prints."""

from __future__ import annotations

import io
import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from rich.console import Console
from sqlalchemy import text

from fleet import db
from fleet.config import Settings, load_fleet_config
from fleet.doctor import _check_run_as, _check_shared_users, mask_url, run_doctor
from fleet.errors import ExitCode

REDIS_SERVER = "/usr/bin/redis-server"
GOOD_TOML = '[agents.echo]\ncommand = ["python", "-m", "fleet.examples.echo_agent"]\nkey_file = "keys/echo.key"\n'


@pytest.fixture
def good(tmp_path: Path, redis_url: str) -> Settings:
    """A valid fleet.toml with a private key, the real Redis, a migrated SQLite file, a log folder."""
    (tmp_path / "keys").mkdir(mode=0o700)
    (tmp_path / "keys" / "echo.key").write_text("sk-doctor-test-key-material")
    (tmp_path / "keys" / "echo.key").chmod(0o600)
    (tmp_path / "fleet.toml").write_text(GOOD_TOML)
    (tmp_path / "logs").mkdir()
    url = f"sqlite:///{tmp_path / 'data' / 'fleet.db'}"
    engine = db.make_engine(url)
    db.upgrade(engine)
    engine.dispose()
    return Settings(config=tmp_path / "fleet.toml", redis_url=redis_url, database_url=url,
                    log_dir=tmp_path / "logs")


def doctor(settings: Settings, **changes: object) -> tuple[int, list[str]]:
    """Run the doctor; its exit code and printed lines."""
    buffer = io.StringIO()
    code = run_doctor(settings.model_copy(update=changes), Console(file=buffer, width=300))
    return code, buffer.getvalue().splitlines()


def line(lines: list[str], status: str, check: str, *fragments: str) -> str:
    """The one line of `check` with `status` containing every fragment (fails when there is none)."""
    found = [entry for entry in lines if entry.startswith(f"{status:<4}  {check:<8}")
             and all(f in entry for f in fragments)]
    assert found, f"no {status} {check} line with {fragments} in:\n" + "\n".join(lines)
    return found[0]


def test_good_setup_passes(good: Settings) -> None:
    code, lines = doctor(good)
    assert code == ExitCode.OK
    line(lines, "ok", "config", str(good.config), "1 agent(s): echo")
    line(lines, "ok", "redis", good.broker_url, "answers")
    line(lines, "ok", "database", "fleet.db", "answers")
    line(lines, "ok", "schema", "latest revision")
    line(lines, "ok", "logs", str(good.log_dir), "writable")
    assert not [entry for entry in lines if entry.startswith("FAIL")]
    assert lines[-1].startswith("doctor: ")


def test_good_setup_on_each_database(good: Settings, database_url: str) -> None:
    engine = db.make_engine(database_url)
    db.upgrade(engine)
    engine.dispose()
    code, lines = doctor(good, database_url=database_url)
    assert code == ExitCode.OK
    line(lines, "ok", "schema", "latest revision")


def test_bad_config_exits_78_and_still_checks_the_rest(good: Settings) -> None:
    good.config.write_text('[agents.echo]\ncommand = ["python"]\nconcurrency = -3\n')
    code, lines = doctor(good)
    assert code == ExitCode.CONFIG
    line(lines, "FAIL", "config", "invalid configuration")
    assert f"  {good.config}:3: agent 'echo', concurrency: Input should be greater than or equal to 1" in lines
    line(lines, "ok", "redis")
    line(lines, "ok", "schema")
    assert lines[-1] == "doctor: 1 check(s) failed (exit 78)"


def test_missing_config_exits_78(good: Settings, tmp_path: Path) -> None:
    code, lines = doctor(good, config=tmp_path / "nope.toml")
    assert code == ExitCode.CONFIG
    line(lines, "FAIL", "config", "no such file", "fleet init")


def test_redis_down_exits_75_and_says_how_to_start_one(good: Settings, closed_port: int) -> None:
    code, lines = doctor(good, redis_url=f"redis://127.0.0.1:{closed_port}/0")
    assert code == ExitCode.TRANSIENT
    found = line(lines, "FAIL", "redis", f"redis://127.0.0.1:{closed_port}/0 does not answer", "refused")
    assert f"`redis-server --port {closed_port}`" in found
    assert "fleet up" in found
    line(lines, "ok", "config")  # the other checks still ran
    line(lines, "ok", "schema")
    assert lines[-1] == "doctor: 1 check(s) failed (exit 75)"


def test_config_error_outranks_a_service_that_is_down(good: Settings, closed_port: int) -> None:
    good.config.write_text("[agents.echo]\n")
    code, _ = doctor(good, redis_url=f"redis://127.0.0.1:{closed_port}/0")
    assert code == ExitCode.CONFIG


def test_postgresql_down_exits_75_says_how_to_start_it_and_hides_the_password(good: Settings,
                                                                              closed_port: int) -> None:
    url = f"postgresql://fleet:hunter2-pg-secret@127.0.0.1:{closed_port}/fleet"
    code, lines = doctor(good, database_url=url)
    assert code == ExitCode.TRANSIENT
    found = line(lines, "FAIL", "database", f"127.0.0.1:{closed_port}", "start PostgreSQL")
    assert "fleet:***@" in found
    assert "hunter2" not in "\n".join(lines)
    assert not [entry for entry in lines if entry.startswith(("ok    schema", "warn  schema"))]


def test_redis_password_is_never_printed(good: Settings, closed_port: int) -> None:
    code, lines = doctor(good, redis_url=f"redis://fleet:hunter2-redis-secret@127.0.0.1:{closed_port}/0")
    assert code == ExitCode.TRANSIENT
    line(lines, "FAIL", "redis", f"redis://fleet:***@127.0.0.1:{closed_port}/0")
    assert "hunter2" not in "\n".join(lines)


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://u:p4ss@h:1/0", "redis://u:***@h:1/0"),
    ("redis://:p4ss@h:1/0", "redis://:***@h:1/0"),
    ("redis://t0ken@h/0", "redis://***@h/0"),
    ("rediss://h:6380/0?password=p4ss&ssl_cert_reqs=none", "rediss://h:6380/0?password=***&ssl_cert_reqs=none"),
    ("redis://h:6379/0", "redis://h:6379/0"),
    ("unix:///run/redis.sock?db=2", "unix:///run/redis.sock?db=2"),
])
def test_mask_url(url: str, shown: str) -> None:
    assert mask_url(url) == shown


def test_not_a_redis_url_is_a_config_error(good: Settings) -> None:
    code, lines = doctor(good, redis_url="http://127.0.0.1:6379/0")
    assert code == ExitCode.CONFIG
    line(lines, "FAIL", "redis", "not a Redis URL")


def test_unsupported_database_url_is_a_config_error(good: Settings) -> None:
    code, lines = doctor(good, database_url="mysql://root:hunter2-mysql@127.0.0.1/fleet")
    assert code == ExitCode.CONFIG
    line(lines, "FAIL", "database", "unsupported database")
    assert "hunter2" not in "\n".join(lines)


# ---------------------------------------------------------------- the schema


def test_schema_not_at_head_fails_78_to_run_db_upgrade(good: Settings, database_url: str) -> None:
    """Without the tables every other command fails (78): the doctor must not say "ready"."""
    engine = db.make_engine(database_url)
    db.check(engine)  # reachable (for SQLite: the file now exists) but never migrated
    engine.dispose()
    code, lines = doctor(good, database_url=database_url)
    assert code == ExitCode.CONFIG
    line(lines, "ok", "database", "answers")
    line(lines, "FAIL", "schema", "no schema yet", "fleet db upgrade")
    assert not [entry for entry in lines if "ready" in entry]


def test_older_schema_fails_78_to_run_db_upgrade(good: Settings) -> None:
    engine = db.make_engine(good.database_url)
    with engine.begin() as conn:  # an older revision of the same tree: base, before 0001
        conn.execute(text("DELETE FROM alembic_version"))
    engine.dispose()
    code, lines = doctor(good)
    assert code == ExitCode.CONFIG
    line(lines, "FAIL", "schema", "fleet db upgrade")


def test_schema_from_a_newer_fleet_warns(good: Settings) -> None:
    engine = db.make_engine(good.database_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999_future'"))
    engine.dispose()
    code, lines = doctor(good)
    assert code == ExitCode.OK
    line(lines, "warn", "schema", "9999_future", "does not know")


# ---------------------------------------------------------------- SQLite and log folders


def test_sqlite_file_not_created_yet_fails_78_without_creating_it(good: Settings, tmp_path: Path) -> None:
    path = tmp_path / "later" / "fleet.db"
    code, lines = doctor(good, database_url=f"sqlite:///{path}")
    assert code == ExitCode.CONFIG  # no tables yet: every other command would fail until `fleet db upgrade`
    line(lines, "FAIL", "database", "does not exist yet", "fleet db upgrade")
    assert not path.parent.exists()  # the doctor looks; it does not create


def test_sqlite_folder_that_is_a_file_fails(good: Settings, tmp_path: Path) -> None:
    (tmp_path / "plain-file").write_text("")
    code, lines = doctor(good, database_url=f"sqlite:///{tmp_path / 'plain-file' / 'fleet.db'}")
    assert code == ExitCode.CONFIG
    line(lines, "FAIL", "database", "plain-file is not a folder")


def test_log_dir_that_cannot_be_made_fails(good: Settings, tmp_path: Path) -> None:
    (tmp_path / "plain-file").write_text("")
    code, lines = doctor(good, log_dir=tmp_path / "plain-file" / "logs")
    assert code == ExitCode.CONFIG
    line(lines, "FAIL", "logs", "plain-file is not a folder")


def test_log_dir_not_created_yet_is_fine_when_its_parent_is_writable(good: Settings, tmp_path: Path) -> None:
    code, lines = doctor(good, log_dir=tmp_path / "new" / "logs")
    assert code == ExitCode.OK
    line(lines, "ok", "logs", "does not exist yet", f"created in {tmp_path}")
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through any permission bits")
def test_read_only_folders_fail_with_77(good: Settings, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, lines = doctor(good, log_dir=locked, database_url=f"sqlite:///{locked / 'fleet.db'}")
    finally:
        locked.chmod(0o700)
    assert code == ExitCode.AUTH
    line(lines, "FAIL", "logs", "cannot create files in")
    line(lines, "FAIL", "database", "cannot create files in")


# ---------------------------------------------------------------- a private redis-server


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[Callable[..., int]]:
    """Start Debian's redis-server on a free port with extra arguments; each is stopped after the test."""
    if not os.access(REDIS_SERVER, os.X_OK):
        pytest.skip(f"{REDIS_SERVER} is not installed")
    started: list[subprocess.Popen[str]] = []

    def start(*args: str) -> int:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        folder = tmp_path / f"redis-{port}"
        folder.mkdir()
        proc = subprocess.Popen([REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", str(folder), "--daemonize", "no", *args],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        started.append(proc)
        assert proc.stdout is not None
        seen = []
        for output in proc.stdout:  # no sleeping: the server says when it is ready, or exits
            seen.append(output)
            if "Ready to accept connections" in output:
                return port
        raise AssertionError("redis-server did not start:\n" + "".join(seen))

    yield start
    for proc in started:
        proc.terminate()
        proc.wait(timeout=30)
        assert proc.stdout is not None
        proc.stdout.close()


def test_eviction_policy_other_than_noeviction_warns(good: Settings, private_redis: Callable[..., int]) -> None:
    port = private_redis("--maxmemory-policy", "allkeys-lru")
    code, lines = doctor(good, redis_url=f"redis://127.0.0.1:{port}/0")
    assert code == ExitCode.OK  # a warning, not a failure
    line(lines, "ok", "redis", "answers")
    found = line(lines, "warn", "redis", "maxmemory-policy is allkeys-lru")
    assert "noeviction" in found


def test_noeviction_passes(good: Settings, private_redis: Callable[..., int]) -> None:
    port = private_redis("--maxmemory-policy", "noeviction")
    code, lines = doctor(good, redis_url=f"redis://127.0.0.1:{port}/0")
    assert code == ExitCode.OK
    line(lines, "ok", "redis", "maxmemory-policy is noeviction")
    # No warning (on loopback, no password is fine); as root, the one about run_as is expected.
    assert not [entry for entry in lines if entry.startswith("warn") and not entry.startswith("warn  run_as")]


def test_server_that_forbids_config_gets_a_warning(good: Settings, private_redis: Callable[..., int]) -> None:
    port = private_redis("--rename-command", "CONFIG", "")
    code, lines = doctor(good, redis_url=f"redis://127.0.0.1:{port}/0")
    assert code == ExitCode.OK
    line(lines, "warn", "redis", "cannot read maxmemory-policy", "noeviction")


def test_acl_user_without_config_gets_a_warning(good: Settings, private_redis: Callable[..., int]) -> None:
    port = private_redis("--user", "default", "off", "--user", "worker", "on", ">w0rker-secret", "~*", "&*",
                         "+@all", "-config")
    code, lines = doctor(good, redis_url=f"redis://worker:w0rker-secret@127.0.0.1:{port}/0")
    assert code == ExitCode.OK
    line(lines, "warn", "redis", "cannot read maxmemory-policy")
    assert "w0rker-secret" not in "\n".join(lines)


@pytest.mark.parametrize("credentials", ["", ":wrong-password@", "nobody:wrong-password@"],
                         ids=["none", "wrong-password", "unknown-user"])
def test_refused_credentials_exit_77(good: Settings, private_redis: Callable[..., int], credentials: str) -> None:
    port = private_redis("--requirepass", "right-password")
    code, lines = doctor(good, redis_url=f"redis://{credentials}127.0.0.1:{port}/0")
    assert code == ExitCode.AUTH
    line(lines, "FAIL", "redis", "refused", "FLEET_REDIS_URL")
    output = "\n".join(lines)
    assert "wrong-password" not in output and "right-password" not in output


def test_right_password_passes_and_is_not_printed(good: Settings, private_redis: Callable[..., int]) -> None:
    port = private_redis("--requirepass", "right-password")
    code, lines = doctor(good, redis_url=f"redis://:right-password@127.0.0.1:{port}/0")
    assert code == ExitCode.OK
    line(lines, "ok", "redis", f"redis://:***@127.0.0.1:{port}/0 answers")
    assert "right-password" not in "\n".join(lines)


# ---------------------------------------------------------------- exposure


def outward_address() -> str | None:
    """This machine's address on its default route (a UDP connect sends nothing), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.123", 9))
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if address.startswith("127.") else address


@pytest.mark.parametrize("password", [None, "right-password"], ids=["open", "password"])
def test_redis_without_a_password_beyond_loopback_warns(good: Settings, private_redis: Callable[..., int],
                                                        password: str | None) -> None:
    """Anyone who reaches an open Redis can lift the kill switch: say so (a warning, exit 0)."""
    address = outward_address()
    if address is None:
        pytest.skip("no non-loopback address on this machine")
    port = private_redis("--bind", "127.0.0.1", address, "--protected-mode", "no",
                         *(("--requirepass", password) if password else ()))
    credentials = f":{password}@" if password else ""
    for host in (address, "127.0.0.1"):
        code, lines = doctor(good, redis_url=f"redis://{credentials}{host}:{port}/0")
        assert code == ExitCode.OK
        line(lines, "ok", "redis", "answers")
        warned = [entry for entry in lines if "WITHOUT A PASSWORD" in entry]
        assert bool(warned) == (password is None and host == address), (host, lines)
        if warned:
            assert warned[0].startswith("warn  redis") and address in warned[0] and "FLEET_REDIS_URL_FILE" in warned[0]


def test_agents_running_as_root_are_a_loud_warning(good: Settings) -> None:
    """Root with no run_as: every agent could read every key file; a warning naming them, exit 0."""
    config = load_fleet_config(good.config)
    assert list(_check_run_as(config, 1000)) == []
    [finding] = _check_run_as(config, 0)
    assert finding.status.value == "warn" and "AGENTS RUN AS ROOT" in finding.detail and "echo" in finding.detail
    assert "run_as" in finding.detail
    if os.geteuid() == 0:  # through the whole doctor, as the tests usually run
        code, lines = doctor(good)
        assert code == ExitCode.OK
        line(lines, "warn", "run_as", "AGENTS RUN AS ROOT", "echo")


def test_agents_sharing_a_run_as_user_with_a_key_are_warned_of(good: Settings, tmp_path: Path) -> None:
    """Agents under one run_as user read each other's environment (/proc/PID/environ) and folder: one holding a
    key shares it with the others. The security review's agent B read agent A's ANTHROPIC_API_KEY that way,
    while compose's fleet.toml said an agent cannot read another agent's folder; doctor said nothing."""
    shared = tmp_path / "shared.toml"
    others = '\n[agents.other]\ncommand = ["true"]\n\n[agents.alone]\ncommand = ["true"]\nrun_as = "daemon"\n'
    shared.write_text(GOOD_TOML.replace("[agents.echo]", '[fleet]\nrun_as = "nobody"\n\n[agents.echo]') + others)
    findings = list(_check_shared_users(load_fleet_config(shared)))
    assert [(f.status.value, f.check) for f in findings] == [("warn", "run_as")], findings
    assert "echo" in findings[0].detail and "other" in findings[0].detail and "nobody" in findings[0].detail
    assert "alone" not in findings[0].detail
    assert list(_check_shared_users(load_fleet_config(good.config))) == []


def test_an_agent_whose_program_is_not_found_is_named_before_every_run_dead_letters_spawn(good: Settings) -> None:
    """A typo in a command (`pyhton`, a tool not installed on this host): doctor said "config ok", and every
    run then ended dead-lettered `spawn` (exit 127). It now warns, naming the agent and the program; the
    programs it finds, a bare python (the worker's own interpreter) included, are not named."""
    good.config.write_text(GOOD_TOML + '\n[agents.typo]\ncommand = ["pyhton-no-such-program", "-V"]\n'
                           '\n[agents.polls]\ncommand = ["true"]\npoll = ["/no/such/poller"]\n')
    code, lines = doctor(good)
    assert code == ExitCode.OK, lines  # a warning: on a fleet of several hosts, another host may have it
    line(lines, "warn", "programs", "agent 'typo'", "pyhton-no-such-program", "not found", "spawn")
    line(lines, "warn", "programs", "agent 'polls'", "/no/such/poller")
    assert not [entry for entry in lines if "programs" in entry and "'echo'" in entry]
