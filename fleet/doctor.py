"""`fleet doctor`: check the configuration, Redis, the database and the log folder, one line each.

Every check runs, so one pass shows everything that is wrong. The exit code is that of the worst
failure: 78 configuration, then 77 permission, then 75 a service is down; warnings never fail.
Secrets never reach the output: URLs are shown with their passwords masked.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from urllib.parse import urlsplit

import redis
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from rich.console import Console
from sqlalchemy import Engine

from fleet import db, identity, redaction
from fleet.config import AgentSpec, FleetConfig, Settings, load_fleet_config
from fleet.errors import ConfigError, ExitCode, PermissionDeniedError, UnavailableError
from fleet.process import resolve_argv
from fleet.services import redis_client

# Worst first: configuration and permissions need a person; a service that is down may come back.
_SEVERITY = (ExitCode.CONFIG, ExitCode.AUTH, ExitCode.TRANSIENT)
_MASK = "***"


class Status(str, Enum):
    """How one check came out."""

    OK = "ok"
    WARN = "warn"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Finding:
    """One line of the report; a failure carries the exit code it calls for."""

    status: Status
    check: str
    detail: str
    code: ExitCode = ExitCode.OK


def _ok(check: str, detail: str) -> Finding:
    return Finding(Status.OK, check, detail)


def _warn(check: str, detail: str) -> Finding:
    return Finding(Status.WARN, check, detail)


def _fail(check: str, detail: str, code: ExitCode) -> Finding:
    return Finding(Status.FAIL, check, detail, code)


def run_doctor(settings: Settings, console: Console) -> int:
    """Run every check, print one line each and a summary; return the exit code."""
    secrets = _secrets(settings)
    findings: list[Finding] = []
    for check in (_check_config, _check_redis, _check_database, _check_log_dir):
        for finding in check(settings):
            findings.append(finding)
            line = f"{finding.status.value:<4}  {finding.check:<8}  {finding.detail}"
            console.print(_scrub(line, secrets), markup=False, highlight=False)
    failed = {f.code for f in findings if f.status is Status.FAIL}
    code = next((c for c in _SEVERITY if c in failed), ExitCode.FAILURE if failed else ExitCode.OK)
    warnings = sum(f.status is Status.WARN for f in findings)
    if failed:
        summary = f"doctor: {sum(f.status is Status.FAIL for f in findings)} check(s) failed (exit {int(code)})"
    elif warnings:
        summary = f"doctor: ready, with {warnings} warning(s)"
    else:
        summary = "doctor: all checks passed"
    console.print(summary, markup=False, highlight=False)
    return int(code)


def security_warnings(config: FleetConfig, redis_url: str) -> list[str]:
    """What `fleet up` warns about before it runs anything: agents that would run as root, and a Redis
    answering without a password on an address others can reach (the same words as these checks)."""
    euid = os.geteuid() if hasattr(os, "geteuid") else None
    return [finding.detail for finding in (*_check_run_as(config, euid), *_open_redis(redis_url))]


# ---------------------------------------------------------------- checks


def _check_config(settings: Settings) -> Iterator[Finding]:
    try:
        config = load_fleet_config(settings.config)
    except ConfigError as exc:
        yield _fail("config", str(exc), ExitCode.CONFIG)
        return
    names = ", ".join(sorted(config.agents))
    if names:
        yield _ok("config", f"{settings.config}: {len(config.agents)} agent(s): {names}")
    else:
        yield _warn("config", f"{settings.config} is valid but defines no agents: add an [agents.NAME] table")
    yield from _check_run_as(config, os.geteuid() if hasattr(os, "geteuid") else None)
    yield from _check_shared_users(config)
    yield from _check_agent_users(config, settings.agent_homes)
    yield from _check_programs(config)


def _check_programs(config: FleetConfig) -> Iterator[Finding]:
    """Each agent's program (and poll), found here as the worker finds it: a typo would fail every run, dead-
    lettered `spawn`. A warning, since on a fleet of several hosts the one doctor runs on may lack a tool
    the workers have. A relative path of a run_as agent is its folder's, which the check above covers."""
    path = {"PATH": os.environ.get("PATH", os.defpath)}
    for name, agent in sorted(config.agents.items()):
        for argv in (agent.command, *([agent.poll] if agent.poll else [])):
            program = argv[0] if argv else ""
            if agent.user_name(config.fleet) is not None and "/" in program and not program.startswith("/"):
                continue
            try:
                resolve_argv(list(argv), path)
            except OSError as exc:
                yield _warn("programs", f"agent {name!r}: {program!r} {exc.strerror or 'cannot be run'} on this "
                            "host: every run of it would be dead-lettered `spawn`; fix its command (an absolute "
                            "path, or a program on the worker's PATH)")


