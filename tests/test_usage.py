"""fleet.usage, pure: each usage format's parser against good, malformed and hostile lines."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from fleet.config import PriceTable
from fleet.usage import (
    MAX_LINE_TOKENS,
    NO_USAGE,
    ClaudeStreamLines,
    JsonTokenLines,
    LineScanner,
    Tokens,
    Usage,
    make_parser,
    parse_line,
    to_micros,
)

DATA = Path(__file__).parent / "data"
SONNET = "claude-sonnet-4-5-20250929"
OPUS = "claude-opus-4-1-20250805"
PRICES = {
    SONNET: PriceTable(input_per_mtok=3.0, output_per_mtok=15.0, cache_write_per_mtok=3.75, cache_read_per_mtok=0.30),
    OPUS: PriceTable(input_per_mtok=15.0, output_per_mtok=75.0, cache_write_per_mtok=18.75, cache_read_per_mtok=1.50),
}
SESSION = "5b0f7c3e-8a51-4d2e-9a7e-2f64c1b8d903"


def micros(price: PriceTable, tokens_in: int = 0, out: int = 0, write: int = 0, read: int = 0) -> int:
    """The expected cost, worked out independently: dollars per million tokens, rounded up to a micro-dollar."""
    dollars = (tokens_in * price.input_per_mtok + out * price.output_per_mtok + write * price.cache_write_per_mtok
               + read * price.cache_read_per_mtok) / 1_000_000
    return math.ceil(round(dollars * 1_000_000, 6))


def line(obj: Any) -> bytes:
    """One compact JSON line, as the CLIs print them."""
    return json.dumps(obj, separators=(",", ":")).encode()


def turn(usage: Any, model: Any = SONNET, message_id: str | None = "msg_01", session: str = SESSION) -> bytes:
    """A Claude Code stream-json assistant line."""
    message: dict[str, Any] = {"type": "message", "role": "assistant", "model": model,
                               "content": [{"type": "text", "text": "ok"}], "usage": usage}
    if message_id is not None:
        message["id"] = message_id
    return line({"type": "assistant", "message": message, "parent_tool_use_id": None, "session_id": session})


def counts(tokens_in: Any = 4, out: Any = 118, write: Any = 14217, read: Any = 0) -> dict[str, Any]:
    """Claude's usage object."""
    return {"input_tokens": tokens_in, "cache_creation_input_tokens": write, "cache_read_input_tokens": read,
            "output_tokens": out, "service_tier": "standard"}


def result(total: Any, session: str = SESSION, usage: Any = None) -> bytes:
    """Claude Code's final result line."""
    return line({"type": "result", "subtype": "success", "is_error": False, "result": "done", "session_id": session,
                 "total_cost_usd": total, "usage": usage if usage is not None else counts()})


def replay(parser: Any, path: Path) -> tuple[int, list[int]]:
    """Feed a transcript through the scanner and a parser: (final cost, running cost after each usage line)."""
    scanner, running, total = LineScanner(), [], 0
    lines = scanner.feed(path.read_bytes()) + scanner.finish()
    for one in lines:
        usage, _ = parser(one)
        if usage is not None:
            total += usage.cost_micros
            running.append(total)
    settled = parser.final() if hasattr(parser, "final") else None  # as fleet.process does at the output's end
    if settled is not None:
        total += settled.cost_micros
        running.append(total)
    return total, running


# ---------------------------------------------------------------- prices


def test_tokens_cost_is_rounded_up_to_a_micro_dollar() -> None:
    price = PRICES[SONNET]
    assert Tokens(input=1).cost_micros(price) == 3  # $3 per million tokens: 3 micro-dollars per token
    assert Tokens(cache_read=1).cost_micros(price) == 1  # 0.3 rounds up: never counted as less
    assert Tokens(cache_read=10).cost_micros(price) == 3  # not 4 for a float's 3.0000000000000004
    assert Tokens(4, 118, 14217, 0).cost_micros(price) == micros(price, 4, 118, 14217) == 55_096
    assert Tokens(MAX_LINE_TOKENS, MAX_LINE_TOKENS, MAX_LINE_TOKENS, MAX_LINE_TOKENS).cost_micros(price) == \
        22_050_000_000  # the largest believable line stays an exact integer


