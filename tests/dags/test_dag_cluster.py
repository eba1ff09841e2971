"""The same DAG file with ``cluster.runtime: cluster`` (configs/cluster.yaml) submits Kubernetes work.

Parsed by Airflow's DagBag in a subprocess (as the scheduler would), the tasks must be the
cncf-kubernetes provider's operators, carrying specs rendered from the config: SparkApplications
for the Spark stages, PyTorchJobs (created and awaited) for training and RL, pods for evaluate /
gate / promote / precompute, with the config's images, resources, pools and secrets. No cluster is
reachable here: the rendered specs are validated offline (every pod and every pod template inside
a custom resource against the Kubernetes schema, the custom resources' own fields structurally).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.33.0"
DS = "2025-01-02"

PROBE = r"""
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(sys.argv[1])
out = {"errors": {k: str(v) for k, v in bag.import_errors.items()}, "tasks": {}}
dag = bag.dags.get("onerec_daily")
if dag is None:
    sys.exit(f"no DAG parsed: {out['errors']}")
heavy = [m for m in ("torch", "pyspark", "transformers", "deepspeed", "mlflow", "delta") if m in sys.modules]
out["heavy"] = heavy
for t in dag.tasks:
    row = {"class": type(t).__name__, "mro": [c.__name__ for c in type(t).__mro__], "pool": t.pool,
           "pool_slots": t.pool_slots, "namespace": getattr(t, "namespace", None),
           "conn": getattr(t, "kubernetes_conn_id", None)}
    if hasattr(t, "pod_template_dict") and t.pod_template_dict:
        row["pod"] = t.pod_template_dict
    if getattr(t, "application_file", None):
        row["spark_app"] = t.application_file
    if hasattr(t, "job"):
        row["job"] = t.job
    out["tasks"][t.task_id] = row
