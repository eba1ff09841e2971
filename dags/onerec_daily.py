"""onerec_daily: keep the OneRec-Think recommender fresh, one day at a time.

landing -> update_catalog -> ingest_events -> build_sequences -> build_eval_snapshot -> build_samples
  -> choose_training_path -> {bootstrap_alignment | incremental_sft} -> rl_refresh -> evaluate
  -> gate_register -> promote -> precompute

Each task calls one function (``onerec_prod.pipeline.run_stage``) with the logical date; the
heavy libraries (torch, pyspark, transformers) are imported only inside task bodies. Training
tasks take slots of the GPU pool; day D waits for day D-1 (``depends_on_past`` and one active
run), because day D continues day D-1's model. Backfill: ``onerec-prod airflow backfill`` (Airflow's
own ``backfill create``); whether a backfilled day may move the champion is
``gate.backfill_moves_champion``.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import dag, get_current_context, task

from onerec_prod.config import load_config

CFG_PATH = os.environ.get("ONEREC_CONFIG")  # set by the deployment; None = configs/local.yaml
CFG = load_config(CFG_PATH)
AF = CFG.airflow

DEFAULTS = {
    "owner": "ml-platform",
    "retries": AF.retries,
    "retry_delay": timedelta(seconds=AF.retry_delay_s),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(hours=1),
}
TRAIN_TASK = {"pool": AF.gpu_pool, "pool_slots": AF.train_pool_slots, "depends_on_past": True}


def _run(stage: str, **kwargs) -> dict:
    """Run one pipeline stage for this run's logical date; return its small summary (XCom)."""
    from onerec_prod.log import setup_logging
    from onerec_prod.pipeline import run_stage

    setup_logging()
    ctx = get_current_context()
    dt = ctx["ds"]
    is_backfill = str(getattr(ctx["dag_run"], "run_type", "")).lower().endswith("backfill")
    rec = run_stage(stage, dt, load_config(CFG_PATH), is_backfill=is_backfill, **kwargs)
    return {k: v for k, v in rec.items() if k in ("counts", "seconds", "passed", "promoted", "version", "path")}


@dag(
    dag_id="onerec_daily",
    schedule="@daily",
    start_date=pendulum.parse(AF.start_date, tz="UTC"),
    end_date=pendulum.parse(AF.end_date, tz="UTC") if AF.end_date else None,
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULTS,
    tags=["onerec", "training"],
    doc_md=__doc__,
)
def onerec_daily():
    @task.sensor(task_id="landing", poke_interval=AF.sensor_poke_interval_s, timeout=AF.sensor_timeout_s,
                 mode="reschedule", retries=0)
    def landing() -> bool:
        from onerec_prod.pipeline import landing_missing

        ds = get_current_context()["ds"]
        missing = landing_missing(load_config(CFG_PATH), ds)
        if missing:  # in the task log: what a timed-out sensor was waiting for
            print(f"landing dt={ds}: no *.jsonl yet in {', '.join(missing)}")
        return not missing

    @task(task_id="update_catalog")
    def update_catalog():
        return _run("update_catalog")

    @task(task_id="ingest_events")
    def ingest_events():
        return _run("ingest_events")

    @task(task_id="build_sequences", depends_on_past=True)
    def build_sequences():
        return _run("build_sequences")

    @task(task_id="build_eval_snapshot")
    def build_eval_snapshot():
        return _run("build_eval_snapshot")

    @task(task_id="build_samples")
    def build_samples():
        return _run("build_samples")

    @task.branch(task_id="choose_training_path")
    def choose_training_path() -> str:
        from onerec_prod.pipeline import choose_training_path as choose

        path = choose(load_config(CFG_PATH))
        return "bootstrap_alignment" if path == "bootstrap" else "incremental_sft"

    @task(task_id="bootstrap_alignment", **TRAIN_TASK)
    def bootstrap_alignment():
        return _run("train", path="bootstrap")

    @task(task_id="incremental_sft", **TRAIN_TASK)
    def incremental_sft():
        return _run("train", path="incremental")

    @task(task_id="rl_refresh", trigger_rule="none_failed_min_one_success", **TRAIN_TASK)
    def rl_refresh():
        return _run("rl_refresh")

    @task(task_id="evaluate", pool=AF.gpu_pool, pool_slots=1)
    def evaluate():
        return _run("evaluate")

    @task(task_id="gate_register", retries=0)
    def gate_register():
        return _run("gate_register")

    @task(task_id="promote", retries=0)
    def promote():
        return _run("promote")

    @task(task_id="precompute", pool=AF.gpu_pool, pool_slots=1)
    def precompute():
        return _run("precompute")

    branch = choose_training_path()
    (
        landing()
        >> update_catalog()
        >> ingest_events()
        >> build_sequences()
        >> build_eval_snapshot()
        >> build_samples()
        >> branch
    )
    rl = rl_refresh()
    branch >> [bootstrap_alignment(), incremental_sft()] >> rl
    rl >> evaluate() >> gate_register() >> promote() >> precompute()


onerec_daily()
