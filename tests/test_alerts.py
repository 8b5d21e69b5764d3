"""fleet.alerts: Sentry on, secrets off. Everything that is sent goes to a real loopback stand-in for Sentry
(tests/sentry_server.py) from real processes, and the leak checks search the raw decompressed bytes.

Sentry is never initialised inside the pytest process: each scenario runs in a subprocess of its own.
The control scenarios show the checks can fail: a bare `sentry_sdk.init` does leak locals and argv.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet import alerts, db, store
from fleet.config import Settings
from fleet.dispatch import DispatchRequest, dispatch
from fleet.models import RunStatus
from tests.harness import PY, ROOT, SECRET_KEY, SECRET_TOKEN, Fleet, PrivateRedis, wait_for
from tests.sentry_server import SentryServer, parse_envelope

WORKER_PROJECT, BEAT_PROJECT = "1", "2"  # two DSNs tell the worker's envelopes from beat's


@pytest.fixture
def sentry() -> Iterator[SentryServer]:
    """A fresh Sentry stand-in on a free loopback port."""
    with SentryServer() as server:
        yield server


def run_scenario(server: SentryServer | None, code: str, tmp_path: Path, *, prelude: str = "",
                 args: tuple[str, ...] = (), env: dict[str, str] | None = None,
                 expect_exit: int = 0) -> subprocess.CompletedProcess[str]:
    """Run `prelude` then `code` as a script in a fresh Python with FLEET_SENTRY_DSN pointing at `server`."""
    script = tmp_path / f"scenario_{uuid.uuid4().hex[:8]}.py"
    script.write_text(prelude + textwrap.dedent(code))
    full = {k: v for k, v in os.environ.items() if not k.startswith(("SENTRY_", "FLEET_"))}
    full |= {"PYTHONPATH": str(ROOT), **({"FLEET_SENTRY_DSN": server.dsn()} if server else {}), **(env or {})}
    proc = subprocess.run([PY, str(script), *args], env=full, cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == expect_exit, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


GUARDED = """
import json, os, sys, subprocess
import sentry_sdk
from fleet import alerts
from fleet.config import load_settings
assert alerts.init_sentry(load_settings(), "test")
"""
BARE = """
import json, os, sys, subprocess
import sentry_sdk
sentry_sdk.init(dsn=os.environ["FLEET_SENTRY_DSN"])
"""


def tagged(event: dict[str, Any], **tags: str) -> bool:
    """Whether an event carries these tags (sentry-sdk sends tags as an object)."""
    have = event.get("tags") or {}
    if isinstance(have, list):
        have = dict(have)
    return all(have.get(name) == value for name, value in tags.items())


# ---------------------------------------------------------------- the scrubber, as plain functions


@pytest.mark.parametrize("text", [
    "ANTHROPIC_API_KEY=plainvalue-{s}",
    "export OPENAI_API_KEY='{s} with spaces'",
    '{{"api_key": "{s}"}}',
    "Authorization: Bearer {s}",
    "redis://:{s}@redis.internal:6379/0",
    "postgresql+psycopg://fleet:{s}@db/fleet",
    "https://x:{s}@github.com/org/repo.git",
    "claude --api-key {s} -p hello",
    "password: {s}, then",
    "sk-ant-api03-{s}",
])
def test_scrub_text_masks_secret_shapes(text: str) -> None:
    secret = uuid.uuid4().hex
    scrubbed = alerts.scrub_text(text.format(s=secret))
    assert secret not in scrubbed and alerts.REDACTED in scrubbed
    assert alerts.scrub_text(scrubbed) == scrubbed  # alert() scrubs, then before_send scrubs again


def test_scrub_text_masks_long_mixed_tokens_but_keeps_ids() -> None:
    assert alerts.scrub_text(f"token {SECRET_TOKEN} used") == f"token {alerts.REDACTED} used"
    kept = [uuid.uuid4().hex, str(uuid.uuid4()), "fleet.sweep.reaper", "fleet@0.1.0", "celery@worker-1",
            "/tmp/pytest-of-root/pytest-12/test_Secret0ABCDEFGHIJKLMNOPQ/fleet.toml", "token was refused",
            "sentry_sdk.integrations.celery.CeleryIntegration"]
    for text in kept:
        assert alerts.scrub_text(text) == text


def test_scrub_is_recursive_and_goes_by_name() -> None:
    secret = uuid.uuid4().hex  # no shape to spot: only the names give these away
    event = {"extra": {"ANTHROPIC_API_KEY": secret, "nested": [{"Password": secret}, ({"x-auth-token": secret},)],
                       "Cookie": {"sessionid": secret}, "fine": "visible", "count": 3, "DB_DSN": secret},
             "contexts": {"agent": {"secret_env": {"TOKEN": secret}, "private_key_file": secret, "enabled": None}}}
    scrubbed = alerts.scrub(event)
    assert secret not in json.dumps(scrubbed)
    assert scrubbed["extra"]["fine"] == "visible" and scrubbed["extra"]["count"] == 3
    assert scrubbed["contexts"]["agent"]["enabled"] is None


def test_celery_job_arguments_keep_ids_and_mask_payloads() -> None:
    secret = uuid.uuid4().hex
    event = {"extra": {"celery-job": {"task_name": "fleet.dispatch",
                                      "args": ["echo", "work-1", {"note": secret}, False, f"free text {secret} here"],
                                      "kwargs": {"payload": secret, "agent": "echo", "run_id": "abc123"}}}}
    job = alerts.scrub_event(event)["extra"]["celery-job"]
    assert job["args"] == ["echo", "work-1", alerts.REDACTED, False, alerts.REDACTED]
    assert job["kwargs"] == {"payload": alerts.REDACTED, "agent": "echo", "run_id": "abc123"}


def test_breadcrumbs_of_subprocesses_are_dropped_and_others_scrubbed() -> None:
    assert alerts.scrub_breadcrumb({"type": "subprocess", "category": "subprocess", "message": "echo hi"}) is None
    crumb = alerts.scrub_breadcrumb({"category": "log", "message": "using ANTHROPIC_API_KEY=abc", "data": {}})
    assert crumb == {"category": "log", "message": f"using ANTHROPIC_API_KEY={alerts.REDACTED}", "data": {}}


def test_check_ins_get_margins_and_keep_their_own() -> None:
    check_in = {"type": "check_in", "monitor_slug": "fleet.watchdog",
                "monitor_config": {"schedule": {"type": "crontab", "value": "* * * * *"}, "max_runtime": 2}}
    config = alerts.scrub_event(check_in)["monitor_config"]
    assert config["checkin_margin"] == alerts.CRON_MARGINS["checkin_margin"] and config["max_runtime"] == 2


def test_deduper_says_yes_once_per_window() -> None:
    now = [100.0]
    seen = alerts.Deduper(60.0, clock=lambda: now[0])
    key = ("dead_letter", "echo", "r1")
    assert seen.first(key) and not seen.first(key) and seen.first(("dead_letter", "echo", "r2"))
    now[0] += 59.9
    assert not seen.first(key)
    now[0] += 60.1
    assert seen.first(key)


def test_alert_without_sentry_logs_and_never_raises(capfd: pytest.CaptureFixture[str]) -> None:
    assert alerts.init_sentry(Settings(sentry_dsn=None), "test") is False and not alerts.enabled()

    class Unprintable:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    run_id = uuid.uuid4().hex
    alerts.alert("overspend", "agent echo spent over its cap", agent="echo", run_id=run_id, level="bogus",
                 api_key="sk-should-not-print-0123456789", odd=Unprintable())
    alerts.alert(alerts.Kind.KILL_ENGAGED, "kill engaged", run_id=run_id)
    alerts.flush()
    out = capfd.readouterr()
    assert run_id in out.err and "sk-should-not-print" not in out.err
    assert run_id not in out.out  # stdout is where `--json` output goes


# ---------------------------------------------------------------- the envelope parser


def test_envelope_parser_reads_length_and_line_items() -> None:
    payload = b'{"a":\n"b"}'  # a raw newline inside: only the length says where it ends
    body = (b'{"event_id":"e1"}\n{"type":"event","length":%d}\n%s\n{"type":"check_in"}\n{"status":"ok"}'
            % (len(payload), payload))
    headers, items = parse_envelope(body)
    assert headers == {"event_id": "e1"}
    assert [(i.type, i.json()) for i in items] == [("event", {"a": "b"}), ("check_in", {"status": "ok"})]


def test_sentry_server_is_parallel_safe() -> None:
    with SentryServer() as one, SentryServer() as two:
        assert one.port != two.port and one.dsn("7").endswith(f":{one.port}/7")


# ---------------------------------------------------------------- Sentry in real processes


@pytest.mark.parametrize("process", ["dispatch", "web"])
def test_init_once_with_safe_options_and_no_celery(sentry: SentryServer, tmp_path: Path, process: str) -> None:
    proc = run_scenario(sentry, """
        import sys
        import sentry_sdk
        from fleet import alerts
        from fleet.config import load_settings
        assert not any(m.split(".")[0] == "celery" for m in sys.modules), "fleet.alerts imported Celery"
        settings = load_settings()
        assert alerts.init_sentry(settings, sys.argv[1]) is True
        client = sentry_sdk.get_client()
        assert alerts.init_sentry(settings, "worker", celery=True) is True
        assert sentry_sdk.get_client() is client, "a second init replaced the client"
        assert not any(m.split(".")[0] == "celery" for m in sys.modules), "init imported Celery unasked"
        options = client.options
        assert options["send_default_pii"] is False and options["include_local_variables"] is False
        assert options["release"].startswith("fleet@") and options["max_breadcrumbs"] <= 50
        sentry_sdk.capture_message("tagged")
        alerts.flush()
        print(sorted(client.integrations))
    """, tmp_path, args=(process,))
    integrations = proc.stdout
    assert "stdlib" not in integrations and "argv" not in integrations and "celery" not in integrations
    assert "excepthook" in integrations  # crashes are still reported
    assert ("tornado" in integrations) == (process == "web")
    event = sentry.wait_for(lambda: sentry.events(), 10, "the tagged event")[0]
    assert tagged(event, process=process)  # the first call named the process; the second changed nothing


def test_bad_dsn_is_a_config_error_that_names_no_secret(tmp_path: Path) -> None:
    proc = run_scenario(None, """
        from fleet import alerts
        from fleet.config import load_settings
        from fleet.errors import ConfigError
        try:
            alerts.init_sentry(load_settings(), "cli")
        except ConfigError as exc:
            print(f"refused: {exc} ({exc.exit_code})")
    """, tmp_path, env={"FLEET_SENTRY_DSN": "not-a-dsn-hunter2"})
    assert "refused: FLEET_SENTRY_DSN" in proc.stdout and "78" in proc.stdout and "hunter2" not in proc.stdout


def test_alert_reaches_sentry_tagged_once_per_transition(sentry: SentryServer, tmp_path: Path) -> None:
    run_scenario(sentry, """
        for _ in range(5):  # one transition, reported five times in a row: one event
            alerts.alert("dead_letter", "run r1 of echo was dead-lettered", agent="echo", run_id="r1",
                         level="warning", attempts=2, reason="failed")
        alerts.alert("breaker_opened", "breaker of echo opened", agent="echo")
        alerts.alert("dead_letter", "run r2 of echo was dead-lettered", agent="echo", run_id="r2")
        alerts.flush()
    """, tmp_path, prelude=GUARDED)
    # Events leave in order: once r2's is here, any repeat of r1's would have arrived before it.
    sentry.wait_for(lambda: any(tagged(e, run_id="r2") for e in sentry.events()), 10, "the r2 alert")
    events = sentry.events()
    first = [e for e in events if tagged(e, alert="dead_letter", run_id="r1")]
    assert len(first) == 1 and len(events) == 3
    event = first[0]
    assert tagged(event, agent="echo", process="test") and event["level"] == "warning"
    assert event["fingerprint"] == ["dead_letter", "echo"]
    assert event["contexts"]["alert"] == {"kind": "dead_letter", "attempts": 2, "reason": "failed"}
    assert "run r1 of echo" in json.dumps(event)
    breaker = next(e for e in events if tagged(e, alert="breaker_opened"))
    assert breaker["level"] == "error" and "run_id" not in (breaker.get("tags") or {})
    assert not sentry.errors and {env.encoding for env in sentry.envelopes} <= {"gzip", "br"}


def test_secrets_in_extra_context_and_breadcrumbs_never_reach_sentry(sentry: SentryServer, tmp_path: Path) -> None:
    secrets = {name: f"{name}-{uuid.uuid4().hex}" for name in
               ("anthropic", "api", "bearer", "redis", "pg", "nested", "token", "log", "cli", "message")}
    visible = f"visible-{uuid.uuid4().hex}"
    run_scenario(sentry, """
        import logging
        s = json.loads(os.environ["SCENARIO_SECRETS"])
        visible = os.environ["SCENARIO_VISIBLE"]
        sentry_sdk.add_breadcrumb(category="deploy", message=f"step {visible} with ANTHROPIC_API_KEY={s['anthropic']}",
                                  data={"headers": {"Accept": "json", "Authorization": f"Bearer {s['bearer']}"},
                                        "urls": [f"redis://:{s['redis']}@redis.internal:6379/0"]})
        logging.getLogger("fleet.test").warning("connecting to postgresql://fleet:%s@db/fleet", s["pg"])
        sentry_sdk.set_context("deploy", {"region": visible,
                                          "config": {"api_key": s["api"], "deep": [[{"password": [s["nested"]]}]]}})
        sentry_sdk.set_extra("env", {"ANTHROPIC_API_KEY": s["anthropic"], "region": visible})
        alerts.alert("watchdog_red", f"Redis down at redis://:{s['redis']}@redis.internal:6379 ({visible})",
                     agent="echo", token=s["token"], items=[{"secret": s["nested"]}, f"Bearer {s['bearer']}"],
                     cmd=f"claude --api-key {s['cli']}", note=f"export ANTHROPIC_API_KEY={s['message']}")
        logging.getLogger("fleet.test").info("agent env ANTHROPIC_API_KEY=%s", s["log"])
        sentry_sdk.capture_message(f"plain capture with password={s['message']}")
        alerts.flush()
    """, tmp_path, prelude=GUARDED, env={"SCENARIO_SECRETS": json.dumps(secrets), "SCENARIO_VISIBLE": visible})
    sentry.wait_for(lambda: len(sentry.events()) >= 2, 10, "both events")
    raw = sentry.raw()
    assert visible.encode() in raw, "the breadcrumbs, contexts and extras were not sent at all"
    assert alerts.REDACTED.encode() in raw
    for name, secret in secrets.items():
        assert secret.encode() not in raw, f"the {name} secret reached Sentry"
    alert = next(e for e in sentry.events() if tagged(e, alert="watchdog_red"))
    assert any(crumb.get("category") == "deploy" for crumb in alert["breadcrumbs"]["values"])


CRASH = """
def handle(path):
    agent_key = open(path).read().strip()
    headers = {"x-api-key": agent_key}
    raise RuntimeError("the agent failed")

