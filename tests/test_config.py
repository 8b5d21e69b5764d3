"""fleet.toml and FLEET_* settings: a good file loads; every bad kind is refused whole, with file:line,
agent and field, and never with a secret in the message. A few run through `fleet doctor` (exit 78)."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from fleet import db
from fleet.config import (
    DEFAULT_REDIS_URL,
    EMBEDDED_POINTER,
    MAX_PRICE_PER_MTOK_USD,
    MAX_USD,
    Settings,
    load_fleet_config,
    load_settings,
    with_embedded_pointer,
)
from fleet.doctor import run_doctor
from fleet.errors import ConfigError, ExitCode
from fleet.schedule import Cron
from tests.harness import wait_for

SECRET = "sk-ant-PLANTED-secret-0123456789abcdef"

GOOD = """\
[fleet]
daily_cap_usd = 5.00
timezone = "Europe/Berlin"
breaker_threshold = 5

[agents.digest]
command = ["python", "-m", "fleet.examples.echo_agent", "--cost", "0.01"]
poll = ["python", "-m", "fleet.examples.has_work"]
schedule = "*/15 * * * *"
daily_cap_usd = 1.00
est_cost_usd = 0.05
timeout_s = 600
concurrency = 2
key_file = "keys/digest.key"
env = { MODEL = "sonnet" }
secret_env = { ANTHROPIC_API_KEY = "keys/digest.anthropic" }

