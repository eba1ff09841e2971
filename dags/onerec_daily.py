"""onerec_daily: keep the OneRec-Think recommender fresh, one day at a time.

landing -> update_catalog -> ingest_events -> build_sequences -> build_eval_snapshot -> build_samples
  -> choose_training_path -> {bootstrap_alignment | incremental_sft} -> rl_refresh -> evaluate
  -> gate_register -> promote -> precompute

Two runtimes, one file (``cluster.runtime``). ``local``: each task calls one function
(``onerec_prod.pipeline.dispatch_stage``) with the logical date: the stage runs in the task's own
process, or, for the stages of ``spark.server_stages``, inside the warm shared server that
``airflow up`` starts (its log streams into the task's log); the heavy libraries (torch, pyspark,
transformers) are imported only inside task bodies. ``cluster``: the
same tasks become Kubernetes work rendered from the config by ``onerec_prod.k8s`` with Airflow's
cncf-kubernetes provider: Spark stages are SparkApplications (``SparkKubernetesOperator``),
training and the RL refresh Kubeflow PyTorchJobs created and awaited (``PyTorchJobOperator``, a
``KubernetesCreateResourceOperator`` that waits for the job's final condition), evaluate / gate /
promote / precompute pods (``KubernetesPodOperator``); the landing sensor and the branch stay
in-process (they only read the object store and the registry). Training
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
CLUSTER = CFG.cluster.runtime == "cluster"
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
    from onerec_prod.pipeline import dispatch_stage

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
    rec = dispatch_stage(stage, dt, cfg, is_backfill=is_backfill, run_tags=tags, **kwargs)
    return {k: v for k, v in rec.items() if k in ("counts", "seconds", "passed", "promoted", "version", "path")}


def _force() -> bool:
    return bool(get_current_context()["params"].get("force"))


def _k8s_operators():
    """The provider's operators (imported only in cluster mode: local runs need no provider)."""
    import yaml
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from airflow.providers.cncf.kubernetes.operators.resource import KubernetesCreateResourceOperator
    from airflow.providers.cncf.kubernetes.operators.spark_kubernetes import SparkKubernetesOperator

    class PyTorchJobOperator(KubernetesCreateResourceOperator):
        """Create a Kubeflow PyTorchJob and wait for its final condition (Succeeded, else fail)."""

        def __init__(self, *, job: dict, poll_interval_s: float = 60.0, skip_param: str | None = None, **kwargs):
            super().__init__(yaml_conf=yaml.safe_dump(job, sort_keys=False), custom_resource_definition=True,
                             namespace=job["metadata"]["namespace"], **kwargs)
            self.job = job
            self.poll_interval_s = poll_interval_s
            self.skip_param = skip_param

        def execute(self, context):
            from airflow.sdk.exceptions import AirflowException, AirflowSkipException
            from kubernetes.client.exceptions import ApiException

            from onerec_prod.k8s import pytorchjob_state

            if self.skip_param and context["params"].get(self.skip_param):
                raise AirflowSkipException(f"params.{self.skip_param}: the SFT candidate goes to evaluation")
            try:
                super().execute(context)  # creates the (templated) job
            except ApiException as e:
                if e.status != 409:
                    raise
                self.log.info("PyTorchJob exists already (a retry): waiting for it")
            body = yaml.safe_load(self.yaml_conf)
            hook = KubernetesHook(conn_id=self.kubernetes_conn_id)
            while True:
                obj = hook.get_custom_object(group="kubeflow.org", version="v1", plural="pytorchjobs",
                                             name=body["metadata"]["name"], namespace=body["metadata"]["namespace"])
                state = pytorchjob_state(obj)
                self.log.info("PyTorchJob %s: %s", body["metadata"]["name"], state)
                if state == "Succeeded":
                    return {"job": body["metadata"]["name"], "state": state}
                if state == "Failed":
                    raise AirflowException(f"PyTorchJob {body['metadata']['name']} failed: {obj.get('status')}")
                time.sleep(self.poll_interval_s)

    return SparkKubernetesOperator, KubernetesPodOperator, PyTorchJobOperator


