"""The stages of one day, each one idempotent function of ``(cfg, dt)``.

The Airflow DAG (``dags/onerec_daily.py``) calls :func:`run_stage` once per task; ``onerec-prod
run-day`` calls the same stages in DAG order in one process. Every stage reads only its inputs,
writes its outputs atomically, records a small JSON summary under ``<var>/runs/dt=D/<stage>.json``
(what the demo's summary table reads) and logs it to the day's MLflow run.

Stage order (see :data:`STAGES`): landing -> update_catalog -> ingest_events -> build_sequences ->
build_eval_snapshot -> build_samples -> train (bootstrap alignment or incremental SFT) ->
rl_refresh -> evaluate -> gate_register -> promote -> precompute.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from onerec_prod import storage
from onerec_prod.config import Config, load_config
from onerec_prod.log import log_context
from onerec_prod.spark_server import SPARK_STAGES  # the Spark jobs, in DAG order

log = logging.getLogger(__name__)

STAGES = (
    "landing",
    *SPARK_STAGES,
    "train",
    "rl_refresh",
    "evaluate",
    "gate_register",
    "promote",
    "precompute",
)


class StageError(RuntimeError):
    """A stage failed for a reason the operator can act on (the message says what and how)."""


# --------------------------------------------------------------------------------------
# run records


def runs_dir(cfg: Config, dt: str) -> Path | str:
    """``<paths.runs>/dt=D``: a local Path, or a URI when ``paths.runs_root`` is on an object store."""
    return storage.child(cfg.paths.runs, f"dt={dt}")


def write_record(cfg: Config, dt: str, stage: str, data: dict[str, Any]) -> Path | str:
    """Atomically write the stage's JSON summary (replaces the previous one on rerun)."""
    path = storage.child(runs_dir(cfg, dt), f"{stage}.json")
    storage.storage(cfg).write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str))
    return path


def read_record(cfg: Config, dt: str, stage: str) -> dict[str, Any] | None:
    try:
        return json.loads(storage.storage(cfg).read_text(storage.child(runs_dir(cfg, dt), f"{stage}.json")))
    except FileNotFoundError:
        return None


# --------------------------------------------------------------------------------------
# paths of a day's artefacts


def candidate_dir(cfg: Config, dt: str, kind: str = "sft") -> Path:
    return Path(cfg.paths.models) / "candidates" / f"dt={dt}" / kind


def final_candidate(cfg: Config, dt: str) -> Path:
    """The day's candidate: the RL-refreshed model if present, else the SFT model."""
    rl = candidate_dir(cfg, dt, "rl")
    return rl if (rl / "config.json").exists() else candidate_dir(cfg, dt, "sft")


def landing_missing(cfg: Config, dt: str) -> list[str]:
    """Day D's landing partitions without a valid completeness marker, with why ([] = landed)."""
    from onerec_prod.replay import landing_missing as missing

    return missing(cfg, dt)


def landing_ready(cfg: Config, dt: str) -> bool:
    """True when both landing partitions of day D carry their ``_SUCCESS`` marker (written last)."""
    return not landing_missing(cfg, dt)


# --------------------------------------------------------------------------------------
# stages


def stage_landing(cfg: Config, dt: str, **_: Any) -> dict[str, Any]:
    missing = landing_missing(cfg, dt)
    if missing:
        raise StageError(
            f"no landing data for dt={dt} (complete, with its _SUCCESS marker) under {cfg.paths.raw}/{{events,items}}/dt={dt}/ "
            f"({'; '.join(missing)}); run `onerec-prod replay --start {dt} --days 1` or wait for the log system"
        )
    st = storage.storage(cfg)
    files = [n for kind in ("events", "items")
             for n in st.listdir(storage.join(cfg.paths.raw, kind, f"dt={dt}")) if n.endswith(".jsonl")]
    return {"files": len(files)}


def _spark_stage(name: str, cfg: Config, dt: str) -> dict[str, Any]:
    """Run Spark job ``name``: on the shared local Spark server when there is one, else in this
    process's own session (:func:`onerec_prod.spark_server.run_on_spark`)."""
    from onerec_prod import spark_server

    return spark_server.run_on_spark(cfg, name, dt)


def stage_train(cfg: Config, dt: str, *, path: str | None = None, force: bool = False,
                **_: Any) -> dict[str, Any]:
    """Bootstrap alignment when no champion exists, else incremental SFT from the champion.

    A rerun of day D repeats its first attempt: the same path and the same parent version (from
    ``runs/dt=D/train.json``), not the current champion, which may be the day's own model by now.
    """
    from onerec_prod.train.day import train_day

    path = path or choose_training_path(cfg, dt)
    prev = read_record(cfg, dt, "train") or {}
    parent = ((prev.get("meta") or {}).get("parent") or {}) if prev.get("path") == path else {}
    pinned = parent.get("version") if parent.get("kind") == "champion" else None
    if pinned is not None:
        log.info("train dt=%s: a rerun; starting from version %s, the parent of the day's first attempt", dt, pinned)
    out = train_day(cfg, dt, bootstrap=(path == "bootstrap"), force=force, parent_version=pinned)
    meta = _read_meta(out)
    return {"path": path, "model_dir": str(out), "train_loss": meta.get("train_loss"), "meta": meta}