def test_tokens_beyond_and_most_never_go_negative() -> None:
    first, later = Tokens(5, 10, 100, 0), Tokens(5, 40, 90, 7)
    assert later.beyond(first) == Tokens(0, 30, 0, 7)
    assert later.most(first) == Tokens(5, 40, 100, 7)


# ---------------------------------------------------------------- claude-stream-json


def test_recorded_transcript_ends_at_its_reported_total() -> None:
    """Ten turns with cache writes and reads: priced as they come, then the result line's total stands."""
    transcript = DATA / "claude-stream-fix-test.jsonl"
    total_line = json.loads(transcript.read_text().splitlines()[-1])
    parser = make_parser("claude-stream-json", PRICES)
    final, running = replay(parser, transcript)
    assert parser.problem is None
    assert final == to_micros(total_line["total_cost_usd"]) == 161_587
    # The turns alone: what Anthropic's prices make of the session's own tokens (Claude Code's
    # housekeeping calls to a small model are only in the total).
    tokens = total_line["usage"]
    assert running[-2] == 160_376
    assert abs(running[-2] - micros(PRICES[SONNET], tokens["input_tokens"], tokens["output_tokens"],
                                    tokens["cache_creation_input_tokens"], tokens["cache_read_input_tokens"])) <= 10
    assert running == sorted(running)  # it only grows while the agent runs


def test_fleet_format_sees_a_claude_run_only_at_its_end() -> None:
    """Why the token formats exist: read as Fleet's own format, a claude run reports nothing until it ends."""
    _, running = replay(make_parser("fleet", {}), DATA / "claude-stream-fix-test.jsonl")
    assert running == [161_587]


def test_reported_total_below_the_running_sum_corrects_it_down() -> None:
    """Priced with dearer cache writes than the session used, the turns add up to more than the bill."""
    dear = {OPUS: PRICES[OPUS].model_copy(update={"cache_write_per_mtok": 30.0})}
    transcript = DATA / "claude-stream-retry-fix.jsonl"
    parser = make_parser("claude-stream-json", dear)
    final, running = replay(parser, transcript)
    assert max(running) == 728_487 and final == 514_028
    assert final == to_micros(json.loads(transcript.read_text().splitlines()[-1])["total_cost_usd"])


def test_turn_is_priced_by_its_model() -> None:
    parser = ClaudeStreamLines(PRICES)
    assert parser(turn(counts(), model=OPUS, message_id="a")) == \
        (Usage(micros(PRICES[OPUS], 4, 118, 14217), 4, 118), None)
    assert parser(turn(counts(), message_id="b"))[0] == Usage(55_096, 4, 118)
    assert parser.problem is None


def test_message_split_over_lines_is_counted_once() -> None:
    """Claude Code prints one line per content block, each with the message's id and usage."""
    parser = ClaudeStreamLines(PRICES)
    assert parser(turn(counts()))[0] == Usage(55_096, 4, 118)
    assert parser(turn(counts()))[0] == Usage(0, 0, 0)
    # A later line of the same message with more output: only the difference.
    assert parser(turn(counts(out=150)))[0] == Usage(32 * 15, 0, 32)
    assert parser(turn(counts(out=120)))[0] == Usage(0, 0, 0)  # fewer than counted: nothing back
    assert parser(turn(counts(), message_id="msg_02"))[0] == Usage(55_096, 4, 118)  # a new message
    assert parser(turn(counts(), message_id=None))[0] == Usage(55_096, 4, 118)  # no id: each line counts


