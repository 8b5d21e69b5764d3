"""`fleet up`: migrations, a Redis (embedded when none answers), then worker, beat, Flower and web.

Every child runs in its own session and process group: a Ctrl-C at the terminal reaches only this
supervisor, which then stops the children in order (worker drains first, embedded broker last) and
sweeps each process group, so nothing is left behind.

The children's JSON logs go to one file per part under the log folder (`worker.log`, `beat.log`,
`flower.log`, `web.log`); `fleet up -v` lets them stream to the terminal instead. What the operator
sees (the banner, the live status block, what a stop stopped) is fleet/upscreen.py.

No secret is in a child's start environment or argv (both outlive any later change: /proc/PID/environ
and `ps`): the Redis URL, database URL, Sentry DSN and web token are handed over as FLEET_*_FILE
paths to 0600 files in a 0700 folder of this run (in memory where /dev/shm exists, removed on exit),
and Flower's basic auth as a 0600 `--conf` file. The web token and Flower's password are generated
for this run and printed here when not configured.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from rich.console import Console
from rich.text import Text
from sqlalchemy.engine import make_url

from fleet import __version__, db, hardening
from fleet.config import (
    DEFAULT_REDIS_URL,
    FILE_SETTINGS,
    FleetConfig,
    Settings,
    check_web_token,
    embedded_pointer,
    load_fleet_config,
    with_embedded_pointer,
)
from fleet.embedded import EmbeddedRedis, redis_answers
from fleet.errors import ConfigError, UnavailableError
from fleet.upscreen import Row, Screen, StatusFeed, Stopped

QUEUES = ("dispatch", "agents")
FLOWER_HOST = "127.0.0.1"  # Flower's /metrics and /healthcheck skip auth: never expose it beyond loopback
FLOWER_USER = "fleet"
WORKER_GRACE_S = 15.0  # warm shutdown: running tasks get this long to finish
OTHER_GRACE_S = 5.0
PROBE_DEADLINE_S = 120.0
POLL_S = 0.2
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Our own variables that carry a secret, or name a file that does: never inherited by a child as they are.
SECRET_ENV = frozenset(f"FLEET_{name.upper()}{suffix}" for name in FILE_SETTINGS for suffix in ("", "_FILE"))

# Runs in its own interpreter so that fleet/ never imports Celery: pings one worker node until it answers.
_PING_PROBE = """\
import sys, time
from workers.app import app
node, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    if app.control.ping(destination=[node], timeout=0.5):
        sys.exit(0)
sys.exit(1)
"""


@dataclass
class UpOptions:
    """What `fleet up` starts, and whether the children's logs stream to the terminal (`verbose`)."""

    workers: int
    embedded: bool
    beat: bool
    flower: bool
    web: bool
    verbose: bool = False


@dataclass
class Child:
    """One supervised process: how to start it and how long it may take to stop."""

    name: str
    argv: list[str]
    env: dict[str, str]
    where: Text = field(default_factory=Text)  # what the operator is told about it
    grace_s: float = OTHER_GRACE_S
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None  # where its output goes (None: the terminal, -v)


@dataclass
class _Up:
    """What one run of `fleet up` knows as it goes: the screen, the banner's rows and warnings, the stop."""

    screen: Screen
    rows: list[Row] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    stopped: Stopped = field(default_factory=Stopped)
    embedded: bool = False


@dataclass
class _Signals:
    """Records stop signals instead of raising KeyboardInterrupt in the middle of a step."""

    received: list[int] = field(default_factory=list)

    def __call__(self, signum: int, _frame: FrameType | None) -> None:
        """Signal handler."""
        self.received.append(signum)  # no printing here: print() is not reentrant

    @property
    def stop(self) -> bool:
        """A stop was asked for."""
        return bool(self.received)

    @property
    def hurry(self) -> bool:
        """A second signal: skip the grace periods."""
        return len(self.received) > 1


def default_console() -> Console:
    """A console that never cuts a line (tokens and URLs must stay whole to be copied)."""
    return Console(soft_wrap=True, width=None if sys.stdout.isatty() else 1000)


