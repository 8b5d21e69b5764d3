"""fleet.process and fleet.launcher against real processes: exit codes, environment, usage, stops, caps."""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet import launcher, orphans, process
from fleet.config import PriceTable
from fleet.process import (
    EXIT_CANNOT_EXECUTE,
    EXIT_NOT_FOUND,
    LAUNCHER_PATH,
    Launch,
    LineScanner,
    ProcessResult,
    Tether,
    Usage,
    group_alive,
    parse_line,
    run_agent,
)
from fleet.usage import MAX_DONE_REASON, make_parser

ENV = {"PATH": os.defpath, "LANG": "C.UTF-8"}


@pytest.fixture(autouse=True, params=["compiled", "python"])
def launcher_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs under both launchers: the compiled one, and the Python one it falls back to."""
    if request.param == "python":
        monkeypatch.setattr(process, "compiled_launcher", lambda: None)
    else:
        assert process.compiled_launcher() is not None, "no C compiler here: the compiled launcher cannot be tested"
    return str(request.param)
SLEEPER = ["python", "-m", "fleet.examples.sleeper"]


def usage_line(cost: float, tokens_in: int = 0, tokens_out: int = 0) -> str:
    """A Fleet usage line."""
    return json.dumps({"fleet_usage": {"cost_usd": cost, "input_tokens": tokens_in, "output_tokens": tokens_out}})


def running(pid: int) -> bool:
    """Whether a process runs; a zombie nobody reaps (this container's init never does) is dead."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:][:1] not in (b"Z", b"X")


def wait_for(condition: Callable[[], bool], deadline_s: float = 10.0) -> bool:
    """Poll a condition until it holds or the deadline passes."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def read_pids(pidfile: Path) -> list[int]:
    """Every pid a sleeper wrote to its pidfile."""
    return [int(pid) for pid in pidfile.read_text().split()] if pidfile.exists() else []


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Callable[..., ProcessResult]]:
    """run_agent with a log in tmp_path and short defaults; kills any group a failed test left behind."""
    groups: list[int] = []

    def _run(argv: list[str], env: dict[str, str] | None = None, **kwargs: Any) -> ProcessResult:
        options: dict[str, Any] = {"log_path": tmp_path / "logs" / "run.log", "timeout_s": 30.0,
                                      "grace_s": 0.5, **kwargs}
        result = run_agent(argv, dict(ENV) if env is None else env, **options)
        if result.pgid:
            groups.append(result.pgid)
        return result

    yield _run
    for pgid in groups:
        if group_alive(pgid):
            os.killpg(pgid, signal.SIGKILL)


def python_agent(code: str) -> list[str]:
    """argv for a small Python agent."""
    return ["python", "-c", textwrap.dedent(code)]


# ---------------------------------------------------------------- parsing (pure)


@pytest.mark.parametrize(("line", "expected"), [
    (b'{"fleet_usage": {"cost_usd": 0.01, "input_tokens": 5, "output_tokens": 7}}', Usage(10000, 5, 7)),
    (b'{"type": "result", "total_cost_usd": 0.5, "usage": {"input_tokens": 3, "output_tokens": 4}}',
     Usage(500000, 3, 4)),
    (b'  {"fleet_usage": {"cost_usd": 2}}\r', Usage(2000000, 0, 0)),
    (b'{"fleet_usage": {"cost_usd": 0.1, "input_tokens": -1, "output_tokens": "x"}}', Usage(100000, 0, 0)),
    (b'{"fleet_usage": {"cost_usd": -1}}', None),
    (b'{"fleet_usage": {"cost_usd": NaN}}', None),
    (b'{"fleet_usage": {"cost_usd": Infinity}}', None),
    (b'{"fleet_usage": {"cost_usd": 1e308}}', None),
    (b'{"fleet_usage": {"cost_usd": "1"}}', None),
    (b'{"fleet_usage": {"cost_usd": true}}', None),
    (b'{"fleet_usage": 3}', None),
    (b'{"type": "result"}', None),
    (b'{"type": "assistant", "total_cost_usd": 1}', None),
    (b'{"fleet_usage": ', None),
    (b'[{"fleet_usage": {"cost_usd": 1}}]', None),
    (b'{"fleet_usage": {"cost_usd": 1}} \xff', None),
])
def test_parse_usage(line: bytes, expected: Usage | None) -> None:
    assert parse_line(line)[0] == expected


@pytest.mark.parametrize(("line", "expected"), [
    (b'{"fleet_done": "converged"}', "converged"),
    (b'{"fleet_done": true}', "done"),
    (b'{"fleet_done": ""}', None),
    (b'{"fleet_done": 3}', None),
    (b'{"fleet_done": "' + b"x" * 500 + b'"}', "x" * 200),
])
def test_parse_done(line: bytes, expected: str | None) -> None:
    assert parse_line(line)[1] == expected


def test_scanner_joins_lines_across_chunks_and_drops_overlong_ones() -> None:
    scanner = LineScanner(max_line_bytes=100)
    line = b'{"fleet_usage": {"cost_usd": 1}}'
    assert scanner.feed(line[:10]) == []
    assert scanner.feed(line[10:] + b"\nyes\n" + line + b"\n{") == [line, line]
    assert scanner.feed(b'"fleet_' + b"x" * 200) == []  # over the cap: dropped up to its newline
    assert scanner.feed(b"\n" + line) == []
    assert scanner.finish() == [line]


# ---------------------------------------------------------------- running


@pytest.mark.parametrize("code", [0, 1, 3, 75, 77, 78])
def test_exit_codes_pass_through(run: Callable[..., ProcessResult], code: int) -> None:
    result = run(["python", "-m", "fleet.examples.exit_with", str(code)])
    assert (result.exit_code, result.started, result.stop_reason) == (code, True, None)
    assert result.pid is not None and result.pgid == result.pid
    assert f"exiting {code}" in result.output_tail  # stderr is merged into the output


def test_death_by_signal_is_128_plus_signum(run: Callable[..., ProcessResult]) -> None:
    result = run(python_agent("import os, signal; os.kill(os.getpid(), signal.SIGKILL)"))
    assert result.exit_code == 128 + signal.SIGKILL


@pytest.mark.parametrize("extra", [{}, {"LC_CTYPE": "C"}, {"LC_ALL": "C"}])
def test_environment_is_exactly_the_one_given(run: Callable[..., ProcessResult],
                                              monkeypatch: pytest.MonkeyPatch, extra: dict[str, str]) -> None:
    monkeypatch.setenv("FLEET_TEST_CANARY", "leaked")
    env = {"PATH": os.defpath, "FLEET_RUN_ID": "r1", "WITH SPACE": "a b\nc", **extra}
    result = run(["env", "-0"], env)  # a C program: what it prints is exactly what execve gave it
    seen = dict(item.split("=", 1) for item in result.output_tail.split("\0") if item)
    assert seen == env


def test_bare_python_is_the_workers_interpreter(run: Callable[..., ProcessResult]) -> None:
    result = run(python_agent("import sys; print(sys.executable)"), {"PATH": "/nonexistent"})
    assert result.exit_code == 0
    assert result.output_tail.strip() == sys.executable


def test_program_is_found_on_the_agents_path(run: Callable[..., ProcessResult], tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "my-agent").write_text("#!/bin/sh\necho found me\n")
    (bin_dir / "my-agent").chmod(0o755)
    assert run(["my-agent"], {"PATH": str(bin_dir)}).output_tail == "found me\n"
    assert run(["my-agent"], {"PATH": os.defpath}).exit_code == EXIT_NOT_FOUND


def test_cwd(run: Callable[..., ProcessResult], tmp_path: Path) -> None:
    assert run(["pwd"], cwd=tmp_path).output_tail.strip() == str(tmp_path)


def test_usage_lines_are_summed_and_malformed_ones_ignored(run: Callable[..., ProcessResult]) -> None:
    code = f"""
        import json, sys
        print({usage_line(0.01, 100, 10)!r})
        print("{{not json")
        print('{{"fleet_usage": {{"cost_usd": -5}}}}')
        print('{{"fleet_usage": {{"cost_usd": NaN}}}}')
        print('{{"fleet_usage": {{"cost_usd": Infinity}}}}')
        print('{{"fleet_usage": {{"cost_usd": "7"}}}}')
        print('[1, 2]')
        print(json.dumps({{"type": "result", "total_cost_usd": 0.25, "usage": {{"input_tokens": 1000,
                                                                         "output_tokens": 200}}}}))
        print("some text", file=sys.stderr, flush=True)
        sys.stdout.write({usage_line(0.000001, 1, 2)!r})  # the last line, with no newline
        """
    result = run(python_agent(code))
    assert result.exit_code == 0
    assert (result.cost_micros, result.input_tokens, result.output_tokens) == (260001, 1101, 212)


def test_fleet_done_and_usage_from_the_echo_agent(run: Callable[..., ProcessResult]) -> None:
    result = run(["python", "-m", "fleet.examples.echo_agent", "--usage-lines", "3", "--done", "converged"],
                 {**ENV, "FLEET_RUN_ID": "run-1"})
    assert result.done_reason == "converged"
    assert (result.cost_micros, result.input_tokens, result.output_tokens) == (30000, 3600, 900)
    assert "run run-1" in result.output_tail


AGENT_KEY = "agent-key-0123456789abcdef"
# What must never reach a terminal, a page or a reason as it is: C0 and C1 controls (newline and tab included: a
# reason is one line), DEL, the Unicode bidi controls, and lone surrogates (no database or Redis can store them).
UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


@pytest.mark.parametrize("line", [
    "json.dumps({'fleet_done': 'converged; key=' + key})",  # the security review's: its own key, in the reason
    "'{\"fleet_done\": \"key=\\\\u0061' + key[1:] + '\"}'",  # a JSON escape: the raw line does not hold it
    "json.dumps({'fleet_done': 'x' * 190 + key})",  # cut at the bound: what is left of the key is masked too
], ids=["plain", "json-escaped", "cut-at-the-bound"])
def test_the_done_reason_is_masked_as_the_output_is(run: Callable[..., ProcessResult], line: str) -> None:
    """The reason becomes a pause reason: an event, `fleet status`, the page, a Redis flag, the database."""
    code = f"import json, os; key = os.environ['FLEET_AGENT_KEY']; print({line})"
    result = run(python_agent(code), {**ENV, "FLEET_AGENT_KEY": AGENT_KEY}, redact=(AGENT_KEY,))
    assert result.done_reason and AGENT_KEY[:8] not in result.done_reason, result.done_reason
    assert "[redacted by fleet]" in result.done_reason or len(result.done_reason) == MAX_DONE_REASON


def test_a_model_name_quoted_in_a_usage_problem_is_masked(run: Callable[..., ProcessResult]) -> None:
    """An unpriced model's name goes into the problem, then the run's error, the dead letter and the alert."""
    parser = make_parser("json-tokens", {})
    code = ("import json, os; print(json.dumps({'model': os.environ['FLEET_AGENT_KEY'], "
            "'usage': {'input_tokens': 1, 'output_tokens': 1}}))")
    run(python_agent(code), {**ENV, "FLEET_AGENT_KEY": AGENT_KEY}, redact=(AGENT_KEY,), parse=parser)
    assert parser.problem and "has no price" in parser.problem
    assert AGENT_KEY not in parser.problem and "[redacted by fleet]" in parser.problem, parser.problem


@pytest.mark.parametrize("reason", [
    "\x1b]8;;https://evil.example/\x1b\\click me\x1b]8;;\x1b\\ \x1b[2J\x1b[31mred",  # a link, a screen clear
    "invoice_\u202egnp.exe \u2066x\u2069",  # bidi: shown as "invoice_exe.png"
    "a\x00b \ud800 \x9b31m c\r\nd\te\x7f",  # NUL (PostgreSQL refuses it), a lone surrogate, C1 CSI
    "\x1b" * 300,  # escaped, it would be four times the bound
])
def test_the_done_reason_is_one_bounded_line_of_visible_characters(run: Callable[..., ProcessResult],
                                                                   reason: str) -> None:
    result = run(python_agent(f"import json; print(json.dumps({{'fleet_done': {reason!r}}}))"))
    assert result.done_reason is not None
    assert not UNSAFE.search(result.done_reason), ascii(result.done_reason)
    assert "\\x1b" in result.done_reason or "\\u202e" in result.done_reason or "\\x00" in result.done_reason
    assert len(result.done_reason) <= MAX_DONE_REASON


def test_log_file_is_private_and_holds_the_output(run: Callable[..., ProcessResult], tmp_path: Path) -> None:
    log_path = tmp_path / "deep" / "runs" / "r.log"
    result = run(python_agent("import sys; print('out', flush=True); print('err', file=sys.stderr)"), log_path=log_path)
    assert log_path.stat().st_mode & 0o777 == 0o600
    assert log_path.read_bytes() == b"out\nerr\n"
    assert result.log_bytes == 8


def test_append_log_keeps_what_an_earlier_run_wrote(run: Callable[..., ProcessResult], tmp_path: Path) -> None:
    log_path = tmp_path / "r.log"
    run(["echo", "poll"], log_path=log_path)
    second = run(["echo", "command"], log_path=log_path, append_log=True)
    assert log_path.read_text() == "poll\ncommand\n" and second.log_bytes == 8
    run(["echo", "fresh"], log_path=log_path)
    assert log_path.read_text() == "fresh\n"


# ---------------------------------------------------------------- stopping


def test_timeout_kills_the_whole_group_even_what_ignores_sigterm(run: Callable[..., ProcessResult],
                                                                 tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    started = time.monotonic()
    result = run([*SLEEPER, "60", "--ignore-term", "--child", "--pidfile", str(pidfile)],
                 timeout_s=2.0, grace_s=0.3)
    elapsed = time.monotonic() - started
    pids = read_pids(pidfile)
    assert result.stop_reason == "timeout"
    assert result.exit_code == 128 + signal.SIGKILL  # SIGTERM was ignored: the grace ended in SIGKILL
    assert len(pids) == 2 and result.pid not in pids  # the launcher leads the group, the agent is its child
    assert not any(running(pid) for pid in pids)
    assert result.pgid is not None and not group_alive(result.pgid)
    assert 2.3 <= elapsed < 4.0


def test_watch_reason_stops_promptly(run: Callable[..., ProcessResult]) -> None:
    stopped_at: list[float] = []
    costs: list[int] = []

    def watch(cost_micros: int) -> str | None:
        costs.append(cost_micros)
        stopped_at.append(time.monotonic())
        return "killed"

    result = run([*SLEEPER, "60"], watch=watch, watch_interval_s=0.1, grace_s=0.5)
    returned_at = time.monotonic()
    assert (result.stop_reason, result.exit_code) == ("killed", 128 + signal.SIGTERM)
    assert len(costs) == 1 and returned_at - stopped_at[0] < 1.0


def test_a_stop_escalates_to_sigkill_after_the_grace(run: Callable[..., ProcessResult], tmp_path: Path) -> None:
    calls: list[float] = []

    pidfile = tmp_path / "pids"

    def watch(_cost: int) -> str | None:
        calls.append(time.monotonic())
        return "killed" if read_pids(pidfile) else None  # the sleeper now ignores SIGTERM

    result = run([*SLEEPER, "60", "--ignore-term", "--pidfile", str(pidfile)], watch=watch,
                 watch_interval_s=0.1, grace_s=0.3)
    took = time.monotonic() - calls[-1]
    assert (result.stop_reason, result.exit_code) == ("killed", 128 + signal.SIGKILL)
    assert 0.3 <= took < 1.3


def test_on_usage_reason_stops_it(run: Callable[..., ProcessResult]) -> None:
    totals: list[int] = []

    def on_usage(cost_micros: int) -> str | None:
        totals.append(cost_micros)
        return "over_cap" if cost_micros >= 30000 else None

    result = run(["python", "-m", "fleet.examples.echo_agent", "--usage-lines", "200", "--sleep", "0.05"],
                 on_usage=on_usage)
    assert result.stop_reason == "over_cap"
    assert totals[:3] == [10000, 20000, 30000]
    assert 30000 <= result.cost_micros < 200 * 10000


def test_usage_is_read_in_the_agents_format(run: Callable[..., ProcessResult]) -> None:
    """A json-tokens agent: each line priced as it arrives; other output, and Fleet's own lines, ignored."""
    price = PriceTable(input_per_mtok=3.0, output_per_mtok=15.0, cache_write_per_mtok=3.75, cache_read_per_mtok=0.3)
    totals: list[int] = []

    def on_usage(cost_micros: int) -> str | None:
        totals.append(cost_micros)
        return None

    code = """
        import json
        print("thinking...", flush=True)
        print(json.dumps({"fleet_usage": {"cost_usd": 5}}), flush=True)
        for out in (100, 200):
            print(json.dumps({"model": "m", "usage": {"input_tokens": 1000, "output_tokens": out}}), flush=True)
        """
    result = run(python_agent(code), on_usage=on_usage, parse=make_parser("json-tokens", {"m": price}))
    assert totals == [4500, 4500 + 6000]
    assert (result.cost_micros, result.input_tokens, result.output_tokens) == (10500, 2000, 300)


def test_a_raising_callback_still_kills_the_agent(run: Callable[..., ProcessResult], tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"

    def watch(_cost: int) -> str | None:
        if len(read_pids(pidfile)) == 2:
            raise RuntimeError("redis went away")
        return None

    with pytest.raises(RuntimeError):
        run([*SLEEPER, "60", "--ignore-term", "--child", "--pidfile", str(pidfile)], watch=watch)
    pids = read_pids(pidfile)
    assert pids and wait_for(lambda: not any(running(pid) for pid in pids), 5.0)


def test_what_the_leader_leaves_behind_is_killed(run: Callable[..., ProcessResult], tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    code = f"""
        import os, subprocess, sys, time
        subprocess.Popen([sys.executable, "-m", "fleet.examples.sleeper", "60", "--ignore-term",
                          "--pidfile", {str(pidfile)!r}])
        deadline = time.monotonic() + 20
        while not os.path.exists({str(pidfile)!r}) and time.monotonic() < deadline:
            time.sleep(0.01)  # exit only once the orphan ignores SIGTERM
        """  # the orphan inherits the pipe, so EOF never comes while it lives
    started = time.monotonic()
    result = run(python_agent(code), grace_s=0.3)
    assert (result.exit_code, result.stop_reason) == (0, None)
    assert result.pgid is not None and not group_alive(result.pgid)
    assert read_pids(pidfile) and not any(running(pid) for pid in read_pids(pidfile))
    assert time.monotonic() - started < 10.0


# ---------------------------------------------------------------- output caps


def test_huge_output_keeps_log_and_memory_bounded_and_still_reads_the_last_usage(
        run: Callable[..., ProcessResult], tmp_path: Path) -> None:
    log_path = tmp_path / "big.log"
    code = f"""
        import sys
        line = b"y" * 1023 + b"\\n"
        for _ in range(50 * 1024):  # 50 MB
            sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()
        print({usage_line(1.5)!r})
        """
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = run(python_agent(code), log_path=log_path, max_log_bytes=2**20, tail_bytes=4096)
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert result.exit_code == 0 and result.cost_micros == 1_500_000
    assert result.log_bytes == log_path.stat().st_size <= 2**20 + 100
    assert b"log truncated" in log_path.read_bytes()[-100:]
    assert len(result.output_tail) <= 4096 and result.output_tail.endswith(usage_line(1.5) + "\n")
    assert peak_after - peak_before < 20 * 1024  # KiB: nothing close to the 50 MB went through memory


def test_endless_output_is_drained_and_capped(run: Callable[..., ProcessResult], tmp_path: Path) -> None:
    log_path = tmp_path / "yes.log"
    result = run(["yes"], log_path=log_path, timeout_s=1.5, max_log_bytes=2**20, tail_bytes=1024)
    assert (result.stop_reason, result.exit_code) == ("timeout", 128 + signal.SIGTERM)
    assert result.log_bytes == log_path.stat().st_size <= 2**20 + 100
    assert result.output_tail.endswith("y\ny\n") and len(result.output_tail) <= 1024


def test_very_long_lines(run: Callable[..., ProcessResult]) -> None:
    code = f"""
        import json, sys
        sys.stdout.write("x" * 5_000_000 + "\\n")  # 5 MB on one line
        sys.stdout.write(json.dumps({{"fleet_usage": {{"cost_usd": 9}}, "pad": "p" * 3_000_000}}) + "\\n")
        sys.stdout.write(json.dumps({{"fleet_usage": {{"cost_usd": 0.5}}, "pad": "p" * 300_000}}) + "\\n")
        print({usage_line(0.25)!r})
        """  # the 300 KB usage line is long, but under the cap
    result = run(python_agent(code), max_line_bytes=2**20)
    assert result.exit_code == 0
    assert result.cost_micros == 750_000  # the 3 MB usage line is over the line cap: dropped, unparsed


# ---------------------------------------------------------------- failures to start


def test_missing_executable(run: Callable[..., ProcessResult], tmp_path: Path) -> None:
    log_path = tmp_path / "missing.log"
    result = run(["no-such-agent-program", "--x"], log_path=log_path)
    assert (result.started, result.exit_code, result.pid) == (False, EXIT_NOT_FOUND, None)
    assert "no-such-agent-program" in result.output_tail
    assert log_path.read_text() == result.output_tail
    assert run([str(tmp_path / "nope")]).exit_code == EXIT_NOT_FOUND
    assert run([]).exit_code == EXIT_NOT_FOUND


def test_not_executable(run: Callable[..., ProcessResult], tmp_path: Path) -> None:
    script = tmp_path / "agent.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    result = run([str(script)])
    assert (result.started, result.exit_code) == (False, EXIT_CANNOT_EXECUTE)
    assert run([str(tmp_path)]).exit_code == EXIT_CANNOT_EXECUTE


# ---------------------------------------------------------------- parent death


PARENT = """
import sys
from pathlib import Path
from typing import Any
from fleet import process
from fleet.process import Launch, Tether, run_agent
if sys.argv[2] == "python":
    process.compiled_launcher = lambda: None
sys.argv.pop(2)
tether = Tether(float(sys.argv[2])) if sys.argv[2] != "-" else None
run_agent(sys.argv[3:], {"PATH": "/usr/bin:/bin"}, log_path=Path(sys.argv[1]), timeout_s=120, grace_s=0.3,
          launch=Launch(tether=tether))
"""


def _silent_group(pidfile: Path) -> list[str]:
    # Silent, or a write to the orphaned pipe (SIGPIPE) would kill it and prove nothing; a child in the
    # group and both ignoring SIGTERM, so only the launcher's SIGKILL can end them.
    return python_agent(f"""
        import os, signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.fork()
        with open({str(pidfile)!r}, "a") as handle:
            handle.write(str(os.getpid()) + "\\n")
        time.sleep(60)
        """)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP])
def test_the_whole_group_dies_with_its_runner_or_when_the_tether_lapses(tmp_path: Path, how: int,
                                                                       launcher_kind: str) -> None:
    """The runner (a worker's pool process) is SIGKILLed (the tether's end-of-file) or SIGSTOPped (it cannot
    extend the tether): the launcher stops the agent and its child, though both ignore SIGTERM."""
    pidfile = tmp_path / "pids"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path / "p.log"), launcher_kind, "1.0",
                               *_silent_group(pidfile)], start_new_session=True)
    try:
        assert wait_for(lambda: len(read_pids(pidfile)) == 2, 15.0)
        pids = read_pids(pidfile)
        assert all(running(pid) for pid in pids)
        os.kill(parent.pid, how)
        assert wait_for(lambda: not any(running(pid) for pid in pids), 5.0)
    finally:
        parent.kill()
        parent.wait()
        for pid in read_pids(pidfile):
            if running(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_tether_that_is_extended_keeps_the_agent(run: Callable[..., ProcessResult]) -> None:
    tether = Tether(0.5)
    result = run([*SLEEPER, "1.5"], watch=lambda _cost: tether.extend(0.5), watch_interval_s=0.1,
                 launch=Launch(tether=tether))
    assert (result.exit_code, result.stop_reason) == (0, None)


def test_a_tether_that_lapses_stops_the_agent(run: Callable[..., ProcessResult]) -> None:
    started = time.monotonic()
    result = run([*SLEEPER, "30"], grace_s=0.3, launch=Launch(tether=Tether(0.5)))
    assert result.exit_code == 128 + signal.SIGTERM
    assert 0.5 <= time.monotonic() - started < 5.0
    assert "could not prove it still owns the run" in result.output_tail


def test_launcher_does_not_exec_when_its_parent_is_already_gone(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    not_my_parent = "1"
    proc = subprocess.run([sys.executable, "-I", "-S", str(LAUNCHER_PATH), f"parent={not_my_parent}",
                           f"lc={launcher.UNSET}", "--", "/usr/bin/touch", str(marker)],
                          capture_output=True, timeout=30)
    assert proc.returncode == launcher.EXIT_CANNOT_EXECUTE
    assert not marker.exists()


def test_the_agent_starts_with_no_signal_ignored(run: Callable[..., ProcessResult]) -> None:
    """The launcher ignores SIGTERM, SIGPIPE and more for itself; none of that may reach the agent (an
    ignored SIGPIPE would make `producer | head` spin instead of stop)."""
    result = run(["grep", "SigIgn", "/proc/self/status"], env={"PATH": "/usr/bin:/bin"})
    assert result.exit_code == 0, result.output_tail
    assert int(result.output_tail.split()[-1], 16) == 0, result.output_tail


# ---------------------------------------------------------------- escapes from the group

ESCAPER = """
import os, signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
if os.fork() == 0:
    os.setsid()  # its own session and group: no group signal reaches it
    if os.fork() == 0:
        time.sleep(3600)  # a grandchild, whose parent stays alive until killed
    open({pidfile!r}, "w").write(str(os.getpid()))
    while True:
        time.sleep(0.2)
print("agent up", flush=True)
time.sleep(3600)
"""
NOBODY_CREDS = "65534:65534:65534"


def marked(marker: bytes) -> list[int]:
    """Every live process whose environment holds `marker`."""
    found = []
    for name in os.listdir("/proc"):
        try:
            if name.isdigit() and marker in Path(f"/proc/{name}/environ").read_bytes() and running(int(name)):
                found.append(int(name))
        except OSError:
            continue
    return found


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/bin/python3"), reason="run_as needs root")
@pytest.mark.parametrize("creds", [None, NOBODY_CREDS], ids=["same-uid", "run_as-nobody"])
def test_a_setsid_child_of_an_agent_that_ignores_sigterm_is_gone_when_a_kill_returns(
        run: Callable[..., ProcessResult], creds: str | None) -> None:
    """The kill path (a watch reason): SIGTERM, the grace, then the kill. A group-wide SIGKILL took the
    launcher too, so the subreaper that was to kill what left the group (its own setsid) died first, and
    that process lived on under init after run_agent returned (security review)."""
    folder = Path(tempfile.mkdtemp(prefix="fleet-escape-", dir="/tmp"))
    folder.chmod(0o777)  # nobody writes its pidfile here
    marker = f"FLEET_ESCAPE_MARK={uuid.uuid4().hex}"
    env = {"PATH": "/usr/bin", marker.split("=")[0]: marker.split("=")[1]}
    started = time.monotonic()
    try:
        result = run(["/usr/bin/python3", "-I", "-S", "-c", ESCAPER.format(pidfile=str(folder / "pid"))], env,
                     grace_s=0.3, watch=lambda _c: "killed" if (folder / "pid").exists() else None,
                     launch=Launch(tether=None, creds=creds))
        assert result.stop_reason == "killed" and (folder / "pid").exists(), result.output_tail
        assert marked(marker.encode()) == [], "a process of the run outlived run_agent"
        assert time.monotonic() - started < 10
    finally:
        for pid in marked(marker.encode()):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(folder, ignore_errors=True)


def test_the_orphan_sweeps_kill_takes_what_left_the_group_too(tmp_path: Path) -> None:
    """fleet.orphans.kill SIGKILLed the launcher's group: the launcher first, so what had left the group (its
    own setsid) lived on under init. It asks the launcher, which kills its whole tree before it exits."""
    pidfile = tmp_path / "pid"
    marker = f"FLEET_ESCAPE_MARK={uuid.uuid4().hex}"
    env = {"PATH": "/usr/bin", marker.split("=")[0]: marker.split("=")[1]}
    tag = f"orphan-{uuid.uuid4().hex}:1"
    argv = process.launcher_argv(["/usr/bin/python3", "-I", "-S", "-c", ESCAPER.format(pidfile=str(pidfile))],
                                 env, Launch(tag=tag), 0.3)
    proc = subprocess.Popen(argv, env=env, start_new_session=True, stdout=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: pidfile.exists() and len(marked(marker.encode())) == 4, 15.0)
        found = [agent for agent in orphans.scan() if f"{agent.run_id}:{agent.fence}" == tag]
        assert [agent.pid for agent in found] == [proc.pid]
        assert orphans.kill(found[0])
        proc.wait(10)
        assert wait_for(lambda: not marked(marker.encode()), 1.0), "a process of the orphan outlived its kill"
    finally:
        for pid in marked(marker.encode()):
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_kill_requests_that_keep_coming_leave_the_launcher_reporting_the_agents_end() -> None:
    """The executor asks the launcher to kill by SIGUSR1 on every turn of its loop until the launcher exits. A
    request arriving while the Python launcher exits (its interpreter puts the default action back at
    shutdown) ended it by SIGUSR1 (138), in place of the agent's own end (137, killed): CI saw it."""
    argv = process.launcher_argv(["/bin/sleep", "30"], dict(ENV), process.Launch(), grace_s=5)
    launched = subprocess.Popen(argv, env=dict(ENV), start_new_session=True)
    children = Path(f"/proc/{launched.pid}/task/{launched.pid}/children")
    assert wait_for(lambda: bool(children.read_text().split()))  # its handler is set before it forks the agent
    while launched.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(launched.pid, signal.SIGUSR1)
        time.sleep(0.0002)
    assert launched.returncode == 128 + signal.SIGKILL