def test_result_replaces_its_sessions_sum_up_or_down() -> None:
    """Down only once the output has ended with it (see the next test): up at once."""
    parser = ClaudeStreamLines(PRICES)
    parser(turn(counts(), message_id="a"))
    parser(turn(counts(), message_id="b"))  # 110_192 so far
    assert parser(result(0.1))[0] == Usage(0, 0, 0)
    assert parser.final() == Usage(100_000 - 110_192, 4 - 8, 118 - 236)
    assert parser.final() is None  # settled once
    # The next session starts from nothing: its total is its own, not a correction of the first.
    parser(turn(counts(), message_id="c", session="s2"))
    assert parser(result(0.2, session="s2"))[0] == Usage(200_000 - 55_096, 0, 0)
    assert parser(result(0.01, session="never-seen"))[0] == Usage(10_000, 4, 118)
    assert parser.problem is None


def test_sessions_interleaved_are_settled_apart() -> None:
    parser = ClaudeStreamLines(PRICES)
    parser(turn(counts(), message_id="a", session="one"))
    parser(turn(counts(), model=OPUS, message_id="b", session="two"))
    assert parser(result(0.06, session="one"))[0].cost_micros == 60_000 - 55_096
    assert parser(result(0.3, session="two"))[0].cost_micros == 300_000 - micros(PRICES[OPUS], 4, 118, 14217)


@pytest.mark.parametrize("total", [-0.01, float("nan"), float("inf"), 1e7, True, "0.5", None, [1]],
                         ids=["negative", "nan", "inf", "huge", "bool", "string", "null", "list"])
def test_result_with_an_implausible_total_is_a_problem_never_zero(total: Any) -> None:
    parser = ClaudeStreamLines(PRICES)
    parser(turn(counts()))
    assert parser(result(total))[0] == NO_USAGE  # the running sum stands, and the agent is stopped
    assert parser.problem is not None and "total_cost_usd" in parser.problem


def test_result_without_a_total_changes_nothing() -> None:
    parser = ClaudeStreamLines(PRICES)
    assert parser(line({"type": "result", "subtype": "error_during_execution", "session_id": SESSION})) == \
        (None, None)
    assert parser.problem is None


def test_result_with_bad_token_counts_still_takes_its_total() -> None:
    parser = ClaudeStreamLines(PRICES)
    parser(turn(counts()))
    assert parser(result(0.06, usage={"input_tokens": -5}))[0] == Usage(60_000 - 55_096, 0, 0)
    assert parser.problem is None  # its tokens are informational; the dollars are what counts


def test_unpriced_model_is_a_problem_never_zero() -> None:
    parser = ClaudeStreamLines({OPUS: PRICES[OPUS]})
    assert parser(turn(counts())) == (NO_USAGE, None)
    assert parser.problem is not None
    assert SONNET in parser.problem and f'[prices."{SONNET}"]' in parser.problem
    parser(turn(counts(), model="claude-other", message_id="x"))
    assert SONNET in parser.problem  # the first problem is the one reported


def test_model_name_in_a_problem_is_cut_short() -> None:
    parser = ClaudeStreamLines(PRICES)
    parser(turn(counts(), model="m" * 10_000))
    assert parser.problem is not None and len(parser.problem) < 400


@pytest.mark.parametrize("model", [None, "", 3, ["claude"], {"name": SONNET}])
def test_turn_without_a_model_name_is_a_problem(model: Any) -> None:
    parser = ClaudeStreamLines(PRICES)
    assert parser(turn(counts(), model=model))[0] == NO_USAGE
    assert parser.problem is not None and "no model" in parser.problem


def test_zero_token_turn_needs_no_price() -> None:
    """Claude Code's own messages (model "<synthetic>") report no tokens: nothing to price, no problem."""
    parser = ClaudeStreamLines(PRICES)
    assert parser(turn(counts(0, 0, 0, 0), model="<synthetic>"))[0] == Usage(0, 0, 0)
    assert parser.problem is None


