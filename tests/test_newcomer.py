"""A newcomer's first ten minutes, end to end: an empty folder, `fleet init`, `fleet up` in a real
terminal (tmux: what it shows is what the screen shows), the README's tour commands, the page on a
phone-sized screen in Chromium, and a kill from the page seen in the terminal's status block.

What the terminal showed is kept in test-artifacts/ beside the screenshots.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.browser import PHONE, Browser
from tests.harness import ROOT, wait_for
from tests.test_up import MARKER_VAR, free_port, marked_processes

pytestmark = pytest.mark.slow
ARTIFACTS = ROOT / "test-artifacts"
FLEET = str(Path(sys.executable).with_name("fleet"))  # the console script `pip install -e .` put beside python
COLUMNS, ROWS = 132, 60


@dataclass
class Terminal:
    """One tmux server of the test's own (its own socket), with one window running a command."""

    socket: str
    folder: Path
    env: dict[str, str]

    def tmux(self, *args: str) -> str:
        """Run a tmux command against this server (started with a user's environment, not the test's)."""
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, check=True,
                              timeout=30, env=self.env).stdout

    def screen(self) -> str:
        """What the window shows now, long lines joined as the terminal wrapped them."""
        return self.tmux("capture-pane", "-p", "-J", "-t", "fleet")

    def history(self) -> str:
        """Everything the window printed, scrollback included."""
        return self.tmux("capture-pane", "-p", "-J", "-S", "-", "-t", "fleet")

    def wait_for(self, pattern: str, timeout: float, what: str) -> re.Match[str]:
        """Wait until the window's text matches `pattern`."""
        def found() -> re.Match[str] | None:
            return re.search(pattern, self.history(), re.MULTILINE)

        try:
            return wait_for(found, timeout, what, interval=0.3)
        except AssertionError:
            raise AssertionError(f"{what}; the terminal shows:\n{self.history()}") from None


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[Terminal]:
    """A private tmux server; whatever the test started in it is gone afterwards."""
    folder = tmp_path / "my-first-fleet"
    folder.mkdir()
    term = Terminal(f"fleet-newcomer-{uuid.uuid4().hex[:8]}", folder, newcomer_env(folder))
    yield term
    embedded = re.search(r"^\s+redis\s+redis://\S+\s+EMBEDDED.*\[pid (\d+)\]", _history(term), re.MULTILINE)
    # Closing the terminal hangs up on fleet up, which then stops its parts itself (the embedded server
    # last); only what is still there well after that is killed. Valkey rewrites its own environment
    # (its process title), so it is found by the pid the banner gave, not by the marker.
    subprocess.run(["tmux", "-L", term.socket, "kill-server"], capture_output=True, timeout=30)
    try:
        wait_for(lambda: not marked_processes(term.socket), 40, "fleet up to stop its parts on the hang-up")
    finally:
        for pid, _ in marked_processes(term.socket):
            os.kill(pid, signal.SIGKILL)
        if embedded is not None and _is_valkey(int(embedded.group(1))):
            os.kill(int(embedded.group(1)), signal.SIGKILL)
        # tmux leaves its socket file behind after kill-server here.
        Path(os.environ.get("TMUX_TMPDIR", "/tmp"), f"tmux-{os.getuid()}", term.socket).unlink(missing_ok=True)


def _history(term: Terminal) -> str:
    try:
        return term.history()
    except subprocess.CalledProcessError:
        return ""


def _is_valkey(pid: int) -> bool:
    try:
        return b"valkey-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def newcomer_env(folder: Path, **extra: str) -> dict[str, str]:
    """A user's environment: no FLEET_* settings of the test's (the folder's defaults apply)."""
    # Not COLUMNS/LINES either: the terminal's own size must decide how wide fleet up draws.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FLEET_", "FLOWER_")) and k not in ("COLUMNS", "LINES")}
    return {**env, "HOME": str(folder.parent), "TERM": "xterm-256color", **extra}


