"""The one writer and reader of training state: model weights, optimizer state, RNG state.

Shared by SFT (:mod:`onerec_prod.train.sft`, through its HF Trainer hooks) and GRPO
(:mod:`onerec_prod.train.grpo` in process, :mod:`onerec_prod.train.grpo_worker` on DeepSpeed
ranks). Everything is safetensors (:func:`onerec_prod.model.io.save_tree`), no pickle:

- ``optimizer_rank{R}.safetensors``: ``{"base": torch optimizer state}`` for a plain optimizer;
  under DeepSpeed ZeRO-1/2 also ``"fp32"`` (this rank's fp32 master partition) and ``"engine"``
  (global/skipped step counters). ZeRO stage 0 under DeepSpeed: the wrapped optimizer's state.
- ``rng_state_{R}.safetensors``: python, numpy, torch CPU (and CUDA) generators.
- weights: :func:`load_weights` reads ``model*.safetensors`` of a checkpoint into a model (tied
  ``lm_head`` may be absent); they are written by :func:`onerec_prod.model.io.save_model` or
  ``save_pretrained``.

Resuming ZeRO state copies the fp32 partitions back and re-gathers the model weights from them
(``update_lp_params``), so a resumed run continues bit for bit.

Resume evidence: :func:`optimizer_steps` and :func:`rng_digest` read the same figures from a live
optimizer / the live generators as from a checkpoint's files, so a resumed run can record what it
restored and a test can compare that with what the killed run saved (a restart from scratch
records nothing and starts at step 0).
"""

from __future__ import annotations

import hashlib
import logging
import random
import shutil
from pathlib import Path
from typing import Any

from onerec_prod.model.io import load_tree, save_tree

log = logging.getLogger(__name__)


def optimizer_file(ckpt: str | Path, rank: int) -> Path:
    return Path(ckpt) / f"optimizer_rank{rank}.safetensors"


def rng_file(ckpt: str | Path, rank: int) -> Path:
    return Path(ckpt) / f"rng_state_{rank}.safetensors"


def _is_zero(opt) -> bool:
    return hasattr(opt, "single_partition_of_fp32_groups")


def save_optimizer(ckpt: str | Path, rank: int, optimizer, engine=None) -> Path:
    """Write ``optimizer``'s state (a torch optimizer, or DeepSpeed's ZeRO-1/2 wrapper with its
    ``engine``) as this rank's shard of checkpoint ``ckpt``."""
    state: dict[str, Any] = {}
    if engine is not None:
        state["engine"] = {"global_steps": engine.global_steps, "global_samples": engine.global_samples,
                           "skipped_steps": engine.skipped_steps}
    if _is_zero(optimizer):
        state["base"] = optimizer.optimizer.state_dict()
        state["fp32"] = list(optimizer.single_partition_of_fp32_groups)
    else:
        state["base"] = optimizer.state_dict()
    Path(ckpt).mkdir(parents=True, exist_ok=True)
    return save_tree(state, optimizer_file(ckpt, rank))


def load_optimizer(ckpt: str | Path, rank: int, optimizer, engine=None) -> None:
    """Inverse of :func:`save_optimizer` (collective under ZeRO: call it on every rank)."""
    import torch

    st = load_tree(optimizer_file(ckpt, rank))
    if _is_zero(optimizer):
        optimizer.optimizer.load_state_dict(st["base"])
        with torch.no_grad():
            for cur, saved in zip(optimizer.single_partition_of_fp32_groups, st["fp32"], strict=True):
                cur.copy_(saved)
        optimizer.update_lp_params()  # fp32 master partitions -> model weights on every rank
    else:
        optimizer.load_state_dict(st["base"])
    if engine is not None and "engine" in st:
        engine.global_steps = st["engine"]["global_steps"]
        engine.global_samples = st["engine"]["global_samples"]
        engine.skipped_steps = st["engine"]["skipped_steps"]


def optimizer_shards(ckpt: str | Path) -> int:
    return len(list(Path(ckpt).glob("optimizer_rank*.safetensors")))


def optimizer_steps(state_dict: dict[str, Any]) -> int:
    """The step count of a torch optimizer ``state_dict`` (Adam's per-parameter ``step``; the
    largest, 0 before the first step): the live optimizer's or a checkpoint's ``"base"`` entry."""
    steps = [int(float(s["step"])) for s in state_dict.get("state", {}).values() if "step" in s]
    return max(steps, default=0)


def base_optimizer(optimizer):
    """The torch optimizer that holds the state: ZeRO-1/2 wrap it, a plain one is itself."""
    return optimizer.optimizer if _is_zero(optimizer) else optimizer


def rng_states() -> dict[str, Any]:
    """This process's python / numpy / torch (CPU, CUDA) generator states."""
    import numpy as np
    import torch

    states: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                              "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.random.get_rng_state_all()
    return states


def rng_digest(states: dict[str, Any] | None = None) -> str:
    """sha256 of generator states (the live ones when None), equal for the live states and for
    the same states read back from :func:`save_rng`'s file (tuples and lists, tensors and arrays
    hash alike)."""
    import numpy as np
    import torch

    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        if isinstance(x, np.ndarray):
            h.update(f"array {x.dtype} {x.shape}:".encode())
            h.update(np.ascontiguousarray(x).tobytes())
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for v in x:
                feed(v)
            h.update(b"]")
        elif isinstance(x, dict):
            for k in sorted(x):
                h.update(f"{k}=".encode())
                feed(x[k])
        else:
            h.update(f"{x!r};".encode())

    feed(rng_states() if states is None else states)
    return h.hexdigest()


def save_rng(ckpt: str | Path, rank: int) -> Path:
    """This process's generator states (:func:`rng_states`) as this rank's RNG file."""
    Path(ckpt).mkdir(parents=True, exist_ok=True)
    return save_tree(rng_states(), rng_file(ckpt, rank))


def load_rng(ckpt: str | Path, rank: int) -> bool:
    """Restore :func:`save_rng`'s states; False (logged) when the checkpoint has none."""
    import numpy as np
    import torch

    p = rng_file(ckpt, rank)
    if not p.exists():
        log.warning("no RNG state %s: resumed run is not bit-reproducible", p.name)
        return False
    st = load_tree(p)
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.random.set_rng_state(st["cpu"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.random.set_rng_state_all(st["cuda"])
    return True


def load_weights(model, ckpt: str | Path) -> None:
    """A checkpoint's ``model*.safetensors`` into ``model`` (a tied ``lm_head`` may be absent)."""
    from safetensors.torch import load_file

    weights: dict[str, Any] = {}
    for f in sorted(Path(ckpt).glob("model*.safetensors")):
        weights.update(load_file(str(f)))
    missing, _ = model.load_state_dict(weights, strict=False)
    if [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"checkpoint {ckpt} lacks weights {missing[:3]}")
    model.tie_weights()


def latest(ckpt_dir: str | Path, prefix: str, done_file: str) -> Path | None:
    """Newest complete ``<prefix>N`` directory (``done_file`` is written last) or None."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return None
    done = [p for p in d.glob(f"{prefix}*") if p.name[len(prefix):].isdigit() and (p / done_file).exists()]
    return max(done, key=lambda p: int(p.name[len(prefix):]), default=None)


def prune(ckpt_dir: str | Path, prefix: str, keep: Path) -> None:
    """Delete every ``<prefix>*`` checkpoint but ``keep``."""
    for old in Path(ckpt_dir).glob(f"{prefix}*"):
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)
