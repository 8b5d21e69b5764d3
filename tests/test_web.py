"""The web process: probes, auth, /metrics, /api/state, run logs, and the page in a real headless Chromium.

Pure parts (auth, canary freshness, rendering, metric families) are plain unit tests; the rest runs a
real `fleet web` subprocess against the real test fleet (or a Redis database and SQLite file of its own).
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from xml.etree import ElementTree

import httpx
import pytest
import redis as redis_lib
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families
from sqlmodel import col, select

from fleet import db, keys, store
from fleet.charts import SpendSeries, spend_chart
from fleet.dispatch import DispatchRequest, dispatch
from fleet.keys import GLOBAL
from fleet.metrics import build_families
from fleet.models import DeadLetter, Run, RunEvent, RunStatus, WatchdogVerdict
from fleet.page import render_page
from fleet.web import (
    actor_of,
    allowed_hosts,
    authorized,
    canary_verdict,
    csrf_key,
    csrf_ok,
    csrf_token,
    host_allowed,
    is_loopback,
    make_app,
)
from tests.browser import PHONE, Browser
from tests.conftest import IN_CI
from tests.harness import ROOT, Fleet, pid_alive, wait_for, wait_for_pids

TOKEN = f"web-test-{uuid.uuid4().hex}"
ALLOWED = "fleet.example.test"  # FLEET_WEB_ALLOWED_HOSTS of the session's web
ARTIFACTS = ROOT / "test-artifacts"
NOW = datetime(2026, 11, 22, 2, 0, tzinfo=UTC)
HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)> & \'quoted\''


# ---------------------------------------------------------------- helpers


def free_port() -> int:
    """A loopback port free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str, **kwargs: Any) -> httpx.Response:
    """GET on loopback, never through a proxy from the environment."""
    return httpx.get(url, trust_env=False, **{"timeout": 15, **kwargs})


def bearer(token: str = TOKEN) -> dict[str, str]:
    """An Authorization header carrying `token`."""
    return {"Authorization": f"Bearer {token}"}


@dataclass
class WebProc:
    """A `fleet web` subprocess and where it listens."""

    proc: subprocess.Popen[bytes]
    base: str
    stderr: Path

    def log(self) -> str:
        """What it wrote to stderr (JSON log lines)."""
        return self.stderr.read_text(errors="replace")


def _answers(url: str) -> bool:
    try:
        return get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def start_web(env: dict[str, str], cwd: Path, stderr: Path) -> WebProc:
    """Start `fleet web` and wait until /livez answers."""
    port = free_port()
    env = {**{k: v for k, v in env.items() if k != "FLEET_WEB_HOST"}, "FLEET_WEB_PORT": str(port)}
    with stderr.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "fleet", "web"], env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err)
    web = WebProc(proc, f"http://127.0.0.1:{port}", stderr)

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"fleet web exited {proc.returncode}:\n{web.log()}")
        return _answers(f"{web.base}/livez")

    try:
        wait_for(up, 20, "fleet web to answer /livez", interval=0.1)
    except BaseException:
        stop_web(web)
        raise
    return web


def stop_web(web: WebProc) -> None:
    """SIGTERM, then make sure it is gone."""
    if web.proc.poll() is None:
        web.proc.terminate()
        try:
            web.proc.wait(10)
        except subprocess.TimeoutExpired:
            web.proc.kill()
            web.proc.wait(5)


@pytest.fixture(scope="session")
def web(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebProc]:
    """`fleet web` on the test fleet, behind TOKEN, also answering to ALLOWED."""
    env = {**fleet.env, "FLEET_WEB_TOKEN": TOKEN, "FLEET_WEB_ALLOWED_HOSTS": f" other.example.test, {ALLOWED.upper()}"}
    proc = start_web(env, fleet.tmp, tmp_path_factory.mktemp("web") / "web.err")
    yield proc
    stop_web(proc)


def send(fleet: Fleet, agent: str) -> str:
    """Dispatch one run of `agent` with a fresh work key; its run id."""
    result = dispatch(fleet.services, DispatchRequest(agent, f"web-{uuid.uuid4().hex}", None, False, actor="test"),
                      fleet.send_execute)
    assert result.status == "queued", result
    return str(result.run_id)


def wait_status(fleet: Fleet, run_id: str, statuses: set[str], timeout: float = 30) -> Run:
    """Wait until a run reaches one of `statuses`."""
    def reached() -> Run | None:
        with db.session(fleet.services.engine) as session:
            run = store.get_run(session=session, run_id=run_id)
        return run if run is not None and run.status in statuses else None

    return wait_for(reached, timeout, f"run {run_id} to reach {statuses}")


def picture(**changes: Any) -> dict[str, Any]:
    """A snapshot as `fleet.state.snapshot` shapes it, for the pure tests."""
    at = NOW.isoformat()
    base: dict[str, Any] = {
        "at": at, "kill": [], "runs_24h": {"succeeded": 3, "dead": 1},
        "running": [{"run_id": "a" * 32, "agent": "digest", "attempt": 1, "host": "h1", "pid": 42,
                     "started_at": (NOW - timedelta(seconds=30)).isoformat()}],
        "recent": [{"run_id": "b" * 32, "agent": "digest", "status": "dead", "attempt": 2, "exit_code": 1,
                    "cost_usd": 0.0, "created_at": at, "error": HOSTILE}],
        "dlq_depth": 1,
        "dead_letters": [{"id": 7, "agent": "digest", "run_id": "b" * 32, "reason": "failed", "attempts": 2,
                          "exit_code": 1, "error": HOSTILE, "created_at": at, "replayed_run_id": None}],
        "watchdog": {"status": "green", "at": at, "host": "h1",
                     "checks": [{"name": "beat", "status": "green", "reason": "fine"}]},
        "spend": {"day": "2026-11-22", "timezone": "UTC", "scopes": [
            {"scope": "*", "spent_usd": 4.5, "reserved_usd": 0.25, "cap_usd": 5.0, "left_usd": 0.25},
            {"scope": "digest", "spent_usd": 0.1, "reserved_usd": 0.05, "cap_usd": 1.0, "left_usd": 0.85},
            {"scope": "free", "spent_usd": 0.0, "reserved_usd": 0.0, "cap_usd": None, "left_usd": None}]},
        "redis": "ok", "queues": {"dispatch": 0, "agents": 2},
        "breakers": {"digest": {"state": "open", "failures": "3"}, "free": {"state": "closed"}},
        "paused": {}, "canaries": {q: {"sent": at, "back": at, "seen": at} for q in ("dispatch", "agents")},
        "beat": {"leader": "h1", "last_tick": at},
    }
    return base | changes


