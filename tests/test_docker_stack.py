"""`docker compose up` for real: the image built, the whole stack started in a Docker engine.

The engine is prepared by ``scripts/docker-engine.sh`` (Debian's docker.io, a
daemon without bridge or iptables rules, base images debootstrapped here, since
no registry is reachable). The stack is docker-compose.yml with the CPU override
and ``docker/compose.test.yml``: every container on the host's network, each
server on its own loopback address. The test then does what a user does:

1. builds the image with the build arguments and secret that compose renders;
2. ``up -d``: PostgreSQL, the init job, the Ray head, two Ray workers, the sweep
   driver and the dashboard;
3. kills one Ray worker container while it trains a trial, and joins a third
   worker with ``docker run``, as docs/deployment.md tells a second machine to;
4. reads the finished sweep from PostgreSQL with ``svdsweep status --json`` and
   the ``optuna`` CLI: exact budgets, the killed trial FAIL, nothing RUNNING;
5. opens the dashboard in headless Chromium;
6. runs the reporter (``--profile report run --rm reporter``) into a bind mount;
7. ``down -v``, after which no container, volume or network of the stack is
   left, and checks that no bridge interface or iptables rule appeared.

Marked ``docker``: ``-m "not docker"`` deselects it. Where the engine cannot
start, the test fails with the reason (it does not skip).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
#: Debian's client (20.10): the docker 28 client some machines have on PATH has no buildx.
DOCKER = "/usr/bin/docker"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
COMPOSE_FILES = ["docker-compose.yml", "docker-compose.cpu.yml", "docker/compose.test.yml"]
IMAGE = "svdsweep:e2e"
#: Marks the images this test builds, so that the ones a rebuild leaves dangling can be pruned.
IMAGE_LABEL = "org.svdsweep.test=e2e"
#: Loopback addresses of docker/compose.test.yml.
POSTGRES_IP, HEAD_IP, WORKER_1_IP, THIRD_WORKER_IP, DASHBOARD_IP = (
    "127.0.11.10",
    "127.0.11.2",
    "127.0.11.3",
    "127.0.11.7",
    "127.0.11.11",
)
EXPERIMENT = "e2e"
TRIALS = 6  # per study: enough that one worker is still training when the other is killed
UP_SERVICES = ["postgres", "init", "ray-head", "ray-worker", "ray-worker-2", "sweep", "dashboard"]
#: The container user, as the compose file names it (SVDSWEEP_UID/GID build args).
RESULTS_UID = RESULTS_GID = 1000
PLACEHOLDER = re.compile(r"change-me-")

pytestmark = [pytest.mark.docker, pytest.mark.timeout(2400)]


def _run(
    args: Sequence[str], *, timeout: float = 600, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, **kwargs)


def _free_ports(count: int) -> list[int]:
    """Distinct ports free on every address (Ray binds some on all of them)."""
    with contextlib.ExitStack() as held:  # all held open at once, so none repeats
        probes = [held.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("", 0))
        return [int(probe.getsockname()[1]) for probe in probes]


def _rules() -> list[str]:
    """The iptables rules (not counters), or ["<no iptables>"] where it is missing."""
    if not shutil.which("iptables-save"):
        return ["<no iptables-save>"]
    dump = _run(["iptables-save"]).stdout
    return sorted(line for line in dump.splitlines() if line.startswith("-A"))


def _bridges() -> list[str]:
    listed = _run(["ip", "-o", "link", "show", "type", "bridge"]).stdout
    names = [line.split(":")[1].strip() for line in listed.splitlines() if ":" in line]
    if Path("/sys/class/net/docker0").exists():
        names.append("docker0")
    return sorted(set(names))


@pytest.fixture(scope="module")
def engine() -> Iterator[None]:
    """A Docker engine with the local base images; the daemon stops after if it was started here."""
    rules_before, bridges_before = _rules(), _bridges()
    if os.geteuid() != 0:
        pytest.fail(
            'needs root to run dockerd (scripts/docker-engine.sh); deselect: -m "not docker"'
        )
    prepared = _run(["bash", str(REPO / "scripts/docker-engine.sh")], timeout=1200)
    print(prepared.stdout, end="")
    if prepared.returncode != 0:
        pytest.fail(f"the Docker engine could not be prepared:\n{prepared.stdout}{prepared.stderr}")
    try:
        yield
    finally:
        if "dockerd: started" in prepared.stdout:
            print(_run(["bash", str(REPO / "scripts/docker-engine.sh"), "stop"]).stdout, end="")
    assert _bridges() == bridges_before, f"a bridge interface appeared: {_bridges()}"
    added = sorted(set(_rules()) - set(rules_before))
    assert not added, f"iptables rules were added: {added}"


class Stack:
    """One compose project of the test files, with the failing service's logs on errors."""

    def __init__(self, tmp_path: Path) -> None:
        self.project = f"{PROJECT_PREFIX}{uuid.uuid4().hex[:8]}"
        self.password = secrets.token_hex(12)
        self.token = secrets.token_hex(32)
        self.results = tmp_path / "results"
        self.results.mkdir()
        os.chown(self.results, RESULTS_UID, RESULTS_GID)
        names = (
            "RAY_PORT",
            "RAY_DASHBOARD_PORT",
            "RAY_CLIENT_PORT",
            "AGENT_PORT_HEAD",
            "AGENT_PORT_WORKER_1",
            "AGENT_PORT_WORKER_2",
            "AGENT_PORT_SWEEP",
            "AGENT_PORT_REPORTER",
            "AGENT_PORT_THIRD_WORKER",
        )
        self.ports = dict(zip(names, _free_ports(len(names)), strict=True))
        self.ray_port = self.ports["RAY_PORT"]
        self.env = {
            "PATH": f"{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(tmp_path),
            "DOCKER_BUILDKIT": "1",
            "POSTGRES_PASSWORD": self.password,
            "RAY_AUTH_TOKEN": self.token,
            "SVDSWEEP_IMAGE": IMAGE,
            "SVDSWEEP_UID": str(RESULTS_UID),
            "SVDSWEEP_GID": str(RESULTS_GID),
            "SVDSWEEP_WORKERS": "2",
            "SVDSWEEP_EXPERIMENT": EXPERIMENT,
            "SVDSWEEP_TRIALS": str(TRIALS),
            "SVDSWEEP_TRIAL_EPOCHS": "1",
            "SVDSWEEP_TEST_TRAIN_SUBSET": "10000",
            "SVDSWEEP_REPORT_EPOCHS": "1",
            "SVDSWEEP_REPORT_SEEDS": "2",
            "SVDSWEEP_WAIT_TIMEOUT": "300",
            "SVDSWEEP_TEST_RESULTS_DIR": str(self.results),
            "RAY_SHM_SIZE": "512mb",
        }
        self.env.update({f"SVDSWEEP_TEST_{name}": str(port) for name, port in self.ports.items()})
        self.storage = f"postgresql+psycopg2://svdsweep:{self.password}@{POSTGRES_IP}:5432/svdsweep"
        self.extra_containers: list[str] = []

    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> str:
        command = [str(VENV_BIN / "docker-compose"), "-p", self.project]
        for file in COMPOSE_FILES:
            command += ["-f", str(REPO / file)]
        done = _run([*command, *args], timeout=timeout, cwd=REPO, env=self.env)
        if check and done.returncode != 0:
            raise AssertionError(f"docker compose {' '.join(args)} failed:\n{done.stderr[-3000:]}")
        return done.stdout

    def logs(self, service: str, lines: int = 40) -> str:
        done = self.compose("logs", "--no-color", "--tail", str(lines), service, check=False)
        return done or "(no logs)"

    @contextlib.contextmanager
    def step(self, name: str, *services: str) -> Iterator[None]:
        """Fails with the last log lines of ``services`` when the step fails."""
        started = time.monotonic()
        try:
            yield
        except Exception as error:  # noqa: BLE001 - any failure gets the services' logs
            logs = "\n".join(
                f"--- {service} (last lines) ---\n{self.logs(service)}" for service in services
            )
            pytest.fail(f"step '{name}' failed: {error}\n{logs}", pytrace=False)
        print(f"docker stack: {name}: {time.monotonic() - started:.0f} s")

    def container(self, service: str) -> str:
        found = self.compose("ps", "-a", "-q", service).split()
        assert len(found) == 1, f"{service}: {len(found)} containers"
        return found[0]

    def head_exec_python(self, code: str) -> str:
        """Runs ``code`` as a Ray driver in the head's container (its raylet is under it)."""
        done = _run([DOCKER, "exec", self.container("ray-head"), "python", "-c", code], timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    def alive_node_ips(self) -> set[str]:
        code = (
            "import ray, json; "
            f"ray.init(address='ray-head:{self.ray_port}', _node_ip_address='{HEAD_IP}', "
            "log_to_driver=False, configure_logging=False, logging_level='ERROR'); "
            "alive = [n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']]; "
            "print('alive:', json.dumps(alive))"
        )
        # Ray prints its own warnings (a dead node's) to stdout as well.
        lines = self.head_exec_python(code).splitlines()
        return set(json.loads(next(line for line in lines if line.startswith("alive: "))[7:]))

    def teardown(self) -> None:
        for name in self.extra_containers:
            _run([DOCKER, "rm", "-f", name])
        self.compose("--profile", "report", "down", "-v", "--remove-orphans", check=False)
        _remove_project(self.project)  # whatever compose could not remove


PROJECT_PREFIX = "svdsweep-e2e-"


def _remove_project(project: str) -> None:
    """Removes a project's containers, volumes and networks with docker alone, by label."""
    label = f"label=com.docker.compose.project={project}"
    for kind, remove in ((["ps", "-a"], ["rm", "-f"]), (["volume", "ls"], ["volume", "rm", "-f"]),
                         (["network", "ls"], ["network", "rm"])):  # fmt: skip
        found = _run([DOCKER, *kind, "-q", "--filter", label]).stdout.split()
        if found:
            _run([DOCKER, *remove, *found])


def _remove_leftovers() -> None:
    """Removes what an interrupted earlier run of this test left: it holds the test's addresses."""
    listed = _run([DOCKER, "ps", "-a", "--format",
                   '{{.Names}} {{.Label "com.docker.compose.project"}}']).stdout  # fmt: skip
    for line in listed.splitlines():
        name, _, project = line.partition(" ")
        if project.startswith(PROJECT_PREFIX):
            _remove_project(project)
        elif name.startswith(PROJECT_PREFIX):
            _run([DOCKER, "rm", "-f", name])


@pytest.fixture
def stack(engine: None, tmp_path: Path) -> Iterator[Stack]:
    _remove_leftovers()
    running = Stack(tmp_path)
    try:
        yield running
    finally:
        running.teardown()


def _build_command(stack: Stack) -> list[str]:
    """`docker build` with what compose renders for the image's build.

    Compose builds through buildx, which Debian's Docker 20.10 lacks, so the
    build arguments, network and secret are read from the rendered files.
    """
    config = json.loads(stack.compose("config", "--format", "json"))
    build = config["services"]["sweep"]["build"]
    command = [DOCKER, "build", "-t", IMAGE, "--label", IMAGE_LABEL, "-f", build["dockerfile"]]
    if build.get("network"):
        command += ["--network", build["network"]]
    for name, value in sorted((build.get("args") or {}).items()):
        command += ["--build-arg", f"{name}={value}"]
    for secret in build.get("secrets") or []:
        source = config["secrets"][secret["source"]]["file"]
        command += ["--secret", f"id={secret['source']},src={source}"]
    return [*command, build["context"]]


def _trials(stack: Stack, optimizer: str) -> list[dict[str, Any]]:
    """The study's trials, as the `optuna` CLI on the host reads them from PostgreSQL."""
    done = _run(
        [
            str(VENV_BIN / "optuna"),
            "trials",
            "--study-name",
            f"{EXPERIMENT}-{optimizer}",
            "--storage",
            stack.storage,
            "-f",
            "json",
        ],
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    trials: list[dict[str, Any]] = json.loads(done.stdout)
    return trials


def _kill_a_worker_mid_trial(stack: Stack) -> tuple[str, int]:
    """Waits until the first Ray worker trains a trial, kills its container, returns the trial."""
    import optuna

    storage = optuna.storages.RDBStorage(stack.storage)
    worker = stack.container("ray-worker")  # looked up first: the kill must follow the sighting
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        for optimizer in ("adam", "svd-adam"):
            name = f"{EXPERIMENT}-{optimizer}"
            with contextlib.suppress(KeyError):  # the study is not created yet
                study = optuna.load_study(study_name=name, storage=storage)
                running = study.get_trials(
                    deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)
                )
                for trial in running:
                    if trial.user_attrs.get("worker_node_ip") == WORKER_1_IP:
                        killed = _run([DOCKER, "kill", worker])
                        assert killed.returncode == 0, killed.stderr
                        # Had it finished just before the kill, the check below would fail for
                        # the wrong reason: say so instead.
                        state = storage.get_trial(trial._trial_id).state
                        assert state == optuna.trial.TrialState.RUNNING, (
                            f"trial {trial.number} of {name} ended ({state.name}) before the kill"
                        )
                        storage.remove_session()
                        return name, trial.number
        time.sleep(0.2)
    raise AssertionError(f"no trial ran on the worker at {WORKER_1_IP} within 600 s")


def _start_third_worker(stack: Stack) -> str:
    """A worker joining the head from outside compose, as docs/deployment.md shows."""
    name = f"{stack.project}-third-worker"
    stack.extra_containers.append(name)
    started = _run(
        [
            DOCKER, "run", "-d", "--name", name,
            "--network", "host", "--init", "--shm-size", "512m",
            # The sweep hands its workers compose's storage URL (host "postgres").
            "--add-host", f"postgres:{POSTGRES_IP}",
            "-e", "RAY_AUTH_MODE=token",
            "-e", f"RAY_AUTH_TOKEN={stack.token}",
            "-e", f"RAY_HEAD_ADDRESS={HEAD_IP}:{stack.ray_port}",
            "-e", f"RAY_NODE_IP={THIRD_WORKER_IP}",
            "-e", "SVDSWEEP_HEARTBEAT_INTERVAL=2",
            "-e", "RAY_START_ARGS=--num-cpus=1 --object-store-memory=100000000 "
                  f"--dashboard-agent-listen-port={stack.ports['AGENT_PORT_THIRD_WORKER']}",
            IMAGE, "ray-worker",
        ]
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    return name


def _wait_until(check: Any, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(2)


def _dashboard_lists_both_studies(base: str, screenshot: Path) -> None:
    assert os.path.exists(CHROMIUM), f"no {CHROMIUM}: scripts/setup.sh installs Debian's chromium"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"],
        )  # fmt: skip
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(f"{base}/dashboard/")
        for optimizer in ("adam", "svd-adam"):
            name = re.compile(rf"(^|\s){re.escape(f'{EXPERIMENT}-{optimizer}')}$")
            page.get_by_text(name).first.wait_for(timeout=60_000)
        page.screenshot(path=str(screenshot))
        browser.close()


def test_compose_stack_sweeps_survives_a_killed_worker_reports_and_leaves_nothing(
    stack: Stack, tmp_path: Path
) -> None:
    with stack.step("build"):
        built = _run(_build_command(stack), timeout=1800, cwd=REPO, env=stack.env)
        assert built.returncode == 0, built.stderr[-3000:]
        _run([DOCKER, "image", "prune", "-f", "--filter", f"label={IMAGE_LABEL}"])

    with stack.step("the .env.example placeholders are refused"):
        for variable, value, role in (
            ("RAY_AUTH_TOKEN", "change-me-openssl-rand-hex-32", "ray-head"),
            ("SVDSWEEP_STORAGE", "postgresql+psycopg2://svdsweep:change-me-openssl-rand-hex-24"
             f"@{POSTGRES_IP}:5432/svdsweep", "init-db"),
        ):  # fmt: skip
            refused = _run(
                [
                    DOCKER,
                    "run",
                    "--rm",
                    "--network",
                    "host",
                    "-e",
                    f"{variable}={value}",
                    IMAGE,
                    role,
                ],
                timeout=120,
            )
            assert refused.returncode == 64, (variable, refused.returncode, refused.stderr)
            assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
            assert "placeholder" in refused.stderr, refused.stderr

    with stack.step("up -d", *UP_SERVICES):
        stack.compose("up", "-d", "--no-build", *UP_SERVICES, timeout=900)
        assert stack.compose("ps", "-q", "dashboard").strip()

    with stack.step("kill a Ray worker mid-trial", "sweep", "ray-worker", "ray-worker-2"):
        killed_study, killed_number = _kill_a_worker_mid_trial(stack)

    with stack.step("a third worker joins with docker run", "ray-head"):
        third = _start_third_worker(stack)
        _wait_until(lambda: THIRD_WORKER_IP in stack.alive_node_ips(), "the third worker joining")
        _wait_until(
            lambda: WORKER_1_IP not in stack.alive_node_ips(), "the killed worker declared dead"
        )

    with stack.step("the sweep finishes", "sweep", "ray-worker-2", "ray-head"):
        exit_code = _run([DOCKER, "wait", stack.container("sweep")], timeout=1200).stdout.strip()
        assert exit_code == "0", f"the sweep exited with {exit_code}"

    with stack.step("exact budgets, the killed trial FAIL, nothing RUNNING", "sweep"):
        status = _run(
            [str(VENV_BIN / "svdsweep"), "status", "--storage", stack.storage,
             "--experiment", EXPERIMENT, "--json"],
            timeout=120,
        )  # fmt: skip
        assert status.returncode == 0, status.stderr
        studies = {study["study"]: study for study in json.loads(status.stdout)}
        assert set(studies) == {f"{EXPERIMENT}-adam", f"{EXPERIMENT}-svd-adam"}
        for study in studies.values():
            assert study["counts"]["COMPLETE"] == study["budget"] == TRIALS, study
            assert study["counts"]["RUNNING"] == 0, study
        states = {
            trial["number"]: trial["state"]
            for trial in _trials(stack, killed_study.removeprefix(f"{EXPERIMENT}-"))
        }
        assert states[killed_number] == "FAIL", (killed_study, killed_number, states)
        nodes = Counter(
            trial.get("user_attrs", {}).get("worker_node_ip")
            for optimizer in ("adam", "svd-adam")
            for trial in _trials(stack, optimizer)
        )
        print(f"docker stack: {killed_study} trial {killed_number} killed (FAIL); by node: {nodes}")

    with stack.step("the dashboard in Chromium lists both studies", "dashboard"):
        _dashboard_lists_both_studies(
            f"http://{DASHBOARD_IP}:8080", tmp_path / "dashboard-studies.png"
        )

    with stack.step("the reporter writes the results", "reporter", "ray-head"):
        stack.compose("--profile", "report", "run", "--rm", "reporter", timeout=1200)
        for name in ("comparison.png", "report.md", "results.json"):
            written = stack.results / name
            assert written.is_file() and written.stat().st_size > 0, f"no {name}"
            owner = (written.stat().st_uid, written.stat().st_gid)
            assert owner == (RESULTS_UID, RESULTS_GID), f"{name} owned by {owner}"
        results = json.loads((stack.results / "results.json").read_text())
        assert EXPERIMENT in json.dumps(results)

    with stack.step("down -v leaves nothing"):
        _run([DOCKER, "rm", "-f", third])
        stack.compose("--profile", "report", "down", "-v", "--remove-orphans")
        label = f"label=com.docker.compose.project={stack.project}"
        for kind in (["ps", "-a"], ["volume", "ls"], ["network", "ls"]):
            left = _run([DOCKER, *kind, "-q", "--filter", label]).stdout.split()
            assert not left, f"{' '.join(kind)}: {left}"
        assert not _run([DOCKER, "ps", "-a", "-q", "--filter", f"name={third}"]).stdout.strip()
        networks = _run([DOCKER, "network", "ls", "--format", "{{.Driver}}"]).stdout.split()
        assert "bridge" not in networks, networks