def _check_run_as(config: FleetConfig, euid: int | None) -> Iterator[Finding]:
    """Agents that would run as root: each could read every key file and the fleet's own secrets."""
    if euid != 0:
        return
    as_root = sorted(name for name, agent in config.agents.items() if _runs_as_root(agent, config))
    if as_root:
        yield _warn("run_as", f"AGENTS RUN AS ROOT: this user is root and {', '.join(as_root)} would run as root "
                    "(no run_as, or run_as = \"root\"), able to read every agent's key file and the fleet's own "
                    'secrets; set run_as = "USER" in [fleet] (or per agent) to run them as an unprivileged user '
                    "(require_run_as = true in [fleet] refuses a file that forgets one)")


def _check_shared_users(config: FleetConfig) -> Iterator[Finding]:
    """Agents under one run_as user, one of them with a key: the others can read it (the same uid reads
    /proc/PID/environ and the folder of each), so a user of its own is what keeps a key to its agent."""
    by_user: dict[str, list[str]] = {}
    for name, agent in sorted(config.agents.items()):
        user = agent.user_name(config.fleet)
        if user is not None:
            by_user.setdefault(user, []).append(name)
    for user, names in sorted(by_user.items()):
        keyed = [name for name in names if config.agents[name].key_file or config.agents[name].secret_env]
        if len(names) > 1 and keyed:
            yield _warn("run_as", f"agents {', '.join(names)} all run as {user!r}: each can read the others' "
                        f"environment and folder, so the key of {', '.join(keyed)} is theirs too; give an agent "
                        "with a key a run_as user of its own")


def _runs_as_root(agent: AgentSpec, config: FleetConfig) -> bool:
    name = agent.user_name(config.fleet)
    if name is None:
        return True
    try:
        return identity.lookup(name).uid == 0
    except ConfigError:
        return False  # the configuration check reports it


def _check_agent_users(config: FleetConfig, homes: Path) -> Iterator[Finding]:
    """Can this process start each run_as agent as its user, in a folder that user owns, running a
    program that user may execute? Run doctor as the worker runs: same user, same capabilities."""
    users = {name: agent.user_name(config.fleet) for name, agent in config.agents.items()}
    checked = 0
    for name, user_name in sorted(users.items()):
        if user_name is None:
            continue
        try:
            user = identity.lookup(user_name)
        except ConfigError:
            continue  # the configuration check already failed on it
        problem = identity.switch_problem(name, user) or identity.home_problem(homes, name, user)
        if problem is not None:
            yield _fail("run_as", problem, ExitCode.CONFIG)
            continue
        checked += 1
        yield from _check_program(config.agents[name], user)
    if checked:
        yield _ok("run_as", f"{checked} agent(s) can start as their own user, in {homes.absolute()}/AGENT")


def _check_program(agent: AgentSpec, user: identity.AgentUser) -> Iterator[Finding]:
    """A program its user cannot execute (the worker's own venv under /root, say) fails every run."""
    for argv in (agent.command, *([agent.poll] if agent.poll else [])):
        try:
            program = Path(resolve_argv(list(argv), {"PATH": os.environ.get("PATH", os.defpath)})[0])
        except OSError:
            continue  # not found here: the run says so
        if not identity.can_execute(program, user):
            yield _warn("run_as", f"agent {agent.name!r} runs as {user.name!r}, who cannot execute {program} "
                        "(by its mode bits and its folders'): give a program that user can run, e.g. "
                        "/usr/bin/python3 instead of a bare python, which means the worker's own interpreter")


