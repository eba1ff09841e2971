"""Training data: export the day's sample mix to a local JSONL file, tokenize, pad and collate.

The driver (``train_day``) reads the Delta ``samples`` table once with Spark and writes a JSONL
file plus a manifest (row counts, Delta version, sid_version); the training processes only read
that file, so they never start Spark. Rows are rendered with
:func:`onerec_prod.samples.prompts.render_training_ids` (loss on the response only).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from onerec_prod.config import Config

log = logging.getLogger(__name__)

ROW_FIELDS = ("sample_id", "task", "messages", "response", "sid_version", "dt")
IGNORE_INDEX = -100


# --------------------------------------------------------------------------------------
# driver side


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_rows_jsonl(rows: Iterable[dict[str, Any]], path: str | Path,
                     extra_manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``rows`` (sorted by dt, sample_id) to ``path`` atomically; return the manifest.

    The manifest (also written to ``<path>.manifest.json``) holds row counts per task, the set of
    sid_versions and the file's sha256.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = []
    for r in rows:
        missing = [k for k in ("task", "messages", "response", "sid_version") if r.get(k) is None]
        if missing:
            raise ValueError(f"sample row {r.get('sample_id')!r} lacks {missing}")
        clean.append({k: r.get(k) for k in ROW_FIELDS})
    clean.sort(key=lambda r: (str(r["dt"]), str(r["sample_id"])))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        for r in clean:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
    os.replace(tmp, path)
    tasks: dict[str, int] = {}
    for r in clean:
        tasks[r["task"]] = tasks.get(r["task"], 0) + 1
    manifest = {
        "path": str(path),
        "rows": len(clean),
        "tasks": dict(sorted(tasks.items())),
        "sid_versions": sorted({r["sid_version"] for r in clean}),
        "sha256": _file_sha256(path),
        **(extra_manifest or {}),
    }
    Path(f"{path}.manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Manifest of a JSONL written by :func:`write_rows_jsonl` (built on the fly if absent)."""
    p = Path(f"{path}.manifest.json")
    if p.exists():
        return json.loads(p.read_text())
    rows = read_jsonl(path)
    tasks: dict[str, int] = {}
    for r in rows:
        tasks[r["task"]] = tasks.get(r["task"], 0) + 1
    return {"path": str(path), "rows": len(rows), "tasks": tasks,
            "sid_versions": sorted({r.get("sid_version") for r in rows if r.get("sid_version")}),
            "sha256": _file_sha256(Path(path)), "data_versions": {}}


def export_samples(cfg: Config, dt: str, tasks: Sequence[str], out_path: str | Path, *,
                   replay: bool, spark=None) -> dict[str, Any]:
    """Write day ``dt``'s samples of ``tasks`` (+ a replay sample of earlier days) to JSONL.

    Replay: ``samples.replay_fraction`` x (day rows) rows from the ``samples.replay_lookback_days``
    days before ``dt`` with the same sid_version, chosen by a seeded stable hash of sample_id
    (the same inputs always give the same file). Reads one pinned Delta version, recorded in the
    manifest as ``data_versions.samples``.
    """
    from pyspark.sql import functions as F

    from onerec_prod.lake import read_table, table_path, table_version
    from onerec_prod.spark import get_spark

    spark = spark or get_spark(cfg.spark)
    path = table_path(cfg, "samples")
    version = table_version(spark, path)
    if version is None:
        raise FileNotFoundError(f"samples table not found at {path}: run the samples job for dt={dt}")
    df = read_table(spark, path, version).filter(F.col("task").isin(list(tasks)))
    cols = list(ROW_FIELDS)
    day = df.filter(F.col("dt") == dt).select(*cols)
    rows = [r.asDict() for r in day.collect()]
    n_replay = 0
    sid_versions = sorted({r["sid_version"] for r in rows})
    if replay and rows and len(sid_versions) == 1 and cfg.samples.replay_fraction > 0:
        lo = (date.fromisoformat(dt) - timedelta(days=cfg.samples.replay_lookback_days)).isoformat()
        want = int(round(len(rows) * cfg.samples.replay_fraction))
        key = F.sha2(F.concat(F.lit(f"{cfg.samples.seed}:"), F.col("sample_id")), 256)
        old = (df.filter((F.col("dt") < dt) & (F.col("dt") >= lo)
                         & (F.col("sid_version") == sid_versions[0]))
               .select(*cols).withColumn("_k", key).orderBy("_k").limit(want).drop("_k"))
        extra = [r.asDict() for r in old.collect()]
        n_replay = len(extra)
        rows.extend(extra)
    manifest = write_rows_jsonl(rows, out_path, {
        "dt": dt, "new_rows": len(rows) - n_replay, "replay_rows": n_replay,
        "data_versions": {"samples": version},
    })
    log.info("exported %d samples for dt=%s (%d replayed) from samples v%s to %s",
             manifest["rows"], dt, n_replay, version, out_path)
    return manifest


# --------------------------------------------------------------------------------------
# trainer side


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def tokenize_rows(rows: Sequence[dict[str, Any]], tokenizer, max_length: int,
                  tasks: Sequence[str] | None = None) -> list[dict[str, list[int]]]:
    """``input_ids``/``labels`` per row (rows of other ``tasks`` are dropped)."""
    from onerec_prod.samples.prompts import messages_from_json, render_training_ids

    out = []
    for r in rows:
        if tasks is not None and r["task"] not in tasks:
            continue
        msgs = r["messages"]
        msgs = messages_from_json(msgs) if isinstance(msgs, str) else msgs
        ids, labels = render_training_ids(tokenizer, msgs, r["response"], max_length)
        out.append({"input_ids": ids, "labels": labels})
    return out


class SftDataset:
    """Map-style dataset of pre-tokenized rows (``torch.utils.data.Dataset`` protocol)."""

    def __init__(self, items: list[dict[str, list[int]]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.items[i]


class PadCollator:
    """Right-pad a batch: ``input_ids`` with ``pad_id``, ``labels`` with -100, attention mask.

    Counts the real (non-pad) tokens it has collated in ``tokens_seen`` (for tokens/s).
    """

    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None):
        self.pad_id = pad_id
        self.multiple = pad_to_multiple_of
        self.tokens_seen = 0

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        n = max(len(b["input_ids"]) for b in batch)
        if self.multiple:
            n = -(-n // self.multiple) * self.multiple
        ids = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.tensor(b["input_ids"], dtype=torch.long)
            labels[i, :k] = torch.tensor(b["labels"], dtype=torch.long)
            mask[i, :k] = 1
            self.tokens_seen += k
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
