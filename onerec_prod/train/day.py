"""SFT / continued training of day D, the driver side (``onerec-prod train``: :mod:`.cli_train`).

The driver picks the init weights (the champion's, else the base model), exports the day's
sample mix from Delta to a local JSONL (training processes never start Spark), checks the
sid_version, writes a JSON spec and launches the training processes. Output:
``<paths.models>/candidates/dt=D/sft`` with ``onerec_meta.json`` (parent version and weights
hash, data versions, sid_version). Re-running a finished day is a no-op; re-running a crashed
day resumes from its own checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from onerec_prod.config import Config

log = logging.getLogger(__name__)


class SidVersionMismatch(ValueError):
    """The init model and the samples use different SID codebooks."""


def candidates_dir(cfg: Config, dt: str) -> Path:
    return Path(cfg.paths.models) / "candidates" / f"dt={dt}"


def _champion(cfg: Config) -> tuple[str, Path] | None:
    """The registry's champion (version, model_dir), or None (no champion / no registry yet)."""
    try:
        from onerec_prod.registry.registry import champion
    except ImportError:
        log.warning("onerec_prod.registry.registry is not available: training from the base model")
        return None
    got = champion(cfg)
    return (str(got[0]), Path(got[1])) if got else None


def _parent(cfg: Config, stage, init_from: str | Path | None, previous: Path | None,
            parent_version: str | None = None) -> dict[str, Any]:
    """Init weights of a stage: explicit dir, previous stage, champion, or the base model.

    ``parent_version`` pins the registry version a ``champion`` stage starts from (a rerun of a day
    repeats its first attempt's parent, even when the champion has moved since, e.g. to the day's
    own model).
    """
    from onerec_prod.model.base import ensure_base_model

    if init_from:
        return {"dir": Path(init_from), "version": None, "kind": "explicit"}
    if stage.init == "previous" and previous is not None:
        return {"dir": previous, "version": None, "kind": "previous"}
    if stage.init == "champion" and parent_version is not None:
        from onerec_prod.registry.registry import version_dir

        return {"dir": version_dir(cfg, parent_version), "version": str(parent_version), "kind": "champion"}
    if stage.init == "champion":
        champ = _champion(cfg)
        if champ is not None:
            return {"dir": champ[1], "version": champ[0], "kind": "champion"}
        log.info("no champion yet: stage %s starts from the base model (bootstrap)", stage.name)
    return {"dir": ensure_base_model(cfg), "version": None, "kind": "base"}


def _check_sid_version(stage, parent_meta: dict, samples_sids: list[str], init_dir: Path) -> str | None:
    if len(samples_sids) > 1:
        raise SidVersionMismatch(
            f"samples mix several sid_versions {samples_sids}: rebuild the day's samples "
            "with one codebook")
    new = samples_sids[0] if samples_sids else None
    old = parent_meta.get("sid_version")
    if old and new and old != new:
        if not stage.full_retrain:
            raise SidVersionMismatch(
                f"model {init_dir} was trained on sid_version {old!r} but the samples use "
                f"{new!r}: stage {stage.name!r} cannot change codebooks. Run a full retrain "
                "from the base model: `onerec-prod train --date D --stage bootstrap`")
        log.warning("stage %s: full retrain moves from sid_version %s to %s", stage.name, old, new)
    return new or old


def _prepare_init(cfg: Config, init_dir: Path, work: Path) -> Path:
    """``init_dir``, or an expanded copy under ``work`` when it lacks the SID tokens."""
    from onerec_prod.model.io import load_model, load_tokenizer, read_meta, save_model
    from onerec_prod.model.vocab import expand_vocab, missing_tokens
    from onerec_prod.sid.tokens import level_sizes

    sizes = level_sizes(cfg.sid)
    tok = load_tokenizer(init_dir)
    if not missing_tokens(tok, sizes):
        return init_dir
    out = work / "init"
    log.info("%s lacks SID tokens for sizes %s: expanding into %s", init_dir, sizes, out)
    model = load_model(init_dir)
    expand_vocab(model, tok, sizes, init=cfg.model.new_token_init)
    meta = {**read_meta(init_dir), "stage": "expanded", "parent": str(init_dir), "sid_sizes": sizes}
    return save_model(model, tok, out, meta)


