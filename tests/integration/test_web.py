"""The Prefect UI and the MLflow UI, in headless Chromium, show the smoke run and its model.

Uses the stack and the API-triggered smoke run of conftest.py (both backends). Screenshots land in
``test-artifacts/`` (kept by CI). Needs Debian's chromium + chromium-driver (``.ci/setup_services.sh``);
skips with that hint when they are missing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.integration.conftest import ARTIFACTS

pytestmark = [pytest.mark.services, pytest.mark.integration]

# Flags that work in a container without a GPU or network access.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1600,1000"]


def _find(*names: str) -> str | None:
    for n in names:
        found = shutil.which(n)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium driven by chromedriver, with a fresh profile."""
    chromium = _find("chromium", "chromium-browser")
    driver_path = _find("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("chromium / chromium-driver not installed: run .ci/setup_services.sh")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="sftflow-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        opts.add_argument(flag)
    drv = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    drv.set_page_load_timeout(120)
    try:
        yield drv
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _wait_for_text(drv: Any, needles: list[str], *, timeout: float = 120.0) -> str:
    """Wait until the rendered page's visible text holds every needle (SPAs render after load)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def has_all(d: Any) -> str | bool:
        text = d.find_element(By.TAG_NAME, "body").text
        return text if all(n in text for n in needles) else False

    try:
        return WebDriverWait(drv, timeout, poll_frequency=1.0).until(has_all)
    except TimeoutException:
        text = drv.find_element(By.TAG_NAME, "body").text
        raise AssertionError(f"{drv.current_url}: page never showed {needles}; it shows:\n{text[:3000]}") from None


def _screenshot(drv: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    drv.save_screenshot(str(path))
    assert path.stat().st_size > 10_000, f"{path}: suspiciously small screenshot"
    return path


def test_prefect_ui_shows_the_smoke_flow_run(stack, smoke_run, browser) -> None:
    url = f"{stack.prefect_api_url.removesuffix('/api')}/runs/flow-run/{smoke_run.id}"
    browser.get(url)
    text = _wait_for_text(browser, [smoke_run.name, "Completed"])
    assert "smoke" in text  # deployment / parameters of the run
    _screenshot(browser, f"prefect-flow-run-{stack.backend}.png")


def test_mlflow_ui_shows_the_registered_model(stack, smoke_run, browser) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=stack.mlflow_uri, registry_uri=stack.mlflow_uri)
    version = client.get_model_version_by_alias("sftflow-smoke", "candidate")
    browser.get(f"{stack.mlflow_uri}/#/models/sftflow-smoke")
    _wait_for_text(browser, ["sftflow-smoke", f"Version {version.version}", "candidate"])
    _screenshot(browser, f"mlflow-model-{stack.backend}.png")

    # The run that produced it, with its parent (the pipeline run of this Prefect flow run).
    run = client.get_run(version.run_id)
    browser.get(f"{stack.mlflow_uri}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}")
    _wait_for_text(browser, [run.info.run_name])
    _screenshot(browser, f"mlflow-run-{stack.backend}.png")