def section(dom: str, section_id: str) -> str:
    """The HTML of `<section id=section_id>` (or the banners div) in a page."""
    match = re.search(rf'<(section|div) id="{section_id}"[^>]*>(.*?)</\1>\s*(?=<section|<div class="grid"|<div '
                      rf'class="stats"|<div class="act"|<div class="row"|<table|<form|</main>|<footer|\Z)', dom, re.S)
    assert match, f"no #{section_id} in the page"
    return match.group(2)


# ---------------------------------------------------------------- pure units


UNIT_TOKEN = "unit-test-token-0123456789"  # parameters must be the same in every xdist worker


@pytest.mark.parametrize(("header", "query", "ok"), [
    (f"Bearer {UNIT_TOKEN}", None, True),
    (f"bearer   {UNIT_TOKEN}", None, True),
    ("", UNIT_TOKEN, True),
    ("Basic " + base64.b64encode(f"anyone:{UNIT_TOKEN}".encode()).decode(), None, True),
    ("Basic " + base64.b64encode(f"{UNIT_TOKEN}:".encode()).decode(), None, False),  # the token as user name
    ("Basic !!!not-base64", None, False),
    ("Bearer wrong", "also-wrong", False),
    (f"Bearer {UNIT_TOKEN}x", None, False),
    ("", None, False),
    (UNIT_TOKEN, None, False),
])
def test_authorized(header: str, query: str | None, ok: bool) -> None:
    assert authorized(UNIT_TOKEN, header, query) is ok
    assert authorized(None, header, query) is True  # make_app without a token is open: `fleet web` never is


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("", False), ("10.0.0.5", False), ("fleet.example.org", False),
])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(("header", "ok"), [
    ("127.0.0.1", True), ("127.0.0.1:8700", True), ("127.1.2.3:80", True), ("[::1]:8700", True), ("[::1]", True),
    ("::1", True), ("localhost", True), ("LOCALHOST:8700", True), ("localhost.:8700", True), (None, True),
    ("fleet.example.test", True), ("Fleet.Example.Test:443", True), ("10.0.0.5:8700", True),  # configured, bound
    ("attacker.example", False), ("attacker.example:8700", False), ("127.0.0.1.attacker.example", False),
    ("localhost.attacker.example", False), ("fleet.example.test.attacker.example", False), ("10.0.0.6", False),
    ("[::2]:8700", False), ("", False), ("0.0.0.0:8700", False), ("2130706433", False),
])
def test_host_allowed(header: str | None, ok: bool) -> None:
    """Loopback literals with any port, the bound host and configured names; nothing else (DNS rebinding)."""
    assert host_allowed(header, allowed_hosts("10.0.0.5", ["fleet.example.test"])) is ok


def test_a_wildcard_bind_names_no_host() -> None:
    assert allowed_hosts("0.0.0.0", []) == allowed_hosts("::", []) == frozenset()
    assert not host_allowed("0.0.0.0", allowed_hosts("0.0.0.0", []))
    assert host_allowed("[fd00::5]:8700", allowed_hosts("fd00::5", []))


def test_canary_freshness() -> None:
    fresh, old = (NOW - timedelta(seconds=30)).isoformat(), (NOW - timedelta(seconds=400)).isoformat()
    assert canary_verdict({"dispatch": fresh, "agents": fresh}, NOW, uptime_s=10_000)[0] is False
    down, why = canary_verdict({"dispatch": fresh, "agents": old}, NOW, uptime_s=10)
    assert down and "'agents' 400s ago" in why and "dispatch" not in why
    # Never seen: ready during the start-up grace, not after it.
    down, why = canary_verdict({"dispatch": None, "agents": None}, NOW, uptime_s=5)
    assert not down and "grace" in why
    down, why = canary_verdict({"dispatch": fresh, "agents": None}, NOW, uptime_s=600)
    assert down and "no canary has ever come back through 'agents'" in why


def test_page_escapes_untrusted_text_and_shows_what_matters() -> None:
    kill = {"scope": "*", "reason": HOSTILE, "actor": "ops", "hard": False, "since": NOW.isoformat()}
    html = render_page(picture(kill=[kill]), error=None, flower_url="http://h:5555/", token_query="?token=t%26",
                       host="h1").decode()
    assert "<script" not in html and "<img" not in html and "onerror=alert(1)>" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
    banners = section(html, "banners")
    assert "FLEET KILLED" in banners and "Circuit breaker not closed" in banners
    assert banners.index("FLEET KILLED") < banners.index("Circuit breaker")  # red first
    assert 'id="overall">KILLED<' in html
    assert 'href="/runs/' + "b" * 32 + '/log?token=t%26"' in section(html, "dlq")
    assert "90%" in section(html, "spend") or "95%" in section(html, "spend")  # 4.75 of 5.00
    assert 'href="http://h:5555/"' in html


def history_of(**changes: Any) -> dict[str, Any]:
    """What `fleet.state.history` gathers, for the pure tests: a day of spend, 24 hours, some durations."""
    start = NOW.replace(hour=0)
    steps = [(start + timedelta(minutes=10 * i), 0.2 * (i + 1)) for i in range(12)]
    hours = [(NOW - timedelta(hours=23 - i), {"succeeded": i % 5, "dead": int(i == 20)}) for i in range(24)]
    base = {"start": start, "end": start + timedelta(days=1), "now": NOW,
            "spend": [SpendSeries("whole fleet", steps, 5.0, 2.4), SpendSeries("digest", steps[:2], None, 0.4)],
            "hours": hours, "durations": {"digest": [(12.5, "succeeded"), (300.0, "dead")], HOSTILE: [(0.2, "idle")]}}
    return base | changes