BAD_COUNTS = [
    ("negative", counts(tokens_in=-1), "input_tokens is out of range"),
    ("float", counts(out=1.5), "output_tokens is not a whole number"),
    ("integral-float", counts(out=12.0), "output_tokens is not a whole number"),
    ("bool", counts(tokens_in=True), "input_tokens is not a whole number"),
    ("string", counts(read="5"), "cache_read_input_tokens is not a whole number"),
    ("huge", counts(write=MAX_LINE_TOKENS + 1), "cache_creation_input_tokens is out of range"),
    ("enormous", counts(out=10**400), "output_tokens is out of range"),
    ("missing-input", {"output_tokens": 5}, "input_tokens is missing"),
    ("missing-output", {"input_tokens": 5}, "output_tokens is missing"),
    ("null-input", counts(tokens_in=None), "input_tokens is missing"),
    ("empty", {}, "input_tokens is missing"),
    ("not-an-object", 7, "usage is not an object"),
    ("list", [1, 2], "usage is not an object"),
]


@pytest.mark.parametrize(("usage", "why"), [case[1:] for case in BAD_COUNTS], ids=[case[0] for case in BAD_COUNTS])
def test_unbelievable_counts_are_a_problem_never_zero(usage: Any, why: str) -> None:
    parser = ClaudeStreamLines(PRICES)
    assert parser(turn(usage))[0] == NO_USAGE
    assert parser.problem is not None and parser.problem.startswith(f"unreadable usage line: {why}")


def test_nan_and_infinite_counts_are_a_problem() -> None:
    """Python's json reads NaN and Infinity: they are floats, never counts."""
    for text in (b"NaN", b"Infinity", b"-Infinity"):
        parser = ClaudeStreamLines(PRICES)
        raw = turn(counts()).replace(b'"output_tokens":118', b'"output_tokens":' + text)
        assert parser(raw)[0] == NO_USAGE and parser.problem == "unreadable usage line: output_tokens is not a " \
                                                                 "whole number"


def test_cache_counts_may_be_absent_or_null() -> None:
    parser = ClaudeStreamLines(PRICES)
    assert parser(turn({"input_tokens": 10, "output_tokens": 2}, message_id="a"))[0] == Usage(60, 10, 2)
    assert parser(turn(counts(10, 2, None, None), message_id="b"))[0] == Usage(60, 10, 2)
    assert parser.problem is None


@pytest.mark.parametrize("raw", [
    b"",
    b"not json at all",
    b'{"type":"assistant","message":{"model":"x","usage":',  # cut off
    b'[{"type":"assistant"}]',
    b'"just a string"',
    b'{"type":"assistant","message":{"usage":{"input_tokens":1}}} \xff\xfe',  # not UTF-8
    b'{"a":' * 100_000 + b"1" + b"}" * 100_000,  # nested past the recursion limit
    b'{"type":"assistant"}',
    b'{"type":"assistant","message":"text"}',
    b'{"type":"assistant","message":{"model":"x","content":[]}}',  # no usage at all
    b'{"type":"user","message":{"role":"user","usage":{"input_tokens":-1}}}',
    b'{"type":"system","subtype":"init","model":"claude-sonnet-4-5-20250929"}',
    b'{"fleet_usage":{"cost_usd":5}}',  # Fleet's own line is not this format
], ids=["empty", "text", "truncated", "array", "string", "bad-utf8", "deep", "no-message", "message-string",
        "no-usage", "user-line", "init", "fleet-line"])
def test_lines_that_are_not_turns_are_ignored(raw: bytes) -> None:
    parser = ClaudeStreamLines(PRICES)
    assert parser(raw) == (None, None)
    assert parser.problem is None


def test_done_is_read_in_the_token_formats() -> None:
    for usage_format in ("claude-stream-json", "json-tokens"):
        assert make_parser(usage_format, PRICES)(b'{"fleet_done": "converged"}') == (None, "converged")


