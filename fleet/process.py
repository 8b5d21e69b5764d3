"""Run one agent process and watch it until it and everything it started are gone.

The agent gets argv (never a shell), exactly the environment it is given, its own session and
process group, and stdin from /dev/null. Its stdout and stderr, merged, stream to a capped log
file; lines carrying usage (in the agent's format: `parse`, see fleet/usage.py) or
`{"fleet_done": ...}` are parsed as they arrive. A timeout, or a reason returned by `watch` or
`on_usage`, stops the whole group: SIGTERM, `grace_s`, then SIGKILL.

Things a caller must know:
- A bare `python` or `python3` as argv[0] means this worker's own interpreter (`sys.executable`),
  so example agents run with the worker's venv even when it is not activated. Any other bare
  name is looked up on the agent's `env["PATH"]`, not the worker's.
- Every agent runs under `fleet.launcher`, which leads the group, outlives the agent and stops
  the whole group when the attempt ends for any reason: the agent exits (its leftovers go),
  this process dies (the tether pipe reaches end-of-file), or the `Tether` is not extended in
  time (the caller could not prove it still owns the run: stopped, wedged or cut off). So the
  group never outlives the attempt, even when the worker is SIGKILLed or SIGSTOPped.
- All callbacks run on the calling thread, so they may use the caller's clients and sessions.
- A process that leaves the group (its own `setsid`) escapes the group signals, not the launcher:
  it is the subreaper of all the agent's descendants and kills every one of them (by the parent
  chains in /proc) before it exits. So the kill never SIGKILLs the group itself, which would take
  the launcher first and leave such a process to init: after the grace it asks the launcher
  (SIGCONT, in case the agent stopped it, then SIGUSR1) and waits for its exit; only a launcher
  that has not exited `_LAUNCHER_KILL_S` later gets the group SIGKILL. What still escapes: an agent
  of the worker's own user (no `run_as`) can SIGKILL its launcher; its descendants that left the
  group then go to init, out of reach. A `run_as` agent cannot signal the launcher (another uid);
  only a cgroup would hold a same-uid agent fully.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fleet import launcher, redaction
from fleet.usage import DEFAULT_MAX_LINE, MAX_DONE_REASON, LineScanner, ParseLine, Usage, parse_line

LAUNCHER_PATH = Path(launcher.__file__)
# -I: ignore PYTHON* variables meant for the agent; -S: skip site, half the startup time.
LAUNCHER_FLAGS = ("-I", "-S")
PYTHON_NAMES = frozenset({"python", "python3"})
EXIT_CANNOT_EXECUTE = launcher.EXIT_CANNOT_EXECUTE
EXIT_NOT_FOUND = launcher.EXIT_NOT_FOUND

_CHUNK = 64 * 1024
_GROUP_POLL_S = 0.02  # how often to look for survivors once the leader is gone or SIGKILLed
_EXIT_POLL_S = 0.05  # how often to poll for the leader's exit when pidfd is unavailable
_DRAIN_S = 1.0  # the group is gone but something outside it still holds the pipe: stop waiting
_LAUNCHER_KILL_S = 2.0  # a launcher asked to kill that has not exited by then is wedged: SIGKILL the group
REDACTED = redaction.MASK.encode()
MAX_PROBLEM = 500  # characters of a usage problem (Fleet's words around a model name the agent chose)
_TRUNCATED = b"\n[fleet: log truncated at %d bytes; later output was read but not kept]\n"


@dataclass
class ProcessResult:
    """How an agent process ended, what it reported, and where its output went."""

    exit_code: int | None  # None if it never started; 128+signum for a death by signal
    stop_reason: str | None  # None, "timeout", or the reason a watcher returned
    cost_micros: int
    input_tokens: int
    output_tokens: int
    done_reason: str | None
    output_tail: str
    pid: int | None
    pgid: int | None
    log_bytes: int
    started: bool


def _no_objection() -> str | None:
    return None


def _no_start_hook(_pid: int, _pgid: int) -> None:
    return None


def _no_watch(_cost_micros: int) -> str | None:
    return None


# ---------------------------------------------------------------- output


class Output:
    """An agent's merged output: a log file that stops at a cap, and a rolling in-memory tail."""

    def __init__(self, log_path: Path, *, max_log_bytes: int, tail_bytes: int, append: bool = False,
                 redact: tuple[str, ...] = ()) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | (os.O_APPEND if append else os.O_TRUNC)
        self._fd = os.open(log_path, flags, 0o600)
        os.fchmod(self._fd, 0o600)  # an existing file keeps its old mode otherwise
        self._room = max_log_bytes
        self._max_log = max_log_bytes
        self._tail_bytes = tail_bytes
        self._tail = bytearray()
        self.log_bytes = 0
        self.truncated = False
        # Secrets never reach the log or the tail, even if the agent prints them. A secret may
        # straddle two reads, so an end that could be the start of one waits for the next read.
        self._redact = redact
        self._secrets = sorted({r.encode() for r in redact if r}, key=len, reverse=True)
        self._hold = max((len(r) for r in self._secrets), default=1) - 1
        self._starts = {secret[:1] for secret in self._secrets}
        self._pending = b""

    def write(self, data: bytes) -> None:
        """Redact, then log what fits under the cap (then one marker line) and keep the tail."""
        if not self._secrets:
            self._keep(data)
            return
        data = self._pending + data
        for secret in self._secrets:
            data = data.replace(secret, REDACTED)
        cut = len(data) - self._held(data)
        self._pending = data[cut:]
        self._keep(data[:cut])

    def masked(self, text: str, limit: int) -> str:
        """Text the agent wrote that Fleet repeats elsewhere (a done reason, a usage problem), masked with the
        same secrets as its output, on one visible line, at most `limit` characters (redaction.agent_text)."""
        return redaction.agent_text(text, self._redact, limit)

    def _held(self, data: bytes) -> int:
        """The length of the longest end of `data` that some secret begins with (0: none)."""
        for size in range(min(self._hold, len(data)), 0, -1):
            end = data[-size:]
            if end[:1] in self._starts and any(secret.startswith(end) for secret in self._secrets):
                return size
        return 0

    def flush(self) -> None:
        """Write out what was held back for redaction (the output has ended)."""
        data, self._pending = self._pending, b""
        self._keep(data)

    def _keep(self, data: bytes) -> None:
        if not data:
            return
        if not self.truncated:
            kept = data[:self._room]
            self._log(kept)
            self._room -= len(kept)
            if len(kept) < len(data):
                self.truncated = True
                self._log(_TRUNCATED % self._max_log)
        self._tail += data[-self._tail_bytes:] if self._tail_bytes else b""
        del self._tail[:max(0, len(self._tail) - self._tail_bytes)]

    def tail(self) -> str:
        """The last `tail_bytes` of the output as text."""
        return self._tail.decode("utf-8", errors="replace")

    def close(self) -> None:
        """Flush what redaction held back and close the log file."""
        try:
            self.flush()
        finally:
            os.close(self._fd)

    def _log(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            self.log_bytes += written
            view = view[written:]


# ---------------------------------------------------------------- process groups


def signal_group(pgid: int, signum: int) -> bool:
    """Send `signum` to a process group; False when the group is gone (or is not ours)."""
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def live_group_members(pgid: int) -> list[int]:
    """Pids of the group's processes that still run: zombies waiting for a reaper do not count."""
    with os.scandir("/proc") as entries:
        return [int(entry.name) for entry in entries
                if entry.name.isdigit() and _stat_is_live_member(entry.name, pgid)]


def _stat_is_live_member(pid: str, pgid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return False
    # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses, so split after the last ")".
    fields = stat[stat.rfind(b")") + 2:].split()
    return len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X")


def ask_launcher_to_kill(pid: int) -> None:
    """Ask a launcher to SIGKILL its whole tree now (what left the group too) and exit (fleet/launcher.py)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGCONT)  # a same-uid agent may have stopped it
        os.kill(pid, signal.SIGUSR1)


def kill_run(proc: subprocess.Popen[bytes], pgid: int) -> None:
    """Kill and reap everything of a run now: its launcher's whole tree, then whatever it left in the group."""
    if proc.returncode is None:
        ask_launcher_to_kill(proc.pid)
        try:
            proc.wait(_LAUNCHER_KILL_S)
        except subprocess.TimeoutExpired:
            signal_group(pgid, signal.SIGKILL)  # wedged: the group at least, as before
            proc.wait()
    if group_alive(pgid):
        signal_group(pgid, signal.SIGKILL)


def group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs."""
    if not signal_group(pgid, 0):
        return False
    # killpg also succeeds for zombies, and an init that never reaps orphans (some containers')
    # would keep them forever: look at what the members are doing.
    return not os.path.isdir("/proc") or bool(live_group_members(pgid))


# ---------------------------------------------------------------- spawning


def resolve_argv(argv: list[str], env: dict[str, str], cwd: Path | None = None) -> list[str]:
    """argv with argv[0] an absolute executable path; raises FileNotFoundError or PermissionError."""
    if not argv:
        raise FileNotFoundError(errno.ENOENT, "empty command")
    program = argv[0]
    if program in PYTHON_NAMES:
        path = sys.executable
    elif "/" in program:
        path = os.path.join(cwd or os.getcwd(), program)
    else:
        found = shutil.which(program, path=env.get("PATH", os.defpath))
        if found is None:
            raise FileNotFoundError(errno.ENOENT, "not found on the agent's PATH", program)
        path = found
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
    if os.path.isdir(path) or not os.access(path, os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), program)
    return [os.path.abspath(path), *argv[1:]]


class Tether:
    """The executor's end of the launcher's dead-man pipe: the group lives only while it is extended.

    `extend(s)` says "my ownership of this run is proven for `s` more seconds". If that time passes
    without another extension, or this process dies (the pipe's end-of-file), the launcher stops
    the whole group itself. Writes never block: a stopped launcher just reads the newest later.
    """

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self.read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self.write_fd, False)
        # extend() comes from another thread than close(): never write to an fd number closed (and reused).
        self._lock = threading.Lock()

    def extend(self, seconds: float) -> None:
        """Prove ownership for `seconds` from now."""
        with self._lock:
            if self.write_fd < 0:
                return
            # A full pipe means a stopped launcher (it reads the newest later); a broken one, a launcher gone.
            with contextlib.suppress(BlockingIOError, BrokenPipeError):
                os.write(self.write_fd, b"%d\n" % max(0, int(seconds * 1000)))

    def spawned(self) -> None:
        """The launcher holds the read end now: drop ours, so its end-of-file means our death."""
        if self.read_fd >= 0:
            os.close(self.read_fd)
            self.read_fd = -1

    def close(self) -> None:
        """The attempt is over: let go of the launcher."""
        self.spawned()
        with self._lock:
            if self.write_fd >= 0:
                os.close(self.write_fd)
                self.write_fd = -1


@dataclass(frozen=True)
class Launch:
    """How the launcher starts an agent: its tether, its user and folder, and which run attempt it is."""

    tether: Tether | None = None
    creds: str | None = None  # "uid:gid:groups" to switch to, or None to stay this user
    tag: str | None = None  # "run_id:fence", shown in `ps` and read by the orphan sweep
    workdir: Path | None = None  # entered by the agent after the switch (this user may not enter it)


LAUNCHER_SOURCE = LAUNCHER_PATH.with_suffix(".c")
_COMPILERS = ("cc", "gcc", "clang")


@functools.cache
def compiled_launcher() -> Path | None:
    """fleet/launcher.c, built on first use into this user's cache (keyed by the source's hash); None where
    no C compiler is found or the build fails: the Python launcher then does the same job, slower
    (~15-60 ms and a resident interpreter per agent, against ~2 ms)."""
    source = LAUNCHER_SOURCE.read_bytes()
    cache = Path.home() / ".cache" / "fleet"
    binary = cache / f"launcher-{hashlib.sha256(source).hexdigest()[:16]}"
    if _trusted_executable(binary):
        return binary
    compiler = next((found for name in _COMPILERS if (found := shutil.which(name))), None)
    if compiler is None:
        return None
    cache.mkdir(mode=0o700, parents=True, exist_ok=True)
    if cache.stat().st_uid != os.geteuid() or cache.stat().st_mode & 0o022:
        return None  # a cache others can write to could hand us their binary to run as root
    partial = cache / f".{binary.name}.{os.getpid()}"
    try:
        subprocess.run([compiler, "-O2", "-o", str(partial), str(LAUNCHER_SOURCE)], check=True, timeout=120,
                       capture_output=True, stdin=subprocess.DEVNULL)
        os.replace(partial, binary)  # atomic: a concurrent build by another worker process is harmless
    except (OSError, subprocess.SubprocessError):
        partial.unlink(missing_ok=True)
        return None
    return binary if _trusted_executable(binary) else None


def _trusted_executable(path: Path) -> bool:
    try:
        info = path.stat()
    except OSError:
        return False
    return info.st_uid == os.geteuid() and not info.st_mode & 0o022 and os.access(path, os.X_OK)


def launcher_argv(argv: list[str], env: dict[str, str], launch: Launch, grace_s: float) -> list[str]:
    """The command that runs `argv` (already resolved) under the launcher (compiled, or Python's)."""
    lc_ctype = "=" + env["LC_CTYPE"] if "LC_CTYPE" in env else launcher.UNSET
    tether = launch.tether
    options = [f"parent={os.getpid()}", f"lc={lc_ctype}", f"grace={grace_s:g}",
               f"tether={tether.read_fd if tether is not None else launcher.UNSET}",
               *([f"ttl={tether.ttl_s:.3f}"] if tether is not None else []),
               f"creds={launch.creds or launcher.UNSET}", f"cwd={launch.workdir or launcher.UNSET}",
               f"run={launch.tag or launcher.UNSET}"]
    compiled = compiled_launcher()
    program = [str(compiled)] if compiled is not None else [sys.executable, *LAUNCHER_FLAGS, str(LAUNCHER_PATH)]
    return [*program, *options, "--", *argv]


def _spawn(argv: list[str], env: dict[str, str], cwd: Path | None, launch: Launch,
           grace_s: float) -> subprocess.Popen[bytes]:
    tether = launch.tether
    try:
        return subprocess.Popen(
            launcher_argv(resolve_argv(argv, env, cwd), env, launch, grace_s), env=env, cwd=cwd,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            close_fds=True, pass_fds=(tether.read_fd,) if tether is not None else (), bufsize=0)
    finally:
        if tether is not None:
            tether.spawned()


def _not_started(exc: OSError, argv: list[str], output: Output) -> ProcessResult:
    what = exc.filename or (argv[0] if argv else "")
    output.write(f"fleet: cannot start agent {what!r}: {exc.strerror or exc}\n".encode())
    code = EXIT_NOT_FOUND if isinstance(exc, FileNotFoundError) else EXIT_CANNOT_EXECUTE
    return ProcessResult(exit_code=code, stop_reason=None, cost_micros=0, input_tokens=0, output_tokens=0,
                         done_reason=None, output_tail=output.tail(), pid=None, pgid=None,
                         log_bytes=output.log_bytes, started=False)


def _stopped_before_start(reason: str, output: Output) -> ProcessResult:
    output.write(f"fleet: not started: {reason}\n".encode())
    return ProcessResult(exit_code=None, stop_reason=reason, cost_micros=0, input_tokens=0, output_tokens=0,
                         done_reason=None, output_tail=output.tail(), pid=None, pgid=None,
                         log_bytes=output.log_bytes, started=False)


def _abandon(proc: subprocess.Popen[bytes]) -> None:
    # Could not even set up the watch (out of fds?): the agent must not run unwatched.
    kill_run(proc, proc.pid)
    if proc.stdout is not None:
        proc.stdout.close()


def exit_code(returncode: int) -> int:
    """A returncode as a shell reports it: 128+signum for a death by signal."""
    return 128 - returncode if returncode < 0 else returncode


# ---------------------------------------------------------------- the run


@dataclass(frozen=True)
class _Limits:
    timeout_s: float
    watch_interval_s: float
    grace_s: float


class _Run:
    """One running agent: its output, its clock, and the escalation that stops its group."""

    def __init__(self, proc: subprocess.Popen[bytes], output: Output, scanner: LineScanner, limits: _Limits,
                 watch: Callable[[int], str | None], on_usage: Callable[[int], str | None],
                 parse: ParseLine) -> None:
        self.proc, self.pgid, self.output, self.scanner = proc, proc.pid, output, scanner
        self.limits, self.watch, self.on_usage, self.parse = limits, watch, on_usage, parse
        now = time.monotonic()
        self.deadline = now + limits.timeout_s
        self.next_watch = now + limits.watch_interval_s
        self.stop_reason: str | None = None
        self.term_sent = False
        self.kill_at: float | None = None  # when the next SIGKILL is due
        self.wedged_at: float | None = None  # when a launcher asked to kill has had long enough to exit
        self.next_group_check = now
        self.group_gone_at: float | None = None
        self.eof = False
        self.cost_micros = self.input_tokens = self.output_tokens = 0
        self.done_reason: str | None = None
        self.selector = selectors.DefaultSelector()
        assert proc.stdout is not None
        self.out_fd = proc.stdout.fileno()
        os.set_blocking(self.out_fd, False)
        self.selector.register(self.out_fd, selectors.EVENT_READ)
        self.pidfd = self._open_pidfd()

    def _open_pidfd(self) -> int | None:
        # A pidfd wakes the loop the moment the leader exits, even while a child still holds the pipe.
        try:
            pidfd = os.pidfd_open(self.proc.pid)
        except (AttributeError, OSError):
            return None
        self.selector.register(pidfd, selectors.EVENT_READ)
        return pidfd

    def loop(self) -> None:
        """Read, watch and escalate until the leader is reaped, the group is empty and the pipe drained."""
        while True:
            now = time.monotonic()
            self._tick(now)
            if self._finished(now):
                return
            for key, _ in self.selector.select(self._wait_s(now)):
                if key.fd == self.out_fd:
                    self._read()
                else:
                    self._leader_exited()

    def _tick(self, now: float) -> None:
        if self.proc.returncode is None and self.pidfd is None:
            self.proc.poll()
        if self.proc.returncode is None:
            self._check_clock(now)
        elif now >= self.next_group_check:
            self._check_group(now)
        if self.kill_at is not None and now >= self.kill_at:
            self._kill(now)
            self.kill_at = now + _GROUP_POLL_S  # again until the group is empty: a child may have forked
            self.next_group_check = now

    def _kill(self, now: float) -> None:
        # While the launcher lives it does the killing (it alone reaches what left the group); a SIGKILL of
        # the group would end it first. Once it is gone, or wedged, the group's leftovers get SIGKILL.
        if self.proc.returncode is None:
            self.wedged_at = self.wedged_at if self.wedged_at is not None else now + _LAUNCHER_KILL_S
            if now < self.wedged_at:
                ask_launcher_to_kill(self.proc.pid)
                return
        signal_group(self.pgid, signal.SIGKILL)

    def _check_clock(self, now: float) -> None:
        if self.stop_reason is not None:
            return
        if now >= self.deadline:
            self._stop("timeout", now)
        elif now >= self.next_watch:
            self.next_watch = now + self.limits.watch_interval_s
            reason = self.watch(self.cost_micros)
            if reason:
                self._stop(reason, time.monotonic())

    def _check_group(self, now: float) -> None:
        # The leader is gone; whatever it left in its group goes too (same TERM, grace, KILL).
        self.next_group_check = now + _GROUP_POLL_S
        if self.group_gone_at is not None:
            return
        if group_alive(self.pgid):
            self._terminate(now)
        else:
            self.group_gone_at, self.kill_at = now, None

    def _stop(self, reason: str, now: float) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            self._terminate(now)

    def _terminate(self, now: float) -> None:
        if not self.term_sent:
            self.term_sent = True
            signal_group(self.pgid, signal.SIGTERM)
            self.kill_at = now + self.limits.grace_s

    def _finished(self, now: float) -> bool:
        if self.proc.returncode is None or self.group_gone_at is None:
            return False
        return self.eof or now >= self.group_gone_at + _DRAIN_S

    def _wait_s(self, now: float) -> float:
        wake = [self.kill_at] if self.kill_at is not None else []
        if self.proc.returncode is not None:
            wake.append(self.next_group_check if self.group_gone_at is None else self.group_gone_at + _DRAIN_S)
        else:
            if self.stop_reason is None:
                wake += [self.deadline, self.next_watch]
            if self.pidfd is None:
                wake.append(now + _EXIT_POLL_S)
        return max(0.0, min(wake, default=now + _EXIT_POLL_S) - now)

    def _read(self) -> None:
        try:
            chunk = os.read(self.out_fd, _CHUNK)
        except BlockingIOError:
            return
        if chunk:
            self.output.write(chunk)
            self._on_lines(self.scanner.feed(chunk))
        else:
            self.eof = True
            self.selector.unregister(self.out_fd)
            self._on_lines(self.scanner.finish())
            final = getattr(self.parse, "final", None)  # what a format settles only at the end (fleet/usage.py)
            settled = final() if final is not None else None
            if settled is not None:
                self._add_usage(settled)

    def _on_lines(self, lines: list[bytes]) -> None:
        for line in lines:
            usage, done = self.parse(line)
            # Both become pause reasons, events, errors and alerts: masked here, before they go anywhere.
            self._mask_problem()
            if done is not None:
                self.done_reason = self.output.masked(done, MAX_DONE_REASON)
            if usage is not None:
                self._add_usage(usage)
        if self.scanner.overlong and hasattr(self.parse, "problem") and not self.parse.problem:
            # Money on a line too long to read is not $0: a problem, which stops the agent (see fleet/usage.py).
            self.parse.problem = f"a usage line longer than {self.scanner.max_line_bytes} bytes could not be read"
            self._add_usage(Usage(0, 0, 0))

    def _mask_problem(self) -> None:
        # A usage problem may quote a model name the agent chose (fleet/usage.py): the executor's verdict
        # repeats it. Masking what is masked already changes nothing.
        problem = getattr(self.parse, "problem", None)
        if problem:
            self.parse.problem = self.output.masked(problem, MAX_PROBLEM)  # type: ignore[attr-defined]

    def _add_usage(self, usage: Usage) -> None:
        self.cost_micros += usage.cost_micros
        self.input_tokens += usage.input_tokens
        self.output_tokens += usage.output_tokens
        reason = self.on_usage(self.cost_micros)  # called after a stop too: the spend still happened
        if reason:
            self._stop(reason, time.monotonic())

    def _leader_exited(self) -> None:
        self.proc.poll()
        if self.proc.returncode is not None and self.pidfd is not None:
            self.selector.unregister(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None

    def close(self) -> None:
        """Kill and reap whatever is left (the loop may have ended by an exception), free the fds."""
        if self.proc.returncode is None or group_alive(self.pgid):
            kill_run(self.proc, self.pgid)
        self.proc.wait()
        if self.pidfd is not None:
            os.close(self.pidfd)
        self.selector.close()
        assert self.proc.stdout is not None
        self.proc.stdout.close()

    def result(self) -> ProcessResult:
        """What the finished run amounts to."""
        assert self.proc.returncode is not None
        return ProcessResult(
            exit_code=exit_code(self.proc.returncode), stop_reason=self.stop_reason,
            cost_micros=self.cost_micros, input_tokens=self.input_tokens, output_tokens=self.output_tokens,
            done_reason=self.done_reason, output_tail=self.output.tail(), pid=self.proc.pid, pgid=self.pgid,
            log_bytes=self.output.log_bytes, started=True)


def run_agent(argv: list[str], env: dict[str, str], *, log_path: Path, timeout_s: float,
              on_started: Callable[[int, int], None] = _no_start_hook,
              watch: Callable[[int], str | None] = _no_watch,
              on_usage: Callable[[int], str | None] = _no_watch,
              watch_interval_s: float = 0.1, grace_s: float = 5.0,
              max_log_bytes: int = 10 * 2**20, tail_bytes: int = 16 * 1024, cwd: Path | None = None,
              max_line_bytes: int = DEFAULT_MAX_LINE, append_log: bool = False,
              redact: tuple[str, ...] = (), launch: Launch = Launch(),
              parse: ParseLine = parse_line, may_start: Callable[[], str | None] = _no_objection) -> ProcessResult:
    """Run one agent to its end (or stop it) and report how it went; blocks the calling thread.

    `env` is the agent's whole environment. `watch` gets the running cost every `watch_interval_s`
    and `on_usage` gets it on each usage line; a reason string from either stops the agent with
    that reason. A program that cannot be started returns `started=False` (exit 127 or 126).
    Every process of the agent's group is gone when this returns, or raises. The agent dies with
    the calling thread (see the module docstring): do not call this from a short-lived thread.
    `append_log` adds to an existing log instead of replacing it (a poll, then the command).
    Each string in `redact` (every secret Fleet knows: fleet/redaction.py) is masked in the log and the tail.
    `launch` gives the launcher its tether, the agent's user and the run tag (see `Launch`).
    `parse` reads usage from an output line (`fleet.usage.make_parser`; Fleet's own format by default).
    `may_start` is asked last, just before the spawn: a reason from it ends the run unstarted, with that reason.
    """
    output = Output(log_path, max_log_bytes=max_log_bytes, tail_bytes=tail_bytes, append=append_log,
                    redact=redact)
    try:
        stop = may_start()  # e.g. a kill that landed since the claim read the flags: not even started
        if stop is not None:
            return _stopped_before_start(stop, output)
        try:
            proc = _spawn(argv, env, cwd, launch, grace_s)
        except OSError as exc:
            return _not_started(exc, argv, output)
        try:
            run = _Run(proc, output, LineScanner(max_line_bytes), _Limits(timeout_s, watch_interval_s, grace_s),
                       watch, on_usage, parse)
        except BaseException:
            _abandon(proc)
            raise
        try:
            on_started(proc.pid, run.pgid)
            run.loop()
        finally:
            run.close()
        output.flush()
        return run.result()
    finally:
        if launch.tether is not None:
            launch.tether.close()
        output.close()
