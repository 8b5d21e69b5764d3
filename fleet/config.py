"""The one reader of configuration: FLEET_* settings from the environment and fleet.toml agents.

Both are read once at each entry point (CLI, worker, beat, web) and passed down from there.
A bad fleet.toml is refused whole, naming the file, line, agent, field and why; never a value.
"""

from __future__ import annotations

import math
import os
import re
import stat
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from fleet import identity
from fleet.errors import ConfigError
from fleet.schedule import Schedule, parse_schedule
from fleet.usage import TOKEN_FORMATS, UsageFormat

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
AGENT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
USER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@-]{0,62}\$?$")
# Variables the fleet sets itself; an agent's env may not override them.
RESERVED_ENV = frozenset({"FLEET_RUN_ID", "FLEET_AGENT", "FLEET_WORK_KEY", "FLEET_PAYLOAD", "FLEET_ATTEMPT",
                          "FLEET_PREV_RUN_ID", "FLEET_AGENT_KEY", "PATH", "HOME", "LANG"})


# Settings that may instead be read from a file named by FLEET_<NAME>_FILE (the convention of
# container secrets): the file's content, stripped, is the value. Giving both is an error.
FILE_SETTINGS = ("redis_url", "database_url", "sentry_dsn", "flower_auth", "web_token")


