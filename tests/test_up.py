"""`fleet up` as a real subprocess: ready, consuming both queues, Flower behind auth, clean stop."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis as redis_lib
from celery import Celery

from fleet import db, keys
from fleet.embedded import EmbeddedRedis, redis_answers
from fleet.supervisor import absolute_database_url, mask_redis_url
from tests.harness import (
    CAPLESS,
    assert_capless_reader_reads_a_dumpable_peer,
    capless_can_read,
    processes_holding,
    wait_for,
)

READY_WITHIN_S = 20.0
STOP_WITHIN_S = 30.0  # the worker's warm-shutdown grace is 15 s; an idle one stops in ~1-2 s
MARKER_VAR = "FLEET_UP_TEST_MARKER"  # inherited by every descendant: how we find leftovers in /proc

needs_proc = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")


def local_get(url: str, **kwargs: Any) -> httpx.Response:
    """GET on loopback, never through a proxy from the environment."""
    return httpx.get(url, trust_env=False, **kwargs)


def free_port() -> int:
    """A loopback port free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def marked_processes(marker: str) -> list[tuple[int, str]]:
    """Live processes (not zombies) whose environment carries `marker`, with their command lines."""
    needle = f"{MARKER_VAR}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle not in (entry / "environ").read_bytes():
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or not ours
            continue
        if state != "Z":
            found.append((int(entry.name), cmdline.strip()))
    return found


@dataclass
class UpRun:
    """One `fleet up` subprocess and where its output goes."""

    process: subprocess.Popen[bytes]
    out: Path
    err: Path
    marker: str
    web_port: int
    flower_port: int
    started: float

    def stdout(self) -> str:
        """Everything printed so far on stdout (the supervisor's own lines)."""
        return self.out.read_text(errors="replace")

    def line(self, pattern: str) -> re.Match[str] | None:
        """The first stdout match of `pattern`, failing at once if fleet up already exited."""
        match = re.search(pattern, self.stdout(), re.MULTILINE)
        if match is None and self.process.poll() is not None:
            pytest.fail(f"fleet up exited with {self.process.returncode} before printing {pattern!r}:\n"
                        f"{self.stdout()}\n{self.err.read_text(errors='replace')[-3000:]}")
        return match


@pytest.fixture
def start_up(tmp_path: Path) -> Iterator[Callable[..., UpRun]]:
    """Start `fleet up` in tmp_path; whatever happens, nothing it started outlives the test."""
    runs: list[UpRun] = []

    def start(*args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()) -> UpRun:
        (tmp_path / "fleet.toml").write_text("[fleet]\ndaily_cap_usd = 1.0\n")
        run_env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "FLOWER_"))}
        marker = uuid.uuid4().hex
        web_port, flower_port = free_port(), free_port()
        run_env.update({
            "FLEET_CONFIG": str(tmp_path / "fleet.toml"),
            "FLEET_DATABASE_URL": f"sqlite:///{tmp_path / 'fleet.db'}",
            "FLEET_LOG_DIR": str(tmp_path / "logs"),
            "FLEET_WEB_PORT": str(web_port),
            "FLEET_FLOWER_PORT": str(flower_port),
            MARKER_VAR: marker,
            **(env or {}),
        })
        out, err = tmp_path / f"up-{len(runs)}.out", tmp_path / f"up-{len(runs)}.err"
        with out.open("wb") as out_file, err.open("wb") as err_file:
            process = subprocess.Popen([*prefix, sys.executable, "-m", "fleet", "up", *args], cwd=tmp_path, env=run_env,
                                       stdin=subprocess.DEVNULL, stdout=out_file, stderr=err_file,
                                       start_new_session=True)
        run = UpRun(process, out, err, marker, web_port, flower_port, time.monotonic())
        runs.append(run)
        return run

    yield start
    for run in runs:
        if run.process.poll() is None:
            run.process.kill()
            run.process.wait()
        for pid, _ in marked_processes(run.marker):
            os.kill(pid, signal.SIGKILL)


def wait_ready(run: UpRun) -> tuple[float, float]:
    """(seconds fleet up reported, seconds since spawn) until ready; fails past READY_WITHIN_S."""
    match = wait_for(lambda: run.line(r"^ready in ([\d.]+)s"), READY_WITHIN_S, "the 'ready' line")
    return float(match.group(1)), time.monotonic() - run.started