def _check_redis(settings: Settings) -> Iterator[Finding]:
    url = settings.broker_url
    shown = mask_url(url)
    try:
        client = redis_client(url)
    except ValueError:
        yield _fail("redis", "FLEET_REDIS_URL is not a Redis URL (use redis://, rediss:// or unix://)",
                    ExitCode.CONFIG)
        return
    try:
        client.ping()
        yield _ok("redis", f"{shown} answers")
        yield from _open_redis(url)
        yield _eviction_policy(client)
    except (redis.AuthenticationError, redis.exceptions.NoPermissionError) as exc:
        yield _fail("redis", f"{shown} refused us ({_first_line(exc)}): check the user and password in "
                    "FLEET_REDIS_URL", ExitCode.AUTH)
    except redis.RedisError as exc:
        yield _fail("redis", f"{shown} does not answer ({_first_line(exc)}); {_how_to_start_redis(settings)}",
                    ExitCode.TRANSIENT)
    finally:
        client.close()


def _how_to_start_redis(settings: Settings) -> str:
    port = _port(settings.broker_url) or 6379
    embedded = ("or run `fleet up`, which starts an embedded Redis-compatible server when none answers"
                if settings.redis_url is None else
                "or unset FLEET_REDIS_URL and run `fleet up`, which then starts an embedded one")
    return f"start Redis there: `redis-server --port {port}`, {embedded}"


def _open_redis(url: str) -> Iterator[Finding]:
    """It answered without credentials: on an address others can reach, anyone there can lift the kill
    switch, raise caps, read payloads in the queues or flush everything."""
    parts = urlsplit(url)
    if parts.password or parts.username or parts.scheme == "unix" or not parts.hostname:
        return
    exposed = [address for address in _addresses(parts.hostname, parts.port or 6379) if not address.is_loopback]
    if exposed:
        yield _warn("redis", f"{mask_url(url)} answers WITHOUT A PASSWORD on a non-loopback address "
                    f"({', '.join(sorted(map(str, exposed)))}): anyone who can reach it can lift the kill switch, "
                    "change caps or flush the queues; require a password (an ACL user, as compose/ sets up) and "
                    "put the URL with it in FLEET_REDIS_URL_FILE")


def _addresses(host: str, port: int) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The addresses `host` stands for (nothing when it does not resolve: the ping would have failed)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return set()
    return {ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos}


def _eviction_policy(client: redis.Redis) -> Finding:
    """Eviction would silently drop queued tasks, leases and kill flags (PITFALLS.md #14)."""
    fix = "set `maxmemory-policy noeviction` in redis.conf (or: redis-cli CONFIG SET maxmemory-policy noeviction)"
    try:
        policy = client.config_get("maxmemory-policy").get("maxmemory-policy")
    except redis.ResponseError as exc:  # CONFIG renamed away, or forbidden to this ACL user (compose's)
        return _warn("redis", f"cannot read maxmemory-policy ({_first_line(exc)}); make sure it is noeviction "
                     "(compose/ starts Redis with it)")
    if policy == "noeviction":
        return _ok("redis", "maxmemory-policy is noeviction")
    return _warn("redis", f"maxmemory-policy is {policy or 'not reported'}: under memory pressure Redis may "
                 f"evict queued tasks, leases and kill flags; {fix}")


def _check_database(settings: Settings) -> Iterator[Finding]:
    try:
        engine = db.make_engine(settings.database_url)
    except ConfigError as exc:
        yield _fail("database", str(exc), ExitCode.CONFIG)
        return
    shown = engine.url.render_as_string(hide_password=True)
    try:
        if engine.dialect.name == "sqlite":
            findings = list(_check_sqlite_file(engine, shown))
        else:
            findings = list(_check_server(engine, shown))
        yield from findings
        if all(f.status is Status.OK for f in findings):
            yield _check_schema(engine)
    finally:
        engine.dispose()


def _check_sqlite_file(engine: Engine, shown: str) -> Iterator[Finding]:
    database = engine.url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        yield _warn("database", f"{shown} is not a plain file: nothing is kept between processes")
        return
    path = Path(database)
    folder = _nearest_existing(path.parent)
    if not folder.is_dir():
        yield _fail("database", f"{shown}: {folder} is not a folder", ExitCode.CONFIG)
        return
    problem = _cannot_write(folder)
    if problem:
        yield _fail("database", f"{shown}: cannot create files in {folder} ({problem}); SQLite needs to write "
                    "the database and its -wal and -shm files there", ExitCode.AUTH)
    elif not path.exists():
        # Every other command would fail (78) until the tables exist: not "ready".
        yield _fail("database", f"{shown} does not exist yet (no fleet has run here): `fleet up` makes it "
                    "and starts the fleet; `fleet db upgrade` only makes it",
                    ExitCode.CONFIG)
    elif not path.is_file():
        yield _fail("database", f"{shown}: {path} is not a file", ExitCode.CONFIG)
    else:
        yield from _check_server(engine, shown)