def run(folder: Path, env: dict[str, str], *args: str, code: int = 0) -> str:
    """One `fleet` command as the README's tour types it; its output."""
    proc = subprocess.run([FLEET, *args], cwd=folder, env=env, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == code, f"fleet {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def readme_tour() -> list[str]:
    """The commands of the README's tour, comments stripped."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("## A short tour"):].split("```sh\n", 1)[1].split("```", 1)[0]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip().startswith("fleet ")]


def test_a_newcomers_first_ten_minutes(terminal: Terminal, tmp_path: Path) -> None:
    """init, up in a terminal, the tour, the page on a phone, a kill from the page, Ctrl-C."""
    folder = terminal.folder
    web_port, flower_port = free_port(), free_port()
    ports = {"FLEET_WEB_PORT": str(web_port), "FLEET_FLOWER_PORT": str(flower_port)}
    env = newcomer_env(folder, **ports)

    said = run(folder, env, "init")
    assert "next steps:" in said and "fleet up" in said and (folder / "keys" / "echo.key").exists()

    # `fleet up` in a real terminal. --embedded only because this machine's shared Redis answers on 6379: a
    # newcomer without one gets the embedded server on 6379 itself.
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in {**ports, MARKER_VAR: terminal.socket}.items())
    terminal.tmux("new-session", "-d", "-s", "fleet", "-x", str(COLUMNS), "-y", str(ROWS), "-c", str(folder),
                  f"env {exports} {FLEET} up --embedded; "
                  "echo FLEET-UP-EXITED-$?; sleep 600")
    started = time.monotonic()
    ready = terminal.wait_for(r"^ready in ([\d.]+)s", 60, "fleet up to say it is ready")
    terminal.wait_for(r"● worker up .*● web up", 20, "the status block to show every part up")
    shown = terminal.screen()
    (ARTIFACTS / "newcomer-terminal-after-up.txt").parent.mkdir(exist_ok=True)
    (ARTIFACTS / "newcomer-terminal-after-up.txt").write_text(shown)
    print(f"\nfleet up: ready in {ready.group(1)} s ({time.monotonic() - started:.1f} s from the keypress); "
          f"the terminal shows:\n{shown}")
    token = re.search(rf"^\s+web\s+http://127\.0\.0\.1:{web_port}/\?token=(\S+) \(generated", shown, re.MULTILINE)
    # The embedded server has a password: another terminal reads its URL from the file the banner names.
    redis_url_file = re.search(r"export FLEET_REDIS_URL_FILE=(/\S+)", shown)
    assert token and redis_url_file, shown
    for part in ("worker", "beat", "flower", "web"):
        assert f"● {part} up" in shown, shown
    assert "! no FLEET_WEB_TOKEN" in shown and '"level"' not in shown  # warnings stand out; no JSON log lines

    # The README's tour, every command as it is written there, in "another terminal" (with the export the
    # banner printed); then a few more looks at what the tour did.
    tour = newcomer_env(folder, FLEET_REDIS_URL_FILE=redis_url_file.group(1), **ports)
    said_by: dict[str, str] = {}
    run_id = ""
    for command in readme_tour():
        argv = [arg.replace("RUN_ID", run_id) for arg in shlex.split(command)][1:]
        said_by[command] = run(folder, tour, *argv)
        found = re.search(r"run ([0-9a-f]{32}) ended succeeded", said_by[command])
        run_id = found.group(1) if found else run_id
    assert run_id, said_by
    assert "would fire" in said_by["fleet dispatch echo --key hello --dry-run"]
    assert f"duplicate run {run_id}" in said_by["fleet dispatch echo --key hello"]
    assert "fleet_usage" in said_by["fleet logs RUN_ID -f"]
    assert "PAUSED echo" in said_by["fleet status"] and "KILLED" not in said_by["fleet status"]
    assert "pause lifted" in said_by["fleet resume echo"]
    assert "kill switch engaged for the whole fleet: going to bed" in said_by['fleet kill --reason "going to bed"']
    assert "kill switch released" in run(folder, tour, "resume")
    assert run(folder, tour, "dispatch", "echo").startswith("queued run")

    # The page on a phone, and a kill from it.
    url = f"http://127.0.0.1:{web_port}/?token={token.group(1)}"
    with Browser(tmp_path / "phone-profile", PHONE, mobile=True) as phone:
        phone.goto(url)
        dom = phone.html()
        assert 'id="overall"' in dom and "agent-echo" in dom and "<svg" in dom
        assert phone.content_width() <= PHONE[0], "the page is wider than the phone: it scrolls sideways"
        phone.screenshot(ARTIFACTS / "newcomer-phone.png", whole=False)
        phone.screenshot(ARTIFACTS / "newcomer-phone-whole.png")
        phone.click("#kill-fleet")
        phone.type("#reason", "first ten minutes: done")
        phone.click("#confirm")
        assert "kill switch engaged for the whole fleet" in phone.html()
        phone.click("#back")
        assert '<header class="killed">' in phone.html()
        phone.screenshot(ARTIFACTS / "newcomer-phone-killed.png", whole=False)
    terminal.wait_for(r"KILLED the whole fleet by web:token@127\.0\.0\.1", 15, "the terminal's block to show the kill")
    (ARTIFACTS / "newcomer-terminal-killed.txt").write_text(terminal.screen())
    refused = run(folder, tour, "dispatch", "echo", code=3)
    assert "refused: killed" in refused and "web:token@127.0.0.1" in refused

    # Ctrl-C: what it stopped and how long it took.
    terminal.tmux("send-keys", "-t", "fleet", "C-c")
    terminal.wait_for(r"^stopped everything in [\d.]+ s$", 60, "the stop report")
    terminal.wait_for(r"FLEET-UP-EXITED-0", 10, "fleet up to exit 0")
    stopped = terminal.history()
    (ARTIFACTS / "newcomer-terminal-stopped.txt").write_text(stopped)
    for part in ("worker", "beat", "flower", "web"):
        assert re.search(rf"^  {part}\s+stopped \(exit code 0\)", stopped, re.MULTILINE), stopped
    for shot in ("newcomer-phone.png", "newcomer-phone-killed.png"):
        assert (ARTIFACTS / shot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        print(f"screenshot: {ARTIFACTS / shot}")


def test_closing_the_terminal_stops_everything(terminal: Terminal) -> None:
    """The terminal window closes under fleet up (SIGHUP, then a terminal that cannot be written to):
    every part is stopped all the same, the embedded server last, and nothing is left running."""
    folder = terminal.folder
    ports = {"FLEET_WEB_PORT": str(free_port()), "FLEET_FLOWER_PORT": str(free_port())}
    run(folder, newcomer_env(folder, **ports), "init")
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in {**ports, MARKER_VAR: terminal.socket}.items())
    terminal.tmux("new-session", "-d", "-s", "fleet", "-x", str(COLUMNS), "-y", str(ROWS), "-c", str(folder),
                  f"env {exports} {FLEET} up --embedded --workers 1; sleep 600")
    terminal.wait_for(r"● worker up .*● web up", 60, "every part up")
    embedded = terminal.wait_for(r"^\s+redis\s+redis://\S+\s+EMBEDDED.*\[pid (\d+)\]", 5, "the embedded server")
    valkey = int(embedded.group(1))
    terminal.tmux("kill-server")
    wait_for(lambda: not marked_processes(terminal.socket), 40, "fleet up and its parts to stop on the hang-up")
    wait_for(lambda: not _is_valkey(valkey), 10, "the embedded server to stop")