def run_up(settings: Settings, options: UpOptions, console: Console | None = None) -> int:
    """Run a whole single-host fleet in the foreground; the exit code (0 after a clean stop)."""
    started = time.monotonic()
    # The operator's FLEET_* secrets are in our own start environment: keep same-uid agents out of it.
    hardening.make_undumpable()
    config = load_fleet_config(settings.config)  # a missing or bad fleet.toml is said first (78), before the ports
    _check_ports(settings, options)
    _check_folder_free(settings)
    console = console or default_console()
    up = _Up(Screen(console, live=console.is_terminal and not options.verbose))
    signals = _Signals()
    code = 0
    try:
        with _signals_handled(signals), contextlib.ExitStack() as stack:
            with console.status("migrating the database, finding Redis…", spinner="dots"):
                migrated, fleet_id = _migrate(settings.database_url)
                up.rows.append(Row("database", Text(migrated)))
                redis_url = _choose_redis(settings, options, stack, up)
                _mark_redis(fleet_id, redis_url, stack)
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fleet-up-")))
            secrets_dir = stack.enter_context(hardening.private_folder("fleet-up-secrets-"))
            children = _plan(settings, options, redis_url, workdir, secrets_dir, up)
            up.warnings += _warnings(config, redis_url, up)
            if signals.stop:
                return 0
            code = _supervise(settings, config, options, children, signals, started, up, redis_url)
    finally:
        if up.stopped.began:
            _say_stopped(up)
    return code


def _say_stopped(up: _Up) -> None:
    """What the stop stopped, one line per part, and how long it took."""
    for part, how, clean in up.stopped.lines:
        up.screen.event(f"  {part:<8} {how}", "" if clean else "bold red")
    up.screen.event(f"stopped everything in {time.monotonic() - up.stopped.began:.1f} s", "bold")


def _warnings(config: FleetConfig, redis_url: str, up: _Up) -> list[str]:
    """What stands out in the banner: agents that run as the operator (root or not), running as root, a
    Redis anyone here can reach without a password (an agent could lift a kill through it)."""
    from fleet.doctor import security_warnings

    found = security_warnings(config, redis_url)
    if urlsplit(redis_url).password is None and not any("WITHOUT A PASSWORD" in w for w in found):
        found.append("Redis has no password: any process on this host, an agent too, could lift a kill "
                     "through it; on a shared host give it one (FLEET_REDIS_URL_FILE)")
    as_operator = _agents_as_operator(config)
    if as_operator:
        shown = ", ".join(as_operator[:_NAMED]) + (", ..." if len(as_operator) > _NAMED else "")
        found.append(f"{len(as_operator)} agent(s) run as you (uid {os.geteuid()}), no other user in run_as ({shown}): "
                     "each can read the fleet's secrets (its secret files, keys/, the web token); give them run_as")
    elif os.geteuid() == 0 and not any("ROOT" in w for w in found):
        found.append("running as root: the worker and every agent without run_as run as root")
    return found


_NAMED = 5  # agents named in the run_as warning; a long list would crowd the banner


def _agents_as_operator(config: FleetConfig) -> list[str]:
    """The agents that run as this process's uid: no run_as, or one naming this very user. Whoever the
    operator is, such an agent reads what the fleet's own 0600 files hold (the same uid owns them)."""
    from fleet import identity

    euid = os.geteuid()
    found = []
    for name, agent in sorted(config.agents.items()):
        user = agent.user_name(config.fleet)
        try:
            if user is None or identity.lookup(user).uid == euid:
                found.append(name)
        except ConfigError:
            continue  # an unknown user is the configuration check's to report
    return found


# ---------------------------------------------------------------- before anything starts


def _check_ports(settings: Settings, options: UpOptions) -> None:
    """Refuse (78) when the web or Flower port is taken, so nothing half-starts."""
    wanted = []
    if options.web:
        wanted.append(("web", settings.web_host, settings.web_port, "FLEET_WEB_PORT"))
    if options.flower:
        wanted.append(("flower", FLOWER_HOST, settings.flower_port, "FLEET_FLOWER_PORT"))
    if options.web and options.flower and settings.web_port == settings.flower_port:
        raise ConfigError(f"FLEET_WEB_PORT and FLEET_FLOWER_PORT are both {settings.web_port}")
    for name, host, port, variable in wanted:
        _check_port(name, host, port, variable)


