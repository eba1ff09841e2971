"""The eval report: one JSON document per (model, snapshot), written atomically, printable as a table.

Report keys (stable; the gate and the DAG read ``metrics``)::

    {"dt", "model_dir", "sid_version", "n_users", "think",
     "metrics": {"recall@5", "ndcg@5", "recall@10", "ndcg@10", "bertscore_f1"},
     "baselines": {"mostpop": {...}, "sasrec": {...}},
     "bertscore": {...details}, "counts": {...}, "data_versions": {...}, "timing": {...},
     "config": {...eval config}, "examples": [...]}
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

PAPER_TABLE = {
    # Beauty, leave-one-out (OneRec-Think paper, Table 2): R@5, R@10, N@5, N@10
    "OneRec-Think (paper)": {"recall@5": 0.0563, "recall@10": 0.0791, "ndcg@5": 0.0398, "ndcg@10": 0.0471},
    "TIGER (paper)": {"recall@5": 0.0454, "recall@10": 0.0648, "ndcg@5": 0.0321, "ndcg@10": 0.0384},
}
TABLE_COLUMNS = ("recall@5", "recall@10", "ndcg@5", "ndcg@10")


def report_path(artifacts_root: str | Path, dt: str, tag: str) -> Path:
    """``<artifacts>/eval/dt=D/report-<tag>.json`` (tag: e.g. the first 12 hex of the weights hash)."""
    return Path(artifacts_root) / "eval" / f"dt={dt}" / f"report-{tag}.json"


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    """Write ``report`` as JSON to ``path`` atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
    return path


def format_table(rows: dict[str, dict[str, Any]], columns=TABLE_COLUMNS) -> str:
    """Fixed-width table: one row per name, one column per metric (missing values: '-')."""
    width = max([len(n) for n in rows] + [10])
    lines = [f"{'':{width}}  " + "  ".join(f"{c:>9}" for c in columns)]
    for name, vals in rows.items():
        cells = []
        for c in columns:
            v = vals.get(c)
            cells.append(f"{v:9.4f}" if isinstance(v, (int, float)) else f"{'-':>9}")
        lines.append(f"{name:{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def format_report(report: dict[str, Any], with_paper: bool = False) -> str:
    """The model's metrics next to the baselines' (and the paper's numbers if asked)."""
    rows = {"model": report.get("metrics", {})}
    rows.update({name: vals for name, vals in report.get("baselines", {}).items()})
    if with_paper:
        rows.update(PAPER_TABLE)
    head = f"eval dt={report.get('dt')} users={report.get('n_users')} think={report.get('think')}"
    bs = report.get("metrics", {}).get("bertscore_f1")
    tail = f"bertscore_f1={bs:.4f}" if isinstance(bs, float) else "bertscore_f1=-"
    return f"{head}\n{format_table(rows)}\n{tail}"