def broker_url_of(run: UpRun) -> str:
    """The Redis URL fleet up chose, as it printed it (an embedded server's password masked)."""
    match = run.line(r"^\s+redis\s+(redis://\S+)")
    assert match is not None
    return match.group(1)


def embedded_url_of(run: UpRun) -> str:
    """The embedded server's URL, password included, from the file the banner names for other terminals."""
    match = run.line(r"^\s+elsewhere\s+export FLEET_REDIS_URL_FILE=(\S+)")
    assert match is not None
    return Path(match.group(1)).read_text()


def assert_worker_consumes_both_queues(broker_url: str) -> None:
    """A ping answers, both queues are consumed, and a task sent to each queue comes back."""
    app = Celery("fleet-up-test", broker=broker_url, backend=broker_url)
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])
    try:
        replies = wait_for(lambda: app.control.ping(timeout=1.0), 10, "a worker ping")
        node = next(name for reply in replies for name in reply if name.startswith("fleet@"))
        queues = app.control.inspect(destination=[node], timeout=2.0).active_queues() or {}
        assert {"dispatch", "agents"} <= {q["name"] for q in queues.get(node, [])}
        for queue in ("dispatch", "agents"):
            # celery.accumulate is built in: it proves consumption without depending on our task module.
            result = app.send_task("celery.accumulate", args=[queue], queue=queue)
            assert result.get(timeout=10) == [queue]
    finally:
        app.close()


def assert_flower_requires_auth(run: UpRun, user: str, password: str) -> None:
    """Flower answers 401 without credentials and 200 with them."""
    url = f"http://127.0.0.1:{run.flower_port}/api/workers"
    wait_for(lambda: _answers(url), 10, "Flower to listen")
    assert local_get(url, timeout=5).status_code == 401
    assert local_get(url, auth=(user, "wrong"), timeout=5).status_code == 401
    assert local_get(url, auth=(user, password), timeout=5).status_code == 200


def _answers(url: str) -> bool:
    try:
        local_get(url, timeout=1)
    except httpx.HTTPError:
        return False
    return True


def assert_web_probes(run: UpRun) -> None:
    """/livez says ok; /readyz sees Redis and the database."""
    base = f"http://127.0.0.1:{run.web_port}"
    livez = local_get(f"{base}/livez", timeout=5)
    assert (livez.status_code, livez.text) == (200, "ok")
    readyz = local_get(f"{base}/readyz", timeout=5)
    assert readyz.status_code == 200, readyz.text
    assert readyz.json()["status"] == "ok"


def assert_web_needs_the_token(run: UpRun, token: str) -> None:
    """The page is behind the token fleet up printed (or was given)."""
    base = f"http://127.0.0.1:{run.web_port}"
    assert local_get(f"{base}/api/state", timeout=10).status_code == 401
    assert local_get(f"{base}/api/state", headers={"Authorization": f"Bearer {token}"}, timeout=10).status_code == 200


def child_environ(run: UpRun, name: str) -> str:
    """A child's start environment, as root reads it."""
    web = run.line(rf"^\s+{name}\s+.*\[pid (\d+)\]")
    assert web is not None
    return Path(f"/proc/{web.group(1)}/environ").read_bytes().decode(errors="replace")


def assert_no_secret_in_children(run: UpRun, *secrets: str) -> None:
    """No child's start environment or argv holds a secret (the supervisor's own does: it was given
    them), and neither fleet up nor its fleet children can be read by a same-uid process (fleet up
    must run under CAPLESS for that: see tests/harness.py)."""
    for secret in secrets:
        holders = [(pid, part) for pid, part in processes_holding(secret) if pid != run.process.pid]
        assert not holders, f"{secret!r} is readable in {holders}"
    assert_capless_reader_reads_a_dumpable_peer()
    assert not capless_can_read(f"/proc/{run.process.pid}/environ"), "fleet up is dumpable"
    for name in ("worker", "web", "flower"):
        match = run.line(rf"^\s+{name}\s+.*\[pid (\d+)\]")
        if match is not None:
            assert not capless_can_read(f"/proc/{match.group(1)}/environ"), f"{name} is dumpable"