print(json.dumps(out, default=str), flush=True)
import os
os._exit(0)  # the provider's imports leave a non-daemon thread behind; the answer is out
"""


@pytest.fixture(scope="module")
def cluster_dag(tmp_path_factory):
    home = tmp_path_factory.mktemp("airflow_home")
    env = {"AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"), "PATH": "/usr/bin:/bin",
           "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "600",  # a loaded CI machine must not time the parse out
           "ONEREC_CONFIG": str(REPO / "configs" / "cluster.yaml"), "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", PROBE, str(REPO / "dags")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _render(obj):
    """Fill the Airflow templates the way the operators do at run time (ds of one day)."""
    text = json.dumps(obj).replace("{{ ds_nodash }}", DS.replace("-", "")).replace("{{ ds }}", DS)
    assert "{{" not in text
    return json.loads(text)


def _cfg():
    from onerec_prod.config import load_config

    return load_config(REPO / "configs" / "cluster.yaml", environ={})


def _validate_pod_spec(spec: dict, name: str) -> None:
    import kubernetes_validate

    kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec},
                                 K8S_VERSION, strict=True)


def test_cluster_dag_uses_the_kubernetes_operators(cluster_dag):
    assert cluster_dag["errors"] == {} and cluster_dag["heavy"] == []
    kinds = {t: row["class"] for t, row in cluster_dag["tasks"].items()}
    spark = ("update_catalog", "ingest_events", "build_sequences", "build_eval_snapshot", "build_samples")
    assert {kinds[t] for t in spark} == {"SparkKubernetesOperator"}
    for t in ("bootstrap_alignment", "incremental_sft", "rl_refresh"):
        assert kinds[t] == "PyTorchJobOperator"
        assert "KubernetesCreateResourceOperator" in cluster_dag["tasks"][t]["mro"]
    assert {kinds[t] for t in ("evaluate", "gate_register", "promote", "precompute")} == {"KubernetesPodOperator"}
    # the sensor and the branch read the object store / registry in-process
    assert kinds["landing"] != "KubernetesPodOperator" and kinds["choose_training_path"] != "KubernetesPodOperator"
    cfg = _cfg()
    for row in cluster_dag["tasks"].values():
        if row["class"] in ("SparkKubernetesOperator", "KubernetesPodOperator", "PyTorchJobOperator"):
            assert row["conn"] == cfg.cluster.kubernetes_conn_id
    for t in ("bootstrap_alignment", "incremental_sft", "rl_refresh"):
        row = cluster_dag["tasks"][t]
        assert (row["pool"], row["pool_slots"]) == (cfg.airflow.gpu_pool, cfg.airflow.train_pool_slots)
    for t in ("evaluate", "precompute"):
        assert (cluster_dag["tasks"][t]["pool"], cluster_dag["tasks"][t]["pool_slots"]) == (cfg.airflow.gpu_pool, 1)


def test_cluster_pods_images_resources_secrets_and_schema(cluster_dag):
    cfg = _cfg()
    c = cfg.cluster
    for t in ("evaluate", "gate_register", "promote", "precompute"):
        pod = _render(cluster_dag["tasks"][t]["pod"])
        _validate_pod_spec(pod["spec"], pod["metadata"]["name"])
        assert pod["metadata"]["namespace"] == c.namespace
        (ctr,) = pod["spec"]["containers"]
        assert ctr["image"] == (c.serving_image if t in ("evaluate", "precompute") else c.image)
        assert ctr["args"] == ["--config", c.config_path, "run-day", "--stage", t, "--date", DS]
        want = c.pod_resources[t]
        assert ctr["resources"]["requests"]["cpu"] == want.cpu and ctr["resources"]["limits"]["memory"] == want.memory
        if want.gpus:
            assert ctr["resources"]["limits"]["nvidia.com/gpu"] == str(want.gpus)
            assert pod["spec"]["nodeSelector"] == c.train_node_selector
        assert [e["secretRef"]["name"] for e in ctr["envFrom"]] == [*c.secrets, c.mlflow_secret]
        assert pod["spec"]["serviceAccountName"] == c.service_account


def test_cluster_spark_applications(cluster_dag):
    cfg = _cfg()
    for t in ("update_catalog", "ingest_events", "build_sequences", "build_eval_snapshot", "build_samples"):
        app = _render(yaml.safe_load(cluster_dag["tasks"][t]["spark_app"]))
        assert (app["apiVersion"], app["kind"]) == ("sparkoperator.k8s.io/v1beta2", "SparkApplication")
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", app["metadata"]["name"])
        s = app["spec"]
        assert s["image"] == cfg.cluster.image and s["mainApplicationFile"] == f"local:///app/jobs/{t}.py"
        assert s["arguments"][:2] == ["--date", DS]
        assert s["driver"]["serviceAccount"] == cfg.cluster.spark_service_account
        assert s["executor"]["instances"] == int(cfg.spark.extra_conf["spark.executor.instances"])
        assert all(isinstance(v, str) for v in s["sparkConf"].values())
        # the lake is on s3a://: hadoop-aws and Delta's S3 log store come with the job
        assert "org.apache.hadoop:hadoop-aws:" in s["sparkConf"]["spark.jars.packages"]
        assert s["sparkConf"]["spark.delta.logStore.s3a.impl"].endswith("S3SingleDriverLogStore")
        assert s["sparkConf"]["spark.kubernetes.driver.secretKeyRef.AWS_ACCESS_KEY_ID"].startswith(
            cfg.cluster.secrets[0] + ":")


def test_cluster_training_jobs_are_pytorchjobs_from_the_launcher(cluster_dag):
    from onerec_prod.train.launcher import cluster_launch_argv

    cfg = _cfg()
    for t, step in (("incremental_sft", "train"), ("bootstrap_alignment", "train"), ("rl_refresh", "rl")):
        job = _render(cluster_dag["tasks"][t]["job"])
        assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
        specs = job["spec"]["pytorchReplicaSpecs"]
        nodes = sum(r["replicas"] for r in specs.values())
        per_node = int(job["spec"]["nprocPerNode"])
        if step == "train":
            assert (nodes, per_node) == (cfg.train.nnodes, cfg.train.nproc) == (10, 8)
        else:
            assert (nodes, per_node) == (1, cfg.grpo.nproc)
        for role, r in specs.items():
            _validate_pod_spec(r["template"]["spec"], f"{job['metadata']['name']}-{role.lower()}")
            ctr = r["template"]["spec"]["containers"][0]
            assert ctr["name"] == "pytorch" and ctr["image"] == cfg.cluster.image
            assert ctr["resources"]["limits"]["nvidia.com/gpu"] == str(per_node)
            env = {e["name"]: e["value"] for e in ctr["env"]}
            assert env["ONEREC__CLUSTER__MASTER_ADDR"] == f"{job['metadata']['name']}-master-0"
    argv = cluster_launch_argv(cfg, "train", DS)
    assert "--nnodes=10" in argv and "--nproc_per_node=8" in argv and "--rdzv_backend=c10d" in argv
