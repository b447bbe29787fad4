"""The Prefect UI and the MLflow UI, in headless Chromium, show the smoke run and its model.

Uses the stack and the API-triggered smoke run of conftest.py (both backends). Screenshots land in
``test-artifacts/`` (kept by CI). Needs Debian's chromium + chromium-driver (``.ci/setup_services.sh``);
skips with that hint when they are missing.
"""

from __future__ import annotations

import contextlib
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


def _console(drv: Any) -> str:
    """The browser's console messages (errors the page logged), for failure messages."""
    try:
        return "\n".join(f"{e.get('level')} {e.get('message')}" for e in drv.get_log("browser"))[-3000:]
    except Exception as exc:  # noqa: BLE001 - diagnostics only
        return f"(unavailable: {exc})"


def _tail(path: str | Path, *, chars: int = 4000) -> str:
    """The end of a server log, for failure messages."""
    try:
        return Path(path).read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"(unreadable: {exc})"


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


FORM_DEPLOYMENT = "smoke-form"


@pytest.fixture(scope="module")
def form_deployment(stack) -> Any:
    """The smoke pipeline's deployment as ``sftflow serve`` builds it (typed ``options`` form with
    the pipeline's values), registered under another name and served by no runner: a run created
    from its form stays scheduled, so the test checks what the form sends without training."""
    from prefect import get_client

    from flows.serve import build_deployments
    from tests.integration.conftest import prefect_api

    deployment = build_deployments(only=["smoke"], limit_concurrency=False)[0]
    deployment.name = FORM_DEPLOYMENT
    with prefect_api(stack.prefect_api_url):
        deployment_id = deployment.apply()
        with get_client(sync_client=True) as client:
            yield client.read_deployment(deployment_id)


def _property_input(drv: Any, label: str) -> Any:
    """The input (or textarea, for strings) of the innermost schema-form property labelled ``label``."""
    from selenium.webdriver.common.by import By

    xpath = (f"//span[contains(@class,'schema-form-property__label') and starts-with(normalize-space(.),'{label}')]"
             "/ancestor::div[contains(concat(' ', @class, ' '), ' schema-form-property ')][1]"
             "/descendant::*[self::input or self::textarea][1]")
    return drv.find_element(By.XPATH, xpath)