def stop_and_assert_clean(run: UpRun, tmp_path: Path, expect_code: int = 0, sig: int = signal.SIGINT) -> float:
    """Signal fleet up (if `sig`), wait for its exit code, and check nothing it started survives."""
    began = time.monotonic()
    if sig:
        run.process.send_signal(sig)
    try:
        code = run.process.wait(STOP_WITHIN_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"fleet up did not stop within {STOP_WITHIN_S:.0f}s:\n{run.stdout()}")
    took = time.monotonic() - began
    assert code == expect_code, run.stdout() + run.err.read_text(errors="replace")[-3000:]
    # Its children were SIGKILLed by process group at the latest: give the kernel a moment to finish them.
    wait_for(lambda: not marked_processes(run.marker), 5, "no process left behind")
    assert not list(tmp_path.rglob("*.pid")), "a stale pid file was left behind"
    assert re.search(r"^stopped everything in [\d.]+ s$", run.stdout(), re.MULTILINE), run.stdout()
    return took


def assert_another_terminal_in_the_folder_reaches_it(folder: Path, broker: str) -> None:
    """A `fleet` command run in the fleet's folder from a terminal that exported nothing (no FLEET_REDIS_URL,
    no FLEET_REDIS_URL_FILE) talks to this fleet's embedded server, not to whatever answers on 6379: a
    `fleet kill` there must stop this fleet, never another one."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "FLOWER_"))}
    env["FLEET_DATABASE_URL"] = f"sqlite:///{folder / 'fleet.db'}"
    doctor = subprocess.run([sys.executable, "-m", "fleet", "doctor"], cwd=folder, env=env, capture_output=True,
                            text=True, timeout=60)
    said = doctor.stdout + doctor.stderr
    assert re.search(rf"ok\s+redis\s+{re.escape(mask_redis_url(broker))} answers", said), said
    assert str(urlsplit(broker).password) not in said


def assert_logs_in_files(run: UpRun, tmp_path: Path, parts: tuple[str, ...]) -> None:
    """Each part's JSON log lines are in LOG_DIR/PART.log, and none reached the terminal."""
    logs = tmp_path / "logs"
    wait_for(lambda: (logs / "worker.log").exists() and (logs / "worker.log").stat().st_size > 0, 10,
             "the worker's log file")
    for part in parts:
        assert (logs / f"{part}.log").exists(), f"no {part}.log"
    web_lines = [line for line in (logs / "web.log").read_text().splitlines() if line.startswith("{")]
    assert any(json.loads(line).get("event") == "web listening" for line in web_lines), web_lines[:5]
    printed = run.stdout() + run.err.read_text(errors="replace")
    assert '"level"' not in printed and '"event"' not in printed, "a JSON log line reached the terminal"


# ---------------------------------------------------------------- the whole fleet


@pytest.mark.slow
@needs_proc
def test_up_embedded(start_up: Callable[..., UpRun], tmp_path: Path, record_property: Any) -> None:
    """--embedded: a private server even though one answers on 6379; Flower gets a generated password."""
    run = start_up("--embedded", "--workers", "1", prefix=tuple(CAPLESS))
    ready_s, wall_s = wait_ready(run)
    shown = broker_url_of(run)
    assert re.fullmatch(r"redis://:\*\*\*@127\.0\.0\.1:\d+/0", shown) and ":6379/" not in shown
    broker = embedded_url_of(run)
    assert mask_redis_url(broker) == shown
    assert not redis_answers(f"redis://127.0.0.1:{urlsplit(broker).port}/0", timeout=1)  # no password, no entry
    assert "EMBEDDED" in run.stdout()
    password = run.line(r"^\s+flower\s+.* user fleet, password (\S+) \(generated")
    assert password is not None
    token = run.line(r"^\s+web\s+http://\S+/\?token=(\S+) \(generated")
    assert token is not None
    assert_web_probes(run)
    assert_another_terminal_in_the_folder_reaches_it(tmp_path, broker)
    assert_worker_consumes_both_queues(broker)
    assert_flower_requires_auth(run, "fleet", password.group(1))
    assert_web_needs_the_token(run, token.group(1))
    assert_no_secret_in_children(run, password.group(1), token.group(1), str(urlsplit(broker).password))
    secrets_file = re.search(r"FLEET_WEB_TOKEN_FILE=([^\0]+)", child_environ(run, "web"))
    assert secrets_file is not None
    secrets_dir = Path(secrets_file.group(1)).parent
    assert (secrets_dir.stat().st_mode & 0o777, Path(secrets_file.group(1)).stat().st_mode & 0o777) == (0o700, 0o600)
    assert_logs_in_files(run, tmp_path, ("worker", "beat", "flower", "web"))
    out = run.stdout()
    assert "! no FLEET_WEB_TOKEN" in out and "Redis has no password" not in out, out
    assert str(urlsplit(broker).password) not in out
    stop_s = stop_and_assert_clean(run, tmp_path)
    assert not secrets_dir.exists(), "the secrets folder outlived fleet up"
    assert not (tmp_path / ".fleet-redis-url").exists(), "the folder's pointer to the embedded server outlived it"
    assert not redis_answers(broker, timeout=0.5), "the embedded server outlived fleet up"
    said = run.stdout()
    for part in ("worker", "beat", "flower", "web"):
        assert re.search(rf"^  {part}\s+stopped \(exit code 0\) in [\d.]+ s$", said, re.MULTILINE), said
    assert "  redis    embedded server stopped" in said
    record_property("ready_s", ready_s)
    record_property("stop_s", round(stop_s, 1))
    print(f"\nfleet up --embedded: ready in {ready_s:.1f}s ({wall_s:.1f}s from spawn), stopped in {stop_s:.1f}s")


