"""Start training processes locally (torchrun) and render the cluster job from the same config.

Locally, :func:`launch` writes the JSON spec, starts ``torchrun --standalone --nproc_per_node N``
(or runs the single process in-process when there is nothing distributed to set up), streams
the workers' output to the log and raises :class:`LaunchError` with the tail of the output when
any rank fails. In the cluster, :func:`render_cluster_job` gives the Kubeflow ``PyTorchJob``
(``kubeflow.org/v1``) that runs the same ``onerec_prod.train.sft`` entry point on
``cluster.training_nodes`` x ``cluster.gpus_per_node`` GPUs. The entry module is a parameter: the
GRPO refresh runs ``onerec_prod.train.grpo_worker`` the same way. An entry module has
``main()`` (``python -m MODULE SPEC.json``) and ``run_spec(spec)`` (the in-process case).

    python -m onerec_prod.train.launcher SPEC.json --nproc 2
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
from typing import Any

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


def launch_command(spec_path: str | Path, nproc: int, zero_stage: int,
                   entry_module: str = ENTRY_MODULE) -> list[str] | None:
    """Command line of the training job, or None when it runs in-process (1 proc, no ZeRO)."""
    if nproc == 1 and zero_stage == 0:
        return None
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "-m", entry_module, str(spec_path)]


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


def run_command(cmd: list[str], env: dict[str, str]) -> None:
    """Run ``cmd`` (dies with this process), stream its output to the log, raise on failure."""
    log.info("launching: %s", " ".join(cmd))
    tail: collections.deque[str] = collections.deque(maxlen=200)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, bufsize=1, preexec_fn=die_with_parent)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line)
            sys.stderr.write(line)  # already formatted (time, level, logger) by the worker
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if rc != 0:
        raise LaunchError(rc, list(tail))


def launch(spec: dict[str, Any], spec_path: str | Path, *, nproc: int, zero_stage: int,
           entry_module: str = ENTRY_MODULE) -> None:
    """Write ``spec`` and run ``entry_module`` on ``nproc`` local processes (in-process if trivial)."""
    spec_path = write_spec(spec, spec_path)
    cmd = launch_command(spec_path, nproc, zero_stage, entry_module)
    if cmd is None:
        import importlib

        log.info("running in-process (1 process, no DeepSpeed): %s", spec_path)
        importlib.import_module(entry_module).run_spec(spec)
        return
    run_command(cmd, worker_env(bool(spec.get("force_cpu"))))


# --------------------------------------------------------------------------------------
# cluster


def render_cluster_job(cfg: Config, spec_path: str = "/shared/onerec/run/spec.json",
                       name: str = "onerec-sft") -> dict[str, Any]:
    """Kubeflow PyTorchJob (v1) running the SFT entry point on nodes x GPUs from ``cfg``.

    The training operator sets ``PET_NNODES``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR`` and
    ``PET_MASTER_PORT`` for torchrun in every pod; ``nprocPerNode`` gives the GPUs per pod.
    ``spec_path`` is the JSON spec the driver (``onerec-prod train``) wrote on shared storage.
    """
    c = cfg.cluster
    nodes, gpus = c.training_nodes, c.gpus_per_node
    command = ["python", "-m", "torch.distributed.run", f"--nnodes={nodes}",
               f"--nproc_per_node={gpus}", "-m", ENTRY_MODULE, spec_path]

    def replica(n: int) -> dict[str, Any]:
        return {
            "replicas": n,
            "restartPolicy": "OnFailure",
            "template": {
                "metadata": {"labels": {"app": "onerec", "component": "train"}},
                "spec": {
                    "containers": [{
                        "name": "pytorch",
                        "image": c.image,
                        "imagePullPolicy": "IfNotPresent",
                        "command": command,
                        "env": [
                            {"name": "ONEREC_CONFIG", "value": "configs/cluster.yaml"},
                            {"name": "HF_HUB_OFFLINE", "value": "1"},
                            {"name": "TOKENIZERS_PARALLELISM", "value": "false"},
                            {"name": "PYTHONUNBUFFERED", "value": "1"},
                        ],
                        "resources": {
                            "limits": {"nvidia.com/gpu": gpus},
                            "requests": {"nvidia.com/gpu": gpus},
                        },
                        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
                    }],
                    "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}],
                },
            },
        }

    specs = {"Master": replica(1)}
    if nodes > 1:
        specs["Worker"] = replica(nodes - 1)
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": name, "namespace": c.namespace,
                     "labels": {"app": "onerec", "component": "train"}},
        "spec": {
            "nprocPerNode": str(gpus),
            "runPolicy": {"cleanPodPolicy": "Running", "backoffLimit": 3},
            "pytorchReplicaSpecs": specs,
        },
    }


def main(argv: list[str] | None = None) -> int:
    from onerec_prod.log import setup_logging

    p = argparse.ArgumentParser(description="Run one training spec on N local processes.")
    p.add_argument("spec")
    p.add_argument("--nproc", type=int, default=None, help="Default: the spec's train.nproc.")
    a = p.parse_args(argv)
    setup_logging("INFO")
    from onerec_prod.config import Config
    from onerec_prod.train.stages import StageCfg, stage_train_cfg

    spec = json.loads(Path(a.spec).read_text())
    tcfg = stage_train_cfg(Config.model_validate(spec["config"]).train,
                           StageCfg.model_validate(spec["stage_cfg"]))
    launch(spec, a.spec, nproc=a.nproc or tcfg.nproc * tcfg.nnodes, zero_stage=tcfg.zero_stage)
    return 0


if __name__ == "__main__":
    sys.exit(main())
