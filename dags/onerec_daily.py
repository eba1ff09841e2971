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

Safety nets (all from ``cfg.airflow``): every task has an ``execution_timeout``
(``task_timeout_s``), a day has a ``dagrun_timeout``, a failed task or day and a missed champion
deadline (``champion_deadline_h`` after the run was queued) go to ``onerec_prod.notify`` (log line,
``<var>/airflow/alerts.jsonl``, optional webhook). Params: ``force`` (retrain/refresh even when the
day's candidate exists with the same inputs) and ``skip_rl`` (evaluate the SFT candidate). Task
logs use Airflow's own handlers, so a stage's INFO stays INFO.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

import pendulum
from airflow.sdk import (
    DeadlineAlert,
    DeadlineReference,
    Param,
    SyncCallback,
    TaskGroup,
    dag,
    get_current_context,
    task,
)

from onerec_prod.config import load_config
from onerec_prod.notify import PipelineNotifier, alerts_path_for

CFG_PATH = os.environ.get("ONEREC_CONFIG")  # set by the deployment; None = configs/local.yaml
CFG = load_config(CFG_PATH)
AF = CFG.airflow
NOTIFY = {"alerts_path": alerts_path_for(CFG.paths.var), "webhook_url": AF.notify_webhook_url,
          "timeout_s": AF.notify_timeout_s}

DEFAULTS = {
    "owner": "ml-platform",
    "retries": AF.retries,
    "retry_delay": timedelta(seconds=AF.retry_delay_s),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(hours=1),
    "on_failure_callback": PipelineNotifier(kind="task_failed", **NOTIFY),
}
TRAIN_TASK = {"pool": AF.gpu_pool, "pool_slots": AF.train_pool_slots, "depends_on_past": True}


def timeout(task_id: str) -> dict:
    """``execution_timeout`` of ``task_id`` from ``airflow.task_timeout_s`` (every task has one)."""
    return {"task_id": task_id, "execution_timeout": timedelta(seconds=AF.task_timeout_s[task_id])}


def _run(stage: str, **kwargs) -> dict:
    """Run one pipeline stage for this run's logical date; return its small summary (XCom).

    Logging is left to Airflow's task handlers (no handler of our own on stderr, which the task
    log would show at ERROR level). The run's ids go to the stage's MLflow run as tags.
    """
    from onerec_prod.pipeline import run_stage

    ctx = get_current_context()
    cfg = load_config(CFG_PATH)
    ti, run = ctx["ti"], ctx["dag_run"]
    dt = ctx["ds"]
    is_backfill = str(getattr(run, "run_type", "")).lower().endswith("backfill")
    tags = {"airflow.dag_id": ti.dag_id, "airflow.run_id": run.run_id, "airflow.task_id": ti.task_id,
            "airflow.try_number": ti.try_number}
    if cfg.airflow.chaos_hang_task == ti.task_id:  # chaos drill: hang (inside the stage's MLflow run)
        from onerec_prod.registry.tracking import stage_run

        with stage_run(cfg, dt, stage, tags):
            print(f"chaos drill: {ti.task_id} hangs until its execution_timeout "
                  f"({cfg.airflow.task_timeout_s[ti.task_id]}s)")
            while True:
                time.sleep(3600)
    rec = run_stage(stage, dt, cfg, is_backfill=is_backfill, run_tags=tags, **kwargs)
    return {k: v for k, v in rec.items() if k in ("counts", "seconds", "passed", "promoted", "version", "path")}


def _force() -> bool:
    return bool(get_current_context()["params"].get("force"))


@dag(
    dag_id="onerec_daily",
    schedule="@daily",
    start_date=pendulum.parse(AF.start_date, tz="UTC"),
    end_date=pendulum.parse(AF.end_date, tz="UTC") if AF.end_date else None,
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULTS,
    dagrun_timeout=timedelta(seconds=AF.dagrun_timeout_s) if AF.dagrun_timeout_s else None,
    on_failure_callback=PipelineNotifier(kind="dag_run_failed", **NOTIFY),
    deadline=DeadlineAlert(
        reference=DeadlineReference.DAGRUN_QUEUED_AT,
        interval=timedelta(hours=AF.champion_deadline_h),
        callback=SyncCallback(PipelineNotifier, kwargs={"kind": "deadline_missed", **NOTIFY}),
        name="champion_refreshed",
    ) if AF.champion_deadline_h else None,
    params={
        "force": Param(False, type="boolean",
                       description="Retrain and refresh even when the day's candidate exists with the same inputs."),
        "skip_rl": Param(False, type="boolean",
                         description="Skip the GRPO refresh: evaluate and gate the SFT candidate."),
    },
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

    # groups mirror the stages; prefix_group_id=False keeps the task ids (history, CLI, branch)
    with TaskGroup("data", prefix_group_id=False, tooltip="Spark + Delta: catalog, events, sequences, samples"):
        @task(**timeout("update_catalog"))
        def update_catalog():
            return _run("update_catalog")

        @task(**timeout("ingest_events"))
        def ingest_events():
            return _run("ingest_events")

        @task(depends_on_past=True, **timeout("build_sequences"))
        def build_sequences():
            return _run("build_sequences")

        @task(**timeout("build_eval_snapshot"))
        def build_eval_snapshot():
            return _run("build_eval_snapshot")

        @task(**timeout("build_samples"))
        def build_samples():
            return _run("build_samples")

        data = [update_catalog(), ingest_events(), build_sequences(), build_eval_snapshot(), build_samples()]

    with TaskGroup("training", prefix_group_id=False, tooltip="SFT (bootstrap or incremental), then GRPO"):
        @task.branch(**timeout("choose_training_path"))
        def choose_training_path() -> str:
            from onerec_prod.pipeline import choose_training_path as choose

            path = choose(load_config(CFG_PATH))
            return "bootstrap_alignment" if path == "bootstrap" else "incremental_sft"

        @task(**TRAIN_TASK, **timeout("bootstrap_alignment"))
        def bootstrap_alignment():
            return _run("train", path="bootstrap", force=_force())

        @task(**TRAIN_TASK, **timeout("incremental_sft"))
        def incremental_sft():
            return _run("train", path="incremental", force=_force())

        @task(trigger_rule="none_failed_min_one_success", **TRAIN_TASK, **timeout("rl_refresh"))
        def rl_refresh():
            from airflow.sdk.exceptions import AirflowSkipException

            if get_current_context()["params"].get("skip_rl"):
                raise AirflowSkipException("params.skip_rl: the SFT candidate goes to evaluation")
            return _run("rl_refresh", force=_force())

        branch = choose_training_path()
        rl = rl_refresh()
        branch >> [bootstrap_alignment(), incremental_sft()] >> rl

    with TaskGroup("release", prefix_group_id=False, tooltip="Evaluate, gate + register, promote"):
        # none_failed: runs after a skipped RL refresh (params.skip_rl), not after a failed one
        @task(pool=AF.gpu_pool, pool_slots=1, trigger_rule="none_failed", **timeout("evaluate"))
        def evaluate():
            return _run("evaluate")

        @task(retries=0, **timeout("gate_register"))
        def gate_register():
            return _run("gate_register")

        @task(retries=0, **timeout("promote"))
        def promote():
            return _run("promote")

        ev = evaluate()
        prom = promote()
        ev >> gate_register() >> prom

    with TaskGroup("serving", prefix_group_id=False, tooltip="Think-Ahead precompute for the active users"):
        @task(pool=AF.gpu_pool, pool_slots=1, **timeout("precompute"))
        def precompute():
            return _run("precompute")

        pre = precompute()

    landing() >> data[0]
    for a, b in zip(data, data[1:]):
        a >> b
    data[-1] >> branch
    rl >> ev
    prom >> pre


onerec_daily()
