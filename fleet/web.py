"""The web process (`fleet web`): probes, /health, /metrics, /api/state, the operator page (rendered by
fleet/page.py), its actions and run logs.

One tornado Application, built by `make_app(services)`; handlers get a `Web` (the Services, the token,
the start time) through `initialize`. Blocking work (Redis, the database, files) runs in a thread so
one slow request cannot stall the event loop that answers /livez.

Decisions:
- Auth: `FLEET_WEB_TOKEN` (or `FLEET_WEB_TOKEN_FILE`), given as `Authorization: Bearer TOKEN`, as
  `?token=TOKEN`, or as the password of HTTP basic auth (any user name; a browser prompts for it).
  /livez, /readyz and /health never need it (probes; they name no agent and no amount). /metrics
  does, although Prometheus endpoints are usually open: these metrics name agents and their spend.
  Scrape with `authorization: {credentials: TOKEN}` (bearer) in the Prometheus job.
- No token: `fleet web` refuses to start (ConfigError, exit 78), on loopback too: every local user,
  and any web page a local browser opens, could read an open page. It does not make one up itself:
  a generated token would be printed into the service's log and change on every restart. `fleet up`
  (interactive, like Flower's password) generates one and prints it on the terminal.
- Host header (DNS rebinding: a hostile page whose name resolves to 127.0.0.1 is same-origin with
  the fleet's page in the victim's browser): only loopback literals (127.0.0.1, ::1, localhost, any
  port), FLEET_WEB_HOST and the names in FLEET_WEB_ALLOWED_HOSTS are answered; any other gets 400 on
  every route but /livez and /readyz. Those two are exempt because orchestrators probe by address
  (a Kubernetes probe sends the pod IP as Host) and they tell only "ok" or which component is down.
  /health is checked: it is read by people and monitors, which can use a configured name, and it
  shows the host name, version and error text. /metrics too: Prometheus sends the target as you
  configured it, so add that name (or address) to FLEET_WEB_ALLOWED_HOSTS.
- /readyz: Redis and the database answer, and a watchdog canary came back through each queue within
  CANARY_FRESH_S. Where no canary ever came back (a new Redis, or no watchdog ran yet) it is ready
  for the first CANARY_FRESH_S of this web process's life, the time a running beat needs to send and
  get back its first canaries (the watchdog runs every minute); after that, 503 naming the queue.
- /health: always 200 while the process runs, with `status` "ok" or "degraded" and each component.
- Actions (/act/*: kill, pause, resume, replay, purge, dry run): POST only, behind the token, with a
  CSRF token the page made (an HMAC of its time under a key derived from the token: every replica
  agrees, a new token voids old forms), refused when Sec-Fetch-Site says another site sent it. Kill
  and purge answer with a confirmation page first. No cookie: a page reached with ?token= posts to
  ?token=, a browser re-sends basic auth itself. What each does is fleet/actions.py; the actor is
  `web:USER@ADDRESS` (the basic-auth user name, else `token`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import errno
import functools
import hashlib
import hmac
import ipaddress
import json
import re
import secrets
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlsplit

import redis
import tornado.httpserver
import tornado.iostream
import tornado.web
from prometheus_client.exposition import choose_encoder

from fleet import __version__, actions, alerts, db, hardening, keys, logs, metrics, runlog, watchdog
from fleet.config import check_web_token
from fleet.dispatch import Sender
from fleet.errors import BadInputError, ConfigError, ExitCode, FleetError, UnavailableError
from fleet.executor import run_log_path
from fleet.page import TEMPLATES, agent_rows, render_page
from fleet.services import Services, check_redis
from fleet.state import history, snapshot

log = logs.get("fleet.web")
_SHUTDOWN_GRACE_S = 5.0
_QUIET_PATHS = frozenset({"/livez", "/readyz", "/health"})  # polled often: successes are not worth a log line
CANARY_FRESH_S = watchdog.CANARY_FRESH_S  # one freshness limit for the probes and the watchdog
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_LOG_CHUNK = 64 * 1024
_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # ?token= must never travel to Flower or anywhere else in a Referer
    "X-Frame-Options": "DENY",
    # No script at all; forms may post to this web only (the actions), nowhere else.
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True)
class Web:
    """What every handler needs: the process's Services, the token (None: open), when it started, the
    Host names it answers to, the key of its forms' CSRF tokens and how to send a fleet.execute."""

    services: Services
    token: str | None
    started: float  # time.monotonic() at start
    allowed_hosts: frozenset[str] = frozenset()
    csrf_key: bytes = b""
    send: Sender | None = None  # None: replays are refused (a web started without a broker sender)