[agents.night-job_2]
command = ["true"]
est_cost_usd = 0.001
"""


@pytest.fixture
def fleet_dir(tmp_path: Path) -> Path:
    """A folder with a private keys/ holding the two secret files GOOD refers to."""
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    for name in ("digest.key", "digest.anthropic"):
        (keys / name).write_text(SECRET)
        (keys / name).chmod(0o600)
    return tmp_path


def write(folder: Path, text: str) -> Path:
    path = folder / "fleet.toml"
    path.write_text(text, encoding="utf-8")
    return path


def refused(folder: Path, text: str) -> str:
    """The ConfigError message for `text`; the secret planted in the key files never appears in it."""
    with pytest.raises(ConfigError) as caught:
        load_fleet_config(write(folder, text))
    message = str(caught.value)
    assert SECRET not in message
    assert caught.value.exit_code == ExitCode.CONFIG
    return message


def test_good_file_loads(fleet_dir: Path) -> None:
    config = load_fleet_config(write(fleet_dir, GOOD))
    assert config.fleet.daily_cap_usd == 5.0
    assert config.fleet.timezone == "Europe/Berlin"
    assert config.fleet.breaker_threshold == 5
    assert config.fleet.lease_ttl_s == 30.0  # a default
    assert sorted(config.agents) == ["digest", "night-job_2"]
    digest = config.agent("digest")
    assert digest.command == ["python", "-m", "fleet.examples.echo_agent", "--cost", "0.01"]
    assert digest.poll == ["python", "-m", "fleet.examples.has_work"]
    assert (digest.daily_cap_usd, digest.est_cost_usd, digest.timeout_s, digest.concurrency) == (1.0, 0.05, 600, 2)
    assert digest.key_file == fleet_dir / "keys" / "digest.key"  # relative to the file, not the cwd
    assert digest.secret_env == {"ANTHROPIC_API_KEY": fleet_dir / "keys" / "digest.anthropic"}
    assert digest.env == {"MODEL": "sonnet"}
    assert isinstance(digest.parsed_schedule, Cron)
    other = config.agent("night-job_2")
    assert (other.schedule, other.key_file, other.concurrency, other.est_cost_usd) == (None, None, 1, 0.001)


def test_unknown_agent_lookup_is_not_found(fleet_dir: Path) -> None:
    from fleet.errors import NotFoundError

    config = load_fleet_config(write(fleet_dir, GOOD))
    with pytest.raises(NotFoundError, match="digest, night-job_2"):
        config.agent("nope")


def test_missing_file_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fleet init") as caught:
        load_fleet_config(tmp_path / "absent.toml")
    assert str(tmp_path / "absent.toml") in str(caught.value)


AGENT = '[agents.a]\ncommand = ["true"]\n'

# (id, text, fragments the message must contain; "{p}" is the file's path)
BAD = [
    ("toml-syntax", '[agents.a]\ncommand = ["true"\n', ["{p}:2: invalid TOML", "Unclosed array"]),
    ("toml-syntax-mid-file", '[fleet]\ntimezone = "UTC\n' + AGENT, ["{p}:2: invalid TOML", "line 2"]),
    ("duplicate-agent", AGENT + '[agents.a]\ncommand = ["false"]\n', ["{p}:3: invalid TOML", "('agents', 'a')"]),
    ("unknown-key", AGENT + 'comand = ["x"]\n', ["{p}:3: agent 'a', comand: unknown key"]),
    ("unknown-fleet-key", '[fleet]\ndaily_cap = 1.0\n', ["{p}:2: [fleet] daily_cap: unknown key"]),
    ("unknown-table", '[fleets]\ndaily_cap_usd = 1.0\n', ["{p}:1: unknown top-level table [fleets]"]),
    ("wrong-type", AGENT + 'timeout_s = "soon"\n', ["{p}:3: agent 'a', timeout_s:", "number"]),
    ("command-not-a-list", '[agents.a]\ncommand = "true"\n', ["{p}:2: agent 'a', command:", "list"]),
    ("empty-command", '[agents.a]\ncommand = []\n', ["{p}:2: agent 'a', command:"]),
    ("empty-argument", '[agents.a]\ncommand = ["python", ""]\n', ["{p}:2: agent 'a', command:", "non-empty"]),
    ("missing-command", '[agents.a]\nschedule = "every 5m"\n', ["{p}:1: agent 'a', command: required key is missing"]),
    ("negative-cap", AGENT + "daily_cap_usd = -1.0\n", ["{p}:3: agent 'a', daily_cap_usd: must be a finite number"]),
    ("negative-cost", AGENT + "est_cost_usd = -0.01\n", ["{p}:3: agent 'a', est_cost_usd: must be a finite"]),
    ("nan-cap", AGENT + "daily_cap_usd = nan\n", ["{p}:3: agent 'a', daily_cap_usd: must be a finite number"]),
    ("inf-cap", AGENT + "daily_cap_usd = inf\n", ["{p}:3: agent 'a', daily_cap_usd: must be a finite number"]),
    ("nan-cost", AGENT + "est_cost_usd = nan\n", ["{p}:3: agent 'a', est_cost_usd: must be a finite number"]),
    ("inf-cost", AGENT + "est_cost_usd = +inf\n", ["{p}:3: agent 'a', est_cost_usd: must be a finite number"]),
    ("fleet-inf-cap", "[fleet]\ndaily_cap_usd = inf\n", ["{p}:2: [fleet] daily_cap_usd: must be a finite number"]),
    ("fleet-nan-cap", "[fleet]\ndaily_cap_usd = nan\n", ["{p}:2: [fleet] daily_cap_usd: must be a finite number"]),
    # Past MAX_USD a cap or an estimate in micro-dollars no longer fits the ledger's 64-bit integers: every
    # dispatch crashed with OverflowError (exit 1) while `fleet doctor` said ok.
    ("huge-cap", AGENT + "daily_cap_usd = 1e30\n",
     ["{p}:3: agent 'a', daily_cap_usd: must be a finite number", "at most 1,000,000,000 USD"]),
    ("huge-cost", AGENT + "est_cost_usd = 1e14\n",
     ["{p}:3: agent 'a', est_cost_usd: must be a finite number", "at most 1,000,000,000 USD"]),
    ("fleet-huge-cap", "[fleet]\ndaily_cap_usd = 1e30\n",
     ["{p}:2: [fleet] daily_cap_usd: must be a finite number", "at most 1,000,000,000 USD"]),
    ("zero-timeout", AGENT + "timeout_s = 0\n", ["{p}:3: agent 'a', timeout_s:"]),
    ("zero-concurrency", AGENT + "concurrency = 0\n", ["{p}:3: agent 'a', concurrency:"]),
    ("bad-schedule", AGENT + 'schedule = "61 * * * *"\n', ["{p}:3: agent 'a', schedule:", "minute"]),
    ("bad-timezone", '[fleet]\ntimezone = "Mars/Olympus"\n', ["{p}:2: [fleet] timezone: unknown timezone"]),
    ("reserved-env", AGENT + 'env = { PATH = "/tmp" }\n', ["{p}:3: agent 'a', env:", "set by Fleet itself"]),
    ("bad-env-name", AGENT + 'env = { "1X" = "y" }\n', ["{p}:3: agent 'a', env:", "not a valid environment"]),
    ("name-with-colon", '[agents."a:b"]\ncommand = ["true"]\n', ["{p}:1: agent 'a:b': name must be an ASCII slug"]),
    ("name-star", '[agents."*"]\ncommand = ["true"]\n', ["{p}:1: agent '*': name must be an ASCII slug"]),
    ("name-non-ascii", '[agents."ÄBC"]\ncommand = ["true"]\n', ["{p}:1: agent 'ÄBC': name must be an ASCII slug"]),
    ("name-upper", '[agents.Digest]\ncommand = ["true"]\n', ["{p}:1: agent 'Digest': name must be"]),
    ("name-too-long", f'[agents.{"a" * 64}]\ncommand = ["true"]\n', ["{p}:1:", "name must be"]),
    ("agent-not-a-table", '[agents]\na = "x"\n', ["agent 'a' must be a table"]),
]


@pytest.mark.parametrize(("text", "fragments"), [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_each_bad_kind_is_refused_with_file_line_agent_and_field(fleet_dir: Path, text: str,
                                                                  fragments: list[str]) -> None:
    message = refused(fleet_dir, text)
    path = fleet_dir / "fleet.toml"
    assert "nothing loaded" in message or "invalid TOML" in message
    for fragment in fragments:
        assert fragment.format(p=path) in message


# An agent under a cap must say what a run costs: with no estimate it reserves nothing, and any
# number of runs would start at an exactly-full cap.
NO_ESTIMATE = [
    ("own-cap", AGENT + "daily_cap_usd = 1.0\n", "{p}:1: agent 'a', est_cost_usd: required"),
    ("fleet-cap", "[fleet]\ndaily_cap_usd = 5.0\n\n" + AGENT, "{p}:4: agent 'a', est_cost_usd: required"),
    ("explicit-zero", "[fleet]\ndaily_cap_usd = 5.0\n\n" + AGENT + "\nest_cost_usd = 0.0\n",
     "{p}:7: agent 'a', est_cost_usd: must be > 0"),
    ("below-a-micro-dollar", AGENT + "daily_cap_usd = 1.0\nest_cost_usd = 0.0000004\n",
     "{p}:4: agent 'a', est_cost_usd: must be > 0"),
]


@pytest.mark.parametrize(("text", "fragment"), [case[1:] for case in NO_ESTIMATE],
                         ids=[case[0] for case in NO_ESTIMATE])
def test_an_agent_under_a_cap_needs_a_positive_estimate(fleet_dir: Path, text: str, fragment: str) -> None:
    message = refused(fleet_dir, text)
    assert fragment.format(p=fleet_dir / "fleet.toml") in message
    assert "under a daily cap" in message


def test_money_at_its_limit_loads(fleet_dir: Path) -> None:
    """The limits themselves are allowed (MAX_USD for caps and estimates, MAX_PRICE_PER_MTOK_USD for prices)."""
    text = (f"[fleet]\ndaily_cap_usd = {MAX_USD}\n\n" + SONNET_PRICE.replace("= 15.00", f"= {MAX_PRICE_PER_MTOK_USD}")
            + AGENT + f"daily_cap_usd = {MAX_USD}\nest_cost_usd = {MAX_USD}\n")
    config = load_fleet_config(write(fleet_dir, text))
    assert config.fleet.daily_cap_usd == config.agent("a").est_cost_usd == MAX_USD
    assert config.prices["claude-sonnet-4-5-20250929"].output_per_mtok == MAX_PRICE_PER_MTOK_USD


def test_an_agent_under_no_cap_may_have_no_estimate(fleet_dir: Path) -> None:
    config = load_fleet_config(write(fleet_dir, AGENT))
    assert config.agent("a").est_cost_usd == 0.0


SONNET_PRICE = """
[prices."claude-sonnet-4-5-20250929"]
input_per_mtok = 3.00
output_per_mtok = 15.00
cache_write_per_mtok = 3.75
cache_read_per_mtok = 0.30
"""
CLAUDE_AGENT = """
[agents.coder]
command = ["claude", "-p", "fix the tests", "--output-format", "stream-json", "--verbose"]
usage_format = "claude-stream-json"
models = ["claude-sonnet-4-5-20250929"]
"""


def test_token_format_agent_loads_with_its_prices(fleet_dir: Path) -> None:
    extra = '\n[prices."gpt-4.1"]\ninput_per_mtok = 2\noutput_per_mtok = 8\ncache_write_per_mtok = 0\n' \
            'cache_read_per_mtok = 0.5\n'
    config = load_fleet_config(write(fleet_dir, SONNET_PRICE + extra + CLAUDE_AGENT + AGENT))
    coder = config.agent("coder")
    assert (coder.usage_format, coder.models) == ("claude-stream-json", ["claude-sonnet-4-5-20250929"])
    assert config.agent("a").usage_format == "fleet"
    assert sorted(config.prices) == ["claude-sonnet-4-5-20250929", "gpt-4.1"]
    sonnet = config.prices["claude-sonnet-4-5-20250929"]
    assert (sonnet.input_per_mtok, sonnet.output_per_mtok, sonnet.cache_write_per_mtok,
            sonnet.cache_read_per_mtok) == (3.0, 15.0, 3.75, 0.3)
    assert list(config.prices_of(coder)) == ["claude-sonnet-4-5-20250929"]  # only the models it declares
    assert config.prices_of(config.agent("a")) == {}


# (id, text, fragment; "{p}" is the file's path)
BAD_USAGE = [
    ("unknown-format", AGENT + 'usage_format = "stream-json"\n',
     "{p}:3: agent 'a', usage_format: Input should be 'fleet', 'claude-stream-json' or 'json-tokens'"),
    ("tokens-without-models", AGENT + 'usage_format = "json-tokens"\n',
     "{p}:3: agent 'a', models: required with usage_format = \"json-tokens\""),
    ("model-without-price", CLAUDE_AGENT,
     "{p}:5: agent 'coder', models: 'claude-sonnet-4-5-20250929' has no [prices.\"claude-sonnet-4-5-20250929\"]"),
    ("models-with-fleet-format", SONNET_PRICE + AGENT + 'models = ["claude-sonnet-4-5-20250929"]\n',
     "{p}:9: agent 'a', models: only read with usage_format"),
    ("empty-model-name", AGENT + 'usage_format = "json-tokens"\nmodels = [" "]\n',
     "{p}:4: agent 'a', models: model names must be non-empty"),
    ("price-missing-kind", SONNET_PRICE.replace("cache_read_per_mtok = 0.30\n", "") + CLAUDE_AGENT,
     "{p}:2: [prices.claude-sonnet-4-5-20250929] cache_read_per_mtok: required key is missing"),
    ("price-negative", SONNET_PRICE.replace("= 15.00", "= -15.00") + CLAUDE_AGENT,
     "{p}:4: [prices.claude-sonnet-4-5-20250929] output_per_mtok:"),
    ("price-nan", SONNET_PRICE.replace("= 3.00", "= nan") + CLAUDE_AGENT,
     "{p}:3: [prices.claude-sonnet-4-5-20250929] input_per_mtok:"),
    ("price-inf", SONNET_PRICE.replace("= 3.75", "= inf") + CLAUDE_AGENT,
     "{p}:5: [prices.claude-sonnet-4-5-20250929] cache_write_per_mtok:"),
    ("price-string", SONNET_PRICE.replace("= 0.30", '= "cheap"') + CLAUDE_AGENT,
     "{p}:6: [prices.claude-sonnet-4-5-20250929] cache_read_per_mtok:"),
    ("price-huge", SONNET_PRICE.replace("= 15.00", "= 1e7") + CLAUDE_AGENT,
     "{p}:4: [prices.claude-sonnet-4-5-20250929] output_per_mtok: must be a finite number >= 0 and at most "
     "1,000,000 USD"),
    ("price-unknown-key", SONNET_PRICE + "batch_per_mtok = 1.0\n" + CLAUDE_AGENT,
     "{p}:7: [prices.claude-sonnet-4-5-20250929] batch_per_mtok: unknown key"),
    ("price-not-a-table", '[prices]\nsonnet = 3.0\n', '{p}:1: [prices."sonnet"] must be a table'),
    ("prices-not-a-table", 'prices = 3\n', "{p}:1: [prices] must be a table of [prices.MODEL] tables"),
]


@pytest.mark.parametrize(("text", "fragment"), [case[1:] for case in BAD_USAGE], ids=[case[0] for case in BAD_USAGE])
def test_usage_that_cannot_be_priced_is_refused(fleet_dir: Path, text: str, fragment: str) -> None:
    message = refused(fleet_dir, text)
    assert fragment.format(p=fleet_dir / "fleet.toml") in message


def test_every_problem_is_reported_at_once(fleet_dir: Path) -> None:
    text = ('[fleet]\ndaily_cap_usd = -5\n\n[agents.one]\ncommand = ["true"]\ntimeout_s = "x"\n\n'
            '[agents."t:w:o"]\ncommand = ["true"]\n\n[agents.three]\nschedule = "every 5m"\n')
    message = refused(fleet_dir, text)
    path = fleet_dir / "fleet.toml"
    assert f"{path}:2: [fleet] daily_cap_usd" in message
    assert f"{path}:6: agent 'one', timeout_s" in message
    assert f"{path}:8: agent 't:w:o'" in message
    assert f"{path}:11: agent 'three', command: required key is missing" in message


# ---------------------------------------------------------------- secret files


@pytest.mark.parametrize(("setup", "why"), [
    (lambda keys: None, "does not exist"),
    (lambda keys: (keys / "a.key").mkdir(), "is not a regular file"),
    (lambda keys: _secret(keys / "a.key", 0o644), "is readable by group or others (mode 644); run: chmod 600"),
    (lambda keys: _secret(keys / "a.key", 0o640), "is readable by group or others (mode 640)"),
    (lambda keys: _secret(keys / "a.key", 0o604), "is readable by group or others (mode 604)"),
    (lambda keys: _content(keys / "a.key", ""), "is empty: the agent would be handed an empty key"),
    (lambda keys: _content(keys / "a.key", " \n\t\n"), "is empty: the agent would be handed an empty key"),
], ids=["missing", "directory", "world-readable", "group-readable", "other-readable", "empty", "blank"])
def test_bad_key_file_is_refused(fleet_dir: Path, setup: object, why: str) -> None:
    setup(fleet_dir / "keys")  # type: ignore[operator]
    message = refused(fleet_dir, '[agents.a]\ncommand = ["true"]\n\nkey_file = "keys/a.key"\n')
    assert f"{fleet_dir / 'fleet.toml'}:4: agent 'a', key_file: {fleet_dir / 'keys' / 'a.key'} {why}" in message


def test_bad_secret_env_file_is_refused_naming_the_variable(fleet_dir: Path) -> None:
    _secret(fleet_dir / "keys" / "token", 0o644)
    message = refused(fleet_dir, '[agents.a]\ncommand = ["true"]\nsecret_env = { API_TOKEN = "keys/token" }\n')
    assert f"{fleet_dir / 'fleet.toml'}:3: agent 'a', secret_env.API_TOKEN:" in message
    assert "readable by group or others" in message


def test_private_key_file_is_accepted(fleet_dir: Path) -> None:
    _secret(fleet_dir / "keys" / "a.key", 0o400)
    config = load_fleet_config(write(fleet_dir, '[agents.a]\ncommand = ["true"]\nkey_file = "keys/a.key"\n'))
    assert config.agent("a").key_file == fleet_dir / "keys" / "a.key"


def _secret(path: Path, mode: int) -> None:
    path.write_text(SECRET)
    path.chmod(mode)


def _content(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o600)


@pytest.mark.parametrize("line", [
    f'timeout_s = "{SECRET}"',
    f'command = "{SECRET}"',
    f'poll = ["{SECRET}", 3]',
    f'env = {{ TOKEN = ["{SECRET}"] }}',
    f'env = "{SECRET}"',
    f'secret_env = "{SECRET}"',
    f'key_file = ["{SECRET}"]',
    f'concurrency = "{SECRET}"',
    f'schedule = "{SECRET}"',
    f'env = {{ TOKEN = "{SECRET}',  # a TOML syntax error on the secret's own line
], ids=["float", "command", "poll", "env-value", "env", "secret-env", "key-file", "int", "schedule", "syntax"])
def test_secret_looking_value_of_the_wrong_type_is_never_echoed(fleet_dir: Path, line: str) -> None:
    command = "" if line.startswith("command") else 'command = ["true"]\n'
    message = refused(fleet_dir, f"[agents.a]\n{command}{line}\n")
    assert f"{fleet_dir / 'fleet.toml'}:" in message
    assert "sk-ant" not in message


def test_secret_files_contents_never_appear_even_beside_other_errors(fleet_dir: Path) -> None:
    _secret(fleet_dir / "keys" / "loose.key", 0o644)
    message = refused(fleet_dir, GOOD + '\n[agents.bad]\ncommand = ["true"]\nkey_file = "keys/loose.key"\n'
                      "est_cost_usd = nan\n")
    assert "agent 'bad'" in message


# ---------------------------------------------------------------- settings


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("FLEET_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_the_folders_embedded_pointer_is_followed_only_when_no_redis_is_configured_and_it_is_private(
        clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A running `fleet up --embedded` leaves its server's URL beside fleet.toml: commands in that folder use it
    when nothing is configured; a configured URL wins; a pointer another user could have written is refused."""
    clean_env.setenv("FLEET_CONFIG", str(tmp_path / "fleet.toml"))
    assert with_embedded_pointer(load_settings()).broker_url == DEFAULT_REDIS_URL  # no pointer: the default
    pointer = tmp_path / EMBEDDED_POINTER
    pointer.write_text("redis://:pw@127.0.0.1:7001/0\n")
    pointer.chmod(0o600)
    followed = with_embedded_pointer(load_settings())
    assert (followed.broker_url, followed.redis_url_file) == ("redis://:pw@127.0.0.1:7001/0", pointer)
    clean_env.setenv("FLEET_REDIS_URL", "redis://127.0.0.1:7002/3")
    assert with_embedded_pointer(load_settings()).broker_url == "redis://127.0.0.1:7002/3"
    clean_env.delenv("FLEET_REDIS_URL")
    pointer.chmod(0o644)
    with pytest.raises(ConfigError, match="not a private file of this user"):
        with_embedded_pointer(load_settings())


