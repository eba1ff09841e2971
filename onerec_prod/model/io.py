"""Loading and saving model directories: safetensors only, with ``onerec_meta.json``.

A model directory is a normal Hugging Face directory (``config.json``, ``*.safetensors``,
tokenizer files) plus ``onerec_meta.json``::

    {"sid_version": ..., "parent": ..., "dt": ..., "stage": ..., "data_versions": {...},
     "weights_sha256": ...}

Writes are atomic: everything goes to a temporary sibling directory which is renamed into place,
so a crash never leaves a half-written model where a reader looks.

No model file is ever unpickled: models (here), the MiniLM item encoder
(:mod:`onerec_prod.sid.embed`) and the rationale teacher (:mod:`onerec_prod.samples.rationale`)
load with ``use_safetensors=True`` after :func:`require_safetensors` refused a directory without
``*.safetensors``; optimizer and RNG state of SFT (ZeRO 0-2) and GRPO checkpoints are
safetensors/JSON (:mod:`onerec_prod.train.checkpoint`). The one exception, trusted files only:
with ``train.zero_stage: 3`` (SFT; GRPO refuses ZeRO-3), DeepSpeed keeps its own partitioned
checkpoint format, and resuming that run reads ``global_step<N>/zero_pp_rank_<R>_mp_rank_00_
{model,optim}_states.pt`` with ``torch.load(weights_only=False)`` (DeepSpeed's checkpoint engine;
HF's ``scheduler.pt`` there goes through ``weights_only=True``). Those files are written by the
same training run into its own checkpoint directory under ``paths.models_root`` and read back
only by its resume; nothing downloaded or registered is ever loaded that way. The cluster
config trains with ZeRO-2, so production unpickles nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from onerec_prod.util import META_FILE, atomic_path, read_meta  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)


def require_safetensors(model_dir: str | Path) -> None:
    """Refuse a model directory that has no ``*.safetensors`` weights (pickle files are never loaded).

    Raises:
        FileNotFoundError: no such directory, or no ``*.safetensors`` in it.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory not found: {model_dir}")
    if not any(model_dir.glob("*.safetensors")):
        raise FileNotFoundError(
            f"{model_dir} holds no *.safetensors weights: only safetensors checkpoints are "
            "loaded (convert pickle checkpoints offline, from a trusted source)"
        )


def load_tokenizer(model_dir: str | Path):
    """The tokenizer of ``model_dir`` (local files only)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


def load_model(model_dir: str | Path, device: str = "cpu", dtype=None):
    """Causal LM of ``model_dir`` from safetensors, on ``device``, in eval mode.

    ``dtype`` None = float32 on CPU, bfloat16 on CUDA; a ``torch.dtype`` or its name otherwise.
    """
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    require_safetensors(model_dir)
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=dtype, use_safetensors=True, local_files_only=True
    )
    return model.to(device).eval()


def weights_hash(model_dir: str | Path) -> str:
    """sha256 over the tensors of every ``*.safetensors`` file (name, dtype, shape, bytes).

    Independent of sharding and of file metadata; equal hashes mean equal weights.
    """
    import torch
    from safetensors import safe_open

    model_dir = Path(model_dir)
    require_safetensors(model_dir)
    entries = []
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            entries.extend((name, f) for name in sf.keys())
    h = hashlib.sha256()
    for name, f in sorted(entries):
        with safe_open(str(f), framework="pt") as sf:
            t = sf.get_tensor(name).contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _exchange_dirs(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported.

    With it, replacing a model dir is one system call: a reader (serving, a resumed trainer) sees
    the whole old model or the whole new one, never no model.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL / ENOSYS / EOPNOTSUPP: this filesystem or kernel cannot
        return False
    raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(err)}")


def save_model(model, tokenizer, model_dir: str | Path, meta: dict[str, Any], *,
               state_dict: dict | None = None) -> Path:
    """Write ``model`` + ``tokenizer`` + ``onerec_meta.json`` to ``model_dir`` atomically.

    Tied weights are written once (HF handles the tie). ``meta`` gets ``weights_sha256`` added.
    An existing ``model_dir`` is replaced as a whole, in one atomic exchange where the OS has one
    (Linux): there is no moment without a complete model at ``model_dir``. Elsewhere it falls
    back to two renames. ``state_dict`` (e.g. gathered from ZeRO-3 partitions) replaces the
    model's own tensors.
    """
    model_dir = Path(model_dir)
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = model_dir.parent / f".{model_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(str(tmp), state_dict=state_dict, max_shard_size="10GB")
        tokenizer.save_pretrained(str(tmp))
        stray = [p.name for p in tmp.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
        if stray:
            raise RuntimeError(f"save_model: non-safetensors files written: {stray}")
        full = dict(meta)
        full["weights_sha256"] = weights_hash(tmp)
        (tmp / META_FILE).write_text(json.dumps(full, indent=2, sort_keys=True, default=str) + "\n")
        if model_dir.exists() and _exchange_dirs(tmp, model_dir):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old model
        else:
            old = None
            if model_dir.exists():
                old = model_dir.parent / f".{model_dir.name}.old-{uuid.uuid4().hex[:8]}"
                os.replace(model_dir, old)
            os.replace(tmp, model_dir)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("saved model to %s (weights %s)", model_dir, full["weights_sha256"][:12])
    return model_dir


# --------------------------------------------------------------------------------------
# training state (optimizer, scheduler, RNG) as safetensors: no pickle anywhere


def keyed_checkpoint_dir(ckpt_dir: str | Path, run_key: str, *, force: bool = False) -> Path:
    """``ckpt_dir`` ready for a run with inputs ``run_key``: checkpoints of the same key are kept
    (so the run resumes from them), those of other inputs (or all, with ``force``) are deleted."""
    ckpt_dir = Path(ckpt_dir)
    key_file = ckpt_dir / "run_key"
    if ckpt_dir.exists() and (force or not key_file.exists() or key_file.read_text() != run_key):
        log.info("discarding checkpoints of other inputs in %s", ckpt_dir)
        shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    key_file.write_text(run_key)
    return ckpt_dir


def _encode(obj: Any, tensors: dict, path: str) -> Any:
    import numpy as np
    import torch

    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": name}
    if isinstance(obj, np.ndarray):
        name = f"t{len(tensors)}"
        tensors[name] = torch.from_numpy(np.ascontiguousarray(obj)).clone()
        return {"__ndarray__": name, "dtype": str(obj.dtype)}
    if isinstance(obj, dict):
        return {"__dict__": [[_encode(k, tensors, path), _encode(v, tensors, f"{path}.{k}")]
                             for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, path) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors, path) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"save_tree: cannot store {type(obj).__name__} at {path or '<root>'}")


def _decode(obj: Any, tensors: dict) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy().astype(obj["dtype"])
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__dict__"]}
    return obj


def save_tree(obj: Any, path: str | Path) -> Path:
    """Write a nest of dicts/lists/tuples/scalars/tensors/ndarrays as one safetensors file.

    Tensors go into the file's tensors, the structure (and every scalar) into its JSON metadata,
    so optimizer, scheduler and RNG states are stored without pickle. Atomic (temp + rename).
    """
    from safetensors.torch import save_file

    path = Path(path)
    tensors: dict = {}
    skeleton = _encode(obj, tensors, "")
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "onerec_tree": json.dumps(skeleton)})
    return path


def load_tree(path: str | Path) -> Any:
    """Inverse of :func:`save_tree`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        skeleton = json.loads(f.metadata()["onerec_tree"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return _decode(skeleton, tensors)
