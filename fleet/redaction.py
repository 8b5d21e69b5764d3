"""Every secret Fleet knows, so that none reaches a run log or a report, whoever printed it.

An agent's output is masked with all of them (fleet/process.py `Output`), not only the running
agent's own: an agent under the worker's uid that found another agent's key file, or the fleet's
Redis URL in a FLEET_*_FILE, and printed it, must not put it into a log the web page serves.
- The fleet's own, from the settings: the Redis URL's and the database URL's passwords (as written,
  percent-encoded, and decoded; for Redis a lone user part too, `redis://SECRET@host`, the old way to
  give a password), the Sentry DSN whole and its keys, the web token, Flower's password (and its whole
  `user:password`). A database URL's lone user part is a user name (`postgresql://postgres@db/fleet`).
- Every agent's, from fleet.toml: the content of each key_file and secret_env file, read now (a file
  that cannot be read is skipped: nothing can be handed out from it either).
Values shorter than MIN_LENGTH are left alone: masking "ab" would mangle every log.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import unquote, urlsplit

from fleet.config import FleetConfig, Settings

MIN_LENGTH = 4


def url_secrets(url: str | None, *, lone_user: bool = False) -> set[str]:
    """A URL's password (or, with `lone_user`, a user part without one) as written and decoded; nothing
    for an unparsable URL."""
    if not url:
        return set()
    try:
        parts = urlsplit(url)
    except ValueError:
        return set()
    userinfo = parts.netloc.rpartition("@")[0]
    if not userinfo:
        return set()
    user, colon, password = userinfo.partition(":")
    secret = password if colon else (user if lone_user else "")
    return {secret, unquote(secret)} if secret else set()


def dsn_secrets(dsn: str | None) -> set[str]:
    """A Sentry DSN whole, and its public (and old-style secret) key."""
    if not dsn:
        return set()
    found = {dsn}
    with contextlib.suppress(ValueError):
        parts = urlsplit(dsn)
        found |= {value for value in (parts.username, parts.password) if value}
    return found


def settings_secrets(settings: Settings) -> set[str]:
    """The fleet's own secrets, from its settings."""
    found = (url_secrets(settings.broker_url, lone_user=True) | url_secrets(settings.database_url)
             | dsn_secrets(settings.sentry_dsn))
    if settings.web_token:
        found.add(settings.web_token)
    if settings.flower_auth:
        found |= {settings.flower_auth, settings.flower_auth.partition(":")[2]}
    return found


def agent_secrets(config: FleetConfig) -> set[str]:
    """What every agent's key_file and secret_env files hold now."""
    files: list[Path] = []
    for agent in config.agents.values():
        files += [*([agent.key_file] if agent.key_file else []), *agent.secret_env.values()]
    found = set()
    for path in files:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            found.add(path.read_text(encoding="utf-8").strip())
    return found


def ordered(secrets: Iterable[str | None]) -> tuple[str, ...]:
    """Secrets worth masking, longest first (so one holding another is masked whole)."""
    return tuple(sorted({s for s in secrets if s and len(s) >= MIN_LENGTH}, key=len, reverse=True))


def known_secrets(settings: Settings, config: FleetConfig, *extra: str) -> tuple[str, ...]:
    """Every secret Fleet knows (plus `extra`), ready for `Output(redact=...)`."""
    return ordered(settings_secrets(settings) | agent_secrets(config) | set(extra))
