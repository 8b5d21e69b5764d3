"""The web process (`fleet web`): probes now; /health, /metrics, /api/state and / are added to ROUTES.

One tornado Application, built by `make_app(services)`; handlers get the Services through
`initialize`. Blocking checks (Redis, the database) run in a thread so one slow probe cannot
stall the event loop that answers /livez.
"""

from __future__ import annotations

import asyncio
import errno
import json
import signal
from collections.abc import Callable
from typing import Any

import tornado.httpserver
import tornado.web

from fleet import db, logs
from fleet.errors import FleetError, UnavailableError
from fleet.services import Services, check_redis

log = logs.get("fleet.web")
_SHUTDOWN_GRACE_S = 5.0
_QUIET_PATHS = frozenset({"/livez", "/readyz"})  # polled every second: successes are not worth a log line


class BaseHandler(tornado.web.RequestHandler):
    """Gives every handler the process's Services and a JSON writer."""

    services: Services

    def initialize(self, services: Services) -> None:
        """Called by tornado with the route's keyword arguments."""
        self.services = services

    def write_json(self, status: int, body: dict[str, Any]) -> None:
        """Send `body` as JSON with `status`."""
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(body, default=str))


class LivezHandler(BaseHandler):
    """200 while the process runs: no dependency checks, so a Redis outage never restarts the web."""

    def get(self) -> None:
        """Answer 'ok'."""
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.finish("ok")


class ReadyzHandler(BaseHandler):
    """200 when Redis answers PING and the database answers SELECT 1; 503 naming what is down."""

    async def get(self) -> None:
        """Run both checks concurrently and report."""
        checks: dict[str, Callable[[], None]] = {
            "redis": lambda: check_redis(self.services.redis),
            "database": lambda: db.check(self.services.engine),
        }
        loop = asyncio.get_running_loop()
        pending = (loop.run_in_executor(None, _reason_down, check) for check in checks.values())
        results = await asyncio.gather(*pending)
        down = {name: reason for name, reason in zip(checks, results, strict=True) if reason}
        if down:
            self.write_json(503, {"status": "unavailable", "down": down})
        else:
            self.write_json(200, {"status": "ok", "checks": {name: "ok" for name in checks}})


def _reason_down(check: Callable[[], None]) -> str | None:
    """None when `check` passes, else a one-line reason with any credentials masked."""
    try:
        check()
    except FleetError as exc:
        return logs.redact_value(str(exc))
    except Exception as exc:  # noqa: BLE001 - a probe reports any failure rather than crashing
        return f"{type(exc).__name__}: {logs.redact_value(str(exc))}"
    return None


# Another engineer adds /health, /metrics, /api/state and / here: (pattern, handler class).
ROUTES: list[tuple[str, type[BaseHandler]]] = [
    (r"/livez", LivezHandler),
    (r"/readyz", ReadyzHandler),
]


def _log_request(handler: tornado.web.RequestHandler) -> None:
    status = handler.get_status()
    if status < 400 and handler.request.path in _QUIET_PATHS:
        return
    level = "warning" if status >= 500 else "info"
    getattr(log, level)("request", method=handler.request.method, path=handler.request.path,
                        status=status, ms=round(1000 * handler.request.request_time(), 1))


def make_app(services: Services) -> tornado.web.Application:
    """The tornado application with every route bound to `services`."""
    return tornado.web.Application(
        [(pattern, handler, {"services": services}) for pattern, handler in ROUTES],
        log_function=_log_request,
    )


def serve(services: Services) -> None:
    """Serve on settings.web_host:web_port until SIGTERM or SIGINT, then stop cleanly."""
    try:
        asyncio.run(_serve(services))
    finally:
        services.close()


async def _serve(services: Services) -> None:
    host, port = services.settings.web_host, services.settings.web_port
    server = _listen(make_app(services), host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("web listening", url=f"http://{host}:{port}")
    await stop.wait()
    log.info("web stopping")
    server.stop()  # no new connections; then close the open ones, bounded so shutdown never hangs
    try:
        await asyncio.wait_for(server.close_all_connections(), _SHUTDOWN_GRACE_S)
    except TimeoutError:
        log.warning("web: connections still open at shutdown were dropped")


def _listen(app: tornado.web.Application, host: str, port: int) -> tornado.httpserver.HTTPServer:
    try:
        return app.listen(port, address=host)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise UnavailableError(f"web: {host}:{port} is already in use (set FLEET_WEB_PORT)") from None
        raise UnavailableError(f"web: cannot listen on {host}:{port}: {exc.strerror}") from None