def _check_folder_free(settings: Settings) -> None:
    """Refuse (78) while the folder's pointer names a server that answers: another `fleet up` of this folder is
    running (or one killed outright left its server, worker and beat behind). A second one would run a second
    fleet on the same database and take the folder's commands, its `fleet kill` too, away from the first."""
    pointer = embedded_pointer(settings.config)
    try:
        found = with_embedded_pointer(settings.model_copy(update={"redis_url": None, "redis_url_file": None}))
    except ConfigError:
        return  # a pointer no command would follow: ours replaces it
    if found.redis_url_file != pointer or not redis_answers(found.broker_url, timeout=1.0):
        return
    raise ConfigError(f"another `fleet up` of this folder is running: the server named in {pointer} answers "
                      f"({mask_redis_url(found.broker_url)}); stop that fleet up (one killed outright leaves its "
                      "server, worker and beat running: stop them), or delete the file if no fleet up wrote it")


def _check_port(name: str, host: str, port: int, variable: str) -> None:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as exc:
        raise ConfigError(f"{name}: cannot resolve {host!r}: {exc.strerror}") from None
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # tornado binds with SO_REUSEADDR too: a port in TIME_WAIT is free for it, a listener is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:  # 78, not 75: a retry finds it taken all the same
                raise ConfigError(f"{name} port {host}:{port} is already in use; stop what holds it "
                                  f"or set {variable} to a free port") from None
            raise ConfigError(f"{name}: cannot listen on {host}:{port}: {exc.strerror}") from None


def _migrate(database_url: str) -> tuple[str, str]:
    """Migrate the database: its banner text, and this fleet's id (fleet/tenancy.py), read on the same engine."""
    from fleet import tenancy

    engine = db.make_engine(database_url)
    try:
        db.upgrade(engine)
        fleet_id = tenancy.fleet_id(engine)
    finally:
        engine.dispose()
    return f"{mask_database_url(absolute_database_url(database_url))} (migrated)", fleet_id


def _mark_redis(ours: str, redis_url: str, stack: contextlib.ExitStack) -> None:
    """Mark the Redis database as this fleet's (`ours`, fleet/tenancy.py), or refuse (78) when another fleet's
    mark is on it; the mark comes off again as this fleet stops."""
    from fleet import tenancy
    from fleet.services import redis_client

    client = redis_client(redis_url)
    stack.callback(client.close)
    other = tenancy.claim(client, ours)
    if other is not None:
        raise ConfigError(other.describe())
    stack.callback(_release_mark, client, ours)


def _release_mark(client: Any, ours: str) -> None:
    with contextlib.suppress(Exception):  # Redis gone at the stop: the mark lapses on its own
        from fleet import tenancy

        tenancy.release(client, ours)


def _choose_redis(settings: Settings, options: UpOptions, stack: contextlib.ExitStack, up: _Up) -> str:
    """The broker URL: the configured or default server, or an embedded one started here."""
    if options.embedded:
        return _point_the_folder_at(settings, _start_embedded(stack, "--embedded was given", up, None), stack, up)
    if settings.redis_url is None and not redis_answers(DEFAULT_REDIS_URL, timeout=1.0):
        # On the default port when it is free, so a terminal elsewhere that exported nothing meets its password
        # (77) rather than another server.
        url = _start_embedded(stack, f"nothing answers at {DEFAULT_REDIS_URL} and FLEET_REDIS_URL is unset", up,
                              urlsplit(DEFAULT_REDIS_URL).port)
        return _point_the_folder_at(settings, url, stack, up)
    url = settings.broker_url
    if not redis_answers(url, timeout=2.0):
        raise UnavailableError(f"Redis at {mask_redis_url(url)} does not answer PING; start it, fix "
                               "FLEET_REDIS_URL, or run `fleet up --embedded`")
    up.rows.append(Row("redis", Text(mask_redis_url(url))))
    return url


def _start_embedded(stack: contextlib.ExitStack, why: str, up: _Up, port: int | None) -> str:
    server = EmbeddedRedis(preferred_port=port)
    server.start()
    stack.callback(_stop_embedded, server, up)  # registered first, so it runs after every child has stopped
    up.embedded = True
    # Its URL carries its password: the banner (a scrollback, a screen share) shows it masked.
    up.rows.append(Row("redis", Text(mask_redis_url(server.url))
                       + Text(f"  EMBEDDED Valkey: {why}; it keeps nothing after exit", style="yellow"), server.pid))
    return server.url