def _run_key(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def train_stage(cfg: Config, dt: str, stage_name: str, out_dir: Path, work: Path, *,
                init_from: str | Path | None = None, previous: Path | None = None,
                samples_path: str | Path | None = None, force: bool = False,
                fault: dict[str, Any] | None = None, parent_version: str | None = None) -> Path:
    """Train one (non-chain) stage into ``out_dir``; ``work`` holds samples, spec, checkpoints.

    ``fault`` (tests, chaos drills) is passed to the training processes, e.g.
    ``{"kill_at_step": 3}`` makes rank 0 SIGKILL itself after step 3, ``{"kill_at_step": 4, "at":
    "checkpoint_write", "rank": 1}`` rank 1 while writing checkpoint-4 (:class:`~onerec_prod.train.sft.Fault`).
    """
    from onerec_prod.model.io import keyed_checkpoint_dir, read_meta, weights_hash
    from onerec_prod.sid.tokens import level_sizes
    from onerec_prod.train.data import export_samples, read_manifest
    from onerec_prod.train.launcher import launch, rdzv_endpoint
    from onerec_prod.train.stages import load_stage, stage_train_cfg

    stage = load_stage(stage_name)
    tcfg = stage_train_cfg(cfg.train, stage)
    parent = _parent(cfg, stage, init_from, previous, parent_version)
    init_dir = _prepare_init(cfg, Path(parent["dir"]), work)
    pmeta = read_meta(init_dir)
    parent_sha = pmeta.get("weights_sha256") or weights_hash(init_dir)
    if samples_path:
        manifest = read_manifest(samples_path)
        samples = Path(samples_path)
    else:
        samples = work / "samples.jsonl"
        manifest = export_samples(cfg, dt, stage.tasks, samples, replay=stage.replay)
    n_rows = sum(n for t, n in manifest["tasks"].items() if t in stage.tasks)
    if n_rows == 0:
        raise ValueError(f"stage {stage.name}: no samples of tasks {stage.tasks} for dt={dt} "
                         f"(have {manifest['tasks']}) in {samples}")
    sid_version = _check_sid_version(stage, pmeta, manifest["sid_versions"], init_dir)
    key = _run_key(parent_sha, manifest["sha256"], stage.model_dump(), tcfg.model_dump(),
                   level_sizes(cfg.sid), cfg.model.model_dump())
    if not force and read_meta(out_dir).get("run_key") == key:
        log.info("stage %s for dt=%s already trained with the same inputs: %s", stage.name, dt, out_dir)
        return out_dir
    ckpt_dir = keyed_checkpoint_dir(work / "checkpoints", key, force=force)
    meta = {
        "dt": dt,
        "stage": stage.name,
        "parent": {"version": parent["version"], "kind": parent["kind"], "dir": str(parent["dir"]),
                   "weights_sha256": parent_sha, "stage": pmeta.get("stage"),
                   "dt": pmeta.get("dt")},
        "parent_version": parent["version"],
        "data_versions": {**manifest.get("data_versions", {}), "samples_sha256": manifest["sha256"]},
        "samples": {"rows": manifest["rows"], "tasks": manifest["tasks"],
                    "replay_rows": manifest.get("replay_rows", 0)},
        "sid_version": sid_version,
        "sid_sizes": level_sizes(cfg.sid),
        "config_hash": cfg.digest(),
        "run_key": key,
    }
    spec = {
        "config": cfg.model_dump(mode="json"),
        "stage_cfg": stage.model_dump(),
        "init_dir": str(init_dir),
        "samples_path": str(samples),
        "out_dir": str(out_dir),
        "ckpt_dir": str(ckpt_dir),
        "meta": meta,
        "force_cpu": not _cuda_available(),
        "fault": fault or {},
    }
    launch(spec, work / "spec.json", nproc=tcfg.nproc, nnodes=tcfg.nnodes, zero_stage=tcfg.zero_stage,
           rdzv_endpoint=rdzv_endpoint(cfg))
    if read_meta(out_dir).get("run_key") != key:
        raise RuntimeError(f"training of stage {stage.name} finished but {out_dir} was not written")
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return out_dir


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def train_day(cfg: Config, dt: str, init_from: str | Path | None = None,
              samples_path: str | Path | None = None, *, stage: str | None = None,
              out_dir: str | Path | None = None, bootstrap: bool = False,
              force: bool = False, parent_version: str | None = None) -> Path:
    """Train day ``dt`` and return the model dir (default ``candidates/dt=D/sft``).

    ``stage`` default: ``bootstrap`` (the alignment + reasoning chain from the base model) when
    ``bootstrap`` is set, else ``train.stage`` (``incremental``: from the champion). A chain
    stage's intermediate models go to ``<out>.stages/<name>``; only the last is ``out``.
    """
    from onerec_prod.train.stages import load_stage

    stage_name = stage or ("bootstrap" if bootstrap else cfg.train.stage)
    top = load_stage(stage_name)
    log.info("train dt=%s stage=%s config_hash=%s nproc=%d zero=%d", dt, stage_name, cfg.digest(),
             cfg.train.nproc * cfg.train.nnodes, cfg.train.zero_stage)
    out = Path(out_dir) if out_dir else candidates_dir(cfg, dt) / "sft"
    work_root = out.parent / f"_{out.name}_work"
    names = top.chain or [stage_name]
    previous = None
    for i, name in enumerate(names):
        last = i == len(names) - 1
        dst = out if last else out.parent / f"{out.name}.stages" / name
        previous = train_stage(cfg, dt, name, dst, work_root / name,
                               init_from=init_from if i == 0 else None, previous=previous,
                               samples_path=samples_path, force=force,
                               parent_version=parent_version if i == 0 else None)
    log.info("day %s stage %s -> %s", dt, stage_name, out)
    return out
