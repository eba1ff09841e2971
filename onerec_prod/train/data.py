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
from pathlib import Path
from typing import Any

from onerec_prod.config import Config

log = logging.getLogger(__name__)

ROW_FIELDS = ("sample_id", "task", "messages", "response", "sid_version", "dt", "loss_from")
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
    """Write day ``dt``'s training mix of ``tasks`` to JSONL; return its manifest.

    One implementation of the mix for the whole project:
    :func:`jobs.build_samples.export_training_mix` (the day's rows + with ``replay`` a seeded
    sample of the ``samples.replay_lookback_days`` days before, same sid_version, as
    :func:`onerec_prod.samples.mix.select_replay`), from one pinned Delta version recorded in the
    manifest as ``data_versions.samples``. The same inputs always give the same file.
    """
    from jobs.build_samples import export_training_mix
    from onerec_prod.spark import get_spark

    export_training_mix(spark or get_spark(cfg.spark), dt, cfg, out_path, tasks=list(tasks), replay=replay)
    return read_manifest(out_path)


# --------------------------------------------------------------------------------------
# trainer side


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def tokenize_rows(rows: Sequence[dict[str, Any]], tokenizer, max_length: int,
                  tasks: Sequence[str] | None = None) -> list[dict[str, list[int]]]:
    """``input_ids``/``labels`` per row (rows of other ``tasks`` are dropped).

    ``sid_stream`` rows render as the bare stream (loss on the codes of items >= ``loss_from``,
    windowed to ``max_length`` from the left, oldest items first out); every other task through
    the chat template (loss on the response).
    """
    from onerec_prod.samples.prompts import messages_from_json, render_training_ids
    from onerec_prod.samples.stream import STREAM_TASK, stream_training_ids

    out = []
    for r in rows:
        if tasks is not None and r["task"] not in tasks:
            continue
        if r["task"] == STREAM_TASK:
            ids, labels = stream_training_ids(tokenizer, r["response"], int(r.get("loss_from") or 1))
            if len(ids) > max_length:  # keep the newest items; cut at an item boundary
                begin = ids[0]
                cut = next((j for j in range(len(ids) - max_length, len(ids)) if ids[j] == begin), len(ids))
                ids, labels = ids[cut:], labels[cut:]
            out.append({"input_ids": ids, "labels": labels})
            continue
        msgs = r["messages"]
        msgs = messages_from_json(msgs) if isinstance(msgs, str) else msgs
        ids, labels = render_training_ids(tokenizer, msgs, r["response"], max_length)
        out.append({"input_ids": ids, "labels": labels})
    return out


class SftDataset:
    """Map-style dataset over sample rows, tokenized when a row is drawn (``Dataset`` protocol).

    Rows of other ``tasks`` are dropped up front; rendering happens in ``__getitem__``, so a run
    capped by ``max_steps`` tokenizes only the rows it trains on (not the whole day's export).
    """

    def __init__(self, rows: Sequence[dict[str, Any]], tokenizer, max_length: int,
                 tasks: Sequence[str] | None = None):
        self.rows = [r for r in rows if tasks is None or r["task"] in tasks]
        self.tokenizer, self.max_length = tokenizer, max_length

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return tokenize_rows([self.rows[i]], self.tokenizer, self.max_length)[0]


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
