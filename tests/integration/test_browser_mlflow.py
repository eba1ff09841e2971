"""The MLflow UI shows a registered version's gate table, in a real browser.

A tiny model is registered, gated and promoted on a sqlite MLflow store (as the pipeline's
gate_register and promote stages do); ``mlflow server`` serves that store on 127.0.0.1, and
headless Chromium (Debian's ``chromium`` and ``chromium-driver``, driven by Selenium; nothing
downloaded at run time) opens the version's page. The rendered description must show the gate
verdict, the gate table's rows and the metrics. The screenshot goes to ``docs/img/``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import gate_record

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / "docs" / "img" / "mlflow-version-gate.png"


def _browser() -> tuple[str, str]:
    chrome = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chrome or not driver:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)")
    return chrome, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gate(champion: str | None) -> dict:
    return gate_record(champion, recall=0.1234, ndcg=0.0712, champion_ndcg=0.0701)


def _model_dir(path: Path, day: str) -> Path:
    """A model folder as the registry sees it (the page shows tags and description, not weights)."""
    path.mkdir()
    (path / "config.json").write_text('{"model_type": "qwen3"}')
    (path / "onerec_meta.json").write_text(f'{{"dt": "{day}", "sid_version": "s1"}}')
    return path


def test_version_page_shows_the_gate_table(make_cfg, tmp_path):
    chrome, driver_path = _browser()
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the test extra) is not installed")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from onerec_prod.registry import registry

    cfg = make_cfg()
    day1, day2 = _model_dir(tmp_path / "d1", "2014-03-06"), _model_dir(tmp_path / "d2", "2014-03-07")
    v1 = registry.register(cfg, day1, "2014-03-06", {"data_versions": {"catalog": 2, "events": 5}})
    registry.record_gate(cfg, v1, _gate(None), {"recall_at_10": 0.1234, "ndcg_at_10": 0.0712})
    registry.promote(cfg, v1, actor="airflow:onerec_daily", reason="daily gate passed dt=2014-03-06")
    v2 = registry.register(cfg, day2, "2014-03-07", {"parent_version": v1,
                                                     "data_versions": {"catalog": 3, "events": 7}})
    registry.record_gate(cfg, v2, _gate(v1), {"recall_at_10": 0.1234, "ndcg_at_10": 0.0712})
    registry.promote(cfg, v2, actor="airflow:onerec_daily", reason="daily gate passed dt=2014-03-07")

    port = _free_port()
    log_file = tmp_path / "mlflow-server.log"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    with open(log_file, "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", cfg.mlflow_uri,
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        import httpx

        deadline = time.monotonic() + 240
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, f"mlflow server exited:\n{log_file.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"mlflow server not up:\n{log_file.read_text()[-3000:]}"
            time.sleep(0.5)

        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service

        opts = Options()
        opts.binary_location = chrome
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1400,1800", f"--user-data-dir={tmp_path / 'chrome'}"):
            opts.add_argument(arg)
        browser = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
        try:
            browser.get(f"http://127.0.0.1:{port}/#/models/{cfg.registry.model_name}/versions/{v2}")
            # the description is markdown rendered by the UI: wait for the gate table's rows
            WebDriverWait(browser, 180, poll_frequency=0.5).until(
                lambda b: "ndcg_at_10" in b.find_element(By.TAG_NAME, "body").text)
            text = browser.find_element(By.TAG_NAME, "body").text
            assert f"v{v2} (dt=2014-03-07)" in text and "Gate: PASSED" in text
            assert "recall_at_10" in text and "regression" in text and "0.0712" in text and "0.0650" in text
            assert f"parent version: {v1}" in text
            cells = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "table td")]
            assert "ndcg_at_10" in cells and "0.0701" in cells  # a real table, not text
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            assert browser.save_screenshot(str(SCREENSHOT))
        finally:
            browser.quit()
    finally:
        os.killpg(server.pid, 15)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
            server.wait(10)
    assert SCREENSHOT.stat().st_size > 10_000