def test_pictures_are_svg_drawn_here_with_every_label_escaped() -> None:
    """Spend against the cap, runs per hour, durations: well-formed inline SVG, no script, no external
    reference, untrusted labels escaped, the figures in their titles."""
    html = render_page(picture(), error=None, flower_url="http://h:5555/", token_query="", host="h1",
                       past=history_of()).decode()
    svgs = re.findall(r"<svg .*?</svg>", html, re.S)
    assert len(svgs) == 4  # the fleet's spend, digest's, runs per hour, durations
    for svg in svgs:
        tree = ElementTree.fromstring(svg)  # well-formed XML
        assert tree.tag.endswith("svg") and "<script" not in svg and "href" not in svg and "<img" not in svg
    assert "cap $5.00" in svgs[0] and "$2.40 of $5.00" in svgs[0]
    assert "(no cap)" in svgs[1] and "cap $" not in svgs[1]
    assert "&lt;script&gt;" in svgs[3] and "<script" not in svgs[3]
    hostile = spend_chart(SpendSeries(HOSTILE, [], 1.0, 0.5), NOW, NOW + timedelta(days=1), NOW)
    assert "&lt;script&gt;" in hostile and "<script" not in hostile
    assert "succeeded 46" in svgs[2] and "dead 1" in svgs[2]  # the legend counts 24 hours' runs
    assert "digest: median 2.6 min of 2 run(s)" in svgs[3]
    assert "http://" not in "".join(svgs).replace("http://www.w3.org/2000/svg", "")  # nothing fetched: works offline
    empty = render_page(picture(), error=None, flower_url="", token_query="", host="h1",
                        past=history_of(spend=[], durations={}, hours=[(NOW, {})])).decode()
    assert "no finished runs in the last 24 h" in empty


def test_page_when_the_database_cannot_be_read() -> None:
    html = render_page(None, error="OperationalError: <no db>", flower_url="http://h:5555/", token_query="",
                       host="h1").decode()
    assert "Cannot read the fleet&#x27;s state" in html and "&lt;no db&gt;" in html


def test_metric_families_without_redis() -> None:
    p = picture(redis="unreachable: ConnectionError")
    for key in ("queues", "breakers", "paused", "canaries", "beat"):
        p.pop(key)
    names = {f.name for f in build_families(p, {("digest", "dead"): 1}, {}, agents=["digest"])}
    assert {"fleet_redis_up", "fleet_spend_dollars", "fleet_dlq_depth", "fleet_kill_engaged"} <= names
    assert not names & {"fleet_queue_depth", "fleet_breaker_state", "fleet_last_tick_age_seconds"}