@pytest.mark.slow
@needs_proc
def test_up_real_redis(start_up: Callable[..., UpRun], tmp_path: Path, redis: redis_lib.Redis,
                       redis_url: str, record_property: Any) -> None:
    """FLEET_REDIS_URL given: no embedded server; Flower uses FLEET_FLOWER_AUTH, the web FLEET_WEB_TOKEN."""
    dsn = f"http://sentrykey{uuid.uuid4().hex}@127.0.0.1:{free_port()}/1"  # nothing listens: events are dropped
    token = f"web-token-{uuid.uuid4().hex}"
    run = start_up("--workers", "1", env={"FLEET_REDIS_URL": redis_url, "FLEET_FLOWER_AUTH": "ops:s3cret-pw",
                                          "FLEET_SENTRY_DSN": dsn, "FLEET_WEB_TOKEN": token}, prefix=tuple(CAPLESS))
    ready_s, wall_s = wait_ready(run)
    assert broker_url_of(run) == redis_url
    assert "EMBEDDED" not in run.stdout()
    for secret in ("s3cret-pw", token, dsn):
        assert secret not in run.stdout(), "a configured secret must not be printed"
    assert_web_probes(run)
    assert_worker_consumes_both_queues(redis_url)
    assert_flower_requires_auth(run, "ops", "s3cret-pw")
    assert_web_needs_the_token(run, token)
    assert_no_secret_in_children(run, "s3cret-pw", token, dsn)
    assert redis.get(keys.owner()), "fleet up marks its Redis database as this fleet's"
    stop_s = stop_and_assert_clean(run, tmp_path, sig=signal.SIGTERM)
    assert redis.get(keys.owner()) is None, "... and takes the mark off as it stops"
    record_property("ready_s", ready_s)
    record_property("stop_s", round(stop_s, 1))
    print(f"\nfleet up (real Redis): ready in {ready_s:.1f}s ({wall_s:.1f}s from spawn), stopped in {stop_s:.1f}s")


@pytest.mark.slow
@needs_proc
def test_up_stops_everything_when_a_child_dies(start_up: Callable[..., UpRun], tmp_path: Path) -> None:
    """A child that dies is named, the rest are stopped, and fleet up exits 1."""
    run = start_up("--embedded", "--workers", "1", "--no-beat", "--no-flower")
    wait_ready(run)
    web = run.line(r"^\s+web\s+.*\[pid (\d+)\]")
    assert web is not None
    os.kill(int(web.group(1)), signal.SIGKILL)
    stop_and_assert_clean(run, tmp_path, expect_code=1, sig=0)
    assert re.search(rf"web \(pid {web.group(1)}\) exited unexpectedly \(signal SIGKILL\)", run.stdout())


