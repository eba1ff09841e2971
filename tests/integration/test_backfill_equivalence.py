"""A 3-day backfill through a real local Airflow equals three daily runs (tables and registry).

Slow (a real scheduler, Spark and training for three days): ``make test-slow``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.airflow, pytest.mark.timeout(5400)]

REPO = Path(__file__).resolve().parents[2]
# the Beauty slice from 2014-02-24 (tests/conftest.py): 02-24..28 land as the bootstrap day
# 2014-02-28 (first model from scratch), then two real days with incremental training
BOOTSTRAP_BEFORE = "2014-03-01"
DAYS = ["2014-02-28", "2014-03-01", "2014-03-02"]
TABLES = {
    "events": ["event_id"],
    "events_quarantine": ["source_file", "line_no"],
    "catalog": ["item_id"],
    "user_history": ["user_id"],
    "examples": ["event_id"],
    "eval_snapshot": ["event_id"],
    "samples": ["sample_id"],
}
OVERRIDES = [
    "sid.codebook_size=64",  # ~4k items: test.yaml's 16 x 3 + 16 collision codes overflow
    "sid.collision_size=64",
    "airflow.start_date=2014-02-28",
    "airflow.end_date=2014-03-02",
    "train.max_steps=2",
    "grpo.steps=1",
    "eval.max_users=10",
    "eval.bertscore_items=2",
    "eval.sasrec_epochs=1",
    # ports of its own, so the test can run beside `make demo` or a developer's local Airflow
    "airflow.api_port=28180",
    "airflow.log_server_port=28893",
    # the backfill's Spark tasks run on the local runtime's shared Spark server (the daily runs
    # in-process): the tables must not tell the two apart
    "spark.shared_session=true",
    "spark.server_port=28193",
]


def _table_rows(spark, cfg, name: str, key: list[str]) -> list[tuple]:
    from onerec_prod.lake import read_table, table_exists, table_path

    path = table_path(cfg, name)
    if not table_exists(spark, path):
        return []
    df = read_table(spark, path)
    cols = sorted(df.columns)
    return sorted(tuple(str(r[c]) for c in cols) for r in df.select(*cols).collect())


def _registry_state(cfg) -> dict:
    from onerec_prod.registry.registry import status

    st = status(cfg)
    out = {}
    for alias in ("champion", "challenger", "previous"):
        v = st.get(alias)
        out[alias] = None if v is None else (v.get("version") if isinstance(v, dict) else v)
    return out


def test_backfill_equals_daily_runs(tmp_path, spark, beauty_slice):
    from onerec_prod import airflow_local
    from onerec_prod.config import load_config
    from onerec_prod.pipeline import run_day
    from onerec_prod.replay import replay

    cfg_path = REPO / "configs" / "test.yaml"

    def cfg_for(root: Path):
        return load_config(cfg_path, [f"paths.var_root={root}", *OVERRIDES], environ={})

    daily, backfilled = cfg_for(tmp_path / "daily"), cfg_for(tmp_path / "backfill")
    for c in (daily, backfilled):
        replay(c, DAYS[1], len(DAYS) - 1, dataset=beauty_slice, bootstrap_before=BOOTSTRAP_BEFORE)

    for dt in DAYS:  # three scheduled days, one after the other, in this process
        run_day(daily, dt)

    extra = airflow_local.overrides_env(OVERRIDES)
    extra["ONEREC__PATHS__VAR_ROOT"] = str(tmp_path / "backfill")
    with airflow_local.running(backfilled, str(cfg_path), extra) as env:
        runs = airflow_local.backfill(backfilled, env, DAYS[0], DAYS[-1], timeout_s=3600)
    states = {str(r["logical_date"])[:10]: r["state"] for r in runs}
    assert states == dict.fromkeys(DAYS, "success"), airflow_local.failed_task_logs(backfilled)

    for name, key in TABLES.items():
        a = _table_rows(spark, daily, name, key)
        b = _table_rows(spark, backfilled, name, key)
        assert a == b, f"table {name} differs between daily runs and the backfill"
        assert name in ("events_quarantine",) or a, f"table {name} is empty"
    assert _registry_state(daily) == _registry_state(backfilled)
