"""optuna-dashboard, started by `svdsweep dashboard`, looked at in a real headless Chromium.

Uses Debian's chromium (no browser download), driven by Playwright. The
screenshot lands in test-output/dashboard.png; docs/dashboard.png is a copy.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cheap_objective import cheap_objective
from conftest import SVDSWEEP, free_port

from svdsweep.studies import create_or_resume, study_name
from svdsweep.sweep import SweepSpec
from svdsweep.worker import run_worker

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
OUTPUT = REPO / "test-output"


@pytest.fixture
def dashboard_on_small_sweep(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A finished two-study sweep (cheap objective) served by `svdsweep dashboard`."""
    url = f"sqlite:///{tmp_path}/dash.db"
    spec = SweepSpec(storage=url, experiment="browser", trials=4, trial_epochs=3, pruner="none")
    create_or_resume(url, "browser", spec.study_settings())
    run_worker(url, "browser", objective=cheap_objective)
    port = free_port()
    server = subprocess.Popen(
        [
            SVDSWEEP,
            "dashboard",
            "--storage",
            url,
            "--port",
            str(port),
            "--artifact-dir",
            str(tmp_path / "artifacts"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/studies", timeout=2) as answer:
                    assert answer.status == 200
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(
                        f"dashboard did not start: {server.stderr.read() if server.stderr else ''}"
                    )
                time.sleep(0.5)
        yield base, url
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_dashboard_shows_both_studies_and_their_trials(
    dashboard_on_small_sweep: tuple[str, str],
) -> None:
    # A missing browser fails the test: the check must not pass by being skipped.
    assert os.path.exists(CHROMIUM), f"no {CHROMIUM}: scripts/setup.sh installs Debian's chromium"
    from playwright.sync_api import sync_playwright

    base, _ = dashboard_on_small_sweep
    OUTPUT.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(f"{base}/dashboard/")
        for optimizer in ("adam", "svd-adam"):
            # Listed as "1. browser-adam": match the name at the end of the entry.
            name = re.compile(rf"(^|\s){re.escape(study_name('browser', optimizer))}$")
            page.get_by_text(name).first.wait_for(timeout=30_000)
        page.screenshot(path=str(OUTPUT / "dashboard-studies.png"))

        page.get_by_text(re.compile(r"browser-svd-adam$")).first.click()
        page.wait_for_url("**/studies/**", timeout=30_000)
        page.get_by_text(re.compile(r"browser-svd-adam \(id=\d+\)")).first.wait_for(timeout=30_000)
        page.wait_for_timeout(1500)  # let the history plot draw before the screenshot
        page.screenshot(path=str(OUTPUT / "dashboard.png"))
        # The study's trial list names all four trials and their state.
        page.goto(page.url.rstrip("/") + "/trials")
        page.get_by_text("4 Trials").first.wait_for(timeout=30_000)
        for number in range(4):
            page.get_by_text(f"Trial {number}", exact=True).first.wait_for(timeout=30_000)
        assert page.get_by_text("Complete", exact=True).count() >= 4
        page.screenshot(path=str(OUTPUT / "dashboard-trials.png"))
        browser.close()
    assert (OUTPUT / "dashboard.png").stat().st_size > 10_000