@pytest.mark.slow
@needs_proc
def test_up_stops_its_parts_when_the_pipe_it_prints_to_is_gone(tmp_path: Path) -> None:
    """`fleet up | tee up.log`, then Ctrl-C: the terminal's SIGINT ends tee too, and fleet up's first line about
    the stop met a closed pipe. rich answers a broken pipe with SystemExit(1), which skipped the stop: fleet up
    exited 1 and left the worker (its agents still running), beat, Flower and the web running, unsupervised."""
    (tmp_path / "fleet.toml").write_text("[fleet]\ndaily_cap_usd = 1.0\n")
    marker = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "FLOWER_"))}
    env.update({"FLEET_CONFIG": str(tmp_path / "fleet.toml"),
                "FLEET_DATABASE_URL": f"sqlite:///{tmp_path / 'fleet.db'}",
                "FLEET_LOG_DIR": str(tmp_path / "logs"), "FLEET_WEB_PORT": str(free_port()),
                "FLEET_FLOWER_PORT": str(free_port()), MARKER_VAR: marker})
    with (tmp_path / "up.err").open("wb") as err:
        process = subprocess.Popen([sys.executable, "-m", "fleet", "up", "--embedded"], cwd=tmp_path, env=env,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                                   start_new_session=True)
    try:
        assert process.stdout is not None
        printed = b""
        deadline = time.monotonic() + READY_WITHIN_S
        while b"\nready in" not in printed:
            assert time.monotonic() < deadline and process.poll() is None, printed.decode(errors="replace")
            if select.select([process.stdout], [], [], 0.5)[0]:
                printed += os.read(process.stdout.fileno(), 65536)
        assert marked_processes(marker), "nothing was started"
        process.stdout.close()  # the reader is gone, as tee is on the same Ctrl-C
        process.send_signal(signal.SIGINT)
        code = process.wait(STOP_WITHIN_S)
        wait_for(lambda: not marked_processes(marker), 5, "no process left behind")
        assert code == 0, (tmp_path / "up.err").read_text(errors="replace")[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pid, _ in marked_processes(marker):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
@needs_proc
def test_up_verbose_streams_the_parts_logs(start_up: Callable[..., UpRun], tmp_path: Path) -> None:
    """-v: the children's JSON log lines come to the terminal as before, and no log file is written."""
    run = start_up("--embedded", "--workers", "1", "--no-beat", "--no-flower", "-v")
    wait_ready(run)
    streamed = wait_for(lambda: [line for line in run.err.read_text(errors="replace").splitlines()
                                 if line.startswith("{") and '"web listening"' in line], 10, "the web's log line")
    assert json.loads(streamed[0])["process"] == "web"
    assert not (tmp_path / "logs" / "web.log").exists() and not (tmp_path / "logs" / "worker.log").exists()
    stop_and_assert_clean(run, tmp_path)


# ---------------------------------------------------------------- quick ones


@needs_proc
def test_up_in_a_folder_without_fleet_toml_says_so_first(tmp_path: Path) -> None:
    """`fleet up` in the wrong folder: the missing fleet.toml (`fleet init` makes one) is what it says, even
    while another process holds the web port; fixing the port first would only lead to the second refusal."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "FLOWER_"))}
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        env.update({"FLEET_WEB_PORT": str(holder.getsockname()[1]), "FLEET_LOG_DIR": str(tmp_path / "logs")})
        proc = subprocess.run([sys.executable, "-m", "fleet", "up", "--embedded"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 78, proc.stderr
    assert "fleet.toml: no such file" in proc.stderr and "fleet init" in proc.stderr, proc.stderr
    assert "already in use" not in proc.stderr and not (tmp_path / "fleet.db").exists()


def test_up_refuses_a_busy_port_before_starting_anything(start_up: Callable[..., UpRun],
                                                          tmp_path: Path) -> None:
    """Web port taken: exit 78 (configuration: a retry finds it taken all the same, so not 75) naming the port
    and the setting that moves it; no migration, no child."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        run = start_up("--embedded", env={"FLEET_WEB_PORT": str(busy)})
        code = run.process.wait(30)
    assert code == 78
    err = run.err.read_text()
    assert f"web port 127.0.0.1:{busy} is already in use" in err and "FLEET_WEB_PORT" in err
    assert not (tmp_path / "fleet.db").exists()
    assert not marked_processes(run.marker)


def test_up_ignores_a_pointer_it_would_not_follow(start_up: Callable[..., UpRun], tmp_path: Path) -> None:
    """`fleet up` chooses its Redis itself and replaces the folder's pointer: one left readable by others (a
    copy, a restore, a chmod; or planted by another user in a shared folder) is refused by the commands that
    would follow it, but `fleet up` refused too (78 "not a private file"), before its own checks, so the
    fleet could not start until the file was gone. Here it gets as far as its port check."""
    pointer = tmp_path / ".fleet-redis-url"
    pointer.write_text("redis://:stale@127.0.0.1:1/0\n")
    pointer.chmod(0o644)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        run = start_up("--embedded", env={"FLEET_WEB_PORT": str(busy)})
        code = run.process.wait(30)
    err = run.err.read_text()
    assert code == 78 and f"web port 127.0.0.1:{busy} is already in use" in err, err


def test_up_refuses_to_start_beside_a_running_fleet_up_of_its_folder(start_up: Callable[..., UpRun], tmp_path: Path,
                                                                     redis_url: str) -> None:
    """A second `fleet up --embedded` in the folder of a running one (or of one SIGKILLed, whose server, worker
    and beat live on) started a second fleet on the same database and took the folder's pointer: a `fleet kill`
    typed in that folder then reached only the newer fleet's Redis while the first one's agents ran on. While
    the pointer names a server that answers, it refuses (78) before starting anything, and leaves the pointer."""
    pointer = tmp_path / ".fleet-redis-url"
    pointer.write_text(redis_url + "\n")
    pointer.chmod(0o600)
    run = start_up("--embedded", "--workers", "1", "--no-flower", "--no-web", "--no-beat")
    try:
        code = run.process.wait(30)
    except subprocess.TimeoutExpired:
        code = None
    err = run.err.read_text()
    assert code == 78, f"fleet up ran beside the folder's running one:\n{run.stdout()}\n{err}"
    assert f"{pointer}" in err and "fleet up" in err, err
    assert pointer.read_text() == redis_url + "\n"
    assert not marked_processes(run.marker)


@needs_proc
def test_up_refuses_a_redis_database_another_fleet_uses(start_up: Callable[..., UpRun], tmp_path: Path,
                                                         redis: redis_lib.Redis, redis_url: str) -> None:
    """Two `fleet init` folders, one Redis: the second `fleet up` found the first fleet's Redis answering and
    shared its database, and each fleet's workers took the other's runs (dropped as `not_found`), leases and kills.
    It refuses (78) before starting anything, saying how to part them; the first fleet's mark stays."""
    from fleet import tenancy

    first = db.make_engine(f"sqlite:///{tmp_path / 'first.db'}")  # the other folder's fleet
    try:
        db.upgrade(first)
        theirs = tenancy.fleet_id(first)
    finally:
        first.dispose()
    assert tenancy.claim(redis, theirs) is None
    run = start_up("--workers", "1", env={"FLEET_REDIS_URL": redis_url})
    assert run.process.wait(60) == 78
    err = run.err.read_text()
    assert "another fleet" in err and "FLEET_REDIS_URL=redis://HOST:6379/N" in err, err
    assert not marked_processes(run.marker)
    assert redis.get(keys.owner()) == theirs


@needs_proc
def test_up_refuses_a_configured_redis_that_does_not_answer(start_up: Callable[..., UpRun]) -> None:
    """FLEET_REDIS_URL given but dead: exit 75 saying so; no embedded server replaces it silently."""
    dead = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    run = start_up(env={"FLEET_REDIS_URL": dead})
    assert run.process.wait(30) == 75
    err = run.err.read_text()
    assert "does not answer" in err and "--embedded" in err and "hunter2" not in err
    assert "EMBEDDED" not in run.stdout()
    assert not marked_processes(run.marker)


def test_embedded_server_starts_answers_and_stops() -> None:
    """The embedded server: a redis:// URL on loopback, no eviction, no persistence, gone after stop."""
    server = EmbeddedRedis()
    with server:
        assert re.fullmatch(r"redis://:[\w-]+@127\.0\.0\.1:\d+/0", server.url)
        assert redis_answers(server.url, timeout=1)
        client = redis_lib.Redis.from_url(server.url, decode_responses=True)
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("appendonly") == {"appendonly": "no"}
        data_dir = Path(client.config_get("dir")["dir"])
        client.close()
        assert data_dir.is_dir()
    assert not redis_answers(server.url, timeout=0.5)
    assert not data_dir.exists()


@needs_proc
def test_embedded_server_requires_a_password_that_no_argv_or_file_shows() -> None:
    """Any local process (an agent under run_as too) can find the server's port in /proc/net/tcp: without a
    password it could LPUSH a forged `fleet.resume` onto `dispatch` and lift a kill. Each server gets a
    password of its own, in the URL it hands out, and in no argv, environment or file of its folder."""
    with EmbeddedRedis() as server, EmbeddedRedis() as other:
        password = urlsplit(server.url).password
        assert password and len(password) >= 24 and password != urlsplit(other.url).password
        anonymous = redis_lib.Redis(host=server.host, port=server.port, socket_timeout=2)
        try:
            with pytest.raises(redis_lib.RedisError, match=r"(?i)noauth|authenticat"):
                anonymous.lpush("dispatch", "forged")
        finally:
            anonymous.close()
        assert redis_answers(server.url, timeout=1)
        client = redis_lib.Redis.from_url(server.url, decode_responses=True)
        data_dir = Path(client.config_get("dir")["dir"])
        client.close()
        proc = Path(f"/proc/{server.pid}")
        for shown in ((proc / "cmdline").read_bytes(), (proc / "environ").read_bytes(),
                      *(f.read_bytes() for f in data_dir.rglob("*") if f.is_file())):
            assert password.encode() not in shown


def test_embedded_server_takes_the_preferred_port_only_when_it_is_free() -> None:
    """`fleet up` asks for 6379 when nothing answers there, so other terminals find it unconfigured; a
    port something else holds is never fought over."""
    wanted = free_port()
    with EmbeddedRedis(preferred_port=wanted) as server:
        assert server.port == wanted and server.url.endswith(f"@127.0.0.1:{wanted}/0")
        with EmbeddedRedis(preferred_port=wanted) as second:
            assert second.port != wanted and redis_answers(second.url, timeout=1)


def test_the_banner_masks_the_embedded_password_and_other_terminals_get_a_file(tmp_path: Path) -> None:
    """What `fleet up` prints for its embedded server shows no password (a terminal's scrollback, a screen
    share, a pasted log); the commands of another terminal reach it through a 0600 file named there."""
    from contextlib import ExitStack

    from rich.console import Console

    from fleet import hardening
    from fleet.config import Settings
    from fleet.supervisor import UpOptions, _plan, _start_embedded, _Up
    from fleet.upscreen import Screen

    console = Console(record=True, width=400, force_terminal=False)
    up = _Up(Screen(console, live=False))
    settings = Settings(config=tmp_path / "fleet.toml", database_url=f"sqlite:///{tmp_path / 'fleet.db'}",
                        log_dir=tmp_path / "logs")
    options = UpOptions(workers=1, embedded=True, beat=True, flower=True, web=True)
    with ExitStack() as stack, hardening.private_folder("fleet-up-test-") as secrets_dir:
        url = _start_embedded(stack, "--embedded was given", up, None)
        password = urlsplit(url).password
        assert password and redis_answers(url, timeout=1)
        children = _plan(settings, options, url, tmp_path, secrets_dir, up)
        up.screen.banner("Fleet", up.rows, up.warnings)
        shown = console.export_text()
        assert password not in shown and mask_redis_url(url) in shown, shown
        named = re.search(r"export FLEET_REDIS_URL_FILE=(\S+)", shown)
        assert named is not None, shown
        assert Path(named.group(1)).read_text() == url and Path(named.group(1)).stat().st_mode & 0o777 == 0o600
        for child in children:
            assert password not in " ".join(child.argv) and password not in " ".join(child.env.values())
        assert not any("Redis has no password" in warning for warning in up.warnings)


def test_the_parts_log_files_are_private_to_the_fleets_user(tmp_path: Path) -> None:
    """worker.log, web.log, cli.jsonl... hold run ids, payload-bearing errors and agents' output: a run_as
    agent must not read them. A new log is created 0600 under the usual umask; one left 0644 becomes 0600."""
    from fleet.supervisor import Child, _start

    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "old.log").write_text("before\n")
    (logs / "old.log").chmod(0o644)
    previous = os.umask(0o022)
    try:
        for name in ("new", "old"):
            child = Child(name, [sys.executable, "-c", "print('hello')"], dict(os.environ), log=logs / f"{name}.log")
            _start(child)
            assert child.process is not None and child.process.wait(30) == 0
    finally:
        os.umask(previous)
    assert (logs / "old.log").read_text() == "before\nhello\n"  # appended to, as before
    assert {p.name: p.stat().st_mode & 0o777 for p in logs.iterdir()} == {"new.log": 0o600, "old.log": 0o600}


