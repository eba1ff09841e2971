"""``onerec-prod demo``: the whole daily loop on the embedded default, through the real DAG.

1. replay Beauty as landing partitions: one bootstrap day (everything before ``--start``), then
   ``--days`` calendar days (new items arrive every day);
2. start a local Airflow (API server, DAG processor, scheduler) and run Airflow's own backfill of
   ``onerec_daily`` over those days, in date order, one run at a time: ingest -> catalog/SIDs ->
   sequences + eval snapshot -> samples -> SFT (bootstrap alignment on day one, then incremental
   from the champion) -> GRPO -> eval -> gate -> register/promote -> Think-Ahead precompute;
3. stop Airflow, start the online service on the champion, send one request;
4. print a per-day summary table and write a plot of it.

A rerun reuses everything already done (replay is byte-identical, Airflow skips successful runs).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from onerec_prod.config import REPO_ROOT, Config

log = logging.getLogger(__name__)
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"


def _days(first: str, n: int) -> list[str]:
    d0 = date.fromisoformat(first)
    return [(d0 + timedelta(days=i)).isoformat() for i in range(n)]


def _get(d: dict | None, *path: str, default: Any = None) -> Any:
    cur: Any = d or {}
    for p in path:
        if not isinstance(cur, dict) or p not in cur:
            return default
        cur = cur[p]
    return cur


def day_summary(cfg: Config, dt: str) -> dict[str, Any]:
    """One row of the summary table, read from the day's run records."""
    from onerec_prod.pipeline import read_record

    ingest = read_record(cfg, dt, "ingest_events")
    catalog = read_record(cfg, dt, "update_catalog")
    train = read_record(cfg, dt, "train")
    ev = read_record(cfg, dt, "evaluate")
    gate = read_record(cfg, dt, "gate_register")
    promo = read_record(cfg, dt, "promote")
    rl = read_record(cfg, dt, "rl_refresh")
    counts = _get(ingest, "counts", default={}) or {}
    ci = _get(ev, "intervals", "recall@10")
    paired = next((c for c in _get(gate, "gate", "checks", default=[]) or []
                   if c.get("kind") == "paired" and c.get("metric") == "recall@10"), None)
    return {
        "dt": dt,
        "events": counts.get("written", counts.get("events_written")),
        "quarantined": counts.get("quarantined"),
        "new_items": _get(catalog, "counts", "new_items"),
        "train_path": _get(train, "path"),
        "train_loss": _get(train, "train_loss"),
        "rl_hit_before": _get(rl, "before", "hit_rate"),
        "rl_hit_after": _get(rl, "after", "hit_rate"),
        "sft_r@10": _get(ev, "sft_metrics", "recall@10"),
        "eval_n": _get(ev, "n_users"),
        "recall@10": _get(ev, "metrics", "recall@10"),
        "r@10_95ci": None if not ci else f"[{ci['low']:.3f},{ci['high']:.3f}]",
        "ndcg@10": _get(ev, "metrics", "ndcg@10"),
        "bertscore": _get(ev, "metrics", "bertscore_f1"),
        "mostpop_r@10": _get(ev, "baselines", "mostpop", "recall@10"),
        "sasrec_r@10": _get(ev, "baselines", "sasrec", "recall@10"),
        "champ_r@10": _get(ev, "champion_metrics", "recall@10"),
        "vs_champ": None if paired is None or paired.get("value") is None else (
            f"{paired['value']:+.3f}[{paired['low']:+.3f},{paired['high']:+.3f}]"),
        "gate": None if gate is None else ("pass" if gate.get("passed_effective", gate.get("passed")) else "FAIL"),
        "champion": _get(promo, "version") if _get(promo, "promoted") else None,
    }


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no days)"
    cols = list(rows[0])
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(out)


TASK_ORDER = ("landing", "update_catalog", "ingest_events", "build_sequences", "build_eval_snapshot",
              "build_samples", "choose_training_path", "bootstrap_alignment", "incremental_sft", "rl_refresh",
              "evaluate", "gate_register", "promote", "precompute")
SPARK_TASKS = ("update_catalog", "ingest_events", "build_sequences", "build_eval_snapshot", "build_samples")


