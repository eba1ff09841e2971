"""Kubernetes work of the daily DAG in ``cluster.runtime: cluster``, rendered from the config.

The DAG (``dags/onerec_daily.py``) keeps one file for both runtimes; in cluster mode each stage
becomes Kubernetes work built here, from ``configs/cluster.yaml`` only:

* Spark stages -> a ``SparkApplication`` (spark-operator, ``sparkoperator.k8s.io/v1beta2``) that runs
  ``jobs/<stage>.py --date D`` with the s3a settings of the config (``spark.extra_conf``), submitted
  and awaited by Airflow's ``SparkKubernetesOperator``;
* training and the RL refresh -> a Kubeflow ``PyTorchJob`` (``onerec_prod.train.launcher.
  render_pytorchjob``: nodes x GPUs from ``train.nnodes`` x ``train.nproc``), created by
  ``KubernetesCreateResourceOperator`` and awaited by a sensor on its status;
* evaluate, gate_register, promote, precompute -> one pod each (``KubernetesPodOperator``) running
  ``onerec-prod run-day --stage S --date D`` in the image of the config (GPU inference stages in
  the serving image), with the task's resources from ``cluster.pod_resources``.

Every pod mounts the config (ConfigMap ``cluster.config_map``) and the secrets of
``cluster.secrets`` as environment (object-store keys); the non-Spark pods also the pipeline's MLflow
user (``cluster.mlflow_secret``). Date fields hold Airflow templates
(``{{ ds }}``), rendered by the operators at run time.
"""

from __future__ import annotations

from typing import Any

from onerec_prod.config import Config, PodResources

SPARK_API = "sparkoperator.k8s.io/v1beta2"
LABELS = {"app.kubernetes.io/part-of": "onerec-prod"}
POD_STAGES = {"evaluate": "evaluate", "gate_register": "gate_register", "promote": "promote",
              "precompute": "precompute"}
GPU_STAGES = ("evaluate", "precompute")  # inference: the serving image, GPU nodes


def _dns(name: str) -> str:
    return name.replace("_", "-")


def _config_volume(cfg: Config) -> tuple[dict, dict]:
    mount = {"name": "config", "mountPath": f"/app/{cfg.cluster.config_path}", "subPath": "cluster.yaml",
             "readOnly": True}
    return {"name": "config", "configMap": {"name": cfg.cluster.config_map}}, mount


def _spark_size(memory: str) -> str:
    """Spark's spelling of a size: ``16g`` stays, ``16Gi`` -> ``16g``."""
    return memory[:-2].lower() + memory[-2].lower() if memory.endswith("i") else memory


def spark_application(cfg: Config, stage: str, ds: str = "{{ ds }}", ds_nodash: str = "{{ ds_nodash }}") -> dict:
    """The SparkApplication running Spark stage ``stage`` (``jobs/<stage>.py``) for day ``ds``."""
    from onerec_prod.spark_server import SPARK_STAGES

    if stage not in SPARK_STAGES:
        raise ValueError(f"{stage!r} is not a Spark stage ({', '.join(SPARK_STAGES)})")
    c, sp = cfg.cluster, cfg.spark
    extra = dict(sp.extra_conf)
    conf = {k: v for k, v in extra.items() if k.startswith(("spark.hadoop.", "spark.delta.", "spark.sql."))}
    conf["spark.jars.packages"] = ",".join(p for p in (
        extra.get("spark.jars.packages", ""), f"io.delta:delta-spark_2.13:{_delta_version()}") if p)
    conf["spark.sql.shuffle.partitions"] = str(sp.shuffle_partitions)
    conf["spark.sql.extensions"] = "io.delta.sql.DeltaSparkSessionExtension"
    conf["spark.sql.catalog.spark_catalog"] = "org.apache.spark.sql.delta.catalog.DeltaCatalog"
    for secret in c.secrets:  # object-store keys in driver and executors
        for role in ("driver", "executor"):
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                conf[f"spark.kubernetes.{role}.secretKeyRef.{key}"] = f"{secret}:{key}"
    labels = {**LABELS, "app.kubernetes.io/name": "onerec-spark", "onerec.io/step": _dns(stage)}
    env = [{"name": "ONEREC_CONFIG", "value": "/etc/onerec/cluster.yaml"}]
    config_maps = [{"name": c.config_map, "path": "/etc/onerec"}]
    return {
        "apiVersion": SPARK_API,
        "kind": "SparkApplication",
        "metadata": {"name": f"onerec-{_dns(stage)}-{ds_nodash}", "namespace": c.namespace, "labels": labels},
        "spec": {
            "type": "Python",
            "pythonVersion": "3",
            "mode": "cluster",
            "image": c.image,
            "imagePullPolicy": "IfNotPresent",
            "mainApplicationFile": f"local:///app/jobs/{stage}.py",
            "arguments": ["--date", ds, "--config", "/etc/onerec/cluster.yaml"],
            "sparkVersion": _spark_version(),
            "timeToLiveSeconds": 86400,
            "restartPolicy": {"type": "OnFailure", "onFailureRetries": cfg.airflow.retries,
                              "onFailureRetryInterval": cfg.airflow.retry_delay_s,
                              "onSubmissionFailureRetries": 3, "onSubmissionFailureRetryInterval": 60},
            "sparkConf": conf,
            "driver": {"cores": 4, "memory": _spark_size(sp.driver_memory), "serviceAccount": c.spark_service_account,
                       "labels": labels, "env": env, "configMaps": config_maps},
            "executor": {"instances": int(extra.get("spark.executor.instances", "2")),
                         "cores": int(extra.get("spark.executor.cores", "2")),
                         "memory": _spark_size(extra.get("spark.executor.memory", "4g")),
                         "labels": labels, "env": env, "configMaps": config_maps},
        },
    }