def test_prefect_custom_run_form_is_typed_and_reaches_the_flow_run(stack, form_deployment, browser) -> None:
    """Open the deployment's "Custom run" page, change training max_steps, submit: the new flow run's
    parameters carry the changed value (read back through the Prefect API)."""
    from prefect import get_client
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from sftflow.config import load_pipelines
    from tests.integration.conftest import prefect_api

    smoke = load_pipelines()["smoke"]
    ui = stack.prefect_api_url.removesuffix("/api")
    browser.get(f"{ui}/deployments/deployment/{form_deployment.id}/run")
    _wait_for_text(browser, ["options", "Training", "Max Steps", "Max Examples", "Min Improvement",
                             "Per Source", "overrides", "Submit"])
    field = _property_input(browser, "Max Steps")
    # The pipeline's current value is the default.
    assert field.get_attribute("value") == str(smoke.training.max_steps)
    assert _property_input(browser, "Base Model").get_attribute("value") == smoke.base_model
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", field)
    _screenshot(browser, f"prefect-custom-run-form-{stack.backend}.png")
    new_steps = smoke.training.max_steps + 7
    field.clear()
    field.send_keys(str(new_steps))
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    def mine() -> list[Any]:
        with prefect_api(stack.prefect_api_url), get_client(sync_client=True) as c:
            runs = c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[form_deployment.id])))
        # (the deployment's cron may have scheduled runs of its own: those carry no options)
        return [r for r in runs if "options" in r.parameters]

    # The UI creates the flow run and then shows it (or, in some UI versions, the deployment's Runs
    # tab): find it through the API. A Prefect server on SQLite can answer one request with a 500
    # on a loaded machine (the UI's "Oops. Something went wrong." toast, the form left as it was);
    # a user clicks Submit again, and so does the test, at most three times, saying so.
    flow_run_id, attempts = None, 0
    while flow_run_id is None and attempts < 3:
        attempts += 1
        for toast_close in browser.find_elements(By.XPATH, "//button[normalize-space(.)='Close']"):
            with contextlib.suppress(Exception):
                toast_close.click()
        submit = browser.find_elements(By.XPATH, "//button[normalize-space(.)='Submit']")
        if submit:  # (gone when the UI already left the form: then only wait)
            submit[0].click()
        with contextlib.suppress(TimeoutException):
            flow_run_id = WebDriverWait(browser, 40, poll_frequency=1.0).until(
                lambda _: next((str(r.id) for r in mine()), False))
        if flow_run_id is None:
            print(f"form submit attempt {attempts} created no flow run; page at {browser.current_url}")
    if flow_run_id is None:
        _screenshot(browser, f"prefect-custom-run-submit-failed-{stack.backend}.png")
        body = browser.find_element(By.TAG_NAME, "body").text
        raise AssertionError(
            f"submitting the form {attempts} times created no flow run ({browser.current_url}); the page shows:\n"
            f"{body[-1500:]}\n--- browser console:\n{_console(browser)}\n"
            f"--- Prefect server log tail ({stack.stack.prefect.log}):\n{_tail(stack.stack.prefect.log)}")
    with prefect_api(stack.prefect_api_url), get_client(sync_client=True) as client:
        fr = client.read_flow_run(flow_run_id)
        extra = [r.id for r in mine() if str(r.id) != flow_run_id]  # a retried submit that landed late
        try:
            assert fr.deployment_id == form_deployment.id
            assert "options" in fr.parameters, fr.parameters
            options = fr.parameters["options"]
            assert options["training"]["max_steps"] == new_steps
            assert fr.parameters["pipeline"] == "smoke"
            # What the flow will do with it: the override key path, on top of pipelines.yaml.
            from sftflow.run_options import options_overrides, resolve_run_config

            assert options_overrides(options, cfg=smoke) == {"training.max_steps": new_steps}
            assert resolve_run_config("smoke", options=options).training.max_steps == new_steps
        finally:
            for run_id in [fr.id, *extra]:
                client.delete_flow_run(run_id)  # never picked up (no runner serves this deployment)


def test_mlflow_pages_answer_the_auditor(stack, smoke_run, browser) -> None:
    """The model version page (gate decision + metrics table in its description) and the pipeline
    run's evaluation table (``eval/side_by_side.json``, logged with ``log_table``) render in the UI."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=stack.mlflow_uri, registry_uri=stack.mlflow_uri)
    version = client.get_model_version_by_alias("sftflow-smoke", "candidate")
    assert version.description, "the gate writes its decision on the version"
    browser.get(f"{stack.mlflow_uri}/#/models/sftflow-smoke/versions/{version.version}")
    _wait_for_text(browser, [f"Version {version.version}", "candidate"])
    _screenshot(browser, f"mlflow-model-version-{stack.backend}.png")

    run = client.get_run(version.run_id)
    parent = run.data.tags.get("mlflow.parentRunId") or run.info.run_id
    artifacts = {a.path for a in client.list_artifacts(parent, "eval")}
    assert "eval/side_by_side.json" in artifacts, artifacts
    # Run inputs: the datasets with their digests (train, held-out, quarantine...) on the stage runs.
    exp = run.info.experiment_id
    stage_runs = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    contexts = {tag.value for r in stage_runs for d in (r.inputs.dataset_inputs if r.inputs else [])
                for tag in d.tags if tag.key == "mlflow.data.context"}
    assert {"training", "heldout"} <= contexts, contexts
    assert any(c.endswith("quarantine") for c in contexts), contexts
    browser.get(f"{stack.mlflow_uri}/#/experiments/{exp}/runs/{parent}/artifacts/eval/side_by_side.json")
    _wait_for_text(browser, ["side_by_side.json"])
    _screenshot(browser, f"mlflow-run-evaluation-{stack.backend}.png")
