"""The project's local Airflow, for real: up, a backfill of a day whose logs never landed, down.

A real API server, DAG processor and LocalExecutor scheduler on sqlite (``onerec_prod.airflow_local``)
run ``onerec_daily`` for one day with no landing data. The landing sensor must time out with a
task log that names the missing partitions, nothing downstream may run or write a table, the
progress line must read the run's real task states, and ``down`` must stop every service.
About two minutes; the 3-day happy path is the slow ``test_backfill_equivalence``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = [pytest.mark.airflow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
DAY = "2014-03-05"
OVERRIDES = [
    f"airflow.start_date={DAY}",
    f"airflow.end_date={DAY}",
    "airflow.sensor_timeout_s=1",
    "airflow.sensor_poke_interval_s=2",
    "airflow.poll_interval_s=3",
    # ports of its own: may run beside `make demo` and the slow equivalence test
    "airflow.api_port=28380",
    "airflow.log_server_port=28993",
]


def test_missing_landing_fails_the_day_clearly_and_nothing_runs(tmp_path):
    from onerec_prod import airflow_local
    from onerec_prod.config import load_config

    cfg_path = REPO / "configs" / "test.yaml"
    root = tmp_path / "var"
    cfg = load_config(cfg_path, [f"paths.var_root={root}", *OVERRIDES], environ={})
    extra = airflow_local.overrides_env(OVERRIDES)
    extra["ONEREC__PATHS__VAR_ROOT"] = str(root)

    with airflow_local.running(cfg, str(cfg_path), extra) as env:
        pids = airflow_local._read_pids(cfg)
        assert set(pids) == {"api-server", "dag-processor", "scheduler"}
        assert all(airflow_local._alive(p) for p in pids.values())
        runs = airflow_local.backfill(cfg, env, DAY, DAY, timeout_s=600)
        progress = airflow_local.task_progress(cfg, str(runs[0]["run_id"]))

    assert [(str(r["logical_date"])[:10], r["state"]) for r in runs] == [(DAY, "failed")]
    # every task of the run reached a final state, read from Airflow's own metadata DB
    assert progress.startswith("14/14 tasks done"), progress
    # the failure names what was missing, in the landing task's log
    logs = airflow_local.failed_task_logs(cfg)
    assert "task_id=landing" in logs, logs[:500]
    assert f"no _SUCCESS marker yet in {cfg.paths.raw}/events/dt={DAY}" in logs
    # nothing downstream ran: no Delta table, no candidate model was written
    assert not Path(cfg.paths.lake).exists() or not any(Path(cfg.paths.lake).iterdir())
    assert not (Path(cfg.paths.models) / "candidates").exists()
    # down stopped every service it started (zombies count as stopped: `_alive` reads /proc)
    assert not any(airflow_local._alive(p) for p in pids.values())
