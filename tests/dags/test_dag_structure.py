"""The DAG file parses, wires the stages in order, and keeps heavy libraries out of parsing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

EXPECTED_EDGES = {
    "landing": ["update_catalog"],
    "update_catalog": ["ingest_events"],
    "ingest_events": ["build_sequences"],
    "build_sequences": ["build_eval_snapshot"],
    "build_eval_snapshot": ["build_samples"],
    "build_samples": ["choose_training_path"],
    "choose_training_path": ["bootstrap_alignment", "incremental_sft"],
    "bootstrap_alignment": ["rl_refresh"],
    "incremental_sft": ["rl_refresh"],
    "rl_refresh": ["evaluate"],
    "evaluate": ["gate_register"],
    "gate_register": ["promote"],
    "promote": ["precompute"],
    "precompute": [],
}

PROBE = r"""
import json, sys, time
t0 = time.time()
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(sys.argv[1])
dag = bag.dags.get("onerec_daily")
heavy = [m for m in ("torch", "pyspark", "transformers", "deepspeed", "mlflow", "delta") if m in sys.modules]
print(json.dumps({
    "errors": {k: str(v) for k, v in bag.import_errors.items()},
    "edges": {t.task_id: sorted(t.downstream_task_ids) for t in dag.tasks} if dag else None,
    "pools": {t.task_id: [t.pool, t.pool_slots] for t in dag.tasks} if dag else None,
    "depends_on_past": sorted(t.task_id for t in dag.tasks if t.depends_on_past) if dag else None,
    "max_active_runs": dag.max_active_runs if dag else None,
    "timeouts": {t.task_id: t.execution_timeout.total_seconds() if t.execution_timeout else None
                 for t in dag.tasks} if dag else None,
    "failure_callbacks": {t.task_id: [type(c).__name__ for c in (t.on_failure_callback or [])]
                          for t in dag.tasks} if dag else None,
    "dag_failure_callback": [type(c).__name__ for c in (dag.on_failure_callback if isinstance(
        dag.on_failure_callback, list) else [dag.on_failure_callback])] if dag else None,
    "dagrun_timeout": dag.dagrun_timeout.total_seconds() if dag and dag.dagrun_timeout else None,
    "deadline": [[type(d.reference).__name__, d.interval.total_seconds(), d.callback.path,
                  d.callback.kwargs.get("kind")] for d in (dag.deadline or [])] if dag else None,
    "params": {k: dag.params[k] for k in dag.params} if dag else None,
    "groups": {t.task_id: t.task_group.group_id for t in dag.tasks} if dag else None,
    "heavy": heavy,
    "seconds": time.time() - t0,
}))
"""


@pytest.fixture(scope="module")
def parsed(tmp_path_factory):
    home = tmp_path_factory.mktemp("airflow_home")
    env = {
        "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"), "PATH": "/usr/bin:/bin",
        "ONEREC_CONFIG": str(REPO / "configs" / "cluster.yaml"),
        "ONEREC__AIRFLOW__TASK_TIMEOUT_S__PROMOTE": "123",  # one task's override, the others default
    }
    res = subprocess.run([sys.executable, "-c", PROBE, str(REPO / "dags")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_dag_imports_without_errors(parsed):
    assert parsed["errors"] == {}
    print(f"DAG parse time: {parsed['seconds']:.2f}s")  # reported, not asserted (see bench/)


def test_no_heavy_imports_at_parse_time(parsed):
    assert parsed["heavy"] == []


def test_task_graph_is_the_daily_pipeline(parsed):
    assert parsed["edges"] == EXPECTED_EDGES


def test_training_tasks_use_gpu_pool_and_wait_for_previous_day(parsed):
    # cluster.yaml: pool "gpu", a training task takes all 80 slots of it
    for t in ("bootstrap_alignment", "incremental_sft", "rl_refresh"):
        assert parsed["pools"][t] == ["gpu", 80]
    assert {"bootstrap_alignment", "incremental_sft", "rl_refresh", "build_sequences"} <= set(
        parsed["depends_on_past"]
    )
    assert parsed["max_active_runs"] == 1


def test_every_task_has_its_configured_timeout(parsed):
    from onerec_prod.config import DAG_TASK_IDS, load_config

    cfg = load_config(REPO / "configs" / "cluster.yaml", ["airflow.task_timeout_s.promote=123"], environ={})
    assert sorted(parsed["timeouts"]) == sorted(DAG_TASK_IDS)  # the config's task list is the DAG's
    expected = {t: float(s) for t, s in cfg.airflow.task_timeout_s.items() if t != "landing"}
    assert {t: s for t, s in parsed["timeouts"].items() if t != "landing"} == expected
    assert parsed["timeouts"]["promote"] == 123.0
    assert parsed["dagrun_timeout"] == float(cfg.airflow.dagrun_timeout_s)


def test_failures_and_missed_deadline_notify(parsed):
    from onerec_prod.config import load_config

    cfg = load_config(REPO / "configs" / "cluster.yaml", environ={})
    assert all(cbs == ["PipelineNotifier"] for cbs in parsed["failure_callbacks"].values()), parsed
    assert parsed["dag_failure_callback"] == ["PipelineNotifier"]
    assert parsed["deadline"] == [["DagRunQueuedAtDeadline", cfg.airflow.champion_deadline_h * 3600,
                                   "onerec_prod.notify.PipelineNotifier", "deadline_missed"]]


def test_params_and_task_groups_mirror_the_stages(parsed):
    assert parsed["params"] == {"force": False, "skip_rl": False}
    groups = parsed["groups"]
    assert groups["landing"] is None
    assert {t for t, g in groups.items() if g == "data"} == {
        "update_catalog", "ingest_events", "build_sequences", "build_eval_snapshot", "build_samples"}
    assert {t for t, g in groups.items() if g == "training"} == {
        "choose_training_path", "bootstrap_alignment", "incremental_sft", "rl_refresh"}
    assert {t for t, g in groups.items() if g == "release"} == {"evaluate", "gate_register", "promote"}
    assert groups["precompute"] == "serving"
