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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from onerec_prod.config import Config
from onerec_prod.samples.export import ROW_FIELDS  # noqa: F401  (the one writer, re-exported)
from onerec_prod.samples.export import write_sample_jsonl as write_rows_jsonl  # noqa: F401

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


# --------------------------------------------------------------------------------------
# driver side


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    :func:`onerec_prod.samples.export.export_training_mix` (the day's rows + with ``replay`` a seeded
    sample of the ``samples.replay_lookback_days`` days before, same sid_version, as
    :func:`onerec_prod.samples.mix.select_replay`), from one pinned Delta version recorded in the
    manifest as ``data_versions.samples``. The same inputs always give the same file.
    """
    kwargs = {"out_path": str(Path(out_path).resolve()), "tasks": list(tasks), "replay": replay}
    if spark is not None:
        return export_mix_on(spark, cfg, dt, **kwargs)
    from onerec_prod.spark_server import run_on_spark

    # on the shared local Spark server when there is one (it writes the file), else in this process
    return run_on_spark(cfg, "export_training_mix", dt, **kwargs)


def export_mix_on(spark, cfg: Config, dt: str, *, out_path: str, tasks: Sequence[str],
                  replay: bool) -> dict[str, Any]:
    """:func:`export_samples` in ``spark``'s process (a ``spark_server.SPARK_CALLS`` entry)."""
    from onerec_prod.samples.export import export_training_mix

    export_training_mix(spark, dt, cfg, out_path, tasks=list(tasks), replay=replay)
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