def _point_the_folder_at(settings: Settings, url: str, stack: contextlib.ExitStack, up: _Up) -> str:
    """Leave the embedded server's URL beside fleet.toml (0600, config.EMBEDDED_POINTER) while we run, so the
    fleet's commands in this folder reach it with nothing exported; taken away as we stop, before the server."""
    pointer = embedded_pointer(settings.config)
    try:
        hardening.replace_private(pointer, url)
    except OSError as exc:
        up.warnings.append(f"could not write {pointer} ({exc.strerror}): commands in this folder need the "
                           "`export FLEET_REDIS_URL_FILE=…` line below")
        return url
    stack.callback(_take_pointer_away, pointer, url)
    return url


def _take_pointer_away(pointer: Path, url: str) -> None:
    """Remove the folder's pointer, unless another `fleet up` of the folder has since written its own."""
    with contextlib.suppress(OSError):
        if pointer.read_text(encoding="utf-8").strip() == url:
            pointer.unlink()


def _elsewhere(redis_url_file: str) -> Row:
    """How another terminal's `fleet` commands reach the embedded server: the 0600 file its children read
    the URL from (a printed URL would print the password), which only this user can open."""
    return Row("elsewhere", Text(f"export FLEET_REDIS_URL_FILE={redis_url_file}", style="bold")
               + Text("  (in another terminal outside this folder, as this user, before fleet status, kill,"
                      " dispatch...; in this folder they find it themselves)", style="dim"))


def _stop_embedded(server: EmbeddedRedis, up: _Up) -> None:
    server.stop()
    up.stopped.add("redis", "embedded server stopped (its data is gone, as promised)")


# ---------------------------------------------------------------- what to start


def _plan(settings: Settings, options: UpOptions, redis_url: str, workdir: Path, secrets_dir: Path,
          up: _Up) -> list[Child]:
    """The children to start, in start order."""
    env = child_env(settings, redis_url, secrets_dir)
    if up.embedded:
        up.rows.append(_elsewhere(env["FLEET_REDIS_URL_FILE"]))
    python = sys.executable
    celery = [python, "-m", "celery", "-A", "workers.app"]
    node = worker_node()
    children = [Child("worker", [*celery, "worker", "-Q", ",".join(QUEUES), "-c", str(options.workers),
                                 "-O", "fair", "-E", "--hostname", "fleet@%h", "-l", "INFO"], env,
                      Text(f"{node}, {options.workers} process(es) consuming queues {', '.join(QUEUES)}"),
                      grace_s=WORKER_GRACE_S)]
    if options.beat:
        # The schedule state lives in this run's temporary folder, and no pid file is written: a
        # killed run can leave nothing stale behind that would block the next start.
        children.append(Child("beat", [*celery, "beat", "-l", "INFO", "--schedule",
                                       str(workdir / "celerybeat-schedule"), "--pidfile="], env,
                              Text("ticks from fleet.toml, sweeps, watchdog; schedule state in a temporary folder")))
    if options.flower:
        children.append(_flower_child(settings, celery, env, secrets_dir))
    if options.web:
        children.append(_web_child(settings, python, env, secrets_dir, up))
    log_dir = settings.log_dir.resolve()
    for child in children:
        child.log = None if options.verbose else log_dir / f"{child.name}.log"
    return children


def _flower_child(settings: Settings, celery: list[str], env: dict[str, str], secrets_dir: Path) -> Child:
    """Flower, always behind basic auth (PITFALLS #12), generated when FLEET_FLOWER_AUTH is unset."""
    user = FLOWER_USER
    where = Text(f"http://{FLOWER_HOST}:{settings.flower_port}  ")
    if settings.flower_auth:
        auth = settings.flower_auth
        user = auth.split(":", 1)[0]
        where += Text(f"user {user}, password from FLEET_FLOWER_AUTH(_FILE)")
    else:
        password = secrets.token_urlsafe(18)
        auth = f"{FLOWER_USER}:{password}"
        where += Text(f"user {user}, password ") + Text(password, style="bold") + Text(
            " (generated; FLEET_FLOWER_AUTH=user:password to choose)", style="dim")
    # A conf file (Python, read by Flower at start): neither argv (`ps`) nor Flower's start environment
    # holds the password. A list, so a comma in the password is not taken for a second user.
    conf = hardening.write_private(secrets_dir, "flowerconfig.py", f"basic_auth = [{auth!r}]\n")
    return Child("flower", [*celery, "flower", f"--address={FLOWER_HOST}", f"--port={settings.flower_port}",
                            f"--conf={conf}"], env, where)