def _check_server(engine: Engine, shown: str) -> Iterator[Finding]:
    try:
        db.check(engine)
    except UnavailableError as exc:
        hint = ("" if engine.dialect.name == "sqlite" else
                "; start PostgreSQL (e.g. `sudo systemctl start postgresql`, or `docker compose up -d postgres` "
                "in compose/) and check the host, port, user and database in FLEET_DATABASE_URL")
        yield _fail("database", f"{exc}{hint}", ExitCode.TRANSIENT)
        return
    except ConfigError as exc:  # the server answered: the database it names was never created
        yield _fail("database", str(exc), ExitCode.CONFIG)
        return
    except PermissionDeniedError as exc:  # the server answered: it does not let this user in
        yield _fail("database", str(exc), ExitCode.AUTH)
        return
    yield _ok("database", f"{shown} answers")


def _check_schema(engine: Engine) -> Finding:
    scripts = ScriptDirectory.from_config(db.alembic_config(engine))
    head = scripts.get_current_head()
    try:
        current = db.current_revision(engine)
    except Exception as exc:  # noqa: BLE001 - any driver error here means the same: cannot read it
        return _fail("schema", f"cannot read the schema revision ({_first_line(exc)})", ExitCode.TRANSIENT)
    if current == head:
        return _ok("schema", f"at the latest revision ({head})")
    # A missing or older schema fails every other command (78) until `fleet db upgrade`: a failure here too.
    if current is None:
        return _fail("schema", "the database has no schema yet: run `fleet db upgrade`", ExitCode.CONFIG)
    try:
        scripts.get_revision(current)
    except CommandError:
        return _warn("schema", f"at revision {current}, which this Fleet does not know (a newer Fleet migrated "
                     "it?): upgrade Fleet on this host")
    return _fail("schema", f"at revision {current}, this Fleet expects {head}: run `fleet db upgrade`",
                 ExitCode.CONFIG)


def _check_log_dir(settings: Settings) -> Iterator[Finding]:
    log_dir = settings.log_dir
    folder = _nearest_existing(log_dir)
    if not folder.is_dir():
        yield _fail("logs", f"FLEET_LOG_DIR {log_dir}: {folder} is not a folder", ExitCode.CONFIG)
        return
    problem = _cannot_write(folder)
    if problem:
        yield _fail("logs", f"cannot create files in {folder} ({problem}): fix its permissions or set "
                    "FLEET_LOG_DIR", ExitCode.AUTH)
    elif folder == log_dir.absolute():
        yield _ok("logs", f"{log_dir} is writable")
    else:
        yield _ok("logs", f"{log_dir} does not exist yet; it will be created in {folder}")


# ---------------------------------------------------------------- helpers


def _nearest_existing(path: Path) -> Path:
    """`path` (made absolute) when it exists, else its closest existing ancestor."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _cannot_write(folder: Path) -> str | None:
    """Why a file cannot be created in `folder` (tried for real: root and ACLs defeat os.access)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _port(url: str) -> int | None:
    try:
        return urlsplit(url).port
    except ValueError:
        return None


def mask_url(url: str) -> str:
    """The URL with any password replaced by *** (a lone user part too: `redis://SECRET@host` is common)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(an unparsable URL)"
    masked = url
    if "@" in parts.netloc:
        userinfo, _, host = parts.netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        masked = masked.replace(f"//{parts.netloc}", f"//{user}:{_MASK}@{host}" if colon else f"//{_MASK}@{host}", 1)
    return re.sub(r"(?i)([?&]password=)[^&#]*", rf"\g<1>{_MASK}", masked)


def _secrets(settings: Settings) -> tuple[str, ...]:
    """Every secret the settings hold: scrubbed from each line in case an error message echoes one."""
    return redaction.ordered(redaction.settings_secrets(settings))


def _scrub(line: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        line = line.replace(secret, _MASK)
    return line
