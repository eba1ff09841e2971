"""Process-group plumbing of the training workers (SFT and GRPO): rank env, init, DeepSpeed config, cleanup.

- :class:`RankEnv`: ``RANK / WORLD_SIZE / LOCAL_RANK`` as torchrun sets them (0/1/0 alone).
- :func:`init_distributed`: gloo on CPU (DeepSpeed's shm comm op is not built there), nccl on
  GPU, the device of this rank.
- :func:`build_ds_config`: the DeepSpeed dict of a ZeRO stage from the template
  ``train.deepspeed_config`` (``common`` + ``zero_by_stage[stage]``).
- :func:`cleanup`: barrier + ``destroy_process_group`` (else rank 1 aborts at exit).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from onerec_prod.config import REPO_ROOT, ConfigError, TrainCfg


@dataclass(frozen=True)
class RankEnv:
    rank: int
    world: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> RankEnv:
        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                   int(os.environ.get("LOCAL_RANK", "0")))


def skip_shm_comm_build() -> None:
    """Do not JIT-build DeepSpeed's shared-memory comm op on CPU.

    DeepSpeed's torch backend compiles ``deepspeed_shm_comm`` (~2 min with the C++ compiler)
    whenever it is created on the CPU accelerator. The op only serves ``inference_all_reduce``
    (tensor-parallel inference); ZeRO training all-reduces through torch.distributed (gloo), so
    the op is never used here. Marking it incompatible makes ``build_shm_op`` return None.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(env: RankEnv, force_cpu: bool = False):
    """Start the process group (DeepSpeed's init): ``(device, on_gpu)`` of this rank."""
    import deepspeed
    import torch

    on_gpu = torch.cuda.is_available() and not force_cpu
    if on_gpu:
        torch.cuda.set_device(env.local_rank)
        device = torch.device("cuda", env.local_rank)
    else:
        skip_shm_comm_build()
        device = torch.device("cpu")
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    return device, on_gpu


def build_ds_config(tcfg: TrainCfg, bf16: bool) -> dict[str, Any] | None:
    """DeepSpeed config dict for ``tcfg.zero_stage`` (None when it is 0)."""
    if tcfg.zero_stage == 0:
        return None
    path = Path(tcfg.deepspeed_config)
    path = path if path.is_absolute() else REPO_ROOT / path
    if not path.exists():
        raise ConfigError(f"train.deepspeed_config: {path} does not exist")
    tpl = yaml.safe_load(path.read_text())
    by_stage = {int(k): v for k, v in (tpl.get("zero_by_stage") or {}).items()}
    if tcfg.zero_stage not in by_stage:
        raise ConfigError(
            f"train.zero_stage={tcfg.zero_stage}: {path} has no zero_by_stage block for it "
            f"(has {sorted(by_stage)})"
        )
    ds = copy.deepcopy(tpl.get("common") or {})
    ds["zero_optimization"] = copy.deepcopy(by_stage[tcfg.zero_stage])
    ds["bf16"] = {"enabled": bool(bf16)}
    return ds


def all_reduce_sums(sums: dict[str, float], device) -> dict[str, float]:
    """Sum a dict of floats over every rank (float64)."""
    import torch
    import torch.distributed as dist

    keys = sorted(sums)
    t = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist(), strict=True))


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    """Barrier, then tear the process group down (idempotent)."""
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