def _web_child(settings: Settings, python: str, env: dict[str, str], secrets_dir: Path, up: _Up) -> Child:
    """The web page, always behind a token: FLEET_WEB_TOKEN, or one generated here and printed."""
    base = web_url(settings)
    if settings.web_token:
        token = check_web_token(settings.web_token)  # refused (78) before any part starts
        where = Text(f"{base}/  token from FLEET_WEB_TOKEN(_FILE): open /?token=TOKEN, or basic auth with it "
                     "as the password")
    else:
        token = secrets.token_urlsafe(24)
        where = Text(f"{base}/?token=") + Text(token, style="bold") + Text(
            " (generated; or basic auth: any user, the token as password)", style="dim")
        up.warnings.append("no FLEET_WEB_TOKEN: the page's token is new on every start "
                           "(FLEET_WEB_TOKEN_FILE, a 0600 file, keeps one)")
    web_env = {**env, "FLEET_WEB_TOKEN_FILE": str(hardening.write_private(secrets_dir, "web_token", token))}
    return Child("web", [python, "-m", "fleet", "web"], web_env, where)


def child_env(settings: Settings, redis_url: str, secrets_dir: Path) -> dict[str, str]:
    """The children's environment: ours, with every location made explicit and absolute, and every
    secret replaced by a FLEET_*_FILE path to a private file in `secrets_dir`."""
    # FLOWER_* variables configure Flower behind our back (FLOWER_UNAUTHENTICATED_API would open it).
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("FLOWER_") and name not in SECRET_ENV}
    env.update({
        "FLEET_CONFIG": str(settings.config.resolve()),
        "FLEET_LOG_DIR": str(settings.log_dir.resolve()),
        "FLEET_WEB_HOST": settings.web_host,
        "FLEET_WEB_PORT": str(settings.web_port),
        "FLEET_FLOWER_PORT": str(settings.flower_port),
        "PYTHONUNBUFFERED": "1",  # log lines reach the terminal as they happen
    })
    shared = {"redis_url": redis_url, "database_url": absolute_database_url(settings.database_url),
              "sentry_dsn": settings.sentry_dsn}
    for name, value in shared.items():
        if value:
            env[f"FLEET_{name.upper()}_FILE"] = str(hardening.write_private(secrets_dir, name, value))
    return env


def worker_node() -> str:
    """The worker's node name: `fleet@%h` as Celery expands it."""
    return f"fleet@{socket.gethostname()}"


def web_url(settings: Settings) -> str:
    """Where the web process can be reached from this host."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(settings.web_host, settings.web_host)
    return f"http://[{host}]:{settings.web_port}" if ":" in host else f"http://{host}:{settings.web_port}"


def absolute_database_url(url: str) -> str:
    """A SQLite URL with an absolute path (children may run elsewhere); other URLs unchanged."""
    parsed = make_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:" \
            or database.startswith("file:") or Path(database).is_absolute():
        return url
    return parsed.set(database=str(Path(database).resolve())).render_as_string(hide_password=False)


def mask_redis_url(url: str) -> str:
    """The URL with any password replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostport}"))


def mask_database_url(url: str) -> str:
    """The URL with any password replaced by ***."""
    return make_url(url).render_as_string(hide_password=True)


# ---------------------------------------------------------------- running


def _supervise(settings: Settings, config: FleetConfig, options: UpOptions, children: list[Child],
               signals: _Signals, started: float, up: _Up, redis_url: str) -> int:
    probe = _Readiness(web_url(settings) if options.web else None, children[0].env)
    reader = _snapshot_reader(settings, config, redis_url)
    feed = StatusFeed(reader)
    try:
        for child in children:
            _start(child)
        _banner(settings, config, children, up)
        up.screen.parts = {child.name: "starting" for child in children}
        feed.start()
        up.screen.start_live(feed, _footer(settings, options))
        return _watch(children, probe, signals, started, up)
    finally:
        up.screen.stop_live()
        if signals.stop:
            up.screen.event(f"stopping on {signal.Signals(signals.received[0]).name}: the worker lets running runs "
                            f"finish (up to {WORKER_GRACE_S:.0f} s); Ctrl-C again stops them now", "bold")
        probe.close()
        _stop_all(children, signals, up)
        feed.close(reader.close)


