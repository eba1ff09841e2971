"""Sample rows as local JSONL for the trainer: one writer, and the day's training-mix export.

Why here: the trainer (``train.data.export_samples``) and the ``build_samples`` job's
``--export`` both need the day's mix; it is samples-library logic (which rows, which replay, in
which order), so it lives with the samples, below both ``train/`` and ``jobs/`` (``jobs/`` stays the
leaf of Spark entry points). :func:`write_sample_jsonl` is the only JSONL writer of sample rows:
the mix export, ``train.data.write_rows_jsonl`` (test fixtures, benches) and hence the tests all
go through it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from onerec_prod.config import Config
from onerec_prod.samples.builders import SFT_TASKS, TASKS
from onerec_prod.samples.mix import lookback_window, order_mix, rank_col, replay_count
from onerec_prod.util import atomic_open, atomic_write_json

log = logging.getLogger(__name__)

ROW_FIELDS = ("sample_id", "task", "messages", "response", "sid_version", "dt", "loss_from")
MIX_FIELDS = (*ROW_FIELDS, "replay")
REQUIRED_FIELDS = ("task", "messages", "response", "sid_version")


def write_sample_jsonl(
    rows: Iterable[Mapping[str, Any]], path: str | Path, extra_manifest: dict[str, Any] | None = None,
    *, fields: Sequence[str] = ROW_FIELDS, sort: bool = True,
) -> dict[str, Any]:
    """Write ``rows`` (their ``fields``) to ``path`` atomically, one JSON object a line; return the manifest.

    ``sort``: order by ``(dt, sample_id)``; False keeps the given order (the seeded mix order).
    The manifest, also written to ``<path>.manifest.json``, holds the row count, rows per task,
    the sid_versions and the file's sha256, plus ``extra_manifest``.

    Raises:
        ValueError: a row lacks one of ``REQUIRED_FIELDS`` (names the sample).
    """
    path = Path(path)
    clean = []
    for r in rows:
        missing = [k for k in REQUIRED_FIELDS if r.get(k) is None]
        if missing:
            raise ValueError(f"sample row {r.get('sample_id')!r} lacks {missing}")
        clean.append({k: r.get(k) for k in fields})
    if sort:
        clean.sort(key=lambda r: (str(r["dt"]), str(r["sample_id"])))
    h = hashlib.sha256()
    tasks: dict[str, int] = {}
    with atomic_open(path, "w", encoding="utf-8") as f:
        for r in clean:
            line = json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n"
            h.update(line.encode())
            f.write(line)
            tasks[r["task"]] = tasks.get(r["task"], 0) + 1
    manifest = {
        "path": str(path), "rows": len(clean), "tasks": dict(sorted(tasks.items())),
        "sid_versions": sorted({r["sid_version"] for r in clean}), "sha256": h.hexdigest(),
        **(extra_manifest or {}),
    }
    atomic_write_json(f"{path}.manifest.json", manifest)
    return manifest


# --------------------------------------------------------------------------------------
# the day's training mix (Spark)


def _check_tasks(tasks: Sequence[str] | None) -> list[str]:
    tasks = list(tasks or SFT_TASKS)
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown tasks {unknown} (valid: {', '.join(TASKS)})")
    return tasks


def _read_samples(spark, cfg: Config, dt: str):
    """(samples table at its latest version, that version); FileNotFoundError when absent."""
    from onerec_prod.lake import read_table, table_path, table_version

    path = table_path(cfg, "samples")
    version = table_version(spark, path)
    if version is None:
        raise FileNotFoundError(f"training mix: table 'samples' not found at {path}: "
                                f"run build_samples for dt={dt}")
    return read_table(spark, path, version), version


def _day_rows(df, dt: str, tasks: Sequence[str]) -> tuple[list[dict[str, Any]], str]:
    """Day ``dt``'s rows of ``tasks`` and their single sid_version."""
    from pyspark.sql import functions as F

    new = [r.asDict() for r in df.where(F.col("dt") == dt).collect()]
    if not new:
        raise FileNotFoundError(f"training mix: no samples of tasks {list(tasks)} for dt={dt}: "
                                "run build_samples first")
    versions = sorted({r["sid_version"] for r in new})
    if len(versions) != 1:
        raise ValueError(f"training mix: samples of dt={dt} mix sid_versions {versions}; rebuild the day")
    return new, versions[0]


def _replay_rows(df, *, dt: str, n_new: int, sid_version: str, samples_cfg, replay: bool):
    """(seeded replay rows, window): :func:`onerec_prod.samples.mix.select_replay` at table scale."""
    from pyspark.sql import functions as F

    c = samples_cfg
    start, end = lookback_window(dt, c.replay_lookback_days)
    if not (replay and c.replay_fraction > 0):
        return [], (start, end)
    window = df.where((F.col("dt") >= start) & (F.col("dt") < end) & (F.col("sid_version") == sid_version))
    n = replay_count(n_new, c.replay_fraction, window.count())
    if not n:
        return [], (start, end)
    picked = (window.withColumn("_k", rank_col(c.seed, dt, "replay", "sample_id"))
              .orderBy("_k").limit(n).drop("_k").collect())
    return [r.asDict() for r in picked], (start, end)


def export_training_mix(
    spark, dt: str, cfg: Config, out_path: str | Path, *, tasks: Sequence[str] | None = None,
    replay: bool = True,
) -> Path:
    """Write day ``dt``'s training mix as JSONL: the day's samples + a seeded replay sample.

    Replay: ``round(n_day * samples.replay_fraction)`` rows (at most what exists) from the
    ``samples.replay_lookback_days`` days before ``dt``, same tasks and sid_version, chosen by
    :func:`onerec_prod.samples.builders.rank_key` (``purpose="replay"``), as in
    :func:`onerec_prod.samples.mix.select_replay`. Rows are in the seeded mix order; fields
    ``sample_id, task, messages`` (JSON string, as in the table)``, response, sid_version, dt,
    loss_from`` plus ``replay`` (bool). Written by :func:`write_sample_jsonl`, whose manifest
    (``<out_path>.manifest.json``) here also records the day, new/replay counts, the Delta
    version read and the replay window.

    Args:
        tasks: tasks to export; default every SFT task (``builders.SFT_TASKS``).
        replay: False = the day's rows only (e.g. the bootstrap alignment stages).
    """
    from pyspark.sql import functions as F

    c = cfg.samples
    tasks = _check_tasks(tasks)
    df, version = _read_samples(spark, cfg, dt)
    df = df.where(F.col("task").isin(tasks)).select(*ROW_FIELDS)
    new, sid_version = _day_rows(df, dt, tasks)
    old, (start, end) = _replay_rows(df, dt=dt, n_new=len(new), sid_version=sid_version,
                                     samples_cfg=c, replay=replay)
    out = Path(out_path)
    write_sample_jsonl(order_mix(new, old, dt=dt, seed=c.seed), out, fields=MIX_FIELDS, sort=False,
                       extra_manifest={"dt": dt, "new_rows": len(new), "replay_rows": len(old),
                                       "data_versions": {"samples": version}, "replay_window": [start, end]})
    log.info("training mix dt=%s: %d rows (%d replayed from [%s, %s)) to %s",
             dt, len(new) + len(old), len(old), start, end, out)
    return out
