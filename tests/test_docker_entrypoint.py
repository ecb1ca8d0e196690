"""The image's entry point refuses the placeholder secrets of .env.example.

A user who copies .env.example and forgets to edit it must not get a stack
whose database password and Ray token anyone can read in this repository. The
entry point runs here as a plain script (no Docker), with the environment
compose would give each container from the unedited .env.example.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"


def _example(name: str) -> str:
    found = re.search(rf"^{name}=(.*)$", (REPO / ".env.example").read_text(), re.M)
    assert found, f"{name} is not in .env.example"
    return found.group(1).strip()


def _storage_url(password: str) -> str:
    """The storage URL docker-compose.yml builds from POSTGRES_PASSWORD."""
    return f"postgresql+psycopg2://svdsweep:{password}@postgres:5432/svdsweep"


def _entrypoint(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    # `true` after the role stands for the Ray/optuna command the role would run.
    clean = {"PATH": os.environ["PATH"], "HOME": "/nonexistent", **env}
    return subprocess.run(
        ["bash", str(ENTRYPOINT), *args], capture_output=True, text=True, env=clean, timeout=60
    )


@pytest.mark.parametrize(
    ("role", "secret"),
    [
        ("ray-head", "RAY_AUTH_TOKEN"),
        ("ray-worker", "RAY_AUTH_TOKEN"),
        ("ray-driver", "RAY_AUTH_TOKEN"),
        ("init-db", "POSTGRES_PASSWORD"),
        ("ray-driver", "POSTGRES_PASSWORD"),
        ("svdsweep", "POSTGRES_PASSWORD"),  # the dashboard's `svdsweep dashboard`
    ],
)
def test_placeholder_secrets_are_refused_in_one_line(role: str, secret: str) -> None:
    env = {"RAY_AUTH_TOKEN": "0" * 64, "SVDSWEEP_STORAGE": _storage_url("a1b2c3")}
    if secret == "RAY_AUTH_TOKEN":
        env["RAY_AUTH_TOKEN"] = _example("RAY_AUTH_TOKEN")
    else:
        env["SVDSWEEP_STORAGE"] = _storage_url(_example("POSTGRES_PASSWORD"))
    refused = _entrypoint(role, "true", RAY_HEAD_ADDRESS="127.0.0.2:6379", **env)
    assert refused.returncode == 64
    assert refused.stdout == ""
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    assert secret in lines[0] and ".env" in lines[0]
    assert _example(secret) not in refused.stderr, "the message names the variable, not its value"


def test_real_secrets_pass_the_check() -> None:
    passed = _entrypoint("true", RAY_AUTH_TOKEN="0" * 64, SVDSWEEP_STORAGE=_storage_url("a1b2c3"))
    assert passed.returncode == 0, passed.stderr