def _banner(settings: Settings, config: FleetConfig, children: list[Child], up: _Up) -> None:
    rows = [*up.rows, *(Row(c.name, c.where, _pid(c)) for c in children)]
    logs = [c.log for c in children if c.log is not None]
    if logs:
        folder = logs[0].parent
        rows.append(Row("logs", Text(f"{folder}/{{{','.join(p.stem for p in logs)}}}.log (JSON lines; "
                                     "`fleet up -v` streams them here instead)")))
    title = (f"Fleet {__version__} on {socket.gethostname()} · {settings.config} · {len(config.agents)} agent(s): "
             f"{', '.join(sorted(config.agents)) or 'none (add one to fleet.toml)'}")
    up.screen.banner(title, rows, up.warnings)


def _footer(settings: Settings, options: UpOptions) -> Text:
    text = Text("Ctrl-C stops everything", style="bold")
    if options.web:
        text += Text(f" · the page {web_url(settings)}/", style="dim")
    return text + Text(" · fleet status / kill / pause elsewhere", style="dim")


def _snapshot_reader(settings: Settings, config: FleetConfig, redis_url: str) -> _SnapshotReader:
    return _SnapshotReader(settings.model_copy(update={"redis_url": redis_url,
                                                        "database_url": absolute_database_url(settings.database_url)}),
                           config)


class _SnapshotReader:
    """The status block's source: `fleet.state.snapshot` on clients of its own (built on first use)."""

    def __init__(self, settings: Settings, config: FleetConfig) -> None:
        """Remember how to connect; nothing is opened yet."""
        self.settings, self.config = settings, config
        self.services: Any = None

    def __call__(self) -> dict[str, Any]:
        """One snapshot."""
        from fleet.services import build
        from fleet.state import snapshot

        if self.services is None:
            self.services = build(self.settings, self.config)
        return snapshot(self.services)

    def close(self) -> None:
        """Close its clients, if it opened any."""
        if self.services is not None:
            self.services.close()


def _start(child: Child) -> None:
    # Own session: terminal signals skip it (we stop it in order) and killpg reaches its pool children.
    output: Any = None
    if child.log is not None:
        child.log.parent.mkdir(parents=True, exist_ok=True)
        # 0600: a part's log names runs and carries errors and agents' output, not for a run_as agent to read.
        output = os.fdopen(hardening.append_private(child.log), "ab")
    try:
        child.process = subprocess.Popen(child.argv, env=child.env, stdin=subprocess.DEVNULL, stdout=output,
                                         stderr=subprocess.STDOUT if output is not None else None,
                                         start_new_session=True)
    finally:
        if output is not None:
            output.close()  # the child holds its own copy


def _watch(children: list[Child], probe: _Readiness, signals: _Signals, started: float, up: _Up) -> int:
    """Wait for a stop signal (0) or a child's death (1), announcing readiness on the way."""
    ready = False
    while not signals.stop:
        for child in children:
            code = exit_status(child)
            if code is not None:
                up.screen.parts[child.name] = "down"
                up.screen.event(f"{child.name} (pid {_pid(child)}) exited unexpectedly ({_describe_exit(code)}); "
                                f"stopping the rest" + (f"; its log: {child.log}" if child.log else ""), "bold red")
                return 1
        if not ready and probe.ready():
            ready = True
            up.screen.ready_after = time.monotonic() - started
            up.screen.parts = dict.fromkeys(up.screen.parts, "up")
            up.screen.event(f"ready in {up.screen.ready_after:.1f}s: the worker answers and the page is up "
                            "(Ctrl-C stops everything)", "bold green")
        elif not ready:
            up.screen.parts.update({name: "up" for name, ok in probe.parts().items() if ok})
            if probe.late:
                probe.late = False
                up.screen.event(f"the worker has not answered a ping for {PROBE_DEADLINE_S:.0f}s; still waiting "
                                f"(its log: {children[0].log or 'above'})", "yellow")
        time.sleep(POLL_S)
    return 0