@pytest.mark.parametrize("euid", [0, 1000], ids=["root", "not-root"])
def test_the_banner_warns_of_agents_without_run_as_whatever_the_operators_uid(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, euid: int) -> None:
    """An agent without run_as runs as the operator's own user, root or not: it can read the fleet's 0600
    secrets (the secret files, keys/, the web token). The banner says so, naming how many, in one line."""
    from rich.console import Console

    from fleet.config import load_fleet_config
    from fleet.supervisor import _Up, _warnings
    from fleet.upscreen import Screen

    (tmp_path / "fleet.toml").write_text("[fleet]\n"
                                         "[agents.a]\ncommand = ['true']\n[agents.b]\ncommand = ['true']\n"
                                         "[agents.c]\ncommand = ['true']\nrun_as = 'nobody'\n")
    config = load_fleet_config(tmp_path / "fleet.toml")
    monkeypatch.setattr(os, "geteuid", lambda: euid)
    found = _warnings(config, "redis://:pw@127.0.0.1:6379/0", _Up(Screen(Console(), live=False)))
    lines = [w for w in found if "run as you" in w]
    assert len(lines) == 1 and f"2 agent(s) run as you (uid {euid})" in lines[0] and "(a, b)" in lines[0], found
    assert "secret" in lines[0] and len(lines[0]) < 240


