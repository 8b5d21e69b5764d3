"""Usage lines in an agent's output: Fleet's `{"fleet_usage": ...}`, Claude Code's stream-json
`{"type": "result", "total_cost_usd": ...}` and `{"fleet_done": "why"}`, found in a byte stream
without ever holding more than one capped line in memory.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

MICROS_PER_USD = 1_000_000
MAX_DONE_REASON = 200
MAX_LINE_COST_USD = 1_000_000  # a usage line claiming more is garbage, not a bill
DEFAULT_MAX_LINE = 2**20  # Claude Code's result line carries the final answer: it can be long
# Lines that start with "{": the only ones that can carry a usage or done object.
_OBJECT_LINE = re.compile(rb"^[ \t]*\{[^\n]*", re.MULTILINE)
_MARKERS = (b"fleet_", b"total_cost_usd")


@dataclass(frozen=True)
class Usage:
    """What one usage line reports; money as integer micro-dollars."""

    cost_micros: int
    input_tokens: int
    output_tokens: int


def to_micros(dollars: object) -> int | None:
    """Dollars as integer micro-dollars; None unless a finite, non-negative JSON number."""
    if isinstance(dollars, bool) or not isinstance(dollars, int | float):
        return None
    micros = dollars * MICROS_PER_USD
    if (isinstance(micros, float) and not math.isfinite(micros)) or dollars > MAX_LINE_COST_USD:
        return None
    return round(micros) if micros >= 0 else None


def _count(value: object) -> int:
    # Token counts are informational: a bad one must not lose the cost that came with it.
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def parse_usage(obj: dict[str, Any]) -> Usage | None:
    """The usage an object reports, in Fleet's own format or Claude Code's stream-json result."""
    usage = obj.get("fleet_usage")
    if isinstance(usage, dict):
        cost, tokens = usage.get("cost_usd", 0), usage
    elif obj.get("type") == "result" and "total_cost_usd" in obj:
        claude_tokens = obj.get("usage")
        cost, tokens = obj["total_cost_usd"], claude_tokens if isinstance(claude_tokens, dict) else {}
    else:
        return None
    micros = to_micros(cost)
    if micros is None:
        return None
    return Usage(micros, _count(tokens.get("input_tokens")), _count(tokens.get("output_tokens")))


def parse_done(obj: dict[str, Any]) -> str | None:
    """The reason in a `{"fleet_done": "why"}` object (`true` means "done")."""
    value = obj.get("fleet_done")
    if value is True:
        return "done"
    if isinstance(value, str) and value.strip():
        return value.strip()[:MAX_DONE_REASON]
    return None


def parse_line(line: bytes) -> tuple[Usage | None, str | None]:
    """The usage and done reason one output line carries; (None, None) for anything else."""
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None, None
    if not isinstance(obj, dict):
        return None, None
    return parse_usage(obj), parse_done(obj)


def _worth_parsing(line: bytes) -> bool:
    return line.lstrip(b" \t").startswith(b"{") and any(marker in line for marker in _MARKERS)


class LineScanner:
    """Cuts a byte stream into lines and keeps those that may carry an object for Fleet.

    Memory stays under `max_line_bytes` whatever the input: a longer line is dropped unparsed.
    """

    def __init__(self, max_line_bytes: int = DEFAULT_MAX_LINE) -> None:
        self._max = max_line_bytes
        self._partial = bytearray()
        self._skipping = False  # inside a line already over the cap: drop up to its newline

    def feed(self, chunk: bytes) -> list[bytes]:
        """The complete candidate lines this chunk finishes."""
        first = chunk.find(b"\n")
        if first < 0:
            self._hold(chunk)
            return []
        self._hold(chunk[:first])
        lines = [] if self._skipping else [bytes(self._partial)]
        self._partial.clear()
        self._skipping = False
        last = chunk.rfind(b"\n")
        # A regex scan stays in C: `yes` must not cost a Python loop per line.
        lines.extend(_OBJECT_LINE.findall(chunk, first + 1, last))
        self._hold(chunk[last + 1:])
        return [line for line in lines if len(line) <= self._max and _worth_parsing(line)]

    def finish(self) -> list[bytes]:
        """The last line, when the output ended without a newline."""
        line = b"" if self._skipping else bytes(self._partial)
        self._partial.clear()
        return [line] if line and _worth_parsing(line) else []

    def _hold(self, data: bytes) -> None:
        if self._skipping or not data:
            return
        if len(self._partial) + len(data) > self._max:
            self._partial.clear()
            self._skipping = True
        else:
            self._partial += data