def test_an_empty_redis_url_variable_does_not_hide_the_folders_pointer(clean_env: pytest.MonkeyPatch,
                                                                        tmp_path: Path) -> None:
    """FLEET_REDIS_URL= (compose's `${FLEET_REDIS_URL:-}`, an env file's blank line) counts as unset everywhere
    else: the default Redis is used. It counted as set for the pointer, so a command in the folder of a running
    `fleet up --embedded` went to whatever answers on 6379 (a kill there stops another fleet)."""
    clean_env.setenv("FLEET_CONFIG", str(tmp_path / "fleet.toml"))
    clean_env.setenv("FLEET_REDIS_URL", "")
    pointer = tmp_path / EMBEDDED_POINTER
    pointer.write_text("redis://:pw@127.0.0.1:7001/0\n")
    pointer.chmod(0o600)
    assert with_embedded_pointer(load_settings()).broker_url == "redis://:pw@127.0.0.1:7001/0"


def test_settings_defaults_and_environment(clean_env: pytest.MonkeyPatch) -> None:
    defaults = load_settings()
    assert (defaults.config, defaults.log_dir, defaults.web_port, defaults.flower_port) == \
        (Path("fleet.toml"), Path("logs"), 8700, 5555)
    assert defaults.broker_url == "redis://127.0.0.1:6379/0"
    assert defaults.database_url == "sqlite:///./fleet.db"
    clean_env.setenv("FLEET_REDIS_URL", "redis://10.0.0.1:6380/2")
    clean_env.setenv("FLEET_WEB_PORT", "9000")
    clean_env.setenv("FLEET_FLOWER_AUTH", "admin:pass:with:colons")
    loaded = load_settings()
    assert (loaded.broker_url, loaded.web_port, loaded.flower_auth) == \
        ("redis://10.0.0.1:6380/2", 9000, "admin:pass:with:colons")