def test_redis_answers_is_false_for_nothing_listening() -> None:
    """No server on the port: False, quickly."""
    began = time.monotonic()
    assert not redis_answers(f"redis://127.0.0.1:{free_port()}/0", timeout=1)
    assert time.monotonic() - began < 2


def test_printed_urls_hide_passwords_and_sqlite_paths_become_absolute(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """What fleet up prints and passes on."""
    assert mask_redis_url("redis://:hunter2@db:6379/0") == "redis://:***@db:6379/0"
    assert mask_redis_url("redis://user:hunter2@db:6379/0") == "redis://user:***@db:6379/0"
    assert mask_redis_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    monkeypatch.chdir(tmp_path)
    assert absolute_database_url("sqlite:///./fleet.db") == f"sqlite:///{tmp_path / 'fleet.db'}"
    assert absolute_database_url("sqlite:////abs/fleet.db") == "sqlite:////abs/fleet.db"
    pg = "postgresql+psycopg://u:p@h/db"
    assert absolute_database_url(pg) == pg


def test_web_readyz_names_what_is_down_and_stops_on_sigterm(tmp_path: Path) -> None:
    """`fleet web` alone: /livez 200, /readyz 503 naming Redis when it is down; SIGTERM exits 0."""
    (tmp_path / "fleet.toml").write_text("[fleet]\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update({"FLEET_CONFIG": str(tmp_path / "fleet.toml"), "FLEET_WEB_PORT": str(port),
                "FLEET_DATABASE_URL": f"sqlite:///{tmp_path / 'fleet.db'}", "FLEET_WEB_TOKEN": "t" * 32,
                "FLEET_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})  # nothing listens there
    web = subprocess.Popen([sys.executable, "-m", "fleet", "web"], env=env, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: _answers(f"{base}/livez"), 15, "the web process to listen")
        assert local_get(f"{base}/livez", timeout=5).text == "ok"
        readyz = local_get(f"{base}/readyz", timeout=10)
        assert readyz.status_code == 503
        assert set(readyz.json()["down"]) == {"redis"}
        web.send_signal(signal.SIGTERM)
        assert web.wait(10) == 0
    finally:
        if web.poll() is None:
            web.kill()
            web.wait()


def test_the_status_block_tells_a_kill_from_a_pause_and_a_stale_watchdog() -> None:
    """What the live block says for a snapshot: runs, spend against the cap, the switches, beat, the watchdog."""
    from rich.console import Console

    from fleet.upscreen import Screen, StatusFeed
    from tests.test_web import NOW, picture

    at = NOW.isoformat()
    stale = {"status": "green", "at": "2026-11-22T01:00:00+00:00", "host": "h", "checks": []}
    p = picture(kill=[{"scope": "digest", "reason": "runaway", "actor": "web:ops@127.0.0.1", "hard": False,
                       "since": at}],
                pauses=[{"scope": "*", "reason": "db upgrade", "actor": "cli:root@h", "since": at}],
                queued=4, watchdog=stale)
    console = Console(record=True, width=160, force_terminal=False)
    screen = Screen(console, live=False)
    screen.parts = {"worker": "up", "web": "starting", "beat": "down"}
    feed = StatusFeed(lambda: p)
    feed.picture = p
    screen.feed = feed
    console.print(screen.render())
    shown = console.export_text()
    assert "● worker up" in shown and "◐ web starting" in shown and "✖ beat down" in shown
    assert "1 running · 4 queued · 1 dead letter(s) · 4 run(s) in 24 h" in shown
    assert "$4.50 of $5.00 today (95%)" in shown
    assert "KILLED digest by web:ops@127.0.0.1: runaway" in shown
    assert "PAUSED the whole fleet by cli:root@h: db upgrade" in shown
    assert "green 1 h 0 min ago STALE: is beat running?" in shown