def choose_training_path(cfg: Config, dt: str | None = None) -> str:
    """``bootstrap`` (itemic alignment from scratch) when no champion exists, else ``incremental``.

    A rerun of day ``dt`` takes the path its first attempt took (``runs/dt=D/train.json``): a
    bootstrap day whose model became champion is bootstrapped again, not trained from itself.
    Reads the alias only: choosing the branch downloads no weights.
    """
    from onerec_prod.registry.registry import CHAMPION, aliases

    prev = read_record(cfg, dt, "train") if dt is not None else None
    if prev and prev.get("path") in ("bootstrap", "incremental"):
        return prev["path"]
    return "incremental" if aliases(cfg).get(CHAMPION) is not None else "bootstrap"


def stage_rl_refresh(cfg: Config, dt: str, *, force: bool = False, **_: Any) -> dict[str, Any]:
    from onerec_prod.train.grpo import rl_day

    return rl_day(cfg, dt, force=force)


def stage_evaluate(cfg: Config, dt: str, **_: Any) -> dict[str, Any]:
    """Score the candidate, the day's SFT model (when RL refreshed it) and the champion on the same
    events (the eval snapshots of the window through D, read once)."""
    from onerec_prod.eval.api import evaluate_models
    from onerec_prod.registry.registry import champion

    cand = final_candidate(cfg, dt)
    others: dict[str, Path] = {}
    sft = candidate_dir(cfg, dt, "sft")
    if cand != sft and (sft / "config.json").exists():
        others["sft"] = sft  # the RL refresh's effect on the same events: SFT model vs RL-refreshed model
    champ = champion(cfg)
    if champ is not None:
        others["champion"] = Path(champ[1])
    report = evaluate_models(cfg, dt, cand, others=others)
    if champ is not None:
        report["champion_version"] = champ[0]
    return report


def stage_gate_register(cfg: Config, dt: str, **_: Any) -> dict[str, Any]:
    from onerec_prod.registry.release import gate_and_register

    report = read_record(cfg, dt, "evaluate")
    if report is None:
        raise StageError(f"no evaluation record for dt={dt}: run the evaluate stage first")
    train = read_record(cfg, dt, "train") or {}
    cand = final_candidate(cfg, dt)
    lineage = {
        "dt": dt,
        "parent": (train.get("meta") or {}).get("parent"),
        "sid_version": (train.get("meta") or {}).get("sid_version"),
        "data_versions": _data_versions(cfg, dt),
        "config_hash": cfg.digest(),
    }
    from onerec_prod.registry.pyfunc import read_catalog

    # the catalog the day's model was trained against: the candidate is registered as a pyfunc model
    catalog = read_catalog(cfg, lineage["data_versions"].get("catalog"))
    return gate_and_register(cfg, dt, cand, report, lineage, catalog=catalog)


def stage_promote(cfg: Config, dt: str, *, is_backfill: bool = False, **_: Any) -> dict[str, Any]:
    from onerec_prod.registry.registry import promote

    gate = read_record(cfg, dt, "gate_register")
    if gate is None:
        raise StageError(f"no gate record for dt={dt}: run gate_register first")
    version = gate.get("version")
    # the same rule as `onerec-prod promote`: a dry_run/disabled gate records failures but does not block
    if not gate.get("passed_effective", gate.get("passed")):
        return {"promoted": False, "reason": "gate failed", "version": version,
                "failed_checks": [f"{c['metric']}:{c['kind']}" for c in (gate.get("gate") or {}).get("checks", [])
                                  if not c.get("passed")]}
    if is_backfill and not cfg.gate.backfill_moves_champion:
        return {"promoted": False, "reason": "backfill run and gate.backfill_moves_champion=false",
                "version": version}
    why = (f"daily gate passed dt={dt}" if gate.get("passed")
           else f"daily gate failed in mode {gate.get('mode')} (not blocking) dt={dt}")
    res = promote(cfg, version, actor="airflow:onerec_daily", reason=why)
    return {"promoted": True, "version": version, **{k: v for k, v in res.items() if k != "version"}}