def spark_task(stage: str, **kw):
    """Spark stage: in-process (local) or a SparkApplication (cluster)."""
    if not CLUSTER:
        def run_spark_stage():
            return _run(stage)

        return task(**timeout(stage), **kw)(run_spark_stage)()
    import yaml

    from onerec_prod.k8s import spark_application

    spark_op, _, _ = _k8s_operators()
    return spark_op(application_file=yaml.safe_dump(spark_application(CFG, stage), sort_keys=False),
                    namespace=CFG.cluster.namespace, kubernetes_conn_id=CFG.cluster.kubernetes_conn_id,
                    get_logs=True, delete_on_termination=True, random_name_suffix=False, **timeout(stage), **kw)


def pod_task(task_id: str, **kw):
    """Evaluate / gate / promote / precompute as a pod (cluster); None in local mode."""
    from onerec_prod.k8s import stage_pod

    _, pod_op, _ = _k8s_operators()
    return pod_op(pod_template_dict=stage_pod(CFG, task_id), namespace=CFG.cluster.namespace,
                  kubernetes_conn_id=CFG.cluster.kubernetes_conn_id, get_logs=True,
                  on_finish_action="delete_pod", **timeout(task_id), **kw)


def training_job(task_id: str, step: str, **kw):
    """SFT or RL refresh as a Kubeflow PyTorchJob, created and awaited (cluster)."""
    from onerec_prod.k8s import pytorchjob

    _, _, job_op = _k8s_operators()
    return job_op(job=pytorchjob(CFG, step), kubernetes_conn_id=CFG.cluster.kubernetes_conn_id,
                  poll_interval_s=AF.sensor_poke_interval_s, **timeout(task_id), **kw)


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
            print(f"landing dt={ds}: not complete yet: {'; '.join(missing)}")
        return not missing

    # groups mirror the stages; prefix_group_id=False keeps the task ids (history, CLI, branch)
    with TaskGroup("data", prefix_group_id=False, tooltip="Spark + Delta: catalog, events, sequences, samples"):
        data = [spark_task("update_catalog"), spark_task("ingest_events"),
                spark_task("build_sequences", depends_on_past=True), spark_task("build_eval_snapshot"),
                spark_task("build_samples")]

    with TaskGroup("training", prefix_group_id=False, tooltip="SFT (bootstrap or incremental), then GRPO"):
        @task.branch(**timeout("choose_training_path"))
        def choose_training_path() -> str:
            from onerec_prod.pipeline import choose_training_path as choose

            path = choose(load_config(CFG_PATH), get_current_context()["ds"])  # a rerun repeats its path
            return "bootstrap_alignment" if path == "bootstrap" else "incremental_sft"

        if CLUSTER:
            boot = training_job("bootstrap_alignment", "train", **TRAIN_TASK)
            incr = training_job("incremental_sft", "train", **TRAIN_TASK)
            rl = training_job("rl_refresh", "rl", trigger_rule="none_failed_min_one_success", skip_param="skip_rl",
                              **TRAIN_TASK)
        else:
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

            boot, incr, rl = bootstrap_alignment(), incremental_sft(), rl_refresh()

        branch = choose_training_path()
        branch >> [boot, incr] >> rl

    with TaskGroup("release", prefix_group_id=False, tooltip="Evaluate, gate + register, promote"):
        # none_failed: runs after a skipped RL refresh (params.skip_rl), not after a failed one
        if CLUSTER:
            ev = pod_task("evaluate", pool=AF.gpu_pool, pool_slots=1, trigger_rule="none_failed")
            gate = pod_task("gate_register", retries=0)
            prom = pod_task("promote", retries=0)
        else:
            @task(pool=AF.gpu_pool, pool_slots=1, trigger_rule="none_failed", **timeout("evaluate"))
            def evaluate():
                return _run("evaluate")

            @task(retries=0, **timeout("gate_register"))
            def gate_register():
                return _run("gate_register")

            @task(retries=0, **timeout("promote"))
            def promote():
                return _run("promote")

            ev, gate, prom = evaluate(), gate_register(), promote()
        ev >> gate >> prom

    with TaskGroup("serving", prefix_group_id=False, tooltip="Think-Ahead precompute for the active users"):
        if CLUSTER:
            pre = pod_task("precompute", pool=AF.gpu_pool, pool_slots=1)
        else:
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
