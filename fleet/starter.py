"""`fleet init`: a starter fleet.toml whose example agents run at once (one with a key of its own in a
private keys/ folder), and a commented example of a real `claude -p` agent beside them.

An existing fleet.toml is refused (BadInputError, exit 65: the arguments lack --force), so a second
`fleet init` never clobbers a working configuration. Even with --force an existing key file is kept:
other agents or hosts may already use that secret.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from fleet.errors import BadInputError

CONFIG_NAME = "fleet.toml"
KEY_FILE = Path("keys/echo.key")  # as named by key_file in STARTER_TOML
EXAMPLE_AGENTS = ("echo", "sleeper", "flaky", "batch", "exit-with")

STARTER_TOML = """\
# Fleet: the agents this fleet runs, their schedules and their spend caps. `fleet doctor` checks this
# file; `fleet up` runs it (worker, beat, Flower, the web page). The example agents below run at once
# and spend nothing real; replace them with your own.
[fleet]
daily_cap_usd = 5.00            # hard cap for the whole fleet per day (timezone below)
timezone = "UTC"

[agents.echo]                   # a cheap agent that reports a usage line each run
command = ["python", "-m", "fleet.examples.echo_agent", "--cost", "0.01"]
schedule = "every 30s"          # cron ("*/15 * * * *"), or "every 30s"
concurrency = 2                 # a scheduled run and one dispatched by hand can run side by side
daily_cap_usd = 1.00            # its own cap: refused `over_cap` once today's runs reach it
est_cost_usd = 0.01             # reserved before each run, settled with what it reported after
timeout_s = 60
key_file = "keys/echo.key"      # given to this agent only, as FLEET_AGENT_KEY

[agents.sleeper]                # a slow one: watch it in `fleet status` and on the page, or kill it
command = ["python", "-m", "fleet.examples.sleeper", "20"]
schedule = "*/2 * * * *"
est_cost_usd = 0.001            # it spends nothing, but every agent under a cap reserves something
timeout_s = 120

[agents.flaky]                  # fails every other run: shows the one retry
command = ["python", "-m", "fleet.examples.flaky"]
schedule = "*/5 * * * *"
est_cost_usd = 0.001
timeout_s = 60

[agents.batch]                  # a bounded batch: fires 3 times a day, then is refused `bounded`
command = ["python", "-m", "fleet.examples.echo_agent", "--cost", "0.001"]
schedule = "every 60s"
max_runs_per_day = 3
est_cost_usd = 0.001
timeout_s = 60

[agents.exit-with]              # no schedule: `fleet dispatch exit-with` to see a retry and the dead-letter queue
command = ["python", "-m", "fleet.examples.exit_with", "75"]
est_cost_usd = 0.001
timeout_s = 60

# ---------------------------------------------------------------- a real `claude -p` agent
# To use it: install Claude Code (`claude` on the PATH of the user that runs the worker), put an
# Anthropic API key in keys/fixer.anthropic (`install -m 600 /dev/null keys/fixer.anthropic`, then
# paste the key into it), check the prices against Anthropic's price list, and remove the first "# "
# of each line below. `fleet doctor` then checks it; `fleet dispatch fixer --dry-run` shows its gates.
#
# [prices."claude-sonnet-4-5-20250929"]   # dollars per million tokens; all four are required
# input_per_mtok = 3.00
# output_per_mtok = 15.00
# cache_write_per_mtok = 3.75              # one rate for every cache write (the 1-hour one, to be safe)
# cache_read_per_mtok = 0.30
#
# [agents.fixer]
# command = ["claude", "-p", "Run the test suite and fix what fails; stop when it passes.",
#            "--output-format", "stream-json", "--verbose", "--max-turns", "30"]
# usage_format = "claude-stream-json"      # each turn's tokens are priced as they arrive: the cap can stop it
# models = ["claude-sonnet-4-5-20250929"]  # every model its lines name (subagents' too), each priced above
# secret_env = { ANTHROPIC_API_KEY = "keys/fixer.anthropic" }  # its key, from a 0600 file, for it alone
# # run_as = "fleet-agent"                 # its own unprivileged user: uncomment once that user exists
# schedule = "0 3 * * *"                   # 03:00 every day
# daily_cap_usd = 2.00                     # a hard cap for this agent per day
# est_cost_usd = 0.50                      # what one run may cost at most: reserved before it starts
# timeout_s = 1800
"""


def write_starter(directory: Path, force: bool) -> list[str]:
    """Write fleet.toml and keys/echo.key under `directory`; return the lines to print."""
    config, key = directory / CONFIG_NAME, directory / KEY_FILE
    _check_nothing_in_the_way(directory, config, key, force)
    directory.mkdir(parents=True, exist_ok=True)
    key.parent.mkdir(mode=0o700, exist_ok=True)
    key.parent.chmod(0o700)  # mkdir's mode passes through the umask, and an existing folder is tightened too
    linked = key.is_symlink()  # a file outside this folder: kept, but its mode is not init's to change
    key_written = _write_key(key)
    _write_atomically(config, STARTER_TOML)
    where = "" if directory.resolve() == Path.cwd().resolve() else f"cd {directory} && "
    kept = (f"kept the existing key {key}, a link to {key.resolve()} (its mode is left as it is: the fleet refuses "
            "a key others can read)" if linked else
            f"{'wrote a new random' if key_written else 'kept the existing'} key {key} (mode 600)")
    return [
        f"wrote {config} (example agents {', '.join(EXAMPLE_AGENTS)}; a commented `claude -p` agent at the end)",
        f"made {key.parent} private (mode 700); keep it out of version control",
        kept,
        "next steps:",
        f"  {where}fleet up        run it: worker, beat, Flower and the web page (the database is migrated first)",
        f"  {where}fleet doctor    check the config, Redis and the database first, if you like",
        "  (fleet db upgrade creates the database schema without starting anything)",
    ]


def _check_nothing_in_the_way(directory: Path, config: Path, key: Path, force: bool) -> None:
    """Refuse (65) before writing anything: a refusal halfway would leave a folder or a key behind, and a
    file where a folder must go made mkdir raise FileExistsError, a traceback."""
    keys = key.parent.absolute()
    # The closest of keys/, the target folder and its parents that is there (a dangling link counts).
    nearest = next(p for p in (keys, *keys.parents) if p.exists() or p.is_symlink())
    if not nearest.is_dir():
        raise BadInputError(f"{nearest} exists and is not a folder: move it away, or init another folder")
    if config.exists() and not force:
        raise BadInputError(f"{config} already exists; pass --force to overwrite it (its key files are kept)")
    for path in (config, key):
        if path.exists() and not path.is_file():
            raise BadInputError(f"{path} exists and is not a file")


def _write_key(path: Path) -> bool:
    """Create a random key readable by its owner only; an existing key is kept (mode tightened, unless a link)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        if not path.is_file():
            raise BadInputError(f"{path} exists and is not a file") from None
        if not path.is_symlink():  # a link's target is outside the folder init was asked to set up
            path.chmod(0o600)
        return False
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(secrets.token_urlsafe(32))
    return True


def _write_atomically(path: Path, text: str) -> None:
    """Replace `path` in one step, so a crash never leaves half a config behind."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
