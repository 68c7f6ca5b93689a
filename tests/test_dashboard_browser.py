"""optuna-dashboard on a small real study, driven by headless Chromium (Debian's chromium + chromedriver)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from optuna.trial import TrialState

from helpers import EPOCHS, ROOT, build_recorded_study, free_port, load, study_id, wait_for_port

pytestmark = pytest.mark.slow  # real processes: see docs/testing.md

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
WAIT = 90  # seconds: the first page load compiles the dashboard's JS bundle on a busy CPU


def require_browser() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if not missing:
        return
    reason = f"{', '.join(missing)} missing: apt-get install chromium chromium-driver"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the browser test must not be skipped)", pytrace=False)
    pytest.skip(reason)


def headless_chromium(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", f"--user-data-dir={profile}", "--window-size=1400,1000"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)


def wait_for_text(driver, *texts: str) -> str:
    """The page's text once every one of `texts` is rendered (fails with the page text otherwise)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    body = lambda: driver.find_element(By.TAG_NAME, "body").text  # noqa: E731
    try:
        WebDriverWait(driver, WAIT, poll_frequency=0.5).until(lambda d: all(t in body() for t in texts))
    except TimeoutException:
        pytest.fail(f"not rendered within {WAIT}s: {[t for t in texts if t not in body()]}\npage:\n{body()[:3000]}")
    return body()


def test_dashboard_shows_the_study_its_trials_and_a_trial_note(tmp_path, tiny_model):
    require_browser()
    recorded = build_recorded_study(tmp_path / "study", tiny_model, name="browse")
    study = load(recorded["url"], recorded["name"])
    pruned = next(t for t in study.trials if t.state == TrialState.PRUNED)
    last = pruned.user_attrs["history"][-1]

    port = free_port()
    server = subprocess.Popen([sys.executable, "search.py", "--study", str(recorded["file"]), "--dashboard",
                               "--port", str(port)], cwd=ROOT, env=recorded["env"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    driver = None
    try:
        wait_for_port(port, server)
        sid = study_id(port, recorded["name"])
        driver = headless_chromium(tmp_path / "chromium-profile")
        base = f"http://127.0.0.1:{port}/dashboard/studies/{sid}"

        driver.get(base)
        wait_for_text(driver, f"{recorded['name']} (id={sid})", "Best Trial")
        driver.save_screenshot(str(tmp_path / "dashboard-study.png"))

        driver.get(f"{base}/trials?numbers={pruned.number}")
        text = wait_for_text(
            driver,
            f"{len(study.trials)} Trials",  # the trial list's count
            f"Trial {pruned.number}: pruned after epoch {len(pruned.intermediate_values)} of {EPOCHS}",  # the note
            f"{last['overall']:.4f}",  # the note's last-epoch row
            "Dev scores on the full dev sets",
            "metrics.json", "sst-dev-output.csv",  # its artifacts
        )
        for t in study.trials:
            assert f"Trial {t.number}" in text
        screenshot = tmp_path / "dashboard-trial.png"
        assert driver.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
