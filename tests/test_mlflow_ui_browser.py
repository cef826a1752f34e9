"""The MLflow UI in a real browser: tiny CfC and GRU runs, seen and compared in headless chromium.

Trains two tiny models on synthetic data into a fresh SQLite store, starts ``mlflow server`` on
loopback against it, and drives Debian's chromium through chromedriver (selenium; no browser
download): the experiment's runs table lists both runs, the ``test/rmse_k5`` column (added
through the Columns menu, as a user would) shows each run's logged value, and selecting both
runs and pressing Compare opens the compare view with both runs and the metric. Screenshots are
saved under the test's tmp folder (path printed).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processes import wait_until_ok

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
METRIC = "test/rmse_k5"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _browser_installed() -> None:
    """Checked before the minute of training and server start the test needs."""
    missing = [exe for exe in (CHROMIUM, CHROMEDRIVER) if not Path(exe).exists()]
    if missing:
        why = f"{', '.join(missing)} missing: run scripts/system-packages.sh as root"
        # CI must run this test; elsewhere a machine without chromium skips it, saying why.
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)


@pytest.fixture()
def mlflow_server(tmp_path: Path, mlflow_uri: str) -> Iterator[str]:
    port = _free_port()
    log = (tmp_path / "mlflow-server.log").open("w")
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [
            str(mlflow_bin),
            "server",
            "--backend-store-uri",
            mlflow_uri,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
        env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        log.flush()
        wait_until_ok(proc, f"{base}/health", 90, tmp_path / "mlflow-server.log", "mlflow server")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture()
def browser(tmp_path: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1800,1000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


def _train_two_runs(tmp_path: Path, mlflow_uri: str) -> dict[str, dict]:
    """Tiny CfC and GRU runs through the real training entry point."""
    from pipeline.dag.settings import DagSettings
    from pipeline.dag.training_api import train
    from tests.synthetic import write_synthetic_etl_output

    data = tmp_path / "etl"
    write_synthetic_etl_output(data, n_stays=40, n_bins=8, seed=0)
    s = DagSettings(tracking_uri=mlflow_uri, experiment="ui-test", epochs=2, data_dir=tmp_path)
    # Only what the UI shows is evaluated: K = 1 and 5, no noise sweep.
    return {
        m: train(s, m, data=data, plots=False, ks=(1, 5), sigmas=(0.0,)) for m in ("cfc", "gru")
    }


def _fmt_prefixes(value: float) -> list[str]:
    """Renderings of ``value`` the UI may use (the compare view rounds to 3 decimals)."""
    return [str(round(value, 3)), f"{value:.3f}", f"{value:.4f}", f"{value:.5f}", repr(value)]


def test_runs_and_rmse_k5_are_shown_and_compare_view_opens(
    tmp_path: Path, mlflow_uri: str, mlflow_server: str, browser
) -> None:
    from mlflow.tracking import MlflowClient
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    runs = _train_two_runs(tmp_path, mlflow_uri)
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("ui-test")
    values = {}
    names = {}
    for model, record in runs.items():
        run = client.get_run(record["run_id"])
        values[model] = run.data.metrics[METRIC]
        names[model] = run.info.run_name
    assert values["cfc"] != values["gru"]

    def body() -> str:
        return browser.find_element(By.TAG_NAME, "body").text

    wait = WebDriverWait(browser, 60)
    browser.get(f"{mlflow_server}/#/experiments/{exp.experiment_id}/runs")
    wait.until(lambda d: all(n in body() for n in names.values()))
    browser.save_screenshot(str(tmp_path / "runs.png"))

    # Add the metric column as a user would: Columns -> test/rmse_k5.
    browser.find_element(
        By.XPATH,
        "//button[normalize-space(.)='Columns' or .//*[normalize-space(text())='Columns']]",
    ).click()
    wait.until(lambda d: d.find_elements(By.XPATH, f"//*[normalize-space(text())='{METRIC}']"))
    browser.find_element(By.XPATH, f"//*[normalize-space(text())='{METRIC}']").click()
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    for model, value in values.items():
        wait.until(
            lambda d, v=value: any(p in body() for p in _fmt_prefixes(v)),
            message=f"{METRIC} of {model} ({value}) not shown in the runs table",
        )
    # Scroll the grid to its right end so the screenshot shows the metric column.
    browser.execute_script(
        "document.querySelectorAll('.ag-center-cols-viewport, .ag-body-horizontal-scroll-viewport')"
        ".forEach(e => e.scrollLeft = e.scrollWidth)"
    )
    time.sleep(0.5)
    browser.save_screenshot(str(tmp_path / "runs_with_metric.png"))

    # Select both runs and open the compare view.
    boxes = [
        b
        for b in browser.find_elements(By.CSS_SELECTOR, "input[type=checkbox]")
        if (b.get_attribute("aria-label") or "").startswith("Press Space to toggle row selection")
    ]
    assert len(boxes) == 2, f"expected one selection box per run, found {len(boxes)}"
    for box in boxes:
        browser.execute_script("arguments[0].click()", box)
    compare = wait.until(
        lambda d: d.find_elements(By.XPATH, "//button[normalize-space(.)='Compare']")
    )
    compare[0].click()
    wait.until(lambda d: "compare-runs" in d.current_url)
    wait.until(lambda d: "Comparing 2 Runs" in body())
    time.sleep(1)
    shot = tmp_path / "compare.png"
    browser.save_screenshot(str(shot))
    text = body()
    for model, record in runs.items():
        assert record["run_id"] in browser.current_url
        assert names[model] in text

    # The metrics table is virtualised (rows absolutely positioned, only visible rows in the
    # DOM): scroll it until the metric's row exists, then read the cells sharing its row.
    row = None
    for top in range(0, 200_000, 200):
        height = browser.execute_script(
            "const g = [...document.querySelectorAll('.ReactVirtualized__Grid')];"
            "g.forEach(e => { e.scrollTop = arguments[0]; });"
            "return Math.max(0, ...g.map(e => e.scrollHeight));",
            top,
        )
        time.sleep(0.2)
        anchors = browser.find_elements(By.XPATH, f"//a[normalize-space(.)='{METRIC}']")
        if anchors:
            row = anchors[0].find_element(By.XPATH, "./..").value_of_css_property("top")
            break
        if top > height:
            break
    assert row is not None, f"{METRIC} row not found in the compare view's metrics table"
    # The value columns are a second virtualised grid that renders a moment later than the
    # name column (the more metrics a run has, the later): read the row until it is complete.
    # Scroll every grid to just above the row so the value grid renders it too (its rendered
    # window can start a row later than the name column's).
    browser.execute_script(
        "document.querySelectorAll('.ReactVirtualized__Grid')"
        ".forEach(e => { e.scrollTop = Math.max(0, parseFloat(arguments[0]) - 200); });",
        row,
    )
    cells: list[str] = []
    for _ in range(40):
        cells = browser.execute_script(
            "return [...document.querySelectorAll("
            "'.ReactVirtualized__Grid__innerScrollContainer > div')]"
            ".filter(e => e.style.top === arguments[0]).map(e => e.innerText.trim());",
            row,
        )
        if len([c for c in cells if c != METRIC]) >= len(values):
            break
        time.sleep(0.25)
    # The name cell was found at this row's offset above; the rest are the runs' values.
    shown = {c for c in cells if c != METRIC}
    for model, value in values.items():
        assert shown & set(_fmt_prefixes(value)), f"{model} {METRIC}={value} not in {cells}"
    print(f"screenshots: {tmp_path}/runs_with_metric.png, {shot}; compare row: {cells}")
