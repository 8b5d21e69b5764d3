"""`fleet init`: a starter fleet.toml with one echo agent, and a private keys/ folder holding its key.

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

STARTER_TOML = """\
# Fleet: the agents this fleet runs, their schedules and their spend caps. Check it with `fleet doctor`.
[fleet]
daily_cap_usd = 1.00            # hard cap for the whole fleet per day
timezone = "UTC"

[agents.echo]                   # a cheap agent that prints a usage line; replace it with your own
command = ["python", "-m", "fleet.examples.echo_agent", "--cost", "0.01"]
schedule = "*/15 * * * *"       # cron, or "every 30s"
daily_cap_usd = 0.50
est_cost_usd = 0.01             # reserved before each run, settled after
timeout_s = 60
concurrency = 1
key_file = "keys/echo.key"      # given to this agent only, as FLEET_AGENT_KEY
"""


def write_starter(directory: Path, force: bool) -> list[str]:
    """Write fleet.toml and keys/echo.key under `directory`; return the lines to print."""
    config = directory / CONFIG_NAME
    if config.exists() and not force:
        raise BadInputError(f"{config} already exists; pass --force to overwrite it (its key files are kept)")
    if config.exists() and not config.is_file():
        raise BadInputError(f"{config} exists and is not a file")
    directory.mkdir(parents=True, exist_ok=True)
    key = directory / KEY_FILE
    key.parent.mkdir(mode=0o700, exist_ok=True)
    key.parent.chmod(0o700)  # mkdir's mode passes through the umask, and an existing folder is tightened too
    key_written = _write_key(key)
    _write_atomically(config, STARTER_TOML)
    return [
        f"wrote {config} (one agent, 'echo')",
        f"made {key.parent} private (mode 700); keep it out of version control",
        f"{'wrote a new random' if key_written else 'kept the existing'} key {key} (mode 600)",
        "next steps:",
        f"  fleet --config {config} doctor       check the config, Redis and the database",
        f"  fleet --config {config} db upgrade   create the database schema",
        f"  fleet --config {config} up           run worker, beat, Flower and the web page",
    ]


def _write_key(path: Path) -> bool:
    """Create a random key readable by its owner only; an existing key is kept (mode tightened)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        if not path.is_file():
            raise BadInputError(f"{path} exists and is not a file") from None
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
