"""Data plane throughput: Beauty replayed through ingest + sequences, Spark+Delta vs plain Python.

    .venv/bin/python bench/dataplane.py [--days 5 | --days all] [--start 2014-01-01] [--work DIR]

Replays Beauty (bootstrap partition of everything before --start, then --days daily partitions)
into a fresh landing zone. It then runs the same transformation twice in the same process:

* **Spark** (local[2], Delta): per day update_catalog (no SIDs), ingest_events, build_sequences;
* **plain Python** (one process, the research-script way): per day parse + validate every line
  (the same schema validator), context checks with in-memory sets, histories in a dict, examples
  written as JSONL; the same functions the tests use as the reference (``reference_ingest``,
  ``reference_sequences``).

It checks that both produce the same number of events, quarantined lines and examples. It prints
events/s for ingest + sequences (the catalog step is timed apart), the Spark/Python ratio, and the
peak memory: max RSS of this Python process and of the JVM (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from jobs.build_sequences import reference_sequences
from jobs.ingest_events import reference_ingest
from onerec_prod.config import load_config
from onerec_prod.replay import replay
from onerec_prod.schemas import load_schema, validate_fields
from onerec_prod.util import atomic_open

LAST_DAY = "2014-07-23"


def _lines(raw: Path, kind: str, dt: str) -> list[tuple[str, int, str]]:
    out = []
    for f in sorted((raw / kind / f"dt={dt}").glob("*.jsonl")):
        rel = f"{kind}/dt={dt}/{f.name}"
        out += [(rel, no, line) for no, line in enumerate(f.read_text().split("\n")[:-1], 1)]
    return out


def plain_python(raw: Path, days: list[str], cfg, out_dir: Path) -> dict:
    """The whole pipeline in one process; returns counts and seconds (catalog apart)."""
    items_schema = load_schema("raw_items")
    known: set[str] = set()
    earlier: set[str] = set()
    prior: dict[str, list[str]] = defaultdict(list)
    counts = {"events": 0, "quarantined": 0, "examples": 0}
    t_cat = t_main = 0.0
    per_day = []
    h = cfg.data.history_len
    for dt in days:
        t0 = time.perf_counter()
        for _, _, line in _lines(raw, "items", dt):
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if validate_fields(items_schema, row) is None:
                known.add(row["item_id"])
        t1 = time.perf_counter()
        good, bad = reference_ingest(_lines(raw, "events", dt), dt, cfg.data.max_future_skew_s, known, earlier)
        earlier.update(e["event_id"] for e in good)
        examples, _ = reference_sequences(prior, good, h, dt)
        for e in sorted(good, key=lambda e: (e["ts"], e["source_file"], e["seq"])):
            hist = prior[e["user_id"]]
            hist.append(e["item_id"])
            if len(hist) > 2 * h:
                del hist[:-h]
        with atomic_open(out_dir / f"examples-{dt}.jsonl") as f:
            for ex in examples:
                f.write(json.dumps(ex, sort_keys=True) + "\n")
        t2 = time.perf_counter()
        t_cat += t1 - t0
        t_main += t2 - t1
        per_day.append(t2 - t1)
        counts["events"] += len(good)
        counts["quarantined"] += len(bad)
        counts["examples"] += len(examples)
    return {**counts, "catalog_s": t_cat, "main_s": t_main, "per_day": per_day}


def spark_pipeline(spark, days: list[str], cfg) -> dict:
    from jobs import build_sequences, ingest_events, update_catalog

    counts = {"events": 0, "quarantined": 0, "examples": 0}
    t_cat = t_main = 0.0
    per_day = []
    for dt in days:
        t0 = time.perf_counter()
        update_catalog.run(spark, dt, cfg, assign_sids=False)
        t1 = time.perf_counter()
        ing = ingest_events.run(spark, dt, cfg)
        seq = build_sequences.run(spark, dt, cfg)
        t2 = time.perf_counter()
        t_cat += t1 - t0
        t_main += t2 - t1
        per_day.append(t2 - t1)
        counts["events"] += ing.counts["events_written"]
        counts["quarantined"] += ing.counts["quarantined"]
        counts["examples"] += seq.counts["examples_written"]
        logging.getLogger("bench").info("%s: %d events, %.1fs", dt, ing.counts["events_written"], t2 - t0)
    return {**counts, "catalog_s": t_cat, "main_s": t_main, "per_day": per_day}


def _vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--days", default="5", help="Daily partitions after --start, or 'all' (to 2014-07-23).")
    p.add_argument("--start", default="2014-01-01", help="First daily partition (bootstrap = all before).")
    p.add_argument("--work", default=None, help="Work dir (default: a temp dir, removed after).")
    p.add_argument("--config", default=None, help="Config file (default configs/local.yaml).")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    from datetime import date

    n_days = ((date.fromisoformat(LAST_DAY) - date.fromisoformat(args.start)).days + 1
              if args.days == "all" else int(args.days))
    work_ctx = tempfile.TemporaryDirectory(prefix="bench-dataplane-") if args.work is None else None
    work = Path(work_ctx.name if work_ctx else args.work)
    base = load_config(args.config)
    cfg = load_config(args.config, [f"paths.var_root={work}", f"paths.dataset_dir={base.paths.dataset}"])

    t0 = time.perf_counter()
    summary = replay(cfg, args.start, n_days, bootstrap_before=args.start)
    t_replay = time.perf_counter() - t0
    days = [x["dt"] for x in summary["partitions"]]
    n_events = sum(x["events"] for x in summary["partitions"])
    print(f"replay: {len(days)} partitions ({days[0]} bootstrap .. {days[-1]}), {n_events} events, "
          f"{t_replay:.1f}s")

    out_py = work / "plain"
    out_py.mkdir(parents=True, exist_ok=True)
    py = plain_python(Path(cfg.paths.raw), days, cfg, out_py)
    py_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    from onerec_prod.spark import get_spark

    t0 = time.perf_counter()
    spark = get_spark(cfg.spark)
    t_start = time.perf_counter() - t0
    sp = spark_pipeline(spark, days, cfg)
    jvm_pid = int(spark.sparkContext._jvm.java.lang.ProcessHandle.current().pid())
    jvm_hwm = _vm_hwm_mb(jvm_pid)
    total_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    spark.stop()

    same = all(py[k] == sp[k] for k in ("events", "quarantined", "examples"))
    py_eps, sp_eps = py["events"] / py["main_s"], sp["events"] / sp["main_s"]
    print(f"{'':<14}{'events':>9}{'examples':>10}{'ingest+seq s':>14}{'events/s':>11}{'catalog s':>11}")
    for name, r, eps in (("plain python", py, py_eps), ("spark+delta", sp, sp_eps)):
        print(f"{name:<14}{r['events']:>9}{r['examples']:>10}{r['main_s']:>14.1f}{eps:>11.0f}"
              f"{r['catalog_s']:>11.1f}")
    if len(days) > 1:
        import statistics

        daily_events = n_events - summary["partitions"][0]["events"]
        print(f"bootstrap partition ({summary['partitions'][0]['events']} events): spark "
              f"{sp['per_day'][0]:.1f}s, python {py['per_day'][0]:.2f}s; daily partitions "
              f"({daily_events / (len(days) - 1):.0f} events/day): spark median "
              f"{statistics.median(sp['per_day'][1:]):.1f}s/day, python median "
              f"{statistics.median(py['per_day'][1:]) * 1000:.0f} ms/day")
    print(f"same output counts: {same}; spark session start {t_start:.1f}s (not counted)")
    print(f"ratio spark/python events/s: {sp_eps / py_eps:.3f} (python is {py_eps / sp_eps:.1f}x faster "
          f"on {len(days)} partitions, {sp['main_s'] / len(days):.1f}s of Spark per day)")
    print(f"peak memory: python process {total_rss:.0f} MB (plain-python phase {py_rss:.0f} MB), "
          f"JVM {jvm_hwm:.0f} MB, python+JVM {total_rss + jvm_hwm:.0f} MB")
    if work_ctx:
        work_ctx.cleanup()
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