class BaseHandler(tornado.web.RequestHandler):
    """Gives every handler the Web context, the Host check, safe headers and a JSON writer."""

    web: Web
    services: Services
    any_host = False  # the probes answer whatever Host they are sent

    def initialize(self, web: Web) -> None:
        """Called by tornado with the route's keyword arguments."""
        self.web, self.services = web, web.services

    def prepare(self) -> None:
        """Refuse a Host header this web is not known by (DNS rebinding), before anything else."""
        if not self.any_host and not host_allowed(self.request.headers.get("Host"), self.web.allowed_hosts):
            self.write_text(400, "400: unknown Host header (add the name to FLEET_WEB_ALLOWED_HOSTS)\n")

    def set_default_headers(self) -> None:
        """No sniffing, no framing, no referrer, no caching, no scripts."""
        for name, value in _SECURITY_HEADERS.items():
            self.set_header(name, value)

    def write_json(self, status: int, body: dict[str, Any]) -> None:
        """Send `body` as JSON with `status`."""
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body, default=str))

    def write_text(self, status: int, body: str | bytes) -> None:
        """Send plain text with `status`."""
        self.set_status(status)
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(body)

    def log_exception(self, typ: type[BaseException] | None, value: BaseException | None,
                      tb: TracebackType | None) -> None:
        """Log failures by path only: the full URI may carry ?token=."""
        if isinstance(value, tornado.web.HTTPError):
            return
        log.error("web: request failed", path=self.request.path, exc_info=(typ, value, tb))

    async def blocking(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` in a worker thread."""
        return await asyncio.get_running_loop().run_in_executor(None, fn)


class AuthHandler(BaseHandler):
    """A handler behind FLEET_WEB_TOKEN (open when no token is configured: loopback only)."""

    def prepare(self) -> None:
        """Refuse with 401 unless the token was given."""
        super().prepare()
        if self._finished:
            return
        if not authorized(self.web.token, self.request.headers.get("Authorization", ""),
                          self.get_query_argument("token", None)):
            self.set_header("WWW-Authenticate", 'Basic realm="fleet", charset="UTF-8"')
            self.write_text(401, "401: FLEET_WEB_TOKEN required (Authorization: Bearer TOKEN, ?token=TOKEN, "
                                 "or basic auth with the token as password)\n")
            return
        # A changed fleet.toml, as the worker and beat pick it up (by mtime; a bad file keeps the last good): the
        # page lists, pauses and kills the agents they run, not those of the file it started with.
        self.services.refresh_config()

    def token_query(self) -> str:
        """`?token=…` for links on a page reached with ?token= (a browser re-sends basic auth itself)."""
        supplied = self.get_query_argument("token", None)
        return f"?token={quote(supplied, safe='')}" if supplied and self.web.token else ""


def authorized(token: str | None, authorization: str, query_token: str | None) -> bool:
    """Whether a request carrying this Authorization header and ?token= may see protected routes."""
    if token is None:
        return True
    offered = [query_token] if query_token else []
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() == "bearer":
        offered.append(value.strip())
    elif scheme.lower() == "basic":
        with contextlib.suppress(binascii.Error, UnicodeDecodeError):
            offered.append(base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2])
    wanted = token.encode()
    return any(hmac.compare_digest(candidate.encode(), wanted) for candidate in offered)


# ---------------------------------------------------------------- probes (no auth)


class LivezHandler(BaseHandler):
    """200 while the process runs: no dependency checks, so a Redis outage never restarts the web."""

    any_host = True

    def get(self) -> None:
        """Answer 'ok'."""
        self.write_text(200, "ok")


class ReadyzHandler(BaseHandler):
    """200 when Redis and the database answer and the canaries are fresh; 503 naming what is not."""

    any_host = True

    async def get(self) -> None:
        """Run the checks concurrently and report."""
        checks: dict[str, Callable[[], None]] = {
            "redis": lambda: check_redis(self.services.redis),
            "database": lambda: db.check(self.services.engine),
        }
        results = await asyncio.gather(*(self.blocking(functools.partial(_reason_down, c)) for c in checks.values()))
        down = {name: reason for name, reason in zip(checks, results, strict=True) if reason}
        ok = {name: "ok" for name in checks if name not in down}
        if "redis" not in down:  # without Redis there is nothing to read the canaries from
            canary = await self.blocking(lambda: _canary_state(self.web))
            (down if canary[0] else ok)["canary"] = canary[1]
        if down:
            self.write_json(503, {"status": "unavailable", "down": down})
        else:
            self.write_json(200, {"status": "ok", "checks": ok})


class HealthHandler(BaseHandler):
    """Version and each component's state; 200 whenever the process answers."""

    async def get(self) -> None:
        """Collect the components in a thread."""
        self.write_json(200, await self.blocking(lambda: health(self.web)))


def health(web: Web) -> dict[str, Any]:
    """The /health document: version, uptime, Redis, database, canaries, watchdog and beat."""
    components: dict[str, Any] = {
        "redis": _reason_down(lambda: check_redis(web.services.redis)) or "ok",
        "database": _reason_down(lambda: db.check(web.services.engine)) or "ok",
    }
    now = web.services.now()
    if components["redis"] == "ok":
        down, reason = _canary_state(web)
        components["canary"] = {"status": "stale" if down else "ok", "detail": reason}
        last_tick = _get(web.services.redis, keys.last_tick())
        components["beat"] = {"last_tick_age_s": round(metrics.age_seconds(now, last_tick), 1) if last_tick else None}
    if components["database"] == "ok":
        try:
            components["watchdog"] = _latest_verdict(web.services, now)
        except Exception as exc:  # noqa: BLE001 - e.g. a database not migrated yet: reported, not raised
            components["watchdog"] = {"error": describe(exc)}
    healthy = components["redis"] == components["database"] == "ok" and components["canary"]["status"] == "ok"
    return {"status": "ok" if healthy else "degraded", "version": __version__, "host": web.services.host,
            "uptime_s": round(time.monotonic() - web.started, 1), "components": components}


def _latest_verdict(services: Services, now: datetime) -> dict[str, Any] | None:
    with db.session(services.engine) as session:
        verdict = watchdog.latest(session)
    if verdict is None:
        return None
    return {"status": verdict.status, "age_s": round(metrics.age_seconds(now, verdict.at.isoformat()), 1)}


def _canary_state(web: Web) -> tuple[bool, str]:
    """(down, detail) of the canary freshness check; reads Redis."""
    seen = {q: _get(web.services.redis, keys.canary_seen(q)) for q in watchdog.QUEUES}
    return canary_verdict(seen, web.services.now(), time.monotonic() - web.started)


def canary_verdict(seen: dict[str, str | None], now: datetime, uptime_s: float) -> tuple[bool, str]:
    """(down, detail): down when a queue's last canary is older than CANARY_FRESH_S, or none ever came
    back and this process has been up longer than that."""
    stale, notes = [], []
    for queue, at in seen.items():
        if at is None:
            if uptime_s > CANARY_FRESH_S:
                stale.append(f"no canary has ever come back through {queue!r}: is a worker consuming it, "
                             "and is the watchdog running (beat, or `fleet watchdog`)?")
            else:
                notes.append(f"{queue}: no canary yet ({CANARY_FRESH_S - uptime_s:.0f}s of start-up grace left)")
            continue
        age = metrics.age_seconds(now, at)
        if age > CANARY_FRESH_S:
            stale.append(f"last canary came back through {queue!r} {age:.0f}s ago (limit {CANARY_FRESH_S:.0f}s)")
        else:
            notes.append(f"{queue}: {age:.0f}s ago")
    return (True, "; ".join(stale)) if stale else (False, "ok (" + "; ".join(notes) + ")")


def _get(client: redis.Redis, key: str) -> str | None:
    value = client.get(key)
    return None if value is None else str(value)


def _reason_down(check: Callable[[], None]) -> str | None:
    """None when `check` passes, else a one-line reason with any credentials masked."""
    try:
        check()
    except Exception as exc:  # noqa: BLE001 - a probe reports any failure rather than crashing
        return describe(exc)
    return None


def describe(exc: BaseException) -> str:
    """One line for an operator: our own errors as they are, others with their type; credentials masked."""
    text = logs.redact_value(str(exc).strip().splitlines()[0] if str(exc).strip() else "")
    return text if isinstance(exc, FleetError) else f"{type(exc).__name__}: {text}"


# ---------------------------------------------------------------- behind the token


class MetricsHandler(AuthHandler):
    """Prometheus exposition (text, or OpenMetrics when asked for), read from the fleet on each scrape."""

    async def get(self) -> None:
        """Collect in a thread."""
        encode, content_type = choose_encoder(self.request.headers.get("Accept", ""))
        registry = self.application.settings["metrics_registry"]
        body = await self.blocking(lambda: encode(registry))
        self.set_header("Content-Type", content_type)
        self.finish(body)


class StateHandler(AuthHandler):
    """The same JSON as `fleet status --json`."""

    async def get(self) -> None:
        """503 when the database cannot be read (Redis down is reported inside the picture)."""
        try:
            picture = await self.blocking(lambda: snapshot(self.services))
        except Exception as exc:  # noqa: BLE001 - the operator gets the reason, not a stack trace
            log.warning("web: cannot read the fleet's state", error=describe(exc))
            self.write_json(503, {"error": describe(exc)})
            return
        self.write_json(200, picture)


class PageHandler(AuthHandler):
    """The operator's page."""

    async def get(self) -> None:
        """Render the snapshot; a database that cannot be read still gets a page that says so."""
        flower = f"http://{self.request.host_name}:{self.services.settings.flower_port}/"
        picture: dict[str, Any] | None = None
        past: dict[str, Any] | None = None
        error: str | None = None
        try:
            picture, past = await self.blocking(lambda: (snapshot(self.services), history(self.services)))
        except Exception as exc:  # noqa: BLE001 - shown on the page instead
            error = describe(exc)
            log.warning("web: cannot read the fleet's state", error=error)
        self.set_status(200 if picture is not None else 503)
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(render_page(picture, error=error, flower_url=flower, token_query=self.token_query(),
                                host=self.services.host, past=past, csrf=csrf_token(self.web.csrf_key, time.time()),
                                agents=agent_rows(picture, self.services.config.agents)))


class RunLogHandler(AuthHandler):
    """A run's merged output as text/plain, from the chunks its worker shipped to the database
    (fleet/runlog.py: any host's page shows a run of any host), else from this host's own file."""

    async def get(self, run_id: str) -> None:
        """400 for anything but 32 lowercase hex characters, 404 when there is no log."""
        if not RUN_ID.match(run_id):
            self.write_text(400, "400: a run id is 32 lowercase hex characters\n")
            return
        engine = self.services.engine

        def page(after: int) -> list[tuple[int, bytes]]:
            with db.session(engine) as session:
                return runlog.chunks(session, run_id, after)

        try:
            rows = await self.blocking(lambda: page(0))
            if not rows:
                await self._from_file(run_id)
                return
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            while rows:
                for _, data in rows:
                    self.write(data)
                await self.flush()
                last = rows[-1][0]
                rows = await self.blocking(functools.partial(page, last))
        except tornado.iostream.StreamClosedError:
            return  # the reader went away
        self.finish()

    async def _from_file(self, run_id: str) -> None:
        path = run_log_path(self.services.settings.log_dir, run_id)
        try:
            handle = await self.blocking(lambda: path.open("rb"))
        except FileNotFoundError:
            self.write_text(404, f"404: no log for run {run_id}\n")
            return
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        try:
            while chunk := await self.blocking(lambda: handle.read(_LOG_CHUNK)):
                self.write(chunk)
                await self.flush()
        finally:
            handle.close()
        self.finish()


# ---------------------------------------------------------------- actions (POST, behind the token and a CSRF token)

CSRF_MAX_AGE_S = 12 * 3600.0  # a page left open overnight still acts; it refreshes itself every REFRESH_S anyway
_WHO = re.compile(r"[^A-Za-z0-9._@+-]")
_HTTP_STATUS = {ExitCode.USAGE: 400, ExitCode.NOT_FOUND: 404, ExitCode.TRANSIENT: 503, ExitCode.AUTH: 403,
                ExitCode.CONFIG: 500}


def csrf_key(token: str | None) -> bytes:
    """The key of the forms' CSRF tokens: derived from the web token (every replica agrees, a new token
    voids old forms), or random for an open test app."""
    secret = token.encode() if token else secrets.token_bytes(32)
    return hmac.new(secret, b"fleet-web-csrf-v1", hashlib.sha256).digest()


def csrf_token(key: bytes, now: float) -> str:
    """`STAMP.MAC`: when the form was made, and a MAC over it that only this web can make."""
    stamp = str(int(now))
    return f"{stamp}.{hmac.new(key, stamp.encode(), hashlib.sha256).hexdigest()[:32]}"


def csrf_ok(key: bytes, value: str, now: float) -> bool:
    """Whether a form's token was made by this web within CSRF_MAX_AGE_S."""
    stamp, _, mac = value.partition(".")
    if not stamp.isdigit() or not hmac.compare_digest(csrf_token(key, float(stamp)), value):
        return False
    return -60 <= now - int(stamp) <= CSRF_MAX_AGE_S and bool(mac)


def actor_of(authorization: str, remote_ip: str) -> str:
    """`web:USER@ADDRESS` for the audit trail: the basic-auth user name when one was given (the token
    is the password; any name works, so it names who acted), else `token`."""
    user = "token"
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() == "basic":
        with contextlib.suppress(binascii.Error, UnicodeDecodeError):
            user = _WHO.sub("", base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[0])[:64] \
                or "token"
    return f"web:{user}@{remote_ip}"


class ActionHandler(AuthHandler):
    """An action: POST only (405 to anything else), the token, a fresh CSRF token from this web's own
    page, never a request another site made; the outcome is a page of its own."""

    title = "Action"  # the heading of its outcome page

    def prepare(self) -> None:
        """Refuse before anything is done: a foreign Host or no token (super), a cross-site request, a stale
        or forged form, a field the action cannot use (before its confirmation is asked for, too)."""
        super().prepare()
        if self._finished:
            return
        if self.request.method != "POST":
            self.set_header("Allow", "POST")
            self.write_text(405, "405: an action is a POST from the page's own form\n")
        elif (self.request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none")
              or not origin_is_own(self.request.headers.get("Origin"), self.request.headers.get("Host"))):
            self.write_text(403, "403: a request from another site cannot act on the fleet\n")
        elif not csrf_ok(self.web.csrf_key, self.get_body_argument("csrf", ""), time.time()):
            self.write_text(403, "403: this form is stale or was not made by this page: reload the page and try "
                                 "again\n")
        else:
            try:
                self.validate()
            except BadInputError as exc:  # the operator's form, not the fleet: a 400 saying what is wrong
                self.refuse(exc)

    def validate(self) -> None:
        """Read and check the form's fields the action needs; BadInputError refuses it with a 400."""

    @property
    def actor(self) -> str:
        """Who acts, for the audit trail."""
        return actor_of(self.request.headers.get("Authorization", ""), self.request.remote_ip or "?")

    def field(self, name: str) -> str | None:
        """A form field, stripped; None when empty."""
        value = (self.get_body_argument(name, "") or "").strip()
        return value or None

    def question(self) -> str | None:
        """What the confirmation page asks before this action is done; None: no confirmation."""
        return None

    def scope(self) -> str:
        """The agent field, which must be said: a form without it must not act on the whole fleet."""
        agent = self.field("agent")
        if agent is None:
            raise BadInputError(f'say whom this is for: agent="{keys.GLOBAL}" for the whole fleet, or an agent\'s '
                                "name")
        return agent

    def target(self) -> str:
        """The agent field as words: `the whole fleet` or `agent NAME`."""
        agent = self.field("agent")
        return "the whole fleet" if agent in (None, keys.GLOBAL) else f"agent {agent}"

    async def act(self, fn: Callable[[], actions.Outcome]) -> None:
        """Ask first when this action needs a confirmation; else do it in a thread and show the outcome."""
        question = self.question()
        if question is not None and self.field("confirm") != "yes":
            fields = {name: self.field(name) or "" for name in ("agent", "reason", "dead", "all")}
            self._page(200, self.title, "amber", question, confirm=fields)
            return
        try:
            outcome = await self.blocking(fn)
        except FleetError as exc:
            self.refuse(exc)
            return
        log.info("web: action", action=self.title, actor=self.actor, outcome=outcome.said)
        self._page(200, self.title, outcome.tone, outcome.said, lines=outcome.lines, gates=outcome.gates,
                   run_id=outcome.run_id)

    def refuse(self, exc: FleetError) -> None:
        """The outcome page of an action that was not done, with the HTTP status its error stands for."""
        log.warning("web: action failed", action=self.title, error=describe(exc))
        self._page(_HTTP_STATUS.get(exc.exit_code, 500), self.title, "red", describe(exc))

    def _page(self, status: int, title: str, tone: str, said: str, **extra: Any) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(TEMPLATES.load("act.html").generate(
            title=title, tone=tone, said=said, lines=extra.get("lines", []), gates=extra.get("gates", {}),
            run_id=extra.get("run_id"), confirm=extra.get("confirm"), action=self.request.path, tq=self.token_query(),
            csrf=csrf_token(self.web.csrf_key, time.time()), host=self.services.host, version=__version__))


class KillAction(ActionHandler):
    """Kill the fleet or one agent, with a reason; asks first."""

    title = "Kill"

    def validate(self) -> None:
        """Whom: said, never assumed."""
        self.agent = self.scope()

    def question(self) -> str:
        """Kill, really?"""
        return (f"Kill {self.target()}? Intake stops at once and running agents get SIGTERM within a second, "
                "SIGKILL a few seconds later. Nothing starts again until someone resumes.")

    async def post(self) -> None:
        """Kill, once confirmed."""
        await self.act(lambda: actions.kill(self.services, agent=self.agent, reason=self.field("reason"),
                                            actor=self.actor))


class PauseAction(ActionHandler):
    """Pause intake of the fleet or one agent (running runs finish)."""

    title = "Pause"

    def validate(self) -> None:
        """Whom: said, never assumed."""
        self.agent = self.scope()

    async def post(self) -> None:
        """Pause."""
        await self.act(lambda: actions.pause_intake(self.services, agent=self.agent, reason=self.field("reason"),
                                                    actor=self.actor))


class ResumeAction(ActionHandler):
    """Lift the kill and the pause of the fleet or one agent."""

    title = "Resume"

    def validate(self) -> None:
        """Whom: said, never assumed."""
        self.agent = self.scope()

    async def post(self) -> None:
        """Resume."""
        await self.act(lambda: actions.resume(self.services, agent=self.agent, actor=self.actor))


class ReplayAction(ActionHandler):
    """Replay a dead letter (once)."""

    title = "Replay"

    def validate(self) -> None:
        """Which dead letter: its id."""
        self.dead = _dead_id(self.field("dead"))

    async def post(self) -> None:
        """Replay through this web's sender of fleet.execute."""
        dead, send = self.dead, self.web.send

        def replay() -> actions.Outcome:
            if send is None:
                raise UnavailableError("this web was started without a broker sender: replay with `fleet dlq replay`")
            return actions.replay(self.services, dead_id=dead, actor=self.actor, send=send)

        await self.act(replay)


class PurgeAction(ActionHandler):
    """Purge one dead letter, or all of them; asks first."""

    title = "Purge"

    def validate(self) -> None:
        """Which dead letters: every one, or one by its id."""
        self.dead: list[int] | None = None if self.field("all") == "all" else [_dead_id(self.field("dead"))]

    def question(self) -> str:
        """Purge, really?"""
        which = "every dead letter" if self.field("all") == "all" else f"dead letter {self.field('dead')}"
        return f"Purge {which} for good? The record and the output tail are deleted (runs and events stay)."

    async def post(self) -> None:
        """Purge, once confirmed."""
        await self.act(lambda: actions.purge(self.services, dead_ids=self.dead, actor=self.actor))


class DryRunAction(ActionHandler):
    """What a dispatch of an agent would do now, gate by gate; writes nothing."""

    title = "Dry run"

    async def post(self) -> None:
        """Plan."""
        agent = self.field("agent") or ""
        await self.act(lambda: actions.dry_run(self.services, agent=agent, actor=self.actor))


def _dead_id(value: str | None) -> int:
    if value is None or not value.isdigit():
        raise BadInputError("a dead letter id is a whole number")
    return int(value)


class NotFoundHandler(BaseHandler):
    """Any other path: a plain 404 with the same safe headers."""

    def prepare(self) -> None:
        """Answer every method."""
        super().prepare()
        if not self._finished:
            self.write_text(404, "404: not found\n")


ROUTES: list[tuple[str, type[BaseHandler]]] = [
    (r"/livez", LivezHandler),
    (r"/readyz", ReadyzHandler),
    (r"/health", HealthHandler),
    (r"/metrics", MetricsHandler),
    (r"/api/state", StateHandler),
    (r"/runs/([^/]+)/log", RunLogHandler),
    (r"/act/kill", KillAction),
    (r"/act/pause", PauseAction),
    (r"/act/resume", ResumeAction),
    (r"/act/replay", ReplayAction),
    (r"/act/purge", PurgeAction),
    (r"/act/dry-run", DryRunAction),
    (r"/", PageHandler),
]


def _log_request(handler: tornado.web.RequestHandler) -> None:
    status = handler.get_status()
    if status < 400 and handler.request.path in _QUIET_PATHS:
        return
    level = "warning" if status >= 500 else "info"
    getattr(log, level)("request", method=handler.request.method, path=handler.request.path,
                        status=status, ms=round(1000 * handler.request.request_time(), 1))


def make_app(services: Services, *, token: str | None = None, started: float | None = None,
             send: Sender | None = None) -> tornado.web.Application:
    """The tornado application with every route bound to `services` (and `token`: None leaves it open;
    `send` enqueues a replay's fleet.execute: None refuses replays)."""
    settings = services.settings
    web = Web(services, token, time.monotonic() if started is None else started,
              allowed_hosts(settings.web_host, settings.web_allowed_hosts), csrf_key(token), send)
    return tornado.web.Application(
        [(pattern, handler, {"web": web}) for pattern, handler in ROUTES],
        log_function=_log_request,
        default_handler_class=NotFoundHandler,
        default_handler_args={"web": web},
        metrics_registry=metrics.registry(services),
    )


# ---------------------------------------------------------------- serving


def is_loopback(host: str) -> bool:
    """Whether `host` (an address, bracketed or not, or `localhost`) is this machine's loopback."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


_WILDCARDS = frozenset({"", "0.0.0.0", "::", "*"})  # a bound wildcard names no host a browser could send


def origin_is_own(origin: str | None, host: str | None) -> bool:
    """Whether a POST's Origin, when a browser sent one, names the host it was sent to (the page's own; scheme
    aside, for a TLS proxy in front). A browser without Sec-Fetch-Site still sends Origin with every POST."""
    if origin is None or origin == "null":
        # curl or a script (the token and the CSRF token are theirs to show); "null": this page's own forms, as
        # Chromium sends them under its no-referrer policy (Sec-Fetch-Site speaks for those browsers)
        return True
    return host is not None and urlsplit(origin).netloc.lower() == host.lower()


def allowed_hosts(web_host: str, configured: list[str]) -> frozenset[str]:
    """The Host names (lowercase, no port, no brackets) answered besides loopback literals."""
    names = {_normal_host(_strip_port(name.strip())) for name in configured}
    if web_host.strip().lower() not in _WILDCARDS:
        names.add(_normal_host(web_host))
    return frozenset(name for name in names if name)


def host_allowed(header: str | None, allowed: frozenset[str]) -> bool:
    """Whether a request's Host header names this web: a loopback literal or an allowed name."""
    if header is None:
        return True  # HTTP/1.0 without Host: no browser sends that, so no rebinding page can
    host = _normal_host(_strip_port(header.strip()))
    return host in allowed or is_loopback(host)


def _strip_port(value: str) -> str:
    if value.startswith("["):  # [::1]:8700
        end = value.find("]")
        return value[: end + 1] if end > 0 else value
    host, colon, port = value.rpartition(":")
    return host if colon and port.isdigit() and ":" not in host else value


def _normal_host(value: str) -> str:
    # A trailing dot is the same DNS name; brackets only wrap an IPv6 literal.
    return value.strip().lower().removeprefix("[").removesuffix("]").rstrip(".")


def web_token(services: Services) -> str:
    """The token; refuses (exit 78) to serve without one."""
    token = (services.settings.web_token or "").strip()
    if not token:
        raise ConfigError("FLEET_WEB_TOKEN is not set: refusing to serve the fleet's state without auth, on "
                          "loopback too. Set FLEET_WEB_TOKEN_FILE to a 0600 file holding a token (e.g. "
                          "`openssl rand -hex 32`) or FLEET_WEB_TOKEN; `fleet up` generates one and prints it")
    return check_web_token(token)


def serve(services: Services, send: Sender | None = None) -> None:
    """Serve on settings.web_host:web_port until SIGTERM or SIGINT, then stop cleanly. `send` enqueues
    a replay's fleet.execute (the entry point passes the Celery one: the core never imports Celery)."""
    hardening.make_undumpable()  # the token and URLs in this process stay out of same-uid agents' reach
    alerts.init_sentry(services.settings, "web")
    try:
        token = web_token(services)
        services.refresh_config()  # notes the file's mtime now: an edit before the first request is picked up
        asyncio.run(_serve(services, token, send))
    finally:
        services.close()


async def _serve(services: Services, token: str, send: Sender | None) -> None:
    host, port = services.settings.web_host, services.settings.web_port
    server = _listen(make_app(services, token=token, send=send), host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("web listening", url=f"http://{host}:{port}", allowed_hosts=sorted(services.settings.web_allowed_hosts),
             started_at=datetime.now(UTC).isoformat())
    await stop.wait()
    log.info("web stopping")
    server.stop()  # no new connections; then close the open ones, bounded so shutdown never hangs
    try:
        await asyncio.wait_for(server.close_all_connections(), _SHUTDOWN_GRACE_S)
    except TimeoutError:
        log.warning("web: connections still open at shutdown were dropped")


def _listen(app: tornado.web.Application, host: str, port: int) -> tornado.httpserver.HTTPServer:
    # 78, not 75: a port someone else holds (or one this host cannot bind) is still so on a retry; the
    # settings move it, as `fleet up` says before it starts anything (supervisor._check_port).
    try:
        return app.listen(port, address=host)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"web: {host}:{port} is already in use: stop what holds it or set FLEET_WEB_PORT "
                              "to a free port") from None
        raise ConfigError(f"web: cannot listen on {host}:{port}: {exc.strerror} (set FLEET_WEB_HOST or "
                          "FLEET_WEB_PORT)") from None
