"""Airflow's safety nets for real: a hung task is killed by its execution_timeout and alerts.

``airflow dags test`` runs ``onerec_daily`` for one landed day on a fresh sqlite metadata DB,
with the chaos drill ``airflow.chaos_hang_task=update_catalog`` (the task sleeps forever inside
its MLflow stage run) and a 30 s ``execution_timeout`` for it. The task must fail with Airflow's
timeout, nothing downstream may run, the failure notifier must POST the alert to a real webhook on
127.0.0.1 and append it to ``alerts.jsonl``, and the stage's MLflow run must end FAILED with the
timeout as its error. About a minute.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytestmark = [pytest.mark.airflow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
DAY = "2014-03-07"


class _Hook(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        type(self).received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture
def webhook():
    _Hook.received = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_port}/alerts", _Hook.received
    srv.shutdown()
    srv.server_close()


def test_hung_task_times_out_and_the_failure_notifier_fires(tmp_path, webhook):
    from onerec_prod import airflow_local, replay
    from onerec_prod.config import load_config
    from onerec_prod.registry import tracking

    url, received = webhook
    root = tmp_path / "var"
    overrides = [
        f"paths.var_root={root}",
        f"airflow.start_date={DAY}",
        f"airflow.end_date={DAY}",
        "airflow.chaos_hang_task=update_catalog",
        "airflow.task_timeout_s.update_catalog=30",
        f"airflow.notify_webhook_url={url}",
        "airflow.sensor_poke_interval_s=1",
        "airflow.sensor_timeout_s=120",  # a day that never lands fails the test fast, not at 480 s
    ]
    cfg_path = REPO / "configs" / "test.yaml"
    cfg = load_config(cfg_path, overrides, environ={})
    for kind in ("events", "items"):  # the day has landed (data + _SUCCESS): the sensor passes at its first poke
        replay.write_partition(Path(cfg.paths.raw) / kind / f"dt={DAY}", ["{}"], None)
    assert replay.landing_missing(cfg, DAY) == []
    tracking.ensure_experiment(cfg)  # the store exists: the hung task's run opens well within 30 s
    env = airflow_local.airflow_env(cfg, str(cfg_path), airflow_local.overrides_env(overrides))
    af = airflow_local._airflow_bin()
    subprocess.run([af, "db", "migrate"], env=env, check=True, capture_output=True, timeout=300)
    res = subprocess.run([af, "dags", "test", "onerec_daily", DAY], env=env, capture_output=True,
                         text=True, timeout=480, cwd=REPO)
    out = res.stdout + res.stderr

    db = airflow_local.airflow_home(cfg) / "airflow.db"
    with sqlite3.connect(db) as con:
        states = dict(con.execute("SELECT task_id, state FROM task_instance WHERE dag_id = 'onerec_daily'"))
    assert states["landing"] == "success", out[-3000:]
    assert states["update_catalog"] == "failed", out[-3000:]
    # nothing after the hung task ran
    assert all(states.get(t) in (None, "upstream_failed") for t in ("ingest_events", "build_samples", "promote"))
    assert "AirflowTaskTimeout" in out or "Timeout" in out

    # the notifier: one POST to the webhook and one line in alerts.jsonl, naming task, day and cause
    alerts = [a for a in received if a["kind"] == "task_failed"]
    assert len(alerts) == 1, received
    alert = alerts[0]
    assert alert["task_id"] == "update_catalog" and alert["ds"] == DAY
    assert alert["error_type"] == "AirflowTaskTimeout", alert
    lines = [json.loads(x) for x in (root / "airflow" / "alerts.jsonl").read_text().splitlines()]
    assert alert in lines

    # the stage's MLflow run opened when the task started and ended FAILED with the timeout
    (run,) = tracking.stage_attempts(cfg, DAY, "update_catalog")
    assert run.info.status == "FAILED"
    assert run.data.tags["error_type"] == "AirflowTaskTimeout"
    assert run.data.tags["airflow.task_id"] == "update_catalog" and run.data.tags["airflow.run_id"]
    assert run.data.params["airflow.task_timeout_s.update_catalog"] == "30"
    # the task log has our INFO line (with the run's URL) at INFO: logging left to Airflow's handlers
    url_line = next(ln for ln in out.splitlines() if "MLflow run of update_catalog" in ln)
    assert "[info" in url_line and run.info.run_id in url_line, url_line