class Settings(BaseSettings):
    """Process settings from FLEET_* environment variables (DESIGN.md, "Settings")."""

    model_config = SettingsConfigDict(env_prefix="FLEET_", extra="ignore")

    config: Path = Path("fleet.toml")
    # The secrets are left out of repr(): a settings object in a traceback or a log must not show them.
    redis_url: str | None = Field(default=None, repr=False)  # None: the default URL, or the embedded server
    database_url: str = Field(default="sqlite:///./fleet.db", repr=False)
    log_dir: Path = Path("logs")
    # run_as agents' HOME and working directories, <agent_homes>/<agent>, created by the worker (fleet/identity.py)
    agent_homes: Path = Path("agent-homes")
    sentry_dsn: str | None = Field(default=None, repr=False)
    web_host: str = "127.0.0.1"
    web_port: int = Field(default=8700, ge=0, le=65535)
    # Host names the web answers to besides loopback and web_host (DNS rebinding: see fleet/web.py).
    web_allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    flower_port: int = Field(default=5555, ge=0, le=65535)
    flower_auth: str | None = Field(default=None, repr=False)
    web_token: str | None = Field(default=None, repr=False)
    # How long a database call may wait (SQLite's lock, PostgreSQL's connect and unacknowledged
    # writes) before it fails with 75: a stalled database must not hold a command or a sweep.
    db_timeout_s: float = Field(default=10.0, gt=0, le=300)
    # When the broker redelivers an unacknowledged message; unset, longer than the longest agent may
    # run (workers/app.py). A run's fenced claim makes a redelivery start nothing either way.
    visibility_timeout_s: float | None = Field(default=None, gt=0)
    redis_url_file: Path | None = None
    database_url_file: Path | None = None
    sentry_dsn_file: Path | None = None
    flower_auth_file: Path | None = None
    web_token_file: Path | None = None

    @property
    def broker_url(self) -> str:
        """The Redis URL every component uses."""
        return self.redis_url or DEFAULT_REDIS_URL

    @model_validator(mode="before")
    @classmethod
    def _read_secret_files(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for name in FILE_SETTINGS:
            path = data.get(f"{name}_file")
            if path in (None, ""):
                continue
            if data.get(name) not in (None, ""):  # an empty variable (compose's `${X:-}`) counts as unset
                raise ValueError(f"FLEET_{name.upper()} and FLEET_{name.upper()}_FILE are both set: give one")
            data[name] = read_secret_file(f"FLEET_{name.upper()}_FILE", Path(path))
        return data

    @field_validator("web_allowed_hosts", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [host.strip().lower() for host in value.split(",") if host.strip()]
        return value

    @field_validator("flower_auth")
    @classmethod
    def _auth_has_user_and_password(cls, value: str | None) -> str | None:
        if value is not None and (":" not in value or not all(value.split(":", 1))):
            raise ValueError("FLEET_FLOWER_AUTH must be user:password")
        return value


def read_secret_file(variable: str, path: Path) -> str:
    """The stripped content of a FLEET_*_FILE; ValueError (a configuration error) when unusable."""
    try:
        value = read_text(path).strip()
    except ValueError as exc:
        raise ValueError(f"{variable}: {exc}") from None
    if not value:
        raise ValueError(f"{variable}: {path} is empty")
    return value


def read_text(path: Path) -> str:
    """A UTF-8 text file's content; ValueError saying why it cannot be read (never what it holds)."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder, not a file") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    except OSError as exc:
        raise ValueError(f"cannot read {path} ({exc.strerror})") from None


def load_settings() -> Settings:
    """Read the settings once; an invalid variable is a configuration error (exit 78)."""
    try:
        return Settings()
    except ValidationError as exc:
        raise ConfigError(f"invalid settings: {describe_settings_error(exc)}") from None


MIN_WEB_TOKEN = 16  # the page's token stands alone before its kill, resume and replay buttons


def check_web_token(token: str) -> str:
    """The web page's token, stripped; ConfigError (78) when it is short enough to guess. Checked only by what
    serves the page (`fleet web`, `fleet up`): a short token must never stop a `fleet kill`."""
    token = token.strip()
    if len(token) < MIN_WEB_TOKEN:
        raise ConfigError(f"FLEET_WEB_TOKEN is {len(token)} characters long: it must be at least {MIN_WEB_TOKEN} "
                          "characters, since it alone guards the page's kill, resume and replay; make one with "
                          "`openssl rand -hex 32`")
    return token


# `fleet up`'s embedded server is reached only with its password. `fleet up` leaves its URL in this 0600
# file beside fleet.toml while it runs, so the fleet's commands in that folder reach it from a terminal
# that exported nothing, instead of whatever answers on 6379 (where a `fleet kill` would stop another fleet).
EMBEDDED_POINTER = ".fleet-redis-url"


def embedded_pointer(config: Path) -> Path:
    """Where a `fleet up` of the fleet whose file is `config` leaves its embedded server's URL."""
    return config.resolve().parent / EMBEDDED_POINTER


def with_embedded_pointer(settings: Settings) -> Settings:
    """`settings`, with the URL of the embedded server a running `fleet up` of this folder left, when no Redis
    is configured. A pointer that another user could have written or read is refused (78), never followed."""
    if settings.redis_url:  # an empty FLEET_REDIS_URL counts as unset, as for broker_url
        return settings
    pointer = embedded_pointer(settings.config)
    try:
        info = pointer.lstat()
    except OSError:
        return settings
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ConfigError(f"{pointer} (a `fleet up --embedded` pointer) is not a private file of this user: "
                          "delete it, or set FLEET_REDIS_URL")
    try:
        url = read_secret_file("FLEET_REDIS_URL_FILE", pointer)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return settings.model_copy(update={"redis_url": url, "redis_url_file": pointer})


def describe_settings_error(exc: ValidationError) -> str:
    """One line per problem, named by variable; never the value (it may be a secret)."""
    problems = []
    for error in exc.errors():
        message = error["msg"].removeprefix("Value error, ")
        where = "_".join(map(str, error["loc"])).upper()
        problems.append(f"FLEET_{where}: {message}" if where else message)
    return "; ".join(problems)


def _user_name(value: str | None) -> str | None:
    if value is not None and not USER_NAME.match(value):
        raise ValueError("must be a user name (letters, digits, '_', '.', '-'; the user must exist on every host)")
    return value


def _finite_non_negative(value: float | None) -> float | None:
    if value is not None and (not math.isfinite(value) or value < 0):
        raise ValueError("must be a finite number >= 0")
    return value


# The ledger counts money in integer micro-dollars, stored as signed 64-bit integers (at most ~9.2e18):
# a cap or an estimate of at most 1e9 USD is 1e15 micro-dollars, so some 9,000 of them can still be
# summed (a day's reservations, a cap plus what is reserved) without overflowing. Past it, every dispatch
# crashed with OverflowError while the file loaded.
MAX_USD = 1_000_000_000
# A price per million tokens: its micro-dollars per token, so a run's tokens times it must fit as well.
MAX_PRICE_PER_MTOK_USD = 1_000_000


def _money(limit: int) -> Callable[[float | None], float | None]:
    """A validator for a dollar amount: finite, >= 0 and at most `limit` (the message names the limit)."""
    def check(value: float | None) -> float | None:
        if value is not None and (not math.isfinite(value) or not 0 <= value <= limit):
            raise ValueError(f"must be a finite number >= 0 and at most {limit:,} USD (money is counted in "
                             "micro-dollars, in 64-bit integers)")
        return value
    return check


MAX_OUTCOME_RETRY_S = 3600  # outcome_retry_s at most: workers/app.py sizes the execute's hard time limit on it


class FleetSection(BaseModel):
    """The `[fleet]` table: fleet-wide limits and timings."""

    model_config = ConfigDict(extra="forbid")

    daily_cap_usd: float | None = None
    timezone: str = "UTC"
    lease_ttl_s: float = Field(default=30.0, gt=0, le=3600)
    heartbeat_s: float = Field(default=5.0, gt=0, le=600)
    kill_poll_s: float = Field(default=0.2, gt=0, le=5)
    kill_unreachable_grace_s: float = Field(default=30.0, gt=0, le=3600)
    stale_after_s: float = Field(default=3600.0, gt=0)
    idempotency_ttl_s: float = Field(default=7 * 86400.0, gt=0)
    retention_days: float = Field(default=30.0, gt=0)
    log_retention_runs: int = Field(default=1000, ge=1)
    breaker_threshold: int = Field(default=3, ge=1)
    breaker_cooldown_s: float = Field(default=300.0, gt=0)
    retry_backoff_s: float = Field(default=10.0, ge=0, le=3600)  # first retry waits about this long (plus jitter)
    kill_grace_s: float = Field(default=5.0, ge=0, le=300)  # SIGTERM, then this long, then SIGKILL
    # A queued run whose message no worker claimed within this is sent again (a resend is harmless:
    # the claim is fenced); one whose resent message is lost too is dead-lettered as `lost`.
    resend_after_s: float = Field(default=300.0, gt=0, le=86400)
    # How long a worker keeps trying to write an outcome while the database is away (keeping its lease); the
    # execute's hard time limit (workers/app.py) leaves room for the longest run and then this.
    outcome_retry_s: float = Field(default=3600.0, gt=0, le=MAX_OUTCOME_RETRY_S)
    run_as: str | None = None  # the user agents run as unless their own run_as says otherwise
    require_run_as: bool = False  # refuse the file when an agent would run as the worker's own user

    _user = field_validator("run_as")(_user_name)
    _usd = field_validator("daily_cap_usd")(_money(MAX_USD))
    _finite = field_validator("lease_ttl_s", "heartbeat_s", "kill_poll_s",
                              "kill_unreachable_grace_s", "stale_after_s", "idempotency_ttl_s",
                              "retention_days", "breaker_cooldown_s", "retry_backoff_s",
                              "kill_grace_s", "resend_after_s", "outcome_retry_s")(_finite_non_negative)

    @model_validator(mode="after")
    def _proofs_fit_in_a_lease(self) -> FleetSection:
        # A running agent lives only as long as its last proof of ownership is good for (the lease
        # minus the launcher's SIGTERM grace and a margin); two heartbeats must fit in that window.
        if self.ownership_window_s < 2 * self.heartbeat_s:
            raise ValueError(f"lease_ttl_s ({self.lease_ttl_s:g}) must exceed kill_grace_s + 2 x heartbeat_s + "
                             f"a margin of max(0.5 s, 10%): with these values an agent would be stopped between "
                             "two heartbeats")
        return self

    @property
    def ownership_window_s(self) -> float:
        """How long one proof of ownership lets a running agent live: the launcher's SIGTERM, its grace
        and its SIGKILL must all land before the lease itself could lapse (a margin for slow clocks)."""
        return self.lease_ttl_s - self.kill_grace_s - max(0.5, self.lease_ttl_s * 0.1)

    @property
    def queued_lease_ttl_s(self) -> float:
        """How long a queued run's slot lease lives between the reaper's renewals."""
        return 3 * self.resend_after_s

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown timezone {value!r}") from None
        return value


class PriceTable(BaseModel):
    """One `[prices.MODEL]` table: dollars per million tokens. Every kind is required: a missing
    price would count those tokens as $0."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_per_mtok: float
    output_per_mtok: float
    cache_write_per_mtok: float
    cache_read_per_mtok: float

    _usd = field_validator("input_per_mtok", "output_per_mtok", "cache_write_per_mtok",
                           "cache_read_per_mtok")(_money(MAX_PRICE_PER_MTOK_USD))


class AgentSpec(BaseModel):
    """One `[agents.NAME]` table, validated. Paths are resolved against the config file's folder."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    command: list[str] = Field(min_length=1)
    poll: list[str] | None = None
    schedule: str | None = None
    daily_cap_usd: float | None = None
    est_cost_usd: float = 0.0
    timeout_s: float = Field(default=1800.0, gt=0, le=86400)  # workers.app sizes the broker timeout on this
    concurrency: int = Field(default=1, ge=1, le=1000)
    # A bounded agent (a batch meant to fire N times and stop): dispatches past N runs in a budget day
    # are refused `bounded`. A retry is the same run; a refused dispatch or an unsent one does not count.
    max_runs_per_day: int | None = Field(default=None, ge=1, le=1_000_000)
    breaker_threshold: int | None = Field(default=None, ge=1)  # overrides [fleet] for this agent
    breaker_cooldown_s: float | None = Field(default=None, gt=0, le=86400)
    key_file: Path | None = None
    env: dict[str, str] = Field(default_factory=dict)
    secret_env: dict[str, Path] = Field(default_factory=dict)
    usage_format: UsageFormat = "fleet"  # how the agent reports what it spends (fleet/usage.py)
    models: list[str] = Field(default_factory=list)  # the models a token format may name, each priced
    run_as: str | None = None  # the user this agent runs as (else [fleet]'s run_as, else the worker's own)

    _usd = field_validator("daily_cap_usd", "est_cost_usd")(_money(MAX_USD))
    _finite = field_validator("timeout_s")(_finite_non_negative)
    _user = field_validator("run_as")(_user_name)

    @field_validator("models")
    @classmethod
    def _model_names(cls, value: list[str]) -> list[str]:
        if any(not name.strip() for name in value):
            raise ValueError("model names must be non-empty strings")
        return value

    @field_validator("command", "poll")
    @classmethod
    def _argv_strings(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or any(not arg or "\x00" in arg for arg in value)):
            raise ValueError("must be a non-empty list of non-empty strings (argv, no shell)")
        return value

    @field_validator("schedule")
    @classmethod
    def _valid_schedule(cls, value: str | None) -> str | None:
        if value is not None:
            parse_schedule(value)
        return value

    @field_validator("env", "secret_env")
    @classmethod
    def _env_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if not ENV_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid environment variable name")
            if name in RESERVED_ENV:
                raise ValueError(f"{name} is set by Fleet itself")
        return value

    def user_name(self, fleet: FleetSection) -> str | None:
        """The user this agent runs as: its own run_as, else the fleet's; None: the worker's own user."""
        return self.run_as or fleet.run_as

    def breaker_settings(self, fleet: FleetSection) -> tuple[int, float]:
        """(threshold, cool-down) of this agent's breaker: its own values, else the fleet's."""
        return (self.breaker_threshold or fleet.breaker_threshold,
                self.breaker_cooldown_s or fleet.breaker_cooldown_s)

    @property
    def parsed_schedule(self) -> Schedule | None:
        """The schedule as an object beat can evaluate."""
        return parse_schedule(self.schedule) if self.schedule else None


@dataclass(frozen=True)
class FleetConfig:
    """A whole validated fleet.toml."""

    path: Path
    fleet: FleetSection
    agents: dict[str, AgentSpec]
    prices: dict[str, PriceTable] = field(default_factory=dict)

    def prices_of(self, agent: AgentSpec) -> dict[str, PriceTable]:
        """The price tables of the models this agent declares: the only models its usage may name."""
        return {model: self.prices[model] for model in agent.models if model in self.prices}

    def agent(self, name: str) -> AgentSpec:
        """The named agent; NotFoundError when there is none."""
        from fleet.errors import NotFoundError

        try:
            return self.agents[name]
        except KeyError:
            raise NotFoundError(f"unknown agent {name!r} (known: {', '.join(sorted(self.agents)) or 'none'})") \
                from None


def mtime_of(path: Path) -> float | None:
    """A fleet.toml's mtime (None when it cannot be read): how a running process tells it changed."""
    try:
        return path.stat().st_mtime
    except OSError:
        return None


CONFIG_SETTLE_S = 1.0  # how long a changed fleet.toml must stay unchanged before a running process takes it


def still_settling(mtime: float, now: float | None = None) -> bool:
    """Whether a fleet.toml changed at `mtime` may still be in the middle of its save: an editor that writes in
    place (nano, vim's backupcopy, `cat >`) leaves it empty or cut short for a moment, and such a file can be valid
    (no agents, no cap). A time ahead of the clock (a clock stepped back) is not waited for."""
    age = (time.time() if now is None else now) - mtime
    return 0 <= age < CONFIG_SETTLE_S


CONFIG_SETTLE_MAX_S = 10.0  # a file that never stays unchanged for CONFIG_SETTLE_S is taken anyway after this


class Settling:
    """Whether a running process should wait before taking a changed fleet.toml: while it changed under
    CONFIG_SETTLE_S ago, but not for more than CONFIG_SETTLE_MAX_S in all, so a file rewritten in a loop (a
    sync, config management) is still taken: deferrals of a removed agent's runs, and dispatches told to
    try again, end."""

    def __init__(self) -> None:
        self.since: float | None = None  # monotonic: when the first look found it still settling

    def wait(self, mtime: float) -> bool:
        """True: look again later; False: take the file now."""
        if not still_settling(mtime):
            self.since = None
            return False
        now = time.monotonic()
        if self.since is None:
            self.since = now
        if now - self.since >= CONFIG_SETTLE_MAX_S:
            self.since = None
            return False
        return True


def load_fleet_config(path: Path) -> FleetConfig:
    """Load and validate fleet.toml, refusing it whole on the first set of problems found."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (create one with `fleet init`)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc.__class__.__name__}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib says "(at line N, column M)", or "(at end of document)": then the last line is the one.
        found = re.search(r"at line (\d+)", str(exc))
        line = int(found.group(1)) if found else max(1, len(text.splitlines()))
        raise ConfigError(f"{path}:{line}: invalid TOML: {exc}") from None
    return _validate(path, text, raw)


def _validate(path: Path, text: str, raw: dict[str, Any]) -> FleetConfig:
    problems: list[str] = []
    unknown = set(raw) - {"fleet", "agents", "prices"}
    problems += [f"{path}:{_line_of(text, key)}: unknown top-level table [{key}]" for key in sorted(unknown)]
    try:
        fleet = FleetSection.model_validate(raw.get("fleet", {}))
    except ValidationError as exc:
        problems += _describe(path, text, "fleet", None, exc)
        fleet = FleetSection()
    agents_raw = raw.get("agents", {})
    if not isinstance(agents_raw, dict):
        problems.append(f"{path}: [agents] must be a table of agent tables")
        agents_raw = {}
    agents: dict[str, AgentSpec] = {}
    for name, body in agents_raw.items():
        agent, agent_problems = _validate_agent(path, text, name, body)
        problems += agent_problems
        if agent is not None:
            agents[name] = agent
    prices_raw = raw.get("prices", {})
    prices, price_problems = _validate_prices(path, text, prices_raw)
    problems += price_problems
    problems += [problem for agent in agents.values() if (problem := _estimate_problem(path, text, fleet, agent))]
    tables = set(prices_raw) if isinstance(prices_raw, dict) else set()  # an invalid one is reported above
    problems += [problem for agent in agents.values() for problem in _usage_problems(path, text, agent, tables)]
    problems += _run_as_problems(path, text, fleet, agents)
    if problems:
        raise ConfigError("invalid configuration, nothing loaded:\n  " + "\n  ".join(problems))
    return FleetConfig(path=path, fleet=fleet, agents=agents, prices=prices)


def _run_as_problems(path: Path, text: str, fleet: FleetSection, agents: dict[str, AgentSpec]) -> list[str]:
    # Like a key file, a user must exist on every host that loads the file (compose: one image).
    problems = []
    if fleet.run_as is not None and (unknown := _unknown_user(fleet.run_as)):
        problems.append(f"{path}:{_line_of(text, 'run_as', section='fleet')}: [fleet] run_as: {unknown}")
    for agent in agents.values():
        section, who = f"agents.{agent.name}", f"agent {agent.name!r}, run_as"
        if agent.run_as is not None and (unknown := _unknown_user(agent.run_as)):
            problems.append(f"{path}:{_line_of(text, 'run_as', section=section)}: {who}: {unknown}")
        elif agent.user_name(fleet) is None and fleet.require_run_as:
            problems.append(f"{path}:{_line_of(text, section)}: {who}: required ([fleet] require_run_as = true, "
                            "and [fleet] sets no run_as): name the user it runs as")
    return problems


def _unknown_user(name: str) -> str | None:
    try:
        identity.lookup(name)
    except ConfigError as exc:
        return str(exc)
    return None


def _validate_prices(path: Path, text: str, raw: Any) -> tuple[dict[str, PriceTable], list[str]]:
    if not isinstance(raw, dict):
        return {}, [f"{path}:{_line_of(text, 'prices')}: [prices] must be a table of [prices.MODEL] tables"]
    prices: dict[str, PriceTable] = {}
    problems: list[str] = []
    for model, body in raw.items():
        section = f"prices.{model}"
        if not isinstance(body, dict):
            problems.append(f"{path}:{_line_of(text, section)}: [prices.\"{model}\"] must be a table")
            continue
        try:
            prices[model] = PriceTable.model_validate(body)
        except ValidationError as exc:
            problems += _describe(path, text, section, None, exc)
    return prices, problems


def _usage_problems(path: Path, text: str, agent: AgentSpec, prices: set[str]) -> list[str]:
    # Token counts are worth nothing without a price: an agent whose usage cannot be priced is
    # refused here rather than counted as $0 while it runs.
    section, who = f"agents.{agent.name}", f"agent {agent.name!r}"
    if agent.usage_format not in TOKEN_FORMATS:
        if not agent.models:
            return []
        return [f"{path}:{_line_of(text, 'models', section=section)}: {who}, models: only read with "
                f"usage_format = \"claude-stream-json\" or \"json-tokens\" (this agent's is \"{agent.usage_format}\")"]
    if not agent.models:
        return [f"{path}:{_line_of(text, 'usage_format', section=section)}: {who}, models: required with "
                f"usage_format = \"{agent.usage_format}\": list the models the agent uses, each with a "
                "[prices.MODEL] table"]
    return [f"{path}:{_line_of(text, 'models', section=section)}: {who}, models: {model!r} has no "
            f"[prices.\"{model}\"] table (input_per_mtok, output_per_mtok, cache_write_per_mtok, "
            "cache_read_per_mtok)" for model in agent.models if model not in prices]


def _estimate_problem(path: Path, text: str, fleet: FleetSection, agent: AgentSpec) -> str | None:
    # A run reserves its estimate before it starts: under a cap, $0 would let any number of runs
    # start at an exactly-full cap. Below one micro-dollar the ledger rounds it to nothing.
    if agent.daily_cap_usd is None and fleet.daily_cap_usd is None:
        return None
    if round(agent.est_cost_usd * 1_000_000) >= 1:
        return None
    given = "est_cost_usd" in agent.model_fields_set
    line = _line_of(text, "est_cost_usd" if given else f"agents.{agent.name}", section=f"agents.{agent.name}")
    why = "must be > 0 (at least 0.000001)" if given else "required"
    return (f"{path}:{line}: agent {agent.name!r}, est_cost_usd: {why} under a daily cap (the agent's own or "
            "[fleet]'s): each run reserves it before it starts; give what one run may cost at most")


def _validate_agent(path: Path, text: str, name: str, body: Any) -> tuple[AgentSpec | None, list[str]]:
    # The line is looked up only for a problem: scanning the file per agent would make loading
    # quadratic in the number of agents.
    if not AGENT_NAME.match(name):
        return None, [f"{path}:{_line_of(text, f'agents.{name}')}: agent {name!r}: name must be an ASCII slug "
                      "(a-z, 0-9, '-', '_'; it is used in Redis keys, file names and metrics labels)"]
    if not isinstance(body, dict):
        return None, [f"{path}:{_line_of(text, f'agents.{name}')}: agent {name!r} must be a table"]
    try:
        agent = AgentSpec.model_validate({**body, "name": name})
    except ValidationError as exc:
        return None, _describe(path, text, f"agents.{name}", name, exc)
    base = path.parent
    agent = agent.model_copy(update={
        "key_file": base / agent.key_file if agent.key_file else None,
        "secret_env": {var: base / file for var, file in agent.secret_env.items()},
    })
    problems = []
    if agent.key_file is not None:
        problems += _secret_file_problems(path, text, name, "key_file", agent.key_file)
    for var, file in agent.secret_env.items():
        problems += _secret_file_problems(path, text, name, f"secret_env.{var}", file)
    return (None, problems) if problems else (agent, [])


def _secret_file_problems(path: Path, text: str, agent: str, field: str, file: Path) -> list[str]:
    def where() -> str:
        return f"{path}:{_line_of(text, field.split('.')[0], section=f'agents.{agent}')}"

    try:
        info = file.stat()
    except FileNotFoundError:
        return [f"{where()}: agent {agent!r}, {field}: {file} does not exist"]
    except OSError as exc:
        return [f"{where()}: agent {agent!r}, {field}: {file} cannot be read ({exc.strerror})"]
    if not stat.S_ISREG(info.st_mode):
        return [f"{where()}: agent {agent!r}, {field}: {file} is not a regular file"]
    if info.st_mode & (stat.S_IRGRP | stat.S_IROTH):
        return [f"{where()}: agent {agent!r}, {field}: {file} is readable by group or others "
                f"(mode {stat.S_IMODE(info.st_mode):o}); run: chmod 600 {file}"]
    if not os.access(file, os.R_OK):
        return [f"{where()}: agent {agent!r}, {field}: {file} is not readable by this user"]
    try:
        read_secret(file)
    except ConfigError as exc:
        return [f"{where()}: agent {agent!r}, {field}: {exc}"]
    return []


def read_secret(file: Path) -> str:
    """A key or secret_env file's value, stripped; ConfigError when it cannot be read or holds nothing, so an
    agent is never handed an empty secret (it would fail at its provider, or worse, run unauthenticated)."""
    try:
        value = read_text(file).strip()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not value:
        raise ConfigError(f"{file} is empty: the agent would be handed an empty key")
    return value


def _describe(path: Path, text: str, section: str, agent: str | None, exc: ValidationError) -> list[str]:
    """Turn pydantic errors into file:line messages. Input values are never echoed: they may be secrets."""
    out = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"])
        line = _line_of(text, str(error["loc"][0]) if error["loc"] else section, section=section)
        who = f"agent {agent!r}, " if agent else f"[{section}] "
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        elif error["type"] == "missing":
            message = "required key is missing"
        out.append(f"{path}:{line}: {who}{field}: {message}")
    return out


def _line_of(text: str, key: str, section: str | None = None) -> int:
    """Best-effort line number of a table header or of a key inside a section (1 when not found)."""
    lines = text.splitlines()
    start = 0
    if section is not None:
        header = re.compile(rf"^\s*\[\s*{re.escape(section)}\s*\]")
        start = next((i for i, line in enumerate(lines) if header.match(line.replace('"', ""))), 0)
    patterns = (re.compile(rf"^\s*\[+\s*{re.escape(key)}\s*\]+"), re.compile(rf"^\s*{re.escape(key)}\s*="))
    for i in range(start, len(lines)):
        unquoted = lines[i].replace('"', "").replace("'", "")
        if any(p.match(unquoted) for p in patterns):
            return i + 1
    return start + 1
