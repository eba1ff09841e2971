"""Start training processes: ONE launch path for a laptop and for the 80-GPU pool.

:func:`torchrun_argv` is the only place that decides torchrun's arguments from ``nnodes`` x
``nproc_per_node``: one node is ``--standalone``; several nodes meet through c10d rendezvous at
``cluster.master_addr:cluster.master_port`` (``--rdzv_backend=c10d``, no ``--standalone``), each
node starting ``nproc_per_node`` ranks. :func:`launch` (what ``train_day`` and the GRPO refresh
call) writes the JSON spec, runs that command (or runs the single process in-process when there
is nothing distributed to set up), streams the workers' output and raises :class:`LaunchError`
with the tail of the output when any rank fails. In the cluster every pod of the Kubeflow
``PyTorchJob`` runs the stage's CLI, which reaches :func:`launch` with ``train.nnodes`` x
``train.nproc``; :func:`render_pytorchjob` renders that job (one Master + nnodes-1 Workers, the
rendezvous host being the Master pod) and :func:`cluster_launch_argv` is the torchrun command
each pod then runs, from the same :func:`torchrun_argv`. The entry module is a parameter: the
GRPO refresh runs ``onerec_prod.train.grpo_worker`` the same way. An entry module has ``main()``
(``python -m MODULE SPEC.json``) and ``run_spec(spec)`` (the in-process case).

    python -m onerec_prod.train.launcher SPEC.json --nproc 2
    python -m onerec_prod.train.launcher SPEC.json --nnodes 2 --nproc 1 --rdzv-endpoint 127.0.0.1:29400
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from onerec_prod.config import Config

log = logging.getLogger(__name__)

ENTRY_MODULE = "onerec_prod.train.sft"


class LaunchError(RuntimeError):
    """A training process failed; the message carries its exit code and last output lines."""

    def __init__(self, rc: int, tail: list[str]):
        self.rc = rc
        super().__init__(f"training failed with exit code {rc}; last output:\n" + "".join(tail[-40:]))


def write_spec(spec: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(spec, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)
    return path


def torchrun_argv(nproc_per_node: int, nnodes: int = 1, *, rdzv_endpoint: str | None = None,
                  rdzv_id: str = "onerec") -> list[str]:
    """torchrun's arguments for ``nnodes`` x ``nproc_per_node`` ranks (the one place that decides them).

    Raises:
        ValueError: several nodes without a rendezvous endpoint (``host:port``).
    """
    if nproc_per_node < 1 or nnodes < 1:
        raise ValueError(f"nnodes={nnodes} and nproc_per_node={nproc_per_node} must be >= 1")
    if nnodes == 1:
        return ["--standalone", "--nnodes=1", f"--nproc_per_node={nproc_per_node}"]
    if not rdzv_endpoint or ":" not in rdzv_endpoint:
        raise ValueError(f"{nnodes} nodes need a c10d rendezvous endpoint host:port (cluster.master_addr/"
                         f"cluster.master_port), got {rdzv_endpoint!r}")
    return [f"--nnodes={nnodes}", f"--nproc_per_node={nproc_per_node}", "--rdzv_backend=c10d",
            f"--rdzv_endpoint={rdzv_endpoint}", f"--rdzv_id={rdzv_id}"]


def launch_command(spec_path: str | Path, nproc: int, zero_stage: int,
                   entry_module: str = ENTRY_MODULE, *, nnodes: int = 1, rdzv_endpoint: str | None = None,
                   rdzv_id: str = "onerec", python: str = sys.executable) -> list[str] | None:
    """Command line of the training job on this node (``nproc`` ranks per node, ``nnodes`` nodes),
    or None when it runs in-process (1 node, 1 process, no ZeRO)."""
    if nproc == 1 and nnodes == 1 and zero_stage == 0:
        return None
    return [python, "-m", "torch.distributed.run",
            *torchrun_argv(nproc, nnodes, rdzv_endpoint=rdzv_endpoint, rdzv_id=rdzv_id),
            "-m", entry_module, str(spec_path)]


def rdzv_endpoint(cfg: Config) -> str:
    """``cluster.master_addr:cluster.master_port``: where the nodes of a multi-node job meet."""
    return f"{cfg.cluster.master_addr}:{cfg.cluster.master_port}"


def worker_env(force_cpu: bool) -> dict[str, str]:
    """Environment of the training processes (offline, quiet, one thread per CPU process)."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("DS_BUILD_OPS", "0")
    env["PYTHONUNBUFFERED"] = "1"
    if force_cpu:
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", "1")
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def die_with_parent() -> None:
    """Linux: get SIGKILL when the parent process dies (no orphaned ranks after a crash).

    torchrun starts each rank in its own session, so killing the launcher would otherwise leave
    ranks running and writing checkpoints next to the rerun that resumes from them.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def worker_main(module: str, run_spec: Callable[[dict[str, Any]], Any], argv: list[str] | None = None) -> int:
    """``python -m MODULE SPEC.json``: one rank of a torchrun job (quiet logs, dies with its agent)."""
    import warnings

    from onerec_prod.log import setup_logging

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.stderr.write(f"usage: python -m {module} SPEC.json\n")
        return 2
    die_with_parent()  # a rank never outlives its torchrun agent
    setup_logging(os.environ.get("ONEREC_LOG_LEVEL", "INFO"))
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    for noisy in ("transformers", "accelerate", "DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    run_spec(json.loads(Path(argv[0]).read_text()))
    return 0


def run_command(cmd: list[str], env: dict[str, str], *, stdout: TextIO | None = None,
                stderr: TextIO | None = None) -> None:
    """Run ``cmd`` (dies with this process), forward its output line by line, raise on failure.

    Each line goes to the stream of this process that matches the one the worker wrote it to:
    worker stdout -> ``stdout``, worker stderr -> ``stderr`` (default: ``sys.stdout`` /
    ``sys.stderr``). Under an Airflow task the workers' :func:`onerec_prod.log.setup_logging`
    writes INFO to stdout and WARNING and above to stderr, and Airflow shows a task's stderr
    lines at ERROR level, so keeping the streams apart keeps INFO at INFO (before, every worker
    line was written to stderr). Outside Airflow the workers log to stderr, as this process does.
    The last lines of both, interleaved as they arrived, go into :class:`LaunchError`.
    """
    import threading

    out, err = stdout or sys.stdout, stderr or sys.stderr
    log.info("launching: %s", " ".join(cmd))
    tail: collections.deque[str] = collections.deque(maxlen=200)
    lock = threading.Lock()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, bufsize=1, preexec_fn=die_with_parent)

    def pump(src: TextIO, dst: TextIO) -> None:
        for line in src:
            with lock:  # whole lines, never two interleaved
                tail.append(line)
                dst.write(line)  # already formatted (time, level, logger) by the worker
                dst.flush()

    assert proc.stdout is not None and proc.stderr is not None
    pumps = [threading.Thread(target=pump, args=(proc.stdout, out), daemon=True),
             threading.Thread(target=pump, args=(proc.stderr, err), daemon=True)]
    try:
        for t in pumps:
            t.start()
        rc = proc.wait()
        for t in pumps:
            t.join()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if rc != 0:
        raise LaunchError(rc, list(tail))


def launch(spec: dict[str, Any], spec_path: str | Path, *, nproc: int, zero_stage: int,
           entry_module: str = ENTRY_MODULE, nnodes: int = 1, rdzv_endpoint: str | None = None,
           rdzv_id: str = "onerec") -> None:
    """Write ``spec`` and run ``entry_module`` on ``nproc`` processes of this node, one of
    ``nnodes`` nodes meeting at ``rdzv_endpoint`` (in-process if trivial)."""
    spec_path = write_spec(spec, spec_path)
    cmd = launch_command(spec_path, nproc, zero_stage, entry_module, nnodes=nnodes,
                         rdzv_endpoint=rdzv_endpoint, rdzv_id=rdzv_id)
    if cmd is None:
        import importlib

        log.info("running in-process (1 process, no DeepSpeed): %s", spec_path)
        importlib.import_module(entry_module).run_spec(spec)
        return
    run_command(cmd, worker_env(bool(spec.get("force_cpu"))))


# --------------------------------------------------------------------------------------
# cluster: the Kubeflow PyTorchJob whose pods run the launch above


JOB_STEPS = {"train": ("train", ENTRY_MODULE), "rl": ("rl", "onerec_prod.train.grpo_worker")}


def job_name(step: str, dt: str) -> str:
    """``onerec-train-20140101``: the PyTorchJob of ``step`` for day ``dt`` (a DNS-1123 name);
    a templated ``{{ ds }}`` becomes ``{{ ds_nodash }}``."""
    return f"onerec-{step}-{'{{ ds_nodash }}' if '{{' in dt else dt.replace('-', '')}"


def job_shape(cfg: Config, step: str) -> tuple[int, int]:
    """``(nodes, processes per node)`` of ``step``: SFT ``train.nnodes`` x ``train.nproc``; the GRPO
    refresh one node x ``grpo.nproc`` (its rollouts need whole weights on every rank)."""
    if step == "rl":
        return 1, cfg.grpo.nproc
    return cfg.train.nnodes, cfg.train.nproc


def cluster_launch_argv(cfg: Config, step: str, dt: str, spec_path: str = "SPEC.json") -> list[str]:
    """The torchrun command each pod of ``step``'s PyTorchJob runs (via the stage's CLI and
    :func:`launch`): ``train.nnodes`` x ``train.nproc`` ranks meeting at the Master pod.

    Inside a pod the config carries ``cluster.master_addr`` = the Master pod's name (set by
    :func:`render_pytorchjob`), so this equals what :func:`launch` runs there.
    """
    name = job_name(step, dt)
    pod_cfg = cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={"master_addr": f"{name}-master-0"})})
    nnodes, nproc = job_shape(cfg, step)
    zero = cfg.grpo.zero_stage if step == "rl" else cfg.train.zero_stage
    cmd = launch_command(spec_path, nproc, zero, JOB_STEPS[step][1], nnodes=nnodes,
                         rdzv_endpoint=rdzv_endpoint(pod_cfg), rdzv_id=name, python="python")
    assert cmd is not None
    return cmd


def render_pytorchjob(cfg: Config, step: str, dt: str) -> dict[str, Any]:
    """Kubeflow PyTorchJob (``kubeflow.org/v1``) running ``onerec-prod STEP --date DT`` in every pod.

    :func:`job_shape` pods (one Master, the rest Workers) of that many GPUs each; every
    pod's stage CLI reaches :func:`launch`, which starts torchrun with c10d rendezvous at the
    Master pod (``ONEREC__CLUSTER__MASTER_ADDR``, port ``cluster.master_port``). Image, resources,
    node selector, tolerations, secrets and volumes come from ``cluster`` in the config.
    """
    if step not in JOB_STEPS:
        raise ValueError(f"unknown training step {step!r} (valid: {', '.join(JOB_STEPS)})")
    c = cfg.cluster
    nnodes, nproc = job_shape(cfg, step)
    if nproc > c.gpus_per_node:
        raise ValueError(f"{step}: {nproc} processes per node exceed cluster.gpus_per_node={c.gpus_per_node}")
    name = job_name(step, dt)
    labels = {"app.kubernetes.io/part-of": "onerec-prod", "app.kubernetes.io/name": f"onerec-{step}"}
    gpus = str(nproc)
    env = [{"name": "ONEREC_CONFIG", "value": c.config_path},
           {"name": "ONEREC__CLUSTER__MASTER_ADDR", "value": f"{name}-master-0"},
           {"name": "HF_HUB_OFFLINE", "value": "1"},
           {"name": "TOKENIZERS_PARALLELISM", "value": "false"},
           {"name": "PYTHONUNBUFFERED", "value": "1"},
           *({"name": k, "value": v} for k, v in sorted(c.train_env.items()))]
    container = {
        "name": "pytorch",
        "image": c.image,
        "workingDir": "/app",
        "command": ["onerec-prod"],
        "args": ["--config", c.config_path, JOB_STEPS[step][0], "--date", dt],
        "ports": [{"name": "pytorchjob-port", "containerPort": c.master_port}],
        "env": env,
        "envFrom": [{"secretRef": {"name": s}} for s in (*c.secrets, c.mlflow_secret)],
        "resources": {"requests": {"cpu": c.train_cpu, "memory": c.train_memory, "nvidia.com/gpu": gpus},
                      "limits": {"memory": c.train_memory, "nvidia.com/gpu": gpus}},
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"},
                         *({"name": v, "mountPath": m} for v, m in sorted(c.volume_mounts.items()))],
    }
    pod = {
        "metadata": {"labels": labels},
        "spec": {
            "serviceAccountName": c.service_account,
            "nodeSelector": dict(c.train_node_selector),
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "containers": [container],
            "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}},
                        *({"name": v, "persistentVolumeClaim": {"claimName": v}} for v in sorted(c.volume_mounts))],
        },
    }
    specs: dict[str, Any] = {"Master": {"replicas": 1, "restartPolicy": "OnFailure", "template": pod}}
    if nnodes > 1:
        specs["Worker"] = {"replicas": nnodes - 1, "restartPolicy": "OnFailure", "template": pod}
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": name, "namespace": c.namespace, "labels": labels},
        "spec": {
            "nprocPerNode": gpus,
            "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": 3,
                          "schedulingPolicy": {"minAvailable": nnodes}},
            "pytorchReplicaSpecs": specs,
        },
    }


def main(argv: list[str] | None = None) -> int:
    from onerec_prod.log import setup_logging

    p = argparse.ArgumentParser(description="Run one training spec on N local processes.")
    p.add_argument("spec")
    p.add_argument("--nproc", type=int, default=None, help="Processes per node. Default: the spec's train.nproc.")
    p.add_argument("--nnodes", type=int, default=None, help="Nodes. Default: the spec's train.nnodes.")
    p.add_argument("--rdzv-endpoint", default=None,
                   help="host:port of the c10d rendezvous (several nodes). Default: cluster.master_addr:master_port.")
    a = p.parse_args(argv)
    setup_logging("INFO")
    from onerec_prod.config import Config
    from onerec_prod.train.stages import StageCfg, stage_train_cfg

    spec = json.loads(Path(a.spec).read_text())
    cfg = Config.model_validate(spec["config"])
    tcfg = stage_train_cfg(cfg.train, StageCfg.model_validate(spec["stage_cfg"]))
    launch(spec, a.spec, nproc=a.nproc or tcfg.nproc, nnodes=a.nnodes or tcfg.nnodes,
           zero_stage=tcfg.zero_stage, rdzv_endpoint=a.rdzv_endpoint or rdzv_endpoint(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