class _Readiness:
    """Ready when the web /livez answers (if started) and the worker answers a Celery ping."""

    def __init__(self, web: str | None, env: dict[str, str]) -> None:
        """Remember what to probe; the ping probe starts on the first call."""
        self.livez = f"{web}/livez" if web else None
        self.env = env
        self.web_ok = web is None
        self.worker_ok = False
        self.process: subprocess.Popen[bytes] | None = None
        self.warned = False
        self.late = False  # the worker did not answer within PROBE_DEADLINE_S (the screen says so)

    def parts(self) -> dict[str, bool]:
        """Which probed parts answered so far."""
        return {"web": self.web_ok, "worker": self.worker_ok}

    def ready(self) -> bool:
        """Check what is not yet known to be up; never blocks for long."""
        if not self.web_ok and self.livez is not None:
            self.web_ok = _http_ok(self.livez)
        if not self.worker_ok:
            self.worker_ok = self._worker_answered()
        return self.web_ok and self.worker_ok

    def _worker_answered(self) -> bool:
        if self.process is None:
            self.process = subprocess.Popen([sys.executable, "-c", _PING_PROBE, worker_node(),
                                             str(PROBE_DEADLINE_S)], env=self.env, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, start_new_session=True)
        code = self.process.poll()
        if code is None:
            return False
        self.process = None
        if code != 0 and not self.warned:
            self.warned = True
            self.late = True
        return code == 0

    def close(self) -> None:
        """Stop the ping probe if it still runs."""
        if self.process is not None and self.process.poll() is None:
            _killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


# No proxies: an http_proxy in the environment must not swallow a loopback probe.
_LOCAL_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http_ok(url: str) -> bool:
    try:
        with _LOCAL_HTTP.open(url, timeout=1.0) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


# ---------------------------------------------------------------- stopping


def _stop_all(children: list[Child], signals: _Signals, up: _Up) -> None:
    """SIGTERM each child, wait out its grace period, then SIGKILL its whole process group."""
    started = up.stopped.began = time.monotonic()
    running = [c for c in children if c.process is not None]
    for child in running:
        # The leader only: Celery's pool children die at once on SIGTERM, while the worker's own
        # warm shutdown lets their running tasks finish first.
        with contextlib.suppress(ProcessLookupError):
            os.kill(_pid(child), signal.SIGTERM)
    deadlines = {c.name: started + c.grace_s for c in running}
    ended: dict[str, float] = {}
    while not signals.hurry and any(exit_status(c) is None and time.monotonic() < deadlines[c.name]
                                    for c in running):
        ended.update({c.name: time.monotonic() for c in running if c.name not in ended and exit_status(c) is not None})
        time.sleep(0.05)
    if signals.hurry:
        up.screen.event("second signal: killing what is left now", "bold red")
    for child in running:
        late = exit_status(child) is None
        # Sweep the group even when the leader exited: a stray grandchild must not outlive us.
        # The leader is not reaped yet, so its pid (the group id) cannot have been reused.
        _killpg(_pid(child), signal.SIGKILL)
        assert child.process is not None
        code = child.process.wait()
        took = ended.get(child.name, time.monotonic()) - started
        if late:
            up.stopped.add(child.name, f"SIGKILL after {took:.1f} s: it did not stop in time", clean=False)
        else:
            up.stopped.add(child.name, f"stopped ({_describe_exit(code)}) in {took:.1f} s")


def exit_status(child: Child) -> int | None:
    """The child's exit code once it exited, without reaping it (so its pid stays reserved for killpg)."""
    process = child.process
    if process is None:
        return None
    if process.returncode is not None or not hasattr(os, "waitid"):
        return process.poll()
    info = os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    if info is None or info.si_pid == 0:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


def _pid(child: Child) -> int:
    assert child.process is not None
    return child.process.pid


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


@contextlib.contextmanager
def _signals_handled(signals: _Signals) -> Iterator[None]:
    """Route SIGINT/SIGTERM/SIGHUP to `signals` for the duration (main thread only, as Python requires)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signals) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