def task_seconds_rows(durations: dict[str, dict[str, float]], days: list[str]) -> list[dict[str, Any]]:
    """One row per day: Airflow's seconds per task (DAG order; a skipped branch is left out), the
    Spark tasks' sum and the day's total task time."""
    present = [t for t in TASK_ORDER if any(t in durations.get(d, {}) for d in days)]
    present += sorted({t for d in days for t in durations.get(d, {})} - set(present))
    rows = []
    for d in days:
        got = durations.get(d, {})
        row: dict[str, Any] = {"dt": d, **{t: got.get(t) for t in present}}
        row["spark_total"] = round(sum(got.get(t, 0.0) for t in SPARK_TASKS), 1) if got else None
        row["total"] = round(sum(got.values()), 1) if got else None
        rows.append(row)
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    days = [r["dt"] for r in rows]
    xs = list(range(len(days)))  # positions, labelled with the dates below
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for key, label in (("recall@10", "OneRec (ours) R@10"), ("mostpop_r@10", "MostPop R@10"),
                       ("sasrec_r@10", "SASRec R@10")):
        axes[0].plot(xs, [r.get(key) or 0 for r in rows], marker="o", label=label)
    axes[0].set_title("Recall@10 on each day's frozen snapshot")
    axes[0].legend(fontsize=7)
    axes[1].plot(xs, [r.get("train_loss") or 0 for r in rows], marker="o", color="tab:red")
    axes[1].set_title("train loss")
    # the bootstrap day holds years of events: log scale, so the daily counts stay visible
    axes[2].bar([x - 0.2 for x in xs], [r.get("events") or 0 for r in rows], width=0.4, label="events")
    axes[2].bar([x + 0.2 for x in xs], [r.get("quarantined") or 0 for r in rows], width=0.4,
                label="quarantined")
    axes[2].set_yscale("log")
    axes[2].set_title("events / quarantined (log scale)")
    axes[2].legend(fontsize=7)
    for ax in axes:
        ax.set_xticks(xs, days)
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def serve_one_request(cfg: Config, user_id: str | None) -> dict[str, Any]:
    """Start the online service on the champion (a free loopback port), send one request, stop it."""
    import httpx

    from onerec_prod.serving.service import background_server, create_app

    with background_server(create_app(cfg)) as base:
        t0 = time.time()
        while True:  # /healthz answers 503 until the champion and its export are loaded
            try:
                if httpx.get(f"{base}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() - t0 > 300:
                raise RuntimeError(f"service at {base} not ready after 300s")
            time.sleep(1)
        body = {"user_id": user_id or "unknown-user", "k": min(5, cfg.serving.top_n)}
        resp = httpx.post(f"{base}/recommend", json=body, timeout=120)
        return {"request": body, "status": resp.status_code, "response": resp.json(), "url": base}


def _a_recent_user(cfg: Config, dt: str) -> str | None:
    from onerec_prod.lake import read_table, table_path
    from onerec_prod.spark import get_spark

    spark = get_spark(cfg.spark)
    rows = (read_table(spark, table_path(cfg, "events")).where(f"dt = '{dt}'")
            .orderBy("user_id").select("user_id").limit(1).collect())
    return rows[0]["user_id"] if rows else None


def lake_row_counts(cfg: Config, dts: list[str]) -> dict[tuple[str, str], int]:
    """``{(table, dt): rows}`` of events, events_quarantine and items_quarantine: what the
    tables hold, counted in Delta (the run records only say what the jobs believed they wrote)."""
    from pyspark.sql import functions as F

    from onerec_prod.lake import read_table, table_exists, table_path
    from onerec_prod.spark import get_spark

    spark = get_spark(cfg.spark)
    out: dict[tuple[str, str], int] = {}
    for table in ("events", "events_quarantine", "items_quarantine"):
        path = table_path(cfg, table)
        counts = ({} if not table_exists(spark, path) else
                  {r["dt"]: r["count"] for r in read_table(spark, path).where(F.col("dt").isin(dts))
                   .groupBy("dt").count().collect()})
        out |= {(table, dt): int(counts.get(dt, 0)) for dt in dts}
    return out


def fault_check(cfg: Config, partitions: list[dict[str, Any]],
                rows: dict[tuple[str, str], int] | None = None) -> dict[str, Any]:
    """Injected bad lines vs what the jobs quarantined, and good lines vs rows written, over the
    replayed days: the demo's "nothing lost on a bad day" line.

    With ``rows`` (:func:`lake_row_counts`) the written and quarantined counts are the tables'
    rows, and the run records must agree with them (``records_agree``).
    """
    from onerec_prod.pipeline import read_record

    out = dict.fromkeys(("event_faults", "item_faults", "events_quarantined", "items_quarantined",
                         "good_events", "events_written"), 0)
    for p in partitions:
        ingest = _get(read_record(cfg, p["dt"], "ingest_events"), "counts", default={}) or {}
        catalog = _get(read_record(cfg, p["dt"], "update_catalog"), "counts", default={}) or {}
        out["event_faults"] += p.get("event_faults", 0)
        out["item_faults"] += p.get("item_faults", 0)
        out["good_events"] += p["events"]
        out["events_quarantined"] += ingest.get("quarantined", 0)
        out["items_quarantined"] += catalog.get("quarantined", 0)
        out["events_written"] += ingest.get("events_written", 0)
    if rows is not None:
        recorded = (out["events_written"], out["events_quarantined"], out["items_quarantined"])
        dts = [p["dt"] for p in partitions]
        out["events_written"] = sum(rows.get(("events", d), 0) for d in dts)
        out["events_quarantined"] = sum(rows.get(("events_quarantine", d), 0) for d in dts)
        out["items_quarantined"] = sum(rows.get(("items_quarantine", d), 0) for d in dts)
        out["counted_in"] = "delta"
        out["records_agree"] = recorded == (out["events_written"], out["events_quarantined"],
                                            out["items_quarantined"])
    out["nothing_lost"] = (out.get("records_agree", True)
                           and out["events_quarantined"] == out["event_faults"]
                           and out["items_quarantined"] == out["item_faults"]
                           and out["events_written"] == out["good_events"])
    return out


def run_demo(cfg: Config, config_path: str, start: str, days: int, *, fresh: bool = False,
             faults: str | None = None) -> dict[str, Any]:
    from onerec_prod import airflow_local
    from onerec_prod.replay import FaultSpec, replay

    t_all = time.time()
    if fresh:
        import shutil

        airflow_local.down(cfg)
        shutil.rmtree(cfg.paths.var, ignore_errors=True)
    boot = (date.fromisoformat(start) - timedelta(days=1)).isoformat()
    daily = _days(start, days)
    log.info("demo: replay bootstrap day %s + %d days %s..%s", boot, days, daily[0], daily[-1])
    spec = cfg.data.replay_faults if faults is None else faults
    replayed = replay(cfg, start, days, faults=FaultSpec.parse(spec) if spec else None)
    extra = {
        "ONEREC__AIRFLOW__START_DATE": boot,
        "ONEREC__AIRFLOW__END_DATE": daily[-1],
        "ONEREC__PATHS__VAR_ROOT": str(cfg.paths.var),
    }
    t0 = time.time()
    with airflow_local.running(cfg, config_path, extra) as env:
        runs = airflow_local.backfill(cfg, env, boot, daily[-1])
    backfill_s = time.time() - t0
    states = {str(r.get("logical_date"))[:10]: r.get("state") for r in runs}
    failed = [d for d, s in states.items() if s != "success"]
    if failed:
        tail = airflow_local.failed_task_logs(cfg)
        raise RuntimeError(f"backfill runs not successful: {states}\n{tail}")
    rows = [day_summary(cfg, d) for d in [boot, *daily]]
    task_rows = task_seconds_rows(airflow_local.task_durations(cfg), [boot, *daily])
    from onerec_prod.registry.registry import status

    reg = status(cfg)
    request = serve_one_request(cfg, _a_recent_user(cfg, daily[-1]))
    png = plot(rows, cfg.paths.var / "demo_summary.png")
    summary = {"rows": rows, "task_seconds": task_rows, "runs": states, "registry": reg, "request": request,
               "faults": fault_check(cfg, replayed["partitions"],
                                     lake_row_counts(cfg, [p["dt"] for p in replayed["partitions"]])),
               "plot": str(png), "backfill_seconds": round(backfill_s, 1),
               "total_seconds": round(time.time() - t_all, 1)}
    (cfg.paths.var / "demo_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--start", default=None, help="First daily partition (default data.replay_start).")
    p.add_argument("--days", type=int, default=None, help="Days after the bootstrap day (default data.replay_days).")
    p.add_argument("--fresh", action="store_true", help="Delete the demo's var dir first.")
    p.add_argument("--faults", default=None, metavar="SPEC",
                   help="Bad lines injected into each replayed day, as `replay --faults` "
                   "(default data.replay_faults; '' = a clean replay).")


def main(args: argparse.Namespace, cfg: Config) -> int:
    config_path = args.config or os.environ.get("ONEREC_CONFIG") or str(DEMO_CONFIG)
    if args.config is None and not os.environ.get("ONEREC_CONFIG"):
        from onerec_prod.config import load_config

        cfg = load_config(DEMO_CONFIG, args.set)
    start = args.start or cfg.data.replay_start
    days = args.days or cfg.data.replay_days
    s = run_demo(cfg, config_path, start, days, fresh=args.fresh, faults=args.faults)
    print("\nonerec-prod demo: per-day summary (each day evaluated on its own frozen snapshot)\n")
    print(format_table(s["rows"]))
    print("\nseconds per Airflow task and day (task start to end, from Airflow's metadata DB)\n")
    print(format_table(s["task_seconds"]))
    f = s["faults"]
    print(f"\nreplay injected {f['event_faults']} bad event lines and {f['item_faults']} bad item lines; "
          f"quarantined with a reason: {f['events_quarantined']} events, {f['items_quarantined']} item "
          f"lines; good events {f['good_events']}, written {f['events_written']} -> "
          + ("nothing lost" if f["nothing_lost"] else "MISMATCH (see the quarantine tables)"))
    reg = s["registry"]
    print(f"\nregistry: champion={_get(reg, 'champion', 'version', default=_get(reg, 'champion'))} "
          f"previous={_get(reg, 'previous', 'version', default=_get(reg, 'previous'))}")
    req = s["request"]
    resp = req["response"]
    print(f"\nPOST /recommend {json.dumps(req['request'])} -> {req['status']} "
          f"path={resp.get('path')} model_version={resp.get('model_version')}")
    for it in resp.get("items", [])[:5]:
        print(f"   {it.get('item_id'):>12}  score={_fmt(it.get('score'))}  sid={it.get('sid')}")
    print(f"\nplot: {s['plot']}\nbackfill {s['backfill_seconds']}s, demo total {s['total_seconds']}s")
    return 0