def _spark_version() -> str:
    from importlib.metadata import version  # not `import pyspark`: the DAG parses without it

    return version("pyspark")


def _delta_version() -> str:
    from importlib.metadata import version

    return version("delta-spark")


def resources(r: PodResources) -> dict[str, dict[str, str]]:
    """Kubernetes requests/limits of ``r`` (memory and GPUs limited, CPU only requested)."""
    req = {"cpu": r.cpu, "memory": r.memory}
    lim = {"memory": r.memory}
    if r.gpus:
        req["nvidia.com/gpu"] = lim["nvidia.com/gpu"] = str(r.gpus)
    return {"requests": req, "limits": lim}


def stage_pod(cfg: Config, task_id: str, ds: str = "{{ ds }}", ds_nodash: str = "{{ ds_nodash }}") -> dict:
    """The Pod (core/v1) that runs DAG task ``task_id`` as ``onerec-prod run-day --stage``."""
    if task_id not in POD_STAGES:
        raise ValueError(f"{task_id!r} does not run as a pod ({', '.join(POD_STAGES)})")
    c = cfg.cluster
    r = c.resources(task_id)
    gpu = task_id in GPU_STAGES
    cfg_vol, cfg_mount = _config_volume(cfg)
    mounts = [cfg_mount, *({"name": v, "mountPath": m} for v, m in sorted(c.volume_mounts.items()))]
    vols = [cfg_vol, *({"name": v, "persistentVolumeClaim": {"claimName": v}} for v in sorted(c.volume_mounts))]
    if gpu:
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
        vols.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
    spec: dict[str, Any] = {
        "serviceAccountName": c.service_account,
        "restartPolicy": "Never",
        "containers": [{
            "name": "base",  # the KubernetesPodOperator's container name
            "image": c.inference_image if gpu else c.image,
            "imagePullPolicy": "IfNotPresent",
            "workingDir": "/app",
            "command": ["onerec-prod"],
            "args": ["--config", c.config_path, "run-day", "--stage", POD_STAGES[task_id], "--date", ds],
            "env": [{"name": "ONEREC_CONFIG", "value": c.config_path},
                    {"name": "HF_HUB_OFFLINE", "value": "1"}, {"name": "PYTHONUNBUFFERED", "value": "1"}],
            "envFrom": [{"secretRef": {"name": s}} for s in (*c.secrets, c.mlflow_secret)],
            "resources": resources(r),
            "volumeMounts": mounts,
        }],
        "volumes": vols,
    }
    if gpu or r.gpus:
        spec["nodeSelector"] = dict(c.train_node_selector)
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"onerec-{_dns(task_id)}-{ds_nodash}", "namespace": c.namespace,
                         "labels": {**LABELS, "app.kubernetes.io/name": f"onerec-{_dns(task_id)}"}},
            "spec": spec}


def pytorchjob(cfg: Config, step: str, ds: str = "{{ ds }}") -> dict:
    """The PyTorchJob of ``step`` (train, rl): the launcher's rendering (one launch path)."""
    from onerec_prod.train.launcher import render_pytorchjob

    return render_pytorchjob(cfg, step, ds)


def pytorchjob_state(obj: dict) -> str:
    """``Succeeded``/``Failed``/``Running``/``Created``... from a PyTorchJob's status conditions."""
    conds = (obj.get("status") or {}).get("conditions") or []
    done = [c["type"] for c in conds if c.get("status") == "True"]
    for final in ("Succeeded", "Failed"):
        if final in done:
            return final
    return done[-1] if done else "Pending"