# ---------------------------------------------------------------- fleet web as a process


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_refuses_to_serve_without_a_token(tmp_path: Path, host: str) -> None:
    """A token is the default: without one `fleet web` does not start, on loopback either (exit 78)."""
    (tmp_path / "fleet.toml").write_text("[fleet]\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update({"FLEET_CONFIG": str(tmp_path / "fleet.toml"), "FLEET_WEB_HOST": host,
                "FLEET_WEB_PORT": str(free_port()), "FLEET_DATABASE_URL": f"sqlite:///{tmp_path / 'fleet.db'}"})
    proc = subprocess.run([sys.executable, "-m", "fleet", "web"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode == 78, proc.stderr
    assert "FLEET_WEB_TOKEN" in proc.stderr and "FLEET_WEB_TOKEN_FILE" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("token", ["hunter", "x" * 15, "a" * 8 + " " * 12])
def test_refuses_a_token_short_enough_to_guess(tmp_path: Path, token: str) -> None:
    """The token is all that stands between the network and the page's kill, resume and replay buttons: a
    five-letter one was served. Below 16 characters it is refused (78), saying how to make one; never echoed."""
    (tmp_path / "fleet.toml").write_text("[fleet]\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update({"FLEET_CONFIG": str(tmp_path / "fleet.toml"), "FLEET_WEB_TOKEN": token, "FLEET_WEB_HOST": "127.0.0.1",
                "FLEET_WEB_PORT": str(free_port()), "FLEET_DATABASE_URL": f"sqlite:///{tmp_path / 'fleet.db'}"})
    proc = subprocess.run([sys.executable, "-m", "fleet", "web"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode == 78, proc.stderr
    assert "at least 16 characters" in proc.stderr and "openssl rand -hex 32" in proc.stderr, proc.stderr
    assert token.strip() not in proc.stderr + proc.stdout and "Traceback" not in proc.stderr


def test_a_web_port_in_use_is_a_configuration_error(tmp_path: Path) -> None:
    """78 naming the port and FLEET_WEB_PORT, not 75 "safe to retry": a retry finds the port taken as well."""
    (tmp_path / "fleet.toml").write_text("[fleet]\n")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
        env.update({"FLEET_CONFIG": str(tmp_path / "fleet.toml"), "FLEET_WEB_TOKEN": TOKEN,
                    "FLEET_WEB_HOST": "127.0.0.1", "FLEET_WEB_PORT": str(busy), "FLEET_LOG_DIR": str(tmp_path / "logs"),
                    "FLEET_DATABASE_URL": f"sqlite:///{tmp_path / 'fleet.db'}"})
        proc = subprocess.run([sys.executable, "-m", "fleet", "web"], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode == 78, proc.stderr
    assert f"127.0.0.1:{busy} is already in use" in proc.stderr and "FLEET_WEB_PORT" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_readyz_names_redis_when_it_is_down(tmp_path: Path) -> None:
    (tmp_path / "fleet.toml").write_text("[fleet]\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update({"FLEET_CONFIG": str(tmp_path / "fleet.toml"), "FLEET_WEB_TOKEN": TOKEN,
                "FLEET_DATABASE_URL": f"sqlite:///{tmp_path / 'fleet.db'}",
                "FLEET_REDIS_URL": f"redis://:hunter2-secret@127.0.0.1:{free_port()}/0"})  # nothing listens
    web = start_web(env, tmp_path, tmp_path / "web.err")
    try:
        readyz = get(f"{web.base}/readyz")
        assert readyz.status_code == 503
        assert set(readyz.json()["down"]) == {"redis"}
        assert "hunter2" not in readyz.text
        health = get(f"{web.base}/health").json()
        assert health["status"] == "degraded" and health["components"]["redis"] != "ok"
        assert health["components"]["database"] == "ok"
    finally:
        stop_web(web)


def test_token_from_a_file_and_canary_freshness(tmp_path: Path, redis: redis_lib.Redis, redis_url: str) -> None:
    """FLEET_WEB_TOKEN_FILE is the token (stripped). /readyz follows the canaries."""
    (tmp_path / "fleet.toml").write_text("[fleet]\ndaily_cap_usd = 2.0\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    token_file = tmp_path / "web.token"
    token_file.write_text(f"\n {TOKEN}\n")
    token_file.chmod(0o600)
    env.update({"FLEET_CONFIG": str(tmp_path / "fleet.toml"), "FLEET_REDIS_URL": redis_url,
                "FLEET_DATABASE_URL": f"sqlite:///{tmp_path / 'fleet.db'}", "FLEET_LOG_DIR": str(tmp_path / "logs"),
                "FLEET_WEB_TOKEN_FILE": str(token_file)})
    subprocess.run([sys.executable, "-m", "fleet", "db", "upgrade"], env=env, cwd=tmp_path, check=True,
                   capture_output=True, timeout=60)
    web = start_web(env, tmp_path, tmp_path / "web.err")
    try:
        assert get(f"{web.base}/").status_code == 401
        assert get(f"{web.base}/api/state", headers=bearer()).json()["redis"] == "ok"
        assert get(f"{web.base}/metrics", headers=bearer()).status_code == 200
        # No canary ever: ready within the start-up grace.
        readyz = get(f"{web.base}/readyz")
        assert readyz.status_code == 200 and "grace" in readyz.json()["checks"]["canary"]
        old = (datetime.now(UTC) - timedelta(minutes=10)).isoformat()
        redis.set(keys.canary_seen("dispatch"), old)
        redis.set(keys.canary_seen("agents"), datetime.now(UTC).isoformat())
        readyz = get(f"{web.base}/readyz")
        assert readyz.status_code == 503 and set(readyz.json()["down"]) == {"canary"}
        assert "'dispatch'" in readyz.json()["down"]["canary"]
        assert get(f"{web.base}/health").json()["components"]["canary"]["status"] == "stale"
        redis.set(keys.canary_seen("dispatch"), datetime.now(UTC).isoformat())
        assert get(f"{web.base}/readyz").status_code == 200
    finally:
        stop_web(web)


# ---------------------------------------------------------------- against the test fleet


@pytest.mark.slow
def test_probes_need_no_auth(fleet: Fleet, web: WebProc) -> None:
    fleet.wait_consuming()  # a fresh canary through each queue
    with db.session(fleet.services.engine) as session:  # a healthy fleet has a verdict to report
        session.add(WatchdogVerdict(at=datetime.now(UTC), status="green", host="test", checks="[]"))
        session.commit()
    assert get(f"{web.base}/livez").text == "ok"
    readyz = get(f"{web.base}/readyz")
    assert readyz.status_code == 200, readyz.text
    assert readyz.json()["checks"] == {"redis": "ok", "database": "ok", "canary": readyz.json()["checks"]["canary"]}
    health = get(f"{web.base}/health")
    assert health.status_code == 200
    body = health.json()
    assert body["version"] and body["status"] == "ok"
    assert body["components"]["redis"] == body["components"]["database"] == "ok"
    assert body["components"]["canary"]["status"] == "ok"
    watchdog_part = body["components"]["watchdog"]
    assert set(watchdog_part) == {"status", "age_s"}, watchdog_part  # the newest verdict, not an error
    assert watchdog_part["status"] in ("green", "amber", "red")
    assert "echo" not in health.text  # no agent names without the token
    missing = get(f"{web.base}/no/such/page")
    assert missing.status_code == 404 and missing.headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.slow
def test_protected_routes_need_the_token(fleet: Fleet, web: WebProc) -> None:
    fleet.reset_agent("echo")
    run_id = send(fleet, "echo")
    wait_status(fleet, run_id, {"succeeded"})
    basic = "Basic " + base64.b64encode(f"ops:{TOKEN}".encode()).decode()
    for path in ("/", "/api/state", "/metrics", f"/runs/{run_id}/log"):
        url = f"{web.base}{path}"
        refused = get(url)
        assert refused.status_code == 401, path
        assert refused.headers["WWW-Authenticate"].startswith("Basic")
        assert get(url, headers=bearer("wrong")).status_code == 401, path
        assert get(url, params={"token": "wrong"}).status_code == 401, path
        for kwargs in ({"headers": bearer()}, {"params": {"token": TOKEN}}, {"headers": {"Authorization": basic}}):
            response = get(url, **kwargs)
            assert response.status_code == 200, (path, kwargs, response.text[:300])
    log = get(f"{web.base}/runs/{run_id}/log", headers=bearer())
    assert log.headers["Content-Type"].startswith("text/plain") and "fleet_usage" in log.text
    assert log.headers["X-Content-Type-Options"] == "nosniff"
    assert TOKEN not in web.log()  # ?token= never reaches a log line


@pytest.mark.slow
def test_a_foreign_host_header_is_refused_on_every_route_but_the_probes(fleet: Fleet, web: WebProc) -> None:
    """DNS rebinding: a page at attacker.example resolving to 127.0.0.1 gets 400, token or not."""
    fleet.wait_consuming()  # fresh canaries: /readyz answers 200
    run_id = send(fleet, "echo")
    wait_status(fleet, run_id, {"succeeded"})
    port = web.base.rsplit(":", 1)[1]
    routes = ("/", "/api/state", "/metrics", "/health", f"/runs/{run_id}/log", "/no/such/page")
    for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.nip.io", ""):
        for path in routes:
            for auth in ({}, bearer()):
                refused = get(f"{web.base}{path}", headers={**auth, "Host": host})
                assert refused.status_code == 400, (host, path, refused.status_code)
                assert "echo" not in refused.text and "Unknown Host" in refused.text.title()
        for probe in ("/livez", "/readyz"):
            assert get(f"{web.base}{probe}", headers={"Host": host}).status_code == 200, (host, probe)
    for host in (f"localhost:{port}", f"[::1]:{port}", f"127.0.0.1:{port}", ALLOWED, f"{ALLOWED}:{port}"):
        for path in routes[:-1]:
            assert get(f"{web.base}{path}", headers={**bearer(), "Host": host}).status_code == 200, (host, path)


@pytest.mark.slow
def test_api_state_is_fleet_status_json(fleet: Fleet, web: WebProc) -> None:
    response = get(f"{web.base}/api/state", headers=bearer())
    assert response.headers["Content-Type"] == "application/json"
    state, status = response.json(), fleet.cli_json("status")
    assert set(state) == set(status)
    assert [(s["scope"], s["cap_usd"]) for s in state["spend"]["scopes"]] == \
        [(s["scope"], s["cap_usd"]) for s in status["spend"]["scopes"]]
    assert state["kill"] == status["kill"] and state["redis"] == status["redis"] == "ok"
    assert [d["id"] for d in state["dead_letters"]] == [d["id"] for d in status["dead_letters"]]
    assert set(state["breakers"]) == set(status["breakers"]) == set(fleet.services.config.agents)


@pytest.mark.slow
def test_log_route_refuses_anything_but_a_run_id(fleet: Fleet, web: WebProc) -> None:
    secret_file = fleet.tmp / "keys" / "secret.key"
    for bad in ("..%2F..%2F..%2F..%2Fetc%2Fpasswd", "..%2Fkeys%2Fsecret.key", "%2e%2e", "A" * 32, "0" * 31,
                "0" * 33, "0" * 31 + "g", "0" * 32 + "%00"):
        response = get(f"{web.base}/runs/{bad}/log", headers=bearer())
        assert response.status_code == 400, (bad, response.status_code)
        assert "root:" not in response.text and secret_file.read_text().strip() not in response.text
    assert get(f"{web.base}/runs/{'0' * 32}/log", headers=bearer()).status_code == 404


@pytest.mark.slow
def test_metrics_after_a_dispatch(fleet: Fleet, web: WebProc) -> None:
    fleet.reset_agent("echo")
    run_id = send(fleet, "echo")
    wait_status(fleet, run_id, {"succeeded"})
    response = get(f"{web.base}/metrics", headers=bearer())
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/plain")
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value

    def value(name: str, **labels: str) -> float:
        return samples[name][tuple(sorted(labels.items()))]

    assert all(name.startswith("fleet_") for name in samples)
    assert value("fleet_scrape_ok") == 1 and value("fleet_redis_up") == 1
    assert value("fleet_info", version=next(iter(samples["fleet_info"]))[0][1]) == 1
    assert value("fleet_runs_last_24h", agent="echo", status="succeeded") >= 1
    assert value("fleet_spend_dollars", scope="echo") >= 0.01
    assert value("fleet_spend_dollars", scope="*") >= value("fleet_spend_dollars", scope="echo")
    assert value("fleet_spend_cap_dollars", scope="*") == 1000.0
    assert (("scope", "echo"),) not in samples["fleet_spend_cap_dollars"]  # echo has no cap of its own
    assert value("fleet_reservations_open", agent="echo") == 0  # settled
    assert value("fleet_kill_engaged", scope="*") == 0 and value("fleet_kill_engaged", scope="echo") == 0
    assert value("fleet_breaker_state", agent="echo", state="closed") == 1
    assert value("fleet_breaker_state", agent="echo", state="open") == 0
    assert set(samples["fleet_queue_depth"]) == {(("queue", "agents"),), (("queue", "dispatch"),)}
    assert value("fleet_dlq_depth") >= 0
    assert len(samples["fleet_watchdog_status"]) == 3 and sum(samples["fleet_watchdog_status"].values()) <= 1
    assert value("fleet_canary_age_seconds", queue="agents") >= 0
    # OpenMetrics when Prometheus asks for it.
    om = get(f"{web.base}/metrics", headers={**bearer(), "Accept": "application/openmetrics-text"})
    assert om.headers["Content-Type"].startswith("application/openmetrics-text")
    assert "fleet_dlq_depth" in {f.name for f in parse_openmetrics(om.text)}


# ---------------------------------------------------------------- the page in a real browser


def chromium(profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run headless Chromium once (skipped locally when it is not installed; a failure under CI)."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        if IN_CI:
            pytest.fail("chromium is required under CI=true (apt-get install -y chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return subprocess.run(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
         "--no-first-run", "--disable-component-update", "--disable-sync", "--no-proxy-server",
         f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL)


@pytest.mark.slow
def test_page_in_chromium(fleet: Fleet, web: WebProc, tmp_path: Path) -> None:
    """A dead letter and an agent's kill banner, as a browser shows them; a screenshot is kept."""
    fleet.reset_agent("fail")
    dead_id = send(fleet, "fail")
    wait_status(fleet, dead_id, {"dead"})
    fleet.cli("watchdog", "--wait", "10")  # a verdict for the page (exit 1 if red: fine, the page shows it)
    reason = 'bed <b>time</b> & "quotes" <script>alert(1)</script>'
    url = f"{web.base}/?token={TOKEN}"
    kind = "sqlite" if fleet.database_url.startswith("sqlite") else "postgresql"
    shot = ARTIFACTS / f"web-page-{kind}.png"
    ARTIFACTS.mkdir(exist_ok=True)
    shot.unlink(missing_ok=True)
    fleet.cli("kill", "exit3", "--reason", reason, check=True)
    try:
        dumped = chromium(tmp_path / "profile-dom", "--dump-dom", url)
        shown = chromium(tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1280,1600", url)
    finally:
        fleet.cli("resume", "exit3", check=True)
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    dom = dumped.stdout
    banners = section(dom, "banners")
    assert "Agent exit3 killed" in banners
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in banners and "&lt;b&gt;time&lt;/b&gt;" in banners
    assert "<script" not in dom and "<b>time</b>" not in dom
    assert 'id="overall">ATTENTION<' in dom
    dlq = section(dom, "dlq")
    log_href = f"/runs/{dead_id}/log?token={TOKEN}"
    assert dead_id[:12] in dlq and log_href in dlq and "fail" in dlq
    assert "exit code 1" in dlq  # the dead letter's last error
    assert f'href="http://127.0.0.1:{fleet.settings.flower_port}/"' in dom
    assert "Watchdog" in section(dom, "watchdog") and "consumption:agents" in section(dom, "watchdog")
    log = get(f"{web.base}{log_href}")
    assert log.status_code == 200 and "boom: the failing agent" in log.text
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    print(f"screenshot of the page ({kind}): {shot}")


def test_artifacts_are_ignored_by_git() -> None:
    ignored = subprocess.run(["git", "check-ignore", "-q", str(ARTIFACTS / "x.png")], cwd=ROOT, timeout=30)
    if ignored.returncode == 128:
        pytest.skip("not a git checkout")
    assert ignored.returncode == 0


# ---------------------------------------------------------------- the page acts


def page_csrf(web: WebProc, **kwargs: Any) -> str:
    """The CSRF token of the page's forms, as a browser would find it."""
    page = get(f"{web.base}/", **({"headers": bearer()} | kwargs))
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found, page.text[:500]
    return found.group(1)


def post(web: WebProc, path: str, data: dict[str, str], **kwargs: Any) -> httpx.Response:
    """POST a form on loopback, never through a proxy."""
    return httpx.post(f"{web.base}{path}", data=data, trust_env=False, **{"timeout": 30, "headers": bearer(), **kwargs})


def make_dead_letter(fleet: Fleet, agent: str) -> int:
    """A dead letter of `agent` as the executor leaves one (its run dead after two attempts); its id."""
    now = datetime.now(UTC)
    run_id, key = uuid.uuid4().hex, f"web-dead-{uuid.uuid4().hex}"
    with db.session(fleet.services.engine) as session:
        session.add(Run(id=run_id, idem_key=f"{agent}:{key}", agent=agent, work_key=key, status=RunStatus.DEAD,
                        attempt=2, exit_code=1, error="exit code 1", created_at=now, updated_at=now, finished_at=now))
        dead = DeadLetter(run_id=run_id, agent=agent, reason="failed", attempts=2, exit_code=1,
                          last_error="exit code 1 (left by the test)", created_at=now)
        session.add(dead)
        session.commit()
        assert dead.id is not None
        return dead.id


def events_of(fleet: Fleet, kind: str) -> list[RunEvent]:
    with db.session(fleet.services.engine) as session:
        return list(session.exec(select(RunEvent).where(RunEvent.kind == kind)))


def test_csrf_tokens_expire_and_cannot_be_forged() -> None:
    key, other = csrf_key("a-token"), csrf_key("another-token")
    token = csrf_token(key, 1_000_000.0)
    assert csrf_ok(key, token, 1_000_000.0 + 3600)
    assert not csrf_ok(key, token, 1_000_000.0 + 13 * 3600)  # too old
    assert not csrf_ok(other, token, 1_000_000.0)  # another web's token (another FLEET_WEB_TOKEN)
    stamp, mac = token.split(".")
    assert not csrf_ok(key, f"{int(stamp) + 100}.{mac}", 1_000_000.0)  # a fresher stamp, same MAC
    assert not csrf_ok(key, "", 1_000_000.0) and not csrf_ok(key, "x.y", 1_000_000.0)
    assert actor_of("Basic " + base64.b64encode(b"ops <b>:pw").decode(), "10.0.0.1") == "web:opsb@10.0.0.1"
    assert actor_of(f"Bearer {UNIT_TOKEN}", "127.0.0.1") == "web:token@127.0.0.1"


@pytest.mark.slow
def test_actions_are_post_only_behind_the_token_and_a_csrf_token(fleet: Fleet, web: WebProc) -> None:
    """No GET acts; a POST needs the token, this page's CSRF token and a same-site request; kill and purge
    only ask until confirmed; the actor is `web:<who>`."""
    agent = "exit3"
    fleet.reset_agent(agent)
    csrf = page_csrf(web)
    form = {"csrf": csrf, "agent": agent, "reason": "web test", "confirm": "yes"}
    assert get(f"{web.base}/act/kill", headers=bearer()).status_code == 405
    assert post(web, "/act/kill", form, headers={}).status_code == 401
    assert post(web, "/act/kill", form | {"csrf": "1.forged"}).status_code == 403
    assert post(web, "/act/kill", {k: v for k, v in form.items() if k != "csrf"}).status_code == 403
    assert post(web, "/act/kill", form, headers={**bearer(), "Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert post(web, "/act/kill", form, headers={**bearer(), "Host": "attacker.example"}).status_code == 400
    assert not fleet.redis.exists(keys.kill(agent)), "a refused POST engaged the kill"
    asked = post(web, "/act/kill", form | {"confirm": ""})
    assert asked.status_code == 200 and "Kill agent exit3?" in asked.text and 'name="confirm" value="yes"' in asked.text
    assert not fleet.redis.exists(keys.kill(agent)), "the kill was engaged before it was confirmed"
    basic = {"Authorization": "Basic " + base64.b64encode(f"night-ops:{TOKEN}".encode()).decode()}
    try:
        done = post(web, "/act/kill", form, headers=basic)
        assert done.status_code == 200 and "kill switch engaged for agent exit3: web test" in done.text
        assert fleet.redis.exists(keys.kill(agent))
        (engaged,) = [e for e in events_of(fleet, "kill.engaged")
                      if e.agent == agent and "web test" in (e.detail or "")]
        assert engaged.actor == "web:night-ops@127.0.0.1"
        refused = fleet.cli("dispatch", agent)
        assert refused.returncode == 3 and "web:night-ops@127.0.0.1" in refused.stdout
    finally:
        resumed = post(web, "/act/resume", {"csrf": csrf, "agent": agent})
    assert resumed.status_code == 200 and f"resumed agent {agent} (kill switch released)" in resumed.text
    assert not fleet.redis.exists(keys.kill(agent))
    paused = post(web, "/act/pause", {"csrf": csrf, "agent": agent, "reason": "key rotation"})
    assert "paused agent exit3: key rotation" in paused.text
    assert "Agent exit3 paused" in section(get(f"{web.base}/", headers=bearer()).text, "banners")
    assert "pause lifted" in post(web, "/act/resume", {"csrf": csrf, "agent": agent}).text
    plan = post(web, "/act/dry-run", {"csrf": csrf, "agent": "echo"})
    assert plan.status_code == 200 and "a dispatch of echo would fire now" in plan.text and 'id="gates"' in plan.text
    assert post(web, "/act/dry-run", {"csrf": csrf, "agent": "no-such-agent"}).status_code == 404
    dead = make_dead_letter(fleet, "fail")
    asked = post(web, "/act/purge", {"csrf": csrf, "dead": str(dead)})
    assert f"Purge dead letter {dead} for good?" in asked.text
    with db.session(fleet.services.engine) as session:
        assert session.get(DeadLetter, dead) is not None
    purged = post(web, "/act/purge", {"csrf": csrf, "dead": str(dead), "confirm": "yes"})
    assert purged.status_code == 200 and "purged 1 dead letter(s)" in purged.text
    with db.session(fleet.services.engine) as session:
        assert session.get(DeadLetter, dead) is None
    assert post(web, "/act/purge", {"csrf": csrf, "dead": str(dead), "confirm": "yes"}).status_code == 404


@contextmanager
def serving(services: Any) -> Iterator[str]:
    """make_app(services) behind TOKEN on a free loopback port, served by a thread's own event loop (no
    workers, no subprocess); its base URL."""
    import tornado.httpserver
    import tornado.netutil

    loop = asyncio.new_event_loop()
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    port = sockets[0].getsockname()[1]

    def run() -> None:
        asyncio.set_event_loop(loop)
        server = tornado.httpserver.HTTPServer(make_app(services, token=TOKEN))
        server.add_sockets(sockets)
        loop.run_forever()
        server.stop()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: _answers(f"http://127.0.0.1:{port}/livez"), 20, "the in-process web to answer", interval=0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def act(base: str, path: str, data: dict[str, str]) -> httpx.Response:
    """POST an action's form with a fresh CSRF token of TOKEN's web."""
    form = {"csrf": csrf_token(csrf_key(TOKEN), time.time()), **data}
    return httpx.post(f"{base}{path}", data=form, trust_env=False, timeout=30, headers=bearer())


def test_an_action_sent_with_another_sites_origin_is_refused(services: Any) -> None:
    """A browser that sends no Sec-Fetch-Site (older ones, some webviews) still sends Origin with a POST: one
    naming another site was let through to the CSRF check alone (found by a new user's walk through the
    README); it is refused, and the page's own origin is not."""
    with serving(services) as base:
        form = {"csrf": csrf_token(csrf_key(TOKEN), time.time()), "agent": "*", "reason": "origin test"}
        own = urlsplit(base).netloc

        def pause(origin: str) -> httpx.Response:
            return httpx.post(f"{base}/act/pause", data=form, trust_env=False, timeout=30,
                              headers={**bearer(), "Origin": origin})

        foreign = pause("http://evil.example")
        assert foreign.status_code == 403 and "another site" in foreign.text, foreign.text
        assert not services.redis.exists(keys.paused(GLOBAL))
        mine = pause(f"http://{own}")
        assert mine.status_code == 200, mine.text
    assert services.redis.exists(keys.paused(GLOBAL))


def test_the_page_picks_up_an_agent_added_to_fleet_toml(services: Any) -> None:
    """The worker and beat reload a changed fleet.toml, and ran an agent added to it; the page kept the file it
    started with: it did not list that agent and refused to pause or kill it (404, "unknown agent") until a
    restart (found by a new user's walk through the README)."""
    config = services.settings.config
    name = f"added-{uuid.uuid4().hex[:8]}"
    with serving(services) as base:
        assert get(f"{base}/", headers=bearer()).status_code == 200  # the page as it started
        config.write_text(config.read_text() + f'\n[agents.{name}]\ncommand = ["true"]\nest_cost_usd = 0.01\n')
        os.utime(config, (time.time() + 5, time.time() + 5))  # a new mtime, however coarse the file system's clock
        page = get(f"{base}/", headers=bearer())
        paused = act(base, "/act/pause", {"agent": name, "reason": "added"})
        resumed = act(base, "/act/resume", {"agent": name})
    assert page.status_code == 200 and f'value="{name}"' in page.text
    assert paused.status_code == 200 and f"paused agent {name}" in paused.text, paused.text
    assert resumed.status_code == 200, resumed.text
    assert not services.redis.exists(keys.paused(name))


@pytest.mark.parametrize(("path", "dead"), [("/act/replay", "abc"), ("/act/replay", ""), ("/act/purge", "abc"),
                                            ("/act/purge", "")])
def test_a_dead_letter_id_that_is_not_a_number_is_a_400(services: Any, path: str, dead: str) -> None:
    """It was a 500 with a traceback in web.log: the id was read before the action's own error handling."""
    with serving(services) as base:
        refused = act(base, path, {"dead": dead, "confirm": "yes"})
        asked = act(base, path, {"dead": dead})  # refused before a confirmation is asked for
    for answer in (refused, asked):
        assert answer.status_code == 400, answer.text
        assert "a dead letter id is a whole number" in answer.text


@pytest.mark.parametrize("path", ["/act/pause", "/act/kill", "/act/resume"])
def test_an_action_without_its_scope_is_refused_not_fleet_wide(services: Any, path: str) -> None:
    """A form without `agent` paused (or killed) the whole fleet with reason "-": the scope must be said, "*"
    for the fleet as the page's own forms send."""
    with serving(services) as base:
        for data in ({}, {"agent": ""}, {"agent": "  "}):
            refused = act(base, path, {**data, "reason": "no scope", "confirm": "yes"})
            assert refused.status_code == 400, refused.text
            assert "agent" in refused.text and "*" in refused.text
        assert not services.redis.exists(keys.kill(keys.GLOBAL)) and not services.redis.exists(keys.paused(keys.GLOBAL))
        with db.session(services.engine) as session:
            assert not list(session.exec(select(RunEvent).where(col(RunEvent.kind).in_(
                ["kill.engaged", "pause.engaged", "kill.released", "pause.released"]))))
        paused = act(base, "/act/pause", {"agent": "*", "reason": "the page's own form"})
        assert paused.status_code == 200 and "paused the whole fleet: the page&#x27;s own form" in paused.text
        assert act(base, "/act/resume", {"agent": "*"}).status_code == 200


@pytest.mark.slow
def test_kill_and_replay_from_the_page_in_chromium(fleet: Fleet, web: WebProc, tmp_path: Path) -> None:
    """In a real browser: replay a dead letter (its work runs once), then kill the fleet from the page (every
    running agent's process is gone, the header and banner turn red), at desktop and phone width."""
    kind = "sqlite" if fleet.database_url.startswith("sqlite") else "postgresql"
    pidfile = fleet.tmp / "long.pids"
    pidfile.unlink(missing_ok=True)
    fleet.reset_agent("long")
    fleet.reset_agent("counter")
    long_runs = [send(fleet, "long") for _ in range(3)]
    pids = [pid for line in wait_for_pids(pidfile, 60, lines=3) for pid in line]
    counter = fleet.tmp / "counter.txt"
    before = counter.read_text().splitlines() if counter.exists() else []
    dead = make_dead_letter(fleet, "counter")
    url = f"{web.base}/?token={TOKEN}"
    ARTIFACTS.mkdir(exist_ok=True)
    with Browser(tmp_path / "profile") as browser:
        try:
            browser.goto(url)
            browser.screenshot(ARTIFACTS / f"web-desktop-{kind}.png")
            browser.click(f"#replay-{dead}")
            said = section(browser.html(), "said")
            found = re.search(rf"replayed dead letter {dead} of counter as run ([0-9a-f]{{32}})", said)
            assert found, said
            replayed = wait_status(fleet, found.group(1), {"succeeded", "dead", "failed"})
            assert replayed.status == "succeeded" and replayed.replay_of == dead
            browser.click("#back")
            assert f'id="replay-{dead}"' not in browser.html()  # replayed: its button is gone
            browser.resize(PHONE, mobile=True)
            browser.goto(url)
            browser.screenshot(ARTIFACTS / f"web-phone-{kind}.png")
            assert browser.content_width() <= PHONE[0], "the page is wider than the phone: it scrolls sideways"
            browser.click("#kill-fleet")
            assert "Kill the whole fleet?" in browser.html()
            browser.type("#reason", "2am: runaway agent")
            browser.click("#confirm")
            assert "kill switch engaged for the whole fleet: 2am: runaway agent" in section(browser.html(), "said")
            wait_for(lambda: not any(pid_alive(pid) for pid in pids), 15, "every agent process to be gone")
            for run_id in long_runs:
                assert wait_status(fleet, run_id, {"killed", "succeeded", "dead", "failed"}).status == "killed"
            browser.click("#back")
            dom = browser.html()
            browser.screenshot(ARTIFACTS / f"web-phone-killed-{kind}.png", whole=False)  # the first screen
            assert '<header class="killed">' in dom and 'id="overall">KILLED<' in dom
            banner = section(dom, "banners")
            assert 'class="banner red"' in banner and "FLEET KILLED" in banner and "2am: runaway agent" in banner
            assert 'id="resume-fleet"' in dom and 'id="kill-fleet"' not in dom
            (engaged,) = [e for e in events_of(fleet, "kill.engaged") if "2am: runaway agent" in (e.detail or "")]
            assert engaged.actor == "web:token@127.0.0.1"
            browser.click("#resume-fleet")
            assert "resumed the whole fleet (kill switch released)" in section(browser.html(), "said")
        finally:
            fleet.cli("resume", check=True)
    after = counter.read_text().splitlines()
    assert [line.split()[0] for line in after[len(before):]] == [found.group(1)]  # the replay ran once
    twice = post(web, "/act/replay", {"csrf": page_csrf(web), "dead": str(dead)})
    assert f"was replayed already, as run {found.group(1)}" in twice.text
    for shot in ("desktop", "phone", "phone-killed"):
        path = ARTIFACTS / f"web-{shot}-{kind}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000
        print(f"screenshot ({shot}, {kind}): {path}")


def test_history_reads_today_s_spend_the_last_day_s_outcomes_and_durations(services: Any) -> None:
    """fleet.state.history on a real database: a run's cost is a step at its finish, today's only; runs
    per hour by outcome over 24 hours; durations of finished runs."""
    from fleet import ledger
    from fleet.state import history

    now = datetime.now(UTC)
    with db.session(services.engine) as session:
        day = ledger.budget_day(session, services.config.fleet.timezone)
        rows = [("echo", RunStatus.SUCCEEDED, 30, 20_000, day), ("echo", RunStatus.DEAD, 5, 0, day),
                ("fail", RunStatus.FAILED, 90, 5_000, "2000-01-01"), ("echo", RunStatus.RUNNING, None, 7_000, day)]
        for agent, status, seconds, cost, budget_day in rows:
            key = uuid.uuid4().hex
            finished = None if seconds is None else now - timedelta(minutes=1)
            started = (finished or now) - timedelta(seconds=seconds or 10)
            session.add(Run(id=uuid.uuid4().hex, idem_key=f"{agent}:{key}", agent=agent, work_key=key, status=status,
                            cost_micros=cost, budget_day=budget_day, created_at=started, updated_at=now,
                            started_at=started, finished_at=finished))
        session.commit()
    past = history(services)
    fleet_series = next(s for s in past["spend"] if s.name == "whole fleet")
    assert [round(usd, 3) for _, usd in fleet_series.points] == [0.02, 0.027]  # yesterday's run is not today's
    assert past["start"] <= now < past["end"]
    assert sum(c.get("succeeded", 0) for _, c in past["hours"]) == 1
    assert sum(c.get("dead", 0) for _, c in past["hours"]) == 1 and len(past["hours"]) == 24
    assert sorted(round(s) for s, _ in past["durations"]["echo"]) == [5, 30]
    assert [round(s) for s, _ in past["durations"]["fail"]] == [90]