def stage_precompute(cfg: Config, dt: str, **_: Any) -> dict[str, Any]:
    from onerec_prod.registry.registry import champion
    from onerec_prod.serving.precompute import precompute

    champ = champion(cfg)
    if champ is None:
        return {"skipped": "no champion"}
    version, model_dir = champ
    return precompute(cfg, dt, Path(model_dir), str(version))


def _read_meta(model_dir: Path) -> dict[str, Any]:
    p = Path(model_dir) / "onerec_meta.json"
    return json.loads(p.read_text()) if p.exists() else {}


def _data_versions(cfg: Config, dt: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for stage in SPARK_STAGES:
        rec = read_record(cfg, dt, stage) or {}
        for table, v in (rec.get("written_versions") or {}).items():
            out[table] = v
    return out


_STAGE_FUNCS = {
    "landing": stage_landing,
    "train": stage_train,
    "rl_refresh": stage_rl_refresh,
    "evaluate": stage_evaluate,
    "gate_register": stage_gate_register,
    "promote": stage_promote,
    "precompute": stage_precompute,
}


def run_stage(stage: str, dt: str, cfg: Config | None = None, *, run_tags: dict[str, Any] | None = None,
              **kwargs: Any) -> dict[str, Any]:
    """Run one stage for day ``dt``; returns (and records) its JSON summary.

    The stage's MLflow run opens before the stage starts and ends FAILED if it raises
    (``registry.tracking.stage_run``); ``run_tags`` (e.g. the Airflow run id) go on that run.

    Raises:
        StageError / ValueError: with a message naming the day, the stage and the fix.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r} (valid: {', '.join(STAGES)})")
    cfg = cfg or load_config()
    t0 = time.time()
    with log_context(dt=dt, stage=stage), _tracked(cfg, dt, stage, run_tags) as run:  # JSON logs: dt, stage
        log.info("stage %s dt=%s: start", stage, dt)
        if stage in SPARK_STAGES:
            record = _spark_stage(stage, cfg, dt)
        else:
            record = _STAGE_FUNCS[stage](cfg, dt, **kwargs)
        record = dict(record or {})
        record["seconds"] = round(time.time() - t0, 2)
        write_record(cfg, dt, stage, record)
        if run is not None:
            run.finish(record)
    log.info("stage %s dt=%s: done in %.1fs", stage, dt, record["seconds"])
    return record


def dispatch_stage(stage: str, dt: str, cfg: Config, **kwargs: Any) -> dict[str, Any]:
    """What an Airflow task of the local runtime calls: :func:`run_stage` inside the shared Spark
    server for a stage of ``spark.server_stages`` (when this task was started with one:
    ``$ONEREC_SPARK_SERVER``), else in this process. The stage's log streams into the task's log,
    and its error keeps its type. A server that is down, or lost mid-stage, is not an error: the
    stage then runs here (stages are idempotent), with a warning saying why."""
    from onerec_prod import spark_server

    url = os.environ.get(spark_server.ENV_URL)
    if url and cfg.spark.shared_session and stage in cfg.spark.server_stages:
        try:
            return spark_server.submit(url, cfg, spark_server.STAGE_PREFIX + stage, dt, kwargs=kwargs)
        except spark_server.SparkServerUnavailable as e:
            log.warning("stage %s dt=%s: %s; running it in this process instead", stage, dt, e)
    return run_stage(stage, dt, cfg, **kwargs)


def _tracked(cfg: Config, dt: str, stage: str, tags: dict[str, Any] | None):
    """The stage's MLflow run (a context manager), or a null context without MLflow."""
    import contextlib

    try:
        from onerec_prod.registry.tracking import stage_run
    except ImportError:  # registry module absent: local record only
        log.warning("MLflow tracking unavailable; kept the local record only")
        return contextlib.nullcontext()
    return stage_run(cfg, dt, stage, tags, last=(stage == STAGES[-1]))


def run_day(cfg: Config, dt: str, *, is_backfill: bool = False, stages: tuple[str, ...] = STAGES) -> dict:
    """All stages of one day in DAG order, in this process (no Airflow)."""
    out = {}
    for stage in stages:
        out[stage] = run_stage(stage, dt, cfg, is_backfill=is_backfill)
    return out


# --------------------------------------------------------------------------------------
# CLI: onerec-prod run-day


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--date", required=True, help="Day to run (YYYY-MM-DD).")
    p.add_argument("--stage", action="append", choices=STAGES, help="Only these stages (repeatable).")
    p.add_argument("--backfill", action="store_true", help="Treat as a backfilled day (promotion policy).")


def main(args: argparse.Namespace, cfg: Config) -> int:
    stages = tuple(args.stage) if args.stage else STAGES
    res = run_day(cfg, args.date, is_backfill=args.backfill, stages=stages)
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk in ("counts", "seconds", "passed", "promoted")}
                      for k, v in res.items()}, indent=2, default=str))
    return 0
