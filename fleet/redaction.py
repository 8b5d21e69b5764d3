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

Text an agent wrote that Fleet repeats elsewhere (its `fleet_done` reason, a model name quoted in a usage
problem) is made safe where it is read (`agent_text`): masked as the output is, made `visible` (no character
left that could drive a terminal or reorder what a page shows) and bounded. `visible` is also what the CLI
runs every stored text through before it reaches the operator's terminal.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import unquote, urlsplit

from fleet.config import FleetConfig, Settings

MIN_LENGTH = 4
MASK = "[redacted by fleet]"  # what stands for a secret in a log, a tail and anything an agent wrote
# A secret's first PARTIAL characters or more are masked in an agent's text wherever they appear: a length bound
# may have cut the rest off. Long enough that a URL-shaped secret (a Sentry DSN) does not mask every https://.
PARTIAL = 12
# C0 controls but newline and tab, DEL, C1 (an 8-bit CSI is one), the Unicode bidi controls that reorder what a
# terminal or a page shows ("invoice_\u202egnp.exe"), and lone surrogates (json.loads makes them; no database or
# Redis client can encode them).
_UNSAFE = "\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff"
_UNSAFE_IN_LINES = re.compile(f"[{_UNSAFE}]")
_UNSAFE_IN_A_LINE = re.compile(f"[\t\n{_UNSAFE}]")


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


# ---------------------------------------------------------------- text an agent wrote


def visible(text: str, *, lines: bool = False) -> str:
    """`text` with every character that could drive a terminal (escape sequences, a screen clear, a hyperlink) or
    reorder what it shows written as a visible escape instead: ESC as `\\x1b`, U+202E as `\\u202e`. With
    `lines`, newlines and tabs are kept (and CRLF read as a newline): multi-line output stays multi-line."""
    if lines:
        return _UNSAFE_IN_LINES.sub(_escaped, text.replace("\r\n", "\n"))
    return _UNSAFE_IN_A_LINE.sub(_escaped, text)


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def mask(text: str, secrets: Iterable[str], *, cut: bool = False) -> str:
    """`text` with each secret masked, and what a length bound may have left of one: its first PARTIAL
    characters or more anywhere, and (`cut`: the text may end where a bound cut it) any start of one at its end."""
    found = sorted({s for s in secrets if s}, key=len, reverse=True)  # as Output's: one holding another goes whole
    for secret in found:
        text = text.replace(secret, MASK)
    for secret in found:
        text = _mask_leading_parts(text, secret)
        if cut:
            text = _mask_cut_end(text, secret)
    return text


def _mask_leading_parts(text: str, secret: str) -> str:
    head = secret[:PARTIAL]
    if len(secret) <= PARTIAL or head not in text:
        return text
    pieces, at = [], 0
    while (start := text.find(head, at)) >= 0:
        end = start + PARTIAL
        while end < len(text) and end - start < len(secret) and text[end] == secret[end - start]:
            end += 1
        pieces += [text[at:start], MASK]
        at = end
    return "".join(pieces) + text[at:]


def _mask_cut_end(text: str, secret: str) -> str:
    for size in range(min(len(secret) - 1, len(text)), 0, -1):
        if text.endswith(secret[:size]):
            return text[:-size] + MASK
    return text


def agent_text(text: str, secrets: Iterable[str], limit: int) -> str:
    """Text an agent wrote that Fleet will repeat (a pause reason, an event, an alert, the page): its secrets
    masked as its output's are, on one line of visible characters, at most `limit` characters long. A text
    `limit` long or longer may have been cut by its parser already: a secret's start at its end is masked too."""
    shown = visible(mask(text, secrets, cut=len(text) >= limit))
    return shown if len(shown) <= limit else shown[:limit - 1] + "…"