def test_many_sessions_and_messages_stay_bounded() -> None:
    parser = ClaudeStreamLines(PRICES)
    for i in range(5000):
        parser(turn({"input_tokens": 1, "output_tokens": 0}, message_id=f"m{i}", session=f"s{i}"))
    assert len(parser._messages) <= 256 and len(parser._sessions) <= 1024
    # A session past the bound is not summed apart: its total then counts whole, never less.
    assert parser(result(0.001, session="s4999"))[0].cost_micros == 1000
    assert parser(result(0.001, session="s0"))[0].cost_micros == 1000 - 3


# ---------------------------------------------------------------- json-tokens


def tokens_line(model: Any = SONNET, **usage: Any) -> bytes:
    """A json-tokens line (the shape of an Anthropic Messages API response's model and usage)."""
    return line({"id": "msg_x", "model": model, "usage": usage or counts(10, 20, 0, 0)})


def test_json_tokens_lines_each_add_their_cost() -> None:
    parser = make_parser("json-tokens", PRICES)
    assert parser(tokens_line(input_tokens=1000, output_tokens=200)) == (Usage(6000, 1000, 200), None)
    assert parser(tokens_line(input_tokens=1000, output_tokens=200)) == (Usage(6000, 1000, 200), None)  # no dedup
    assert parser(tokens_line(OPUS, **counts(4, 118, 14217, 500)))[0] == \
        Usage(micros(PRICES[OPUS], 4, 118, 14217, 500), 4, 118)
    assert parser(line({"model": SONNET, "usage": counts(1, 1, 0, 0), "other": [1, {"x": None}]}))[0] == \
        Usage(18, 1, 1)
    assert parser.problem is None


@pytest.mark.parametrize(("raw", "why"), [
    (tokens_line("gpt-5"), "model 'gpt-5' has no price"),
    (tokens_line(None), "names no model"),
    (line({"usage": counts()}), "names no model"),
    (tokens_line(input_tokens=5), "output_tokens is missing"),
    (tokens_line(input_tokens=-5, output_tokens=1), "input_tokens is out of range"),
    (tokens_line(input_tokens=5, output_tokens=False), "output_tokens is not a whole number"),
    (tokens_line(input_tokens=5, output_tokens=1, cache_read_input_tokens=2.5), "cache_read_input_tokens is not"),
    (tokens_line(input_tokens=10**12, output_tokens=1), "input_tokens is out of range"),
], ids=["unpriced", "null-model", "no-model", "missing", "negative", "bool", "float", "huge"])
def test_json_tokens_problems(raw: bytes, why: str) -> None:
    parser = make_parser("json-tokens", PRICES)
    assert parser(raw)[0] == NO_USAGE
    assert parser.problem is not None and why in parser.problem


@pytest.mark.parametrize("raw", [
    b'{"usage": "see --help"}', b'{"model": "x"}', b'{"fleet_usage": {"cost_usd": 1}}',
    b'{"type": "result", "total_cost_usd": 1}', b"[]", b"{oops",
])
def test_json_tokens_ignores_lines_without_a_usage_object(raw: bytes) -> None:
    parser = make_parser("json-tokens", PRICES)
    assert parser(raw) == (None, None) and parser.problem is None


def test_json_tokens_zero_counts_need_no_price() -> None:
    parser = JsonTokenLines({})
    assert parser(tokens_line("local-model", input_tokens=0, output_tokens=0))[0] == Usage(0, 0, 0)
    assert parser.problem is None


# ---------------------------------------------------------------- fleet, and the scanner


def test_fleet_format_is_parse_line_and_never_a_problem() -> None:
    parser = make_parser("fleet", {})
    for raw in (b'{"fleet_usage": {"cost_usd": 0.01}}', b'{"type": "result", "total_cost_usd": 0.5}',
                tokens_line(), turn(counts()), b"nonsense"):
        assert parser(raw) == parse_line(raw)
    assert parser.problem is None


def test_scanner_passes_token_lines_and_still_drops_other_output() -> None:
    scanner = LineScanner()
    stream = b"\n".join([
        b"plain text",
        b'{"type":"user","message":{"role":"user","content":[{"type":"tool_result","content":"big"}]}}',
        turn(counts()),
        tokens_line(),
        b'{"model": "x", "usage": {"input_tokens": 1, "output_tokens": 1}}',
        result(0.1),
        b'{"fleet_done": "why"}',
    ]) + b"\n"
    kept = scanner.feed(stream)
    assert len(kept) == 5 and not any(b"tool_result" in one for one in kept)


