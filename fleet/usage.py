"""Usage lines in an agent's output, in the format its agent declares (`usage_format`), found in a
byte stream without ever holding more than one capped line in memory.

- `fleet`: Fleet's own `{"fleet_usage": {"cost_usd": ...}}`, and Claude Code's final
  `{"type": "result", "total_cost_usd": ...}`; each line's dollars are added up.
- `claude-stream-json`: Claude Code's `--output-format stream-json --verbose`. Each `assistant`
  line's `message.usage` tokens are priced as they arrive (a message split over several lines
  repeats its id and usage: it is counted once); the final `result` line's `total_cost_usd` then
  replaces what that session's turns added up to, up or down.
- `json-tokens`: any JSON line `{"model": NAME, "usage": {"input_tokens": N, "output_tokens": M,
  "cache_creation_input_tokens": C, "cache_read_input_tokens": R}}` (the two cache counts may be
  left out), each priced and added up.

Tokens become dollars through the agent's price table (dollars per million tokens). A token line
that cannot be priced (a model with no price, a count that is not a plausible whole number) is
never counted as $0: the parser records a `problem`, and the executor stops the agent for it.
`{"fleet_done": "why"}` is read in every format.
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

MICROS_PER_USD = 1_000_000
MAX_DONE_REASON = 200
MAX_LINE_COST_USD = 1_000_000  # a usage line claiming more is garbage, not a bill
MAX_LINE_TOKENS = 10**9  # likewise: no single model call reads or writes a billion tokens
DEFAULT_MAX_LINE = 2**20  # Claude Code's result line carries the final answer: it can be long
# Lines that start with "{": the only ones that can carry a usage or done object.
_OBJECT_LINE = re.compile(rb"^[ \t]*\{[^\n]*", re.MULTILINE)
# Every format's usage line holds one of these (the token formats' lines a `"usage"` key).
_MARKERS = (b"fleet_", b"total_cost_usd", b'"usage"')
_MARKER_TAIL = max(len(marker) for marker in _MARKERS) - 1
_MAX_MESSAGES = 256  # message ids remembered to count a message split over several lines once
_MAX_SESSIONS = 1024  # sessions whose turns are summed apart until their result line
_MAX_NAME = 100  # of a model name quoted in a problem: the agent wrote it

UsageFormat = Literal["fleet", "claude-stream-json", "json-tokens"]
TOKEN_FORMATS: frozenset[str] = frozenset({"claude-stream-json", "json-tokens"})


@dataclass(frozen=True)
class Usage:
    """What one usage line adds to the run's spend; money as integer micro-dollars.

    A `claude-stream-json` result line's cost may be negative: its total corrects the running sum.
    """

    cost_micros: int
    input_tokens: int
    output_tokens: int


NO_USAGE = Usage(0, 0, 0)


class Price(Protocol):
    """One `[prices.MODEL]` table: dollars per million tokens of each kind."""

    @property
    def input_per_mtok(self) -> float: ...
    @property
    def output_per_mtok(self) -> float: ...
    @property
    def cache_write_per_mtok(self) -> float: ...
    @property
    def cache_read_per_mtok(self) -> float: ...


ParseLine = Callable[[bytes], "tuple[Usage | None, str | None]"]  # one output line -> (usage, done reason)


class LineParser(Protocol):
    """Turns one output line into (usage, done reason); `problem` says why a usage line could not be priced."""

    problem: str | None

    def __call__(self, line: bytes) -> tuple[Usage | None, str | None]: ...


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


def _object(line: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    return obj if isinstance(obj, dict) else None


def parse_line(line: bytes) -> tuple[Usage | None, str | None]:
    """The usage (`fleet` format) and done reason one output line carries; (None, None) for anything else."""
    obj = _object(line)
    if obj is None:
        return None, None
    return parse_usage(obj), parse_done(obj)


# ---------------------------------------------------------------- token formats


@dataclass(frozen=True)
class Tokens:
    """Token counts of one model call (or of the part of it not counted yet)."""

    input: int = 0
    output: int = 0
    cache_write: int = 0
    cache_read: int = 0

    def cost_micros(self, price: Price) -> int:
        """What these tokens cost, rounded up: dollars per million tokens are micro-dollars per token."""
        exact = (self.input * price.input_per_mtok + self.output * price.output_per_mtok
                 + self.cache_write * price.cache_write_per_mtok + self.cache_read * price.cache_read_per_mtok)
        return math.ceil(round(exact, 6))  # 10 x 0.3 is 3.0000000000000004 in floats: that is 3, not 4

    def beyond(self, counted: Tokens) -> Tokens:
        """What these counts add to those already counted (never less than nothing)."""
        return Tokens(max(0, self.input - counted.input), max(0, self.output - counted.output),
                      max(0, self.cache_write - counted.cache_write), max(0, self.cache_read - counted.cache_read))

    def most(self, other: Tokens) -> Tokens:
        """The larger of each count."""
        return Tokens(max(self.input, other.input), max(self.output, other.output),
                      max(self.cache_write, other.cache_write), max(self.cache_read, other.cache_read))

    def __add__(self, other: Tokens) -> Tokens:
        return Tokens(self.input + other.input, self.output + other.output, self.cache_write + other.cache_write,
                      self.cache_read + other.cache_read)


_FIELDS = (("input_tokens", True), ("output_tokens", True), ("cache_creation_input_tokens", False),
           ("cache_read_input_tokens", False))


def read_tokens(usage: object) -> Tokens | str:
    """The counts of a `usage` object (Anthropic's names), or why they are not believable."""
    if not isinstance(usage, dict):
        return "usage is not an object"
    counts = []
    for name, required in _FIELDS:
        value = usage.get(name)
        if value is None and not required:
            value = 0  # older Claude Code versions, and APIs without caching, leave them out
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{name} is {'missing' if value is None else 'not a whole number'}"
        if not 0 <= value <= MAX_LINE_TOKENS:
            return f"{name} is out of range (0 to {MAX_LINE_TOKENS:,})"
        counts.append(value)
    return Tokens(*counts)


class FleetLines:
    """`usage_format = "fleet"`: dollars as reported. Nothing to price, but a usage line whose dollars cannot be
    read (text, negative, not finite, past MAX_LINE_COST_USD) is a problem, never $0, as in the token formats."""

    def __init__(self) -> None:
        self.problem: str | None = None

    def __call__(self, line: bytes) -> tuple[Usage | None, str | None]:
        obj = _object(line)
        if obj is None:
            return None, None
        usage = parse_usage(obj)
        if usage is None and _claims_usage(obj):
            self.problem = self.problem or ("a usage line's cost is not a plausible amount of dollars (a number, "
                                            f"0 to {MAX_LINE_COST_USD:,})")
            return NO_USAGE, parse_done(obj)  # reported, so the executor sees the problem at once
        return usage, parse_done(obj)


def _claims_usage(obj: dict[str, Any]) -> bool:
    """Whether an object is a usage line of Fleet's own format (or Claude Code's result), readable or not."""
    return "fleet_usage" in obj or (obj.get("type") == "result" and "total_cost_usd" in obj)


class _TokenLines:
    """What both token formats share: pricing, and the first problem found."""

    def __init__(self, prices: Mapping[str, Price]) -> None:
        self.prices = dict(prices)
        self.problem: str | None = None

    def __call__(self, line: bytes) -> tuple[Usage | None, str | None]:
        obj = _object(line)
        if obj is None:
            return None, None
        return self.usage(obj), parse_done(obj)

    def usage(self, obj: dict[str, Any]) -> Usage | None:
        """What one object adds to the run's spend, if it is a usage line."""
        raise NotImplementedError

    def tokens(self, counts: object) -> Tokens | None:
        """A usage object's counts; None (and a problem recorded) when they are not believable."""
        tokens = read_tokens(counts)
        if isinstance(tokens, str):
            self._flag(f"unreadable usage line: {tokens}")
            return None
        return tokens

    def cost(self, model: object, tokens: Tokens) -> int | None:
        """What a step's tokens cost; None (and a problem recorded) when they cannot be priced."""
        if tokens == Tokens():
            return 0  # nothing to price (Claude Code's "<synthetic>" messages)
        if not isinstance(model, str) or not model:
            self._flag("a usage line names no model, so its tokens cannot be priced")
            return None
        price = self.prices.get(model)
        if price is None:
            name = model[:_MAX_NAME]
            self._flag(f"model {name!r} has no price for this agent: add it to the agent's models and a "
                       f"[prices.\"{name}\"] table")
            return None
        return tokens.cost_micros(price)

    def _flag(self, problem: str) -> None:
        self.problem = self.problem or problem


class JsonTokenLines(_TokenLines):
    """`usage_format = "json-tokens"`: each `{"model": ..., "usage": {...}}` line is one priced step."""

    def usage(self, obj: dict[str, Any]) -> Usage | None:
        """A line with a `usage` object is a step; other lines are output."""
        if not isinstance(obj.get("usage"), dict):
            return None
        tokens = self.tokens(obj["usage"])
        cost = None if tokens is None else self.cost(obj.get("model"), tokens)
        if tokens is None or cost is None:
            return NO_USAGE  # reported, so the executor sees the problem at once
        return Usage(cost, tokens.input, tokens.output)


class ClaudeStreamLines(_TokenLines):
    """`usage_format = "claude-stream-json"`: priced turns while it runs, the reported total at the end."""

    def __init__(self, prices: Mapping[str, Price]) -> None:
        super().__init__(prices)
        self._messages: OrderedDict[str, Tokens] = OrderedDict()  # message id -> tokens counted
        self._sessions: dict[str | None, tuple[int, Tokens]] = {}  # since the session's result line
        self._lower: dict[str | None, Usage] = {}  # a result's correction down, held until the output ends

    def usage(self, obj: dict[str, Any]) -> Usage | None:
        """An assistant turn, or the result line; anything else (init, tool results) is output."""
        kind = obj.get("type")
        if kind == "assistant":
            return self._turn(obj)
        if kind == "result" and "total_cost_usd" in obj:
            return self._total(obj)
        return None

    @staticmethod
    def _session(obj: dict[str, Any]) -> str | None:
        key = obj.get("session_id")
        return key if isinstance(key, str) else None

    def _turn(self, obj: dict[str, Any]) -> Usage | None:
        message = obj.get("message")
        if not isinstance(message, dict) or "usage" not in message:
            return None
        tokens = self.tokens(message["usage"])
        if tokens is None:
            return NO_USAGE
        message_id = message.get("id")
        if isinstance(message_id, str):
            # One message with several content blocks comes as several lines with the same id and
            # usage: count what a later line adds, never the same tokens twice.
            counted = self._messages.pop(message_id, None)
            self._messages[message_id] = tokens if counted is None else tokens.most(counted)
            if len(self._messages) > _MAX_MESSAGES:
                self._messages.popitem(last=False)
            tokens = tokens if counted is None else tokens.beyond(counted)
        cost = self.cost(message.get("model"), tokens)
        if cost is None:
            return NO_USAGE
        session = self._session(obj)
        self._lower.pop(session, None)  # the session went on after its result line: that was not its end
        # Past the bound a new session is not summed apart: its result's total then counts whole,
        # on top of its turns (too much, never too little).
        if session in self._sessions or len(self._sessions) < _MAX_SESSIONS:
            micros, summed = self._sessions.get(session, (0, Tokens()))
            self._sessions[session] = (micros + cost, summed + tokens)
        return Usage(cost, tokens.input, tokens.output)

    def _total(self, obj: dict[str, Any]) -> Usage:
        total = to_micros(obj["total_cost_usd"])
        if total is None:
            self._flag("the result line's total_cost_usd is not a plausible amount of dollars")
            return NO_USAGE
        session = self._session(obj)
        micros, summed = self._sessions.pop(session, (0, Tokens()))
        reported = read_tokens(obj.get("usage"))
        tokens = reported if isinstance(reported, Tokens) else summed
        correction = Usage(total - micros, tokens.input - summed.input, tokens.output - summed.output)
        if correction.cost_micros >= 0:
            return correction
        # Lower than its turns as priced: taken only once the output ends with no turn of the session after it.
        # Anything the agent runs can print such a line to its stdout; taken at once, a forged total of 0 blinded
        # the cap guard for the rest of the session (found by a security review).
        self._lower[session] = correction
        return Usage(0, 0, 0)

    def final(self) -> Usage | None:
        """At the end of the output: the corrections down of the sessions whose result line was their last word."""
        if not self._lower:
            return None
        lowered = list(self._lower.values())
        self._lower.clear()
        return Usage(sum(u.cost_micros for u in lowered), sum(u.input_tokens for u in lowered),
                     sum(u.output_tokens for u in lowered))


_PARSERS: dict[str, Callable[[Mapping[str, Price]], LineParser]] = {
    "fleet": lambda _prices: FleetLines(),
    "claude-stream-json": ClaudeStreamLines,
    "json-tokens": JsonTokenLines,
}


def make_parser(usage_format: str, prices: Mapping[str, Price]) -> LineParser:
    """A fresh parser for one agent process (the stream-json one keeps state): its format, its prices."""
    return _PARSERS[usage_format](prices)


def _worth_parsing(line: bytes) -> bool:
    return line.lstrip(b" \t").startswith(b"{") and any(marker in line for marker in _MARKERS)


class LineScanner:
    """Cuts a byte stream into lines and keeps those that may carry an object for Fleet.

    Memory stays under `max_line_bytes` whatever the input: a longer line is dropped unparsed, and
    counted in `overlong` when it looked like one Fleet should have read (an object line with a usage
    marker anywhere in it: its money would otherwise be counted as nothing; the runner turns the
    count into a usage problem).
    """

    def __init__(self, max_line_bytes: int = DEFAULT_MAX_LINE) -> None:
        self._max = self.max_line_bytes = max_line_bytes
        self._partial = bytearray()
        self._skipping = False  # inside a line already over the cap: drop up to its newline
        self._skip_object = False  # ... which began as an object
        self._skip_marked = False  # ... in which a marker was seen
        self._skip_tail = b""  # the last bytes seen of it, for a marker cut across two chunks
        self.overlong = 0  # dropped lines that may have carried usage

    def feed(self, chunk: bytes) -> list[bytes]:
        """The complete candidate lines this chunk finishes."""
        first = chunk.find(b"\n")
        if first < 0:
            self._hold(chunk)
            return []
        self._hold(chunk[:first])
        lines = [] if self._skipping else [bytes(self._partial)]
        self._end_skip()
        self._partial.clear()
        last = chunk.rfind(b"\n")
        # A regex scan stays in C: `yes` must not cost a Python loop per line.
        lines.extend(_OBJECT_LINE.findall(chunk, first + 1, last))
        self._hold(chunk[last + 1:])
        wanted = [line for line in lines if _worth_parsing(line)]
        self.overlong += sum(len(line) > self._max for line in wanted)
        return [line for line in wanted if len(line) <= self._max]

    def finish(self) -> list[bytes]:
        """The last line, when the output ended without a newline."""
        line = b"" if self._skipping else bytes(self._partial)
        self._end_skip()
        self._partial.clear()
        return [line] if line and _worth_parsing(line) else []

    def _hold(self, data: bytes) -> None:
        if not data:
            return
        if self._skipping:
            self._watch_skipped(data)
        elif len(self._partial) + len(data) > self._max:
            self._skipping = True
            self._skip_object = self._partial.lstrip(b" \t").startswith(b"{") or (
                not self._partial and data.lstrip(b" \t").startswith(b"{"))
            head, self._partial = bytes(self._partial), bytearray()
            self._skip_marked, self._skip_tail = False, b""
            self._watch_skipped(head)
            self._watch_skipped(data)
        else:
            self._partial += data

    def _watch_skipped(self, data: bytes) -> None:
        if self._skip_object and not self._skip_marked:
            window = self._skip_tail + data
            self._skip_marked = any(marker in window for marker in _MARKERS)
            self._skip_tail = window[-_MARKER_TAIL:]

    def _end_skip(self) -> None:
        if self._skipping and self._skip_object and self._skip_marked:
            self.overlong += 1
        self._skipping = self._skip_object = self._skip_marked = False
        self._skip_tail = b""
