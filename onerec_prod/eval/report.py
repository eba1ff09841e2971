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


def _model_intervals(report: dict[str, Any], metric: str) -> dict[str, dict[str, float]]:
    """``{model: {mean, low, high}}`` of ``metric`` for every model and baseline of ``report``
    (all scored on the same events)."""
    out = {"candidate": (report.get("intervals") or {}).get(metric)}
    for name in ("sft", "champion"):
        out[name] = (report.get(f"{name}_intervals") or {}).get(metric)
    for name, b in (report.get("baselines") or {}).items():
        out[name] = (b.get("intervals") or {}).get(metric)
    return {k: v for k, v in out.items() if v}


def plot_report(report: dict[str, Any], path: str | Path) -> Path:
    """The day's eval as a figure (logged to MLflow with the gate): left, R@10 and N@10 of every model
    on the same events with their 95% bootstrap intervals; right, R@10 per eval day of the pooled
    window for the candidate and the champion, each point labelled with its number of events."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = max((report.get("config") or {}).get("ks") or [10])
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 3.8))
    for j, metric in enumerate((f"recall@{k}", f"ndcg@{k}")):
        iv = _model_intervals(report, metric)
        xs = [i + (j - 0.5) * 0.38 for i in range(len(iv))]
        means = [v["mean"] for v in iv.values()]
        err = [[m - v["low"] for m, v in zip(means, iv.values(), strict=True)],
               [v["high"] - m for m, v in zip(means, iv.values(), strict=True)]]
        left.bar(xs, means, width=0.36, yerr=err, capsize=3, label=metric.replace("recall", "R").replace("ndcg", "N"))
        left.set_xticks(range(len(iv)), list(iv))
    left.set_title(f"dt={report.get('dt')}: {report.get('n_users')} events, 95% intervals")
    left.legend(fontsize=8)
    for name, key in (("candidate", "per_day"), ("champion", "champion_per_day")):
        days = report.get(key) or {}
        if not days:
            continue
        ds = sorted(days)
        m = [days[d][f"recall@{k}"] for d in ds]
        right.errorbar(ds, [v["mean"] for v in m], yerr=[[v["mean"] - v["low"] for v in m],
                                                          [v["high"] - v["mean"] for v in m]],
                       marker="o", capsize=3, label=name)
        if name == "candidate":
            for d, v in zip(ds, m, strict=True):
                right.annotate(f"n={v['n']}", (d, v["high"]), fontsize=7, ha="center", va="bottom")
    right.set_title(f"R@{k} per eval day of the window")
    right.tick_params(axis="x", labelrotation=30, labelsize=7)
    if right.get_legend_handles_labels()[0]:  # a report without per-day splits draws no lines
        right.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