def test_a_result_line_the_session_went_on_after_lowers_nothing() -> None:
    """A result line is text on the agent's stdout, which anything it runs can write to (a tool writing into
    /proc/<claude>/fd/1). A forged `total_cost_usd: 0` mid-session replaced the turns' sum at once: the cap guard
    was blind for the rest of the session (3x the cap spent), and with the real result never printed (claude
    killed) the attempt was booked $0 (found by a security review). A total lower than the turns as priced is now
    held until the output ends, and dropped if a turn of its session came after it."""
    parser = ClaudeStreamLines(PRICES)
    parser(turn(counts(), message_id="a"))
    assert parser(result(0.0))[0] == Usage(0, 0, 0)  # the forged line: the running sum stands
    assert parser(turn(counts(), message_id="b"))[0] == Usage(55_096, 4, 118)  # the session goes on
    assert parser.final() is None  # and its end never came: the turns as priced are what it spent


@pytest.mark.parametrize("raw", [
    b'{"fleet_usage": {"cost_usd": "0.50"}}', b'{"fleet_usage": {"cost_usd": -1}}',
    b'{"fleet_usage": {"cost_usd": NaN}}', b'{"fleet_usage": {"cost_usd": 2e6}}', b'{"fleet_usage": "0.50"}',
    b'{"type": "result", "total_cost_usd": "0.50"}',
])
def test_fleet_format_a_cost_that_cannot_be_read_is_a_problem_never_zero(raw: bytes) -> None:
    """Money Fleet cannot read is not $0 in Fleet's own format either (a line too long to read already is not): a
    cost sent as a string (a Decimal serialised as text), negative or absurd was dropped, the run booked nothing,
    and an agent reporting that way spent past every cap with no one told."""
    parser = make_parser("fleet", {})
    assert parser(raw)[0] == NO_USAGE and parser.problem is not None and "cost" in parser.problem


def test_an_agent_whose_fleet_usage_lines_cannot_be_read_is_stopped_and_dead_lettered(services: Any) -> None:
    """End to end: the agent reports $0.50 a line as text, thirty times, under a $1 cap. It ran to its end as
    `succeeded` with nothing booked; now its usage is a problem: dead-lettered `usage`, booked at least its
    reservation, and the agent paused until fleet.toml or the agent is fixed."""
    from sqlmodel import select

    from fleet import db, dispatch, executor, ledger
    from fleet.config import load_fleet_config
    from fleet.models import DeadLetter, Run, RunStatus

    path = services.settings.config
    agent = path.parent / "stringly.py"
    agent.write_text("import time\nfor _ in range(30):\n"
                     "    print('{\"fleet_usage\": {\"cost_usd\": \"0.50\"}}', flush=True)\n    time.sleep(0.02)\n")
    path.write_text(path.read_text() + f"""
[agents.stringly]
command = ["python", "{agent}"]
est_cost_usd = 0.10
daily_cap_usd = 1.00
timeout_s = 30
""")
    services.config = load_fleet_config(path)
    queued = dispatch.dispatch(services, dispatch.DispatchRequest("stringly", "bad-money", actor="test"),
                               lambda *_: None)
    assert queued.status == "queued", queued
    outcome = executor.execute(services, queued.run_id or "", queued.fence or 0, lambda *_: None)
    with db.session(services.engine) as session:
        run = session.get(Run, queued.run_id)
        dead = session.exec(select(DeadLetter).where(DeadLetter.run_id == queued.run_id)).first()
    assert run is not None and run.status == RunStatus.DEAD, outcome
    assert dead is not None and dead.reason == "usage", dead
    assert run.cost_micros >= ledger.to_micros(0.10), run.cost_micros