@pytest.mark.parametrize("value", ["eighty", "70000", "-1", "80.5"])
def test_bad_web_port_is_a_config_error(clean_env: pytest.MonkeyPatch, value: str) -> None:
    clean_env.setenv("FLEET_WEB_PORT", value)
    with pytest.raises(ConfigError, match="FLEET_WEB_PORT"):
        load_settings()


@pytest.mark.parametrize("value", ["adminhunter2secret", ":hunter2secret", "admin:", ":"])
def test_flower_auth_needs_user_and_password(clean_env: pytest.MonkeyPatch, value: str) -> None:
    clean_env.setenv("FLEET_FLOWER_AUTH", value)
    with pytest.raises(ConfigError, match="FLEET_FLOWER_AUTH must be user:password") as caught:
        load_settings()
    assert "hunter2" not in str(caught.value)


# ---------------------------------------------------------------- through `fleet doctor`


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port bound but never listening: connecting is refused, and no one else can take it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def doctor_env(tmp_path: Path, redis_port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(FLEET_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0", FLEET_LOG_DIR=str(tmp_path / "logs"),
               FLEET_DATABASE_URL=f"sqlite:///{tmp_path / 'fleet.db'}", FLEET_CONFIG=str(tmp_path / "absent.toml"))
    env.update(extra)
    return env


def run_fleet(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleet", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=60, check=False)


@pytest.mark.parametrize(("text", "fragment"), [
    ('[agents.a]\ncommand = ["true"\n', "{p}:2: invalid TOML"),
    ('[agents.a]\ncommand = ["true"]\nest_cost_usd = inf\n', "{p}:3: agent 'a', est_cost_usd: must be a finite"),
    ('[agents.a]\ncommand = ["true"]\nkey_file = "keys/digest.key"\n', None),  # made world-readable below
], ids=["syntax", "inf-cost", "readable-key"])
def test_doctor_cli_exits_78_on_bad_config(fleet_dir: Path, closed_port: int, text: str,
                                           fragment: str | None) -> None:
    path = write(fleet_dir, text)
    (fleet_dir / "keys" / "digest.key").chmod(0o644)
    # Redis is down too: the configuration problem still decides the exit code (78 beats 75).
    result = run_fleet(["--config", str(path), "doctor"], doctor_env(fleet_dir, closed_port), fleet_dir)
    output = result.stdout + result.stderr
    assert result.returncode == ExitCode.CONFIG, output
    expected = fragment or "{p}:3: agent 'a', key_file: " + str(fleet_dir / "keys" / "digest.key")
    assert expected.format(p=path) in output
    assert SECRET not in output


def test_config_option_beats_fleet_config_variable(fleet_dir: Path, closed_port: int) -> None:
    good = write(fleet_dir, GOOD)
    env = doctor_env(fleet_dir, closed_port, FLEET_CONFIG=str(fleet_dir / "absent.toml"))
    engine = db.make_engine(env["FLEET_DATABASE_URL"])
    db.upgrade(engine)  # else the missing tables (78) would outrank the Redis that is down (75)
    engine.dispose()
    result = run_fleet(["--config", str(good), "doctor"], env, fleet_dir)
    assert result.returncode == ExitCode.TRANSIENT, result.stdout  # config fine; only Redis is down
    assert "ok    config" in result.stdout
    result = run_fleet(["doctor"], env, fleet_dir)
    assert result.returncode == ExitCode.CONFIG
    assert "absent.toml: no such file" in result.stdout


@pytest.mark.parametrize(("name", "value"), [("FLEET_WEB_PORT", "not-a-port"),
                                             ("FLEET_FLOWER_AUTH", "adminhunter2secret")])
def test_bad_setting_exits_78_through_the_cli(tmp_path: Path, closed_port: int, name: str, value: str) -> None:
    result = run_fleet(["doctor"], doctor_env(tmp_path, closed_port, **{name: value}), tmp_path)
    assert result.returncode == ExitCode.CONFIG
    assert f"invalid settings: {name}" in result.stderr
    assert "hunter2" not in result.stdout + result.stderr


def test_doctor_in_process_prints_the_config_error(fleet_dir: Path, closed_port: int) -> None:
    path = write(fleet_dir, '[agents."a:b"]\ncommand = ["true"]\n')
    settings = Settings(config=path, redis_url=f"redis://127.0.0.1:{closed_port}/0",
                        database_url=f"sqlite:///{fleet_dir / 'fleet.db'}", log_dir=fleet_dir / "logs")
    buffer = io.StringIO()
    code = run_doctor(settings, Console(file=buffer, width=200))
    assert code == ExitCode.CONFIG
    assert f"FAIL  config    invalid configuration, nothing loaded:\n  {path}:1: agent 'a:b'" in buffer.getvalue()


# ---------------------------------------------------------------- secrets from files (FLEET_*_FILE)


@pytest.mark.parametrize("name", ["redis_url", "database_url", "sentry_dsn", "flower_auth", "web_token"])
def test_a_secret_setting_can_come_from_a_file(clean_env: pytest.MonkeyPatch, tmp_path: Path, name: str) -> None:
    """The container-secrets convention: the file's content, stripped, is the value."""
    value = {"redis_url": "redis://:hunter2secret@db:6379/0", "flower_auth": "ops:hunter2secret"}.get(
        name, "hunter2secret")
    secret = tmp_path / "secret"
    secret.write_text(f"  {value}\n\n")
    clean_env.setenv(f"FLEET_{name.upper()}_FILE", str(secret))
    loaded = load_settings()
    assert getattr(loaded, name) == value
    assert "hunter2" not in repr(loaded) and "hunter2" not in str(loaded)  # secrets stay out of reprs


def test_a_value_and_its_file_together_are_a_config_error(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("redis://:hunter2secret@db:6379/0")
    clean_env.setenv("FLEET_REDIS_URL_FILE", str(secret))
    clean_env.setenv("FLEET_REDIS_URL", "redis://:other-hunter2@db:6379/0")
    with pytest.raises(ConfigError, match="FLEET_REDIS_URL and FLEET_REDIS_URL_FILE are both set") as caught:
        load_settings()
    assert "hunter2" not in str(caught.value)
    clean_env.setenv("FLEET_REDIS_URL", "")  # compose's `${X:-}`: an empty variable is unset
    assert load_settings().redis_url == "redis://:hunter2secret@db:6379/0"


@pytest.mark.parametrize(("setup", "why"), [
    (lambda p: None, "does not exist"),
    (lambda p: p.mkdir(), "is a folder"),
    (lambda p: p.write_text(" \n"), "is empty"),
    (lambda p: p.write_bytes(b"\xff\xfehunter2"), "is not UTF-8"),
])
def test_an_unusable_secret_file_is_a_config_error(clean_env: pytest.MonkeyPatch, tmp_path: Path,
                                                   setup: Any, why: str) -> None:
    path = tmp_path / "dsn"
    setup(path)
    clean_env.setenv("FLEET_SENTRY_DSN_FILE", str(path))
    with pytest.raises(ConfigError, match=f"FLEET_SENTRY_DSN_FILE: {path} {why}") as caught:
        load_settings()
    assert "hunter2" not in str(caught.value)


def test_a_bad_flower_auth_file_is_refused_like_the_variable(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "auth"
    path.write_text("adminhunter2secret\n")
    clean_env.setenv("FLEET_FLOWER_AUTH_FILE", str(path))
    with pytest.raises(ConfigError, match="FLEET_FLOWER_AUTH must be user:password") as caught:
        load_settings()
    assert "hunter2" not in str(caught.value)


def test_web_allowed_hosts_are_comma_separated(clean_env: pytest.MonkeyPatch) -> None:
    assert load_settings().web_allowed_hosts == []
    clean_env.setenv("FLEET_WEB_ALLOWED_HOSTS", " Fleet.Example.org, ops.example.org:8700 ,,")
    assert load_settings().web_allowed_hosts == ["fleet.example.org", "ops.example.org:8700"]


def test_the_longest_run_and_its_outcome_retries_fit_in_the_executes_hard_time_limit(fleet_dir: Path) -> None:
    """Found by review: outcome_retry_s had no bound (3,600 s by default) while the execute's hard time limit left
    1,800 s past the longest agent: a 24 h agent whose outcome met a database outage was killed by Celery in
    mid-retry and its outcome lost. The file refuses a longer retry, and the limit covers the longest of each."""
    from fleet.config import FleetSection
    from fleet.executor import POLL_TIMEOUT_S
    from workers.app import EXECUTE_TIME_LIMIT, MAX_AGENT_SECONDS

    assert "outcome_retry_s" in refused(fleet_dir, "[fleet]\noutcome_retry_s = 7200\n")

    def bound(section: type[Any], name: str) -> float:
        limits = [getattr(m, "le", None) for m in section.model_fields[name].metadata]
        return float(next(limit for limit in limits if limit is not None))

    longest = (MAX_AGENT_SECONDS + POLL_TIMEOUT_S + bound(FleetSection, "kill_grace_s")
               + bound(FleetSection, "outcome_retry_s"))
    assert longest < EXECUTE_TIME_LIMIT, (EXECUTE_TIME_LIMIT, longest)


def test_a_fleet_toml_read_in_the_middle_of_its_save_buries_no_run(services: Any) -> None:
    """An editor that saves in place (nano, vim's backupcopy, `cat > fleet.toml`) truncates the file first and
    writes it after: a worker's task that looks in between read an empty fleet.toml, a valid one with no agent
    and no cap, took it as the new configuration, and the next claim dead-lettered a queued run as
    `agent_removed` (its agent was back a moment later). A fleet.toml is taken only once it has settled."""
    from fleet import dispatch, executor
    from fleet.models import Run, RunStatus

    queued = dispatch.dispatch(services, dispatch.DispatchRequest("echo", "mid-save", actor="test"), lambda *_: None)
    assert queued.status == "queued", queued
    path = services.settings.config
    good = path.read_text()
    services.refresh_config()  # the worker has seen the good file
    path.write_text("")  # the save's first step: the file is empty for a moment
    services.refresh_config()  # what the worker does before each task (workers.app.services)
    outcome = executor.execute(services, queued.run_id or "", queued.fence or 0, lambda *_: None)
    path.write_text(good)  # ... and whole again
    with db.session(services.engine) as session:
        run = session.get(Run, queued.run_id)
    assert run is not None and run.status != RunStatus.DEAD, (outcome, run.error if run else None)
    assert "echo" in services.config.agents
    path.write_text(good + '\n[agents.later]\ncommand = ["true"]\nest_cost_usd = 0.01\n')  # settled: taken
    settled = time.time() - 2
    os.utime(path, (settled, settled))
    assert services.refresh_config() and "later" in services.config.agents


def test_a_run_of_an_agent_added_a_moment_ago_is_not_buried_while_its_fleet_toml_settles(services: Any) -> None:
    """`fleet dispatch` reads fleet.toml as it starts, so a run of an agent added a moment ago reaches a worker
    that has not taken the new file yet (it waits for the save to settle): the claim must wait for it, not
    dead-letter the run as `agent_removed`."""
    from fleet import dispatch, executor
    from fleet.models import Run, RunStatus
    from fleet.services import build

    path = services.settings.config
    services.refresh_config()  # the worker has seen the file as it was
    path.write_text(path.read_text() + '\n[agents.added]\ncommand = ["true"]\nest_cost_usd = 0.01\n')
    cli = build(services.settings, load_fleet_config(path))  # the `fleet dispatch` process, started just now
    try:
        queued = dispatch.dispatch(cli, dispatch.DispatchRequest("added", "new", actor="test"), lambda *_: None)
    finally:
        cli.close()
    assert queued.status == "queued", queued
    services.refresh_config()  # before the task: the file is a moment old, not taken yet
    outcome = executor.execute(services, queued.run_id or "", queued.fence or 0, lambda *_: None)
    with db.session(services.engine) as session:
        run = session.get(Run, queued.run_id)
    assert run is not None and run.status == RunStatus.QUEUED, (outcome, run.error if run else None)
    assert outcome.status == "deferred", outcome  # its message is sent again shortly (workers.tasks.execute)
    settled = time.time() - 2
    os.utime(path, (settled, settled))
    services.refresh_config()
    assert executor.execute(services, queued.run_id or "", queued.fence or 0, lambda *_: None).status == "succeeded"


def test_a_dispatch_of_an_agent_in_a_settling_fleet_toml_is_told_to_try_again(services: Any) -> None:
    """`celery call fleet.dispatch` for an agent saved into fleet.toml a moment ago reaches a worker that has not
    taken the file yet: it is told to try again (75), not that the agent does not exist (69)."""
    from fleet import dispatch
    from fleet.errors import NotFoundError, UnavailableError

    path = services.settings.config
    services.refresh_config()
    path.write_text(path.read_text() + '\n[agents.added]\ncommand = ["true"]\nest_cost_usd = 0.01\n')
    services.refresh_config()
    with pytest.raises(UnavailableError, match="try again"):
        dispatch.dispatch(services, dispatch.DispatchRequest("added", "new", actor="test"), lambda *_: None)
    with pytest.raises(NotFoundError):  # a name in neither file is still unknown, once the file is taken
        settled = time.time() - 2
        os.utime(path, (settled, settled))
        services.refresh_config()
        dispatch.dispatch(services, dispatch.DispatchRequest("nowhere", "new", actor="test"), lambda *_: None)
    assert dispatch.dispatch(services, dispatch.DispatchRequest("added", "new", actor="test"),
                             lambda *_: None).status == "queued"


def test_a_worker_process_that_starts_in_the_middle_of_a_save_takes_the_file_once_it_settles(services: Any) -> None:
    """A pool child starts afresh (worker_max_tasks_per_child) and builds its clients, reading fleet.toml, on its
    first task. If that read falls in an in-place save (the file empty for a moment, truncated and written within
    one timestamp tick, so the finished file has the mtime the empty one had), the child took the empty file as
    its configuration for good: the mtime never changed again, so it was never re-read, no change was pending,
    and the child's claims dead-lettered every queued run as `agent_removed` until the next edit."""
    from fleet import dispatch, executor
    from fleet.models import Run, RunStatus
    from fleet.services import build

    queued = dispatch.dispatch(services, dispatch.DispatchRequest("echo", "fresh-child", actor="test"),
                               lambda *_: None)
    assert queued.status == "queued", queued
    path = services.settings.config
    good = path.read_text()
    path.write_text("")  # the save's first step
    tick = path.stat().st_mtime
    child = build(services.settings)  # the fresh pool child's first task (workers.app.services) ...
    try:
        child.refresh_config()  # ... which refreshes right after building
        path.write_text(good)  # the save's second step, in the same timestamp tick
        os.utime(path, (tick, tick))
        deadline = time.monotonic() + 10
        while child.refresh_config() is False and time.monotonic() < deadline:  # later tasks, once it settles
            time.sleep(0.05)
        assert "echo" in child.config.agents, sorted(child.config.agents)
        executor.execute(child, queued.run_id or "", queued.fence or 0, lambda *_: None)
        with db.session(child.engine) as session:
            run = session.get(Run, queued.run_id)
        assert run is not None and run.status != RunStatus.DEAD, run.error if run else None
    finally:
        child.close()


def test_a_beat_that_starts_in_the_middle_of_a_save_takes_the_file_once_it_settles(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same for beat: one that starts while fleet.toml is empty mid-save, the finished file keeping the
    empty one's mtime, kept an empty schedule until the next edit (no agent ever ticked)."""
    from types import SimpleNamespace

    from fleet.config import Settling
    from workers import beat

    path = tmp_path / "fleet.toml"
    path.write_text("")
    tick = path.stat().st_mtime
    monkeypatch.setattr(beat, "settings", SimpleNamespace(config=path))
    loaded: list[set[str]] = []

    class Probe(beat.LeaderScheduler):
        schedule: dict[str, Any] = {}  # no store behind it: only what _reload merges is recorded

        def merge_inplace(self, b: dict[str, Any]) -> None:
            loaded.append(set(b))

    scheduler = object.__new__(Probe)  # no Celery app, no Redis: only its fleet.toml reload
    scheduler.config_mtime = None
    scheduler.settling = Settling()
    scheduler._reload(force=True)  # setup_schedule, at start
    path.write_text('[agents.ticker]\ncommand = ["true"]\nschedule = "every 30s"\nest_cost_usd = 0.01\n')
    os.utime(path, (tick, tick))
    ticking = "fleet.ticks:every 30s"
    deadline = time.monotonic() + 10
    while not any(ticking in entries for entries in loaded) and time.monotonic() < deadline:
        scheduler._reload()  # each beat tick
        time.sleep(0.05)
    assert any(ticking in entries for entries in loaded), loaded


def test_a_fleet_toml_rewritten_more_often_than_it_settles_is_taken_all_the_same(
        services: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file rewritten every half second (a sync loop, config management) never stays unchanged for the settle
    second: it was never taken, so a removed agent's runs were deferred and dispatches refused as settling for
    ever. It is taken once it has been settling for CONFIG_SETTLE_MAX_S (shortened here)."""
    from fleet import config as config_module

    monkeypatch.setattr(config_module, "CONFIG_SETTLE_MAX_S", 0.5, raising=False)
    path = services.settings.config
    services.refresh_config()
    path.write_text(path.read_text() + '\n[agents.churned]\ncommand = ["true"]\nest_cost_usd = 0.01\n')

    def rewritten_and_looked_at() -> bool:
        now = time.time()
        os.utime(path, (now, now))  # rewritten again: always under a second old
        services.refresh_config()
        return "churned" in services.config.agents

    wait_for(rewritten_and_looked_at, 5, "a fleet.toml that never settles to be taken")
