"""`svdsweep train` as a user runs it: the installed console script, in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SVDSWEEP

#: A proxy on a closed port: any download attempt fails at once instead of going online.
OFFLINE_PROXY = "http://127.0.0.1:9"


class Launched:
    """A command started in the background; :meth:`result` waits for it (once)."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.args = args
        self.process = subprocess.Popen(
            [SVDSWEEP, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self._result: subprocess.CompletedProcess[str] | None = None

    def result(self) -> subprocess.CompletedProcess[str]:
        if self._result is None:
            stdout, stderr = self.process.communicate(timeout=300)
            self._result = subprocess.CompletedProcess(
                self.process.args, self.process.returncode, stdout, stderr
            )
        return self._result


JSON_ARGS = [
    "train",
    "--optimizer", "svd-adam",
    "--k", "9",
    "--lr", "0.002",
    "--epochs", "2",
    "--train-subset", "500",
    "--device", "cpu",
    "--json",
]  # fmt: skip
BAD_INPUT = {
    "negative-lr": (["--lr", "-1"], ["lr must be a positive finite number"]),
    "svd-adam-without-k": (["--optimizer", "svd-adam"], ["svd-adam needs k"]),
    "bad-dataset": (["--dataset", "nope"], ["dataset must be one of"]),
}


def offline_env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["SVDSWEEP_CACHE_DIR"] = str(cache)
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env[name] = OFFLINE_PROXY
    for name in ("no_proxy", "NO_PROXY"):
        env.pop(name, None)
    return env


@pytest.fixture(scope="module")
def runs(
    session_cache: Path, fashion_splits: object, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Launched]]:
    """Every command of this module, started at once: each spends seconds importing torch.

    ``fashion_splits`` has already decompressed the data into the session cache.
    """
    env = offline_env(session_cache)
    # MNIST has no Debian package, this cache is empty and downloads cannot get out,
    # so an empty --data-dir leaves nothing to fall back on.
    missing = tmp_path_factory.mktemp("missing-data")
    (missing / "empty").mkdir()
    missing_env = offline_env(missing / "cache")
    missing_env.pop("SVDSWEEP_DATA_DIR", None)
    launched = {
        "json": Launched(JSON_ARGS, env),
        "missing-data": Launched(
            ["train", "--dataset", "mnist", "--data-dir", str(missing / "empty")], missing_env
        ),
    }
    for name, (args, _) in BAD_INPUT.items():
        launched[name] = Launched(["train", "--device", "cpu", *args], env)
    yield launched
    for command in launched.values():
        if command.process.poll() is None:
            command.process.kill()
            command.process.wait()


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def test_console_script_is_installed() -> None:
    assert Path(SVDSWEEP).is_file(), "run: pip install -e '.[test]'"


@pytest.mark.slow
def test_train_json_output(runs: dict[str, Launched]) -> None:
    result = runs["json"].result()
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    output = json.loads(result.stdout)  # stdout holds the JSON and nothing else

    for curve in ("train_loss", "val_loss", "val_acc", "epoch_seconds", "energy"):
        assert len(output[curve]) == 2, curve
    assert all(0 <= acc <= 1 for acc in output["val_acc"])
    assert all(0 < fraction <= 1 for fraction in output["energy"])
    assert set(output["energy_per_layer"]) == {"1.weight", "3.weight", "5.weight"}
    assert output["device"] == "cpu"
    assert output["test_acc"] is None
    expected = {"optimizer": "svd-adam", "k": 9, "lr": 0.002, "epochs": 2, "train_subset": 500}
    assert {key: output["config"][key] for key in expected} == expected


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_a_one_line_error(runs: dict[str, Launched], case: str) -> None:
    assert_one_line_error(runs[case].result(), *BAD_INPUT[case][1])
    assert runs[case].result().returncode == 1


def test_missing_data_is_a_one_line_error(runs: dict[str, Launched]) -> None:
    command = runs["missing-data"]
    result = command.result()
    empty = command.args[-1]
    assert_one_line_error(result, "mnist not found", f"--data-dir: {empty}", "download into")
    assert result.returncode == 1