handle(sys.argv[1])
"""


@pytest.mark.parametrize("guarded", [True, False], ids=["fleet", "bare-sdk-control"])
def test_local_variables_never_reach_sentry(sentry: SentryServer, tmp_path: Path, guarded: bool) -> None:
    secret = uuid.uuid4().hex  # lowercase hex: no shape the scrubber could spot, only locals would carry it
    key_file = tmp_path / "agent.key"
    key_file.write_text(secret)
    proc = run_scenario(sentry, CRASH, tmp_path, prelude=GUARDED if guarded else BARE, args=(str(key_file),),
                        expect_exit=1)
    assert "the agent failed" in proc.stderr  # an uncaught crash, reported at exit
    event = sentry.wait_for(lambda: sentry.events(), 10, "the crash event")[0]
    frames = event["exception"]["values"][-1]["stacktrace"]["frames"]
    assert any(frame.get("function") == "handle" for frame in frames)
    if guarded:
        assert not any("vars" in frame for frame in frames)
        assert secret.encode() not in sentry.raw()
    else:
        assert secret.encode() in sentry.raw(), "control: a bare SDK sends locals, so this test can see a leak"


@pytest.mark.parametrize("guarded", [True, False], ids=["fleet", "bare-sdk-control"])
def test_subprocess_argv_never_reaches_sentry(sentry: SentryServer, tmp_path: Path, guarded: bool) -> None:
    secret = uuid.uuid4().hex
    run_scenario(sentry, """
        subprocess.run(["echo", os.environ["SCENARIO_SECRET"]], check=True, stdout=subprocess.DEVNULL)
        sentry_sdk.capture_message("after a subprocess")
        sentry_sdk.flush()
    """, tmp_path, prelude=GUARDED if guarded else BARE, env={"SCENARIO_SECRET": secret})
    sentry.wait_for(lambda: sentry.events(), 10, "the message event")
    if guarded:
        assert secret.encode() not in sentry.raw()
    else:
        assert secret.encode() in sentry.raw(), "control: a bare SDK records argv, so this test can see a leak"


# ---------------------------------------------------------------- a real worker and a real beat


class SentryFleet:
    """A small fleet whose worker and beat run tests.sentry_celery_app (the fleet's app with Sentry on).

    It has a Redis server of its own: beat's leader lease, its queues and the sweeps it fires every
    minute never meet another test's, in this session or a parallel one.
    """

    def __init__(self, tmp: Path, server: SentryServer, redis_url: str) -> None:
        self.server = server
        self.harness = Fleet(tmp, redis_url, f"sqlite:///{tmp / 'fleet.db'}")
        self.beat: subprocess.Popen[bytes] | None = None

    def celery(self, *args: str, project: str, log: str) -> subprocess.Popen[bytes]:
        env = {**self.harness.env, "FLEET_SENTRY_DSN": self.server.dsn(project)}
        out = open(self.harness.tmp / log, "ab")  # noqa: SIM115 - lives with the process
        return subprocess.Popen([PY, "-m", "celery", "-A", "tests.sentry_celery_app", *args], env=env,
                                cwd=self.harness.tmp, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)

    def start(self) -> None:
        self.harness.redis.flushdb()
        self.harness.cli("db", "upgrade", check=True)
        self.harness.workers.append(self.celery(
            "worker", "-Q", "dispatch,agents", "-c", "2", "-n", f"sentry-{uuid.uuid4().hex[:6]}@%h",
            "--without-mingle", "--without-gossip", "-l", "INFO", project=WORKER_PROJECT, log="worker.log"))
        # Beat starts now, so the wait for its first whole minute overlaps the other tests of this module.
        self.beat = self.celery("beat", "-s", str(self.harness.tmp / "beat-schedule"), "-l", "INFO",
                                project=BEAT_PROJECT, log="beat.log")
        self.harness.wait_consuming()

    def stop(self) -> None:
        if self.beat is not None:
            self.harness.stop_worker(self.beat)
        self.harness.stop()
        self.harness.redis.close()


@pytest.fixture(scope="module")
def sentry_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentryFleet]:
    """A Sentry stand-in, and a fleet reporting to it: one worker (project 1) and one beat (project 2)."""
    home = tmp_path_factory.mktemp("sentry-fleet")
    redis_server = PrivateRedis(home)
    redis_server.start()
    with SentryServer() as server:
        fleet = SentryFleet(home, server, redis_server.url)
        try:
            fleet.start()
            yield fleet
        finally:
            fleet.stop()
            redis_server.stop()


@pytest.mark.slow
def test_agent_key_never_reaches_sentry(sentry_fleet: SentryFleet) -> None:
    harness, server = sentry_fleet.harness, sentry_fleet.server
    result = dispatch(harness.services, DispatchRequest("secret", f"secret-{uuid.uuid4().hex}", None, False,
                                                        actor="test"), harness.send_execute)
    run_id = result.run_id
    assert result.status == "queued" and run_id is not None

    def finished() -> bool:
        with db.session(harness.services.engine) as session:
            run = store.get_run(session=session, run_id=run_id)
            return run is not None and run.status in (RunStatus.SUCCEEDED, RunStatus.DEAD)

    wait_for(finished, 30, f"run {run_id} to finish")
    harness.celery.send_task("tests.sentry.alert_run", args=["dead_letter", run_id], queue="dispatch").get(timeout=30)
    crash = harness.celery.send_task("tests.sentry.crash_with_key", args=[run_id], queue="dispatch")
    with pytest.raises(Exception, match="crashed while holding a key"):
        crash.get(timeout=30)

    def both() -> list[dict[str, Any]] | None:
        events = server.events(WORKER_PROJECT)
        alert = [e for e in events if tagged(e, alert="dead_letter", run_id=run_id, agent="secret")]
        crashed = [e for e in events if "crashed while holding a key" in json.dumps(e.get("exception"))]
        return alert + crashed if alert and crashed else None

    alert, crashed = server.wait_for(both, 20, "the worker's alert and crash events")
    assert alert["contexts"]["alert"]["env"]["FLEET_AGENT_KEY"] == alerts.REDACTED  # it was there, masked
    frames = crashed["exception"]["values"][-1]["stacktrace"]["frames"]
    assert not any("vars" in frame for frame in frames)
    raw = server.raw()
    for secret in (SECRET_KEY, SECRET_TOKEN):
        assert secret.encode() not in raw
        assert secret.encode() not in (harness.log_dir / "runs" / f"{run_id}.log").read_bytes()


@pytest.mark.slow
def test_beat_tasks_check_in_from_beat_and_worker(sentry_fleet: SentryFleet) -> None:
    server = sentry_fleet.server
    slug = "fleet.sweep.reaper"  # crontab(minute="*"): the first one comes at the next whole minute

    def pair() -> tuple[dict[str, Any], dict[str, Any]] | None:
        started = {c["check_in_id"]: c for c in server.check_ins(BEAT_PROJECT)
                   if c["monitor_slug"] == slug and c["status"] == "in_progress"}
        for done in server.check_ins(WORKER_PROJECT):
            if done["monitor_slug"] == slug and done["status"] == "ok" and done["check_in_id"] in started:
                return started[done["check_in_id"]], done
        return None

    started, done = server.wait_for(pair, 90, f"in_progress (beat) and ok (worker) check-ins of {slug}")
    assert started["monitor_config"]["schedule"] == {"type": "crontab", "value": "* * * * *"}
    assert started["monitor_config"]["checkin_margin"] == alerts.CRON_MARGINS["checkin_margin"]
    assert isinstance(done["duration"], float) and done["duration"] >= 0
    assert sentry_fleet.beat is not None and sentry_fleet.beat.poll() is None
    assert not server.errors
