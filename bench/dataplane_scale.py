"""Data plane at scale: synthetic days of 100k / 1M / 10M events through the Spark jobs.

    nice -n 19 .venv/bin/python bench/dataplane_scale.py [--sizes 100k,1m] [--items 1000000]
        [--bad-share 0.001] [--work DIR] [--python-max 1m] [--no-samples]

For each size, in a fresh lake: a synthetic catalog of ``--items`` items with SIDs
(:func:`onerec_prod.synth.catalog_frame`), then two synthetic days of that size
(:func:`onerec_prod.synth.write_day`: Zipf users and items, ``--bad-share`` bad lines):

* day 1 (``2014-03-01``): ingest_events + build_sequences, so day 2 has yesterday's histories;
* day 2 (``2014-03-02``), measured: ingest_events -> build_sequences -> build_eval_snapshot ->
  build_samples, each its own timing, on one local[2] session (``spark.master``).

Per step it prints seconds, events/s per core (day-2 events / seconds / cores), the CPU seconds of
the JVM, its Python workers and the driver together with events per CPU second (on a shared
machine the wall clock measures the neighbours; the CPU seconds measure the step), the JVM's peak
heap (sampled) and its old generation after GC (the live data: in local mode the driver and the
executors are this one JVM), the peak RSS of the Python driver and of the Python workers, and the
shuffle read/write and input bytes of the step's Spark stages (from the Spark UI's REST API), which
say whether the step is shuffle-bound. Between sizes it prints the time ratio per 10x events
(1.0 = linear). The plain-Python reference (the tests' ``reference_*`` functions, one process,
everything in dicts) runs the same steps in a child process for sizes up to ``--python-max``
(its peak RSS is measured; above that size it is not run and the estimate is printed).
``--report WORK/dataplane_scale.json`` prints the table of a saved run again.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from onerec_prod import synth  # noqa: E402
from onerec_prod.config import load_config  # noqa: E402

D1, D2 = "2014-03-01", "2014-03-02"
STEPS = ("ingest_events", "build_sequences", "build_eval_snapshot", "build_samples")
MB = 1024 * 1024


def parse_size(s: str) -> int:
    s = s.strip().lower()
    mult = {"k": 1_000, "m": 1_000_000}.get(s[-1], 1)
    return int(float(s[:-1] if s[-1] in "km" else s) * mult)


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Sampler(threading.Thread):
    """Every 0.5 s: JVM heap used, JVM old gen after the last GC, RSS of JVM / driver / workers."""

    def __init__(self, spark) -> None:
        super().__init__(daemon=True)
        import psutil

        self.psutil = psutil
        jvm = spark.sparkContext._jvm
        self.mf = jvm.java.lang.management.ManagementFactory
        self.jvm_pid = int(jvm.java.lang.ProcessHandle.current().pid())
        self.stop_ev = threading.Event()
        self.reset()

    def reset(self) -> None:
        self.peak = {"heap_mb": 0.0, "old_after_gc_mb": 0.0, "jvm_rss_mb": 0.0, "driver_py_rss_mb": 0.0,
                     "workers_py_rss_mb": 0.0}

    def sample(self) -> None:
        heap = self.mf.getMemoryMXBean().getHeapMemoryUsage().getUsed() / MB
        old = 0.0
        for pool in self.mf.getMemoryPoolMXBeans():
            if "Old" in pool.getName() or "Tenured" in pool.getName():
                cu = pool.getCollectionUsage()
                if cu is not None:
                    old = max(old, cu.getUsed() / MB)
        workers = 0.0
        try:
            for c in self.psutil.Process(self.jvm_pid).children(recursive=True):
                workers += c.memory_info().rss / MB
        except self.psutil.Error:
            pass
        now = {"heap_mb": heap, "old_after_gc_mb": old, "jvm_rss_mb": _rss_mb(self.jvm_pid),
               "driver_py_rss_mb": _rss_mb(os.getpid()), "workers_py_rss_mb": workers}
        for k, v in now.items():
            self.peak[k] = max(self.peak[k], v)

    def cpu_s(self) -> float:
        """CPU seconds (user + system) used so far by the JVM, every process under it (the Python
        workers; exited ones through their parent's children times) and this Python driver. On a
        shared machine this, not the wall clock, says what a step costs."""
        total = time.process_time()
        try:
            jvm = self.psutil.Process(self.jvm_pid)
            for proc in [jvm, *jvm.children(recursive=True)]:
                try:
                    t = proc.cpu_times()
                    total += t.user + t.system + t.children_user + t.children_system
                except self.psutil.Error:
                    pass
        except self.psutil.Error:
            pass
        return total

    def run(self) -> None:
        while not self.stop_ev.wait(0.5):
            try:
                self.sample()
            except Exception:  # noqa: BLE001 (py4j during shutdown)
                return


def _stages(ui: str, app: str) -> dict[int, dict]:
    with urllib.request.urlopen(f"{ui}/api/v1/applications/{app}/stages?status=complete", timeout=30) as r:
        return {s["stageId"] * 1000 + s.get("attemptId", 0): s for s in json.loads(r.read())}


def spark_size(spark, sampler: Sampler, cfg, n: int) -> dict:
    """Day 1 (history), then the measured steps of day 2; per-step figures."""
    from jobs import build_eval_snapshot, build_samples, build_sequences, ingest_events

    sc = spark.sparkContext
    ui, app = sc.uiWebUrl, sc.applicationId
    t0 = time.perf_counter()
    ingest_events.run(spark, D1, cfg)
    build_sequences.run(spark, D1, cfg)
    day1_s = time.perf_counter() - t0
    logging.getLogger("bench").warning("n=%d day 1 (ingest + sequences) in %.0fs", n, day1_s)
    runs = {"ingest_events": lambda: ingest_events.run(spark, D2, cfg),
            "build_sequences": lambda: build_sequences.run(spark, D2, cfg),
            "build_eval_snapshot": lambda: build_eval_snapshot.run(spark, D2, cfg),
            "build_samples": lambda: build_samples.run(spark, D2, cfg)}
    out = {"day1_s": day1_s, "steps": {}}
    for step in STEPS:
        if step not in cfg_steps:
            continue
        before = set(_stages(ui, app))
        spark.sparkContext._jvm.System.gc()
        time.sleep(1)
        sampler.reset()
        sampler.sample()
        t, c = time.perf_counter(), sampler.cpu_s()
        try:
            res = runs[step]()
        except Exception as e:  # noqa: BLE001 (reported; the later steps need this one)
            logging.getLogger("bench").exception("n=%d %s failed", n, step)
            out["steps"][step] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
            break
        secs, cpu = time.perf_counter() - t, sampler.cpu_s() - c
        sampler.sample()
        time.sleep(1.5)  # the UI's store catches up with the last stage
        new = [s for k, s in _stages(ui, app).items() if k not in before]
        run_ms = sum(s.get("executorRunTime", 0) for s in new)
        shuffle_ms = sum(s.get("executorRunTime", 0) for s in new
                         if s.get("shuffleReadBytes", 0) or s.get("shuffleWriteBytes", 0))
        out["steps"][step] = {
            "s": secs, "cpu_s": cpu, "counts": res.counts, **{k: round(v) for k, v in sampler.peak.items()},
            "input_mb": sum(s.get("inputBytes", 0) for s in new) / MB,
            "shuffle_read_mb": sum(s.get("shuffleReadBytes", 0) for s in new) / MB,
            "shuffle_write_mb": sum(s.get("shuffleWriteBytes", 0) for s in new) / MB,
            "spill_mb": sum(s.get("diskBytesSpilled", 0) for s in new) / MB,
            "stages": len(new), "task_time_in_shuffle_stages": shuffle_ms / run_ms if run_ms else 0.0,
        }
        # the whole row, so a size that does not finish still leaves its finished steps in the log
        logging.getLogger("bench").warning("n=%d %s: %.1fs %s", n, step, secs, json.dumps(out["steps"][step]))
    return out


cfg_steps: set[str] = set(STEPS)


# --------------------------------------------------------------------------------------
# plain-Python reference (child process: its own peak RSS)


def python_reference(raw: Path, n_items: int, history_len: int, eval_fraction: float, salt: str,
                     skew: int, samples_cfg=None) -> dict:
    """The same steps in one process with the tests' reference functions; seconds per step."""
    from jobs.build_eval_snapshot import eval_user_selected
    from jobs.build_sequences import reference_sequences
    from jobs.ingest_events import reference_ingest

    def lines(dt):
        out = []
        for f in sorted((raw / "events" / f"dt={dt}").glob("*.jsonl")):
            rel = f"events/dt={dt}/{f.name}"
            with open(f) as fh:
                out += [(rel, no, line.rstrip("\n")) for no, line in enumerate(fh, 1)]
        return out

    known = {synth.item_id(k) for k in range(n_items)}
    good1, _ = reference_ingest(lines(D1), D1, skew, known, set())
    prior: dict[str, list[str]] = {}
    for e in sorted(good1, key=lambda e: (e["ts"], e["source_file"], e["seq"])):
        prior.setdefault(e["user_id"], []).append(e["item_id"])
    earlier = {e["event_id"] for e in good1}
    del good1
    res = {}
    t, c = time.perf_counter(), time.process_time()
    good, bad = reference_ingest(lines(D2), D2, skew, known, earlier)
    res["ingest_events"] = time.perf_counter() - t
    res["ingest_events_cpu"] = time.process_time() - c
    t, c = time.perf_counter(), time.process_time()
    examples, _ = reference_sequences(prior, good, history_len, D2)
    res["build_sequences"] = time.perf_counter() - t
    res["build_sequences_cpu"] = time.process_time() - c
    t, c = time.perf_counter(), time.process_time()
    order = {e["event_id"]: (e["ts"], e["source_file"], e["seq"]) for e in good}
    last: dict[str, dict] = {}
    for ex in examples:
        if eval_user_selected(ex["user_id"], eval_fraction, salt):
            cur = last.get(ex["user_id"])
            if cur is None or order[ex["event_id"]] > order[cur["event_id"]]:
                last[ex["user_id"]] = ex
    snap = [ex for ex in last.values() if ex["history"]]
    res["build_eval_snapshot"] = time.perf_counter() - t
    res["build_eval_snapshot_cpu"] = time.process_time() - c
    if samples_cfg is not None:
        from onerec_prod.samples import builders

        t, c = time.perf_counter(), time.process_time()
        held = {ex["event_id"] for ex in snap}
        eval_ts = {ex["user_id"]: ex["ts"] for ex in snap}
        kept = [ex for ex in examples if ex["event_id"] not in held
                and not (ex["user_id"] in eval_ts and ex["ts"] > eval_ts[ex["user_id"]])]
        ids = {i for ex in kept for i in ex["history"]} | {ex["target_item_id"] for ex in kept}
        items = {}
        for iid in ids:
            k = int(iid[1:])
            items[iid] = {"item_id": iid, "title": f"Synthetic product {k}, shade {k % 37}",
                          "categories": f"Beauty > Dept {k % 12} > Aisle {k % 97}",
                          "description": f"A synthetic item ({k}) for scale tests of the data plane.",
                          "sid": tuple((k // 256 ** i) % 256 for i in range(4))}
        from onerec_prod.samples.rationale import make_rationale_source

        rows = builders.build_day_samples(kept, items, dt=D2, sid_version="synth-v1", samples_cfg=samples_cfg,
                                          caption_items=[], general_items=[],
                                          rationale_source=make_rationale_source("category", samples_cfg))
        res["build_samples"] = time.perf_counter() - t
        res["build_samples_cpu"] = time.process_time() - c
        res["samples"] = len(rows)
    res.update(events=len(good), quarantined=len(bad), examples=len(examples), eval=len(snap),
               peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return res


# --------------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100k,1m", help="Events per day, comma separated (e.g. 100k,1m,10m).")
    p.add_argument("--items", default="1m", help="Catalog size (default 1m).")
    p.add_argument("--bad-share", type=float, default=0.001, help="Share of bad lines (default 0.001).")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--work", default=None, help="Work dir (default: a temp dir, removed after).")
    p.add_argument("--config", default=None, help="Config (default configs/local.yaml).")
    p.add_argument("--python-max", default="1m", help="Largest size the plain-Python reference runs at.")
    p.add_argument("--python-samples-max", default="100k",
                   help="Largest size the plain-Python reference also builds samples at.")
    p.add_argument("--no-samples", action="store_true", help="Skip build_samples (Spark and Python).")
    p.add_argument("--python-ref", nargs=2, metavar=("RAW", "SAMPLES"), help=argparse.SUPPRESS)
    p.add_argument("--cores", type=int, default=None, help="Cores of the saved run (--report; default 2).")
    p.add_argument("--report", metavar="JSON", help="Only print the table of a saved dataplane_scale.json.")
    args = p.parse_args()
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        _report({int(k): v for k, v in saved.items()}, 2 if args.cores is None else args.cores,
                parse_size(args.python_max))
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    base = load_config(args.config)
    n_items = parse_size(args.items)
    if args.python_ref:  # child mode
        res = python_reference(Path(args.python_ref[0]), n_items, base.data.history_len,
                               base.data.eval_user_fraction, base.data.eval_salt, base.data.max_future_skew_s,
                               base.samples if args.python_ref[1] == "1" else None)
        print("PYREF " + json.dumps(res))
        return 0
    if args.no_samples:
        cfg_steps.discard("build_samples")
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    tmp = tempfile.TemporaryDirectory(prefix="bench-scale-") if args.work is None else None
    work = Path(tmp.name if tmp else args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)

    from onerec_prod.config import SparkCfg
    from onerec_prod.lake import table_path
    from onerec_prod.spark import get_spark

    sp = base.spark
    spark_cfg = SparkCfg(**{**sp.model_dump(), "ui_enabled": True,
                            "extra_conf": {**sp.extra_conf, "spark.ui.retainedStages": "5000",
                                           "spark.ui.retainedJobs": "5000"}})
    t0 = time.perf_counter()
    spark = get_spark(spark_cfg)
    # local[N]: N task slots; spark.default.parallelism is set to the shuffle partitions, not cores
    m = re.fullmatch(r"local\[(\d+)\]", sp.master)
    cores = int(m.group(1)) if m else (os.cpu_count() if sp.master.startswith("local") else
                                       int(spark.sparkContext.defaultParallelism))
    print(f"spark {spark.version} master={sp.master} ({cores} cores) driver_memory={sp.driver_memory} "
          f"shuffle_partitions={sp.shuffle_partitions}; session start {time.perf_counter() - t0:.0f}s")
    sampler = Sampler(spark)
    sampler.start()

    cat_dir = work / "catalog_template"
    if not (cat_dir / "_delta_log").exists():
        t0 = time.perf_counter()
        synth.catalog_frame(spark, n_items, "2014-02-28").write.format("delta").mode("overwrite").save(str(cat_dir))
        print(f"catalog: {n_items} items with SIDs written in {time.perf_counter() - t0:.0f}s")

    results = {}
    for n in sizes:
        root = work / f"n{n}"
        raw = root / "raw"
        cfg = load_config(args.config, [f"paths.var_root={root}", f"paths.raw_root={raw}",
                                        f"spark.master={sp.master}"])
        if not (raw / "events" / f"dt={D2}" / "_synth.json").exists():
            t0 = time.perf_counter()
            for dt in (D1, D2):
                m = synth.write_day(raw, dt, n, n_items=n_items, seed=args.seed, bad_share=args.bad_share,
                                    files=max(2, min(16, n // 250_000)))
            print(f"n={n}: two landing days written in {time.perf_counter() - t0:.0f}s "
                  f"({m['bytes'] / MB:.0f} MB/day, {m['bad_total']} bad lines/day)")
        shutil.rmtree(root / "lake", ignore_errors=True)
        (root / "lake").mkdir(parents=True)
        shutil.copytree(cat_dir, table_path(cfg, "catalog"))
        from jobs import day_record  # the copied catalog stands for both days' update_catalog runs

        for dt in (D1, D2):
            day_record.write(cfg, "update_catalog", dt, {"catalog": {"version": 0}})
        results[n] = spark_size(spark, sampler, cfg, n)
        results[n]["manifest"] = json.loads((raw / "events" / f"dt={D2}" / "_synth.json").read_text())
        if n <= parse_size(args.python_max):
            with_samples = "1" if (n <= parse_size(args.python_samples_max) and not args.no_samples) else "0"
            cmd = [sys.executable, __file__, "--items", args.items, "--python-ref", str(raw), with_samples]
            if args.config:
                cmd += ["--config", args.config]
            t0 = time.perf_counter()
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("PYREF ")), None)
            results[n]["python"] = json.loads(line[6:]) if line else {"error": out.stderr[-2000:]}
            print(f"n={n}: plain-Python reference in {time.perf_counter() - t0:.0f}s (child process)")
        if tmp is None and os.environ.get("BENCH_SCALE_KEEP") != "1":
            shutil.rmtree(root / "lake", ignore_errors=True)
        if n != sizes[-1]:  # figures so far, in case a larger size does not finish
            _report(results, cores, parse_size(args.python_max))
        (work / "dataplane_scale.json").write_text(json.dumps(results, indent=1, default=str))
    sampler.stop_ev.set()
    _report(results, cores, parse_size(args.python_max))
    spark.stop()
    if tmp:
        tmp.cleanup()
    return 0


def _report(results: dict, cores: int, python_max: int | None = None) -> None:
    """The table: wall seconds and events/s per core (wall x cores), CPU seconds (all processes of
    the session) and events per CPU second, memory peaks, Spark stage I/O; then the plain-Python
    reference, and the scaling between sizes (wall and CPU)."""
    print("\nday 2 of each size (day 1 already in the lake); events = good events of day 2; "
          "ev/cpu-s = events per CPU second of the JVM + Python workers + driver")
    hdr = (f"{'events':>9} {'step':<20}{'s':>8}{'ev/s/core':>11}{'cpu s':>8}{'ev/cpu-s':>10}{'heap':>7}"
           f"{'old/gc':>7}{'jvmRSS':>7}{'drvPy':>7}{'wrkPy':>7}{'in MB':>8}{'shufR':>8}{'shufW':>8}"
           f"{'spill':>7}{'shuf%t':>7}")
    print(hdr)
    for n, r in results.items():
        ev = ((r["steps"].get("ingest_events") or {}).get("counts") or {}).get("events_written", n)
        for step, s in r["steps"].items():
            if "error" in s:
                print(f"{n:>9} {step:<20} FAILED: {s['error'][:200]}")
                continue
            cpu = s.get("cpu_s") or float("nan")
            print(f"{n:>9} {step:<20}{s['s']:>8.1f}{ev / s['s'] / cores:>11.0f}{cpu:>8.1f}{ev / cpu:>10.0f}"
                  f"{s['heap_mb']:>7}{s['old_after_gc_mb']:>7}{s['jvm_rss_mb']:>7}{s['driver_py_rss_mb']:>7}"
                  f"{s['workers_py_rss_mb']:>7}{s['input_mb']:>8.0f}{s['shuffle_read_mb']:>8.0f}"
                  f"{s['shuffle_write_mb']:>8.0f}{s.get('spill_mb', 0):>7.0f}"
                  f"{s['task_time_in_shuffle_stages']:>7.0%}")
        done = [s for s in r["steps"].values() if "s" in s]
        tot = sum(s["s"] for s in done)
        tot_cpu = sum(s.get("cpu_s") or 0.0 for s in done)
        if tot:
            print(f"{n:>9} {'total':<20}{tot:>8.1f}{ev / tot / cores:>11.0f}{tot_cpu:>8.1f}"
                  f"{ev / tot_cpu if tot_cpu else 0:>10.0f}   (day 1, ingest+sequences: {r['day1_s']:.0f}s)")
        py = r.get("python")
        if py and "error" not in py:
            common = [k for k in STEPS if k in py and k in r["steps"] and "s" in r["steps"][k]]
            py_t = sum(py[k] for k in common)
            py_c = sum(py.get(f"{k}_cpu", py[k]) for k in common)
            sp_t = sum(r["steps"][k]["s"] for k in common)
            sp_c = sum(r["steps"][k].get("cpu_s") or 0.0 for k in common)
            same = (py["events"] == ev and py["examples"]
                    == r["steps"].get("build_sequences", {}).get("counts", {}).get("examples_written"))
            print(f"{n:>9} plain Python ({', '.join(common)}): {py_t:.1f}s wall, {py_c:.1f} cpu-s = "
                  f"{py['events'] / py_t:.0f} ev/s on 1 core, {py['events'] / py_c:.0f} ev/cpu-s, peak RSS "
                  f"{py['peak_rss_mb']:.0f} MB; same counts: {same}")
            print(f"{n:>9} Spark/Python: per core (wall) {(ev / sp_t / cores) / (py['events'] / py_t):.2f}x, "
                  f"per CPU second {(ev / sp_c) / (py['events'] / py_c) if sp_c else 0:.2f}x; per step (cpu): "
                  + ", ".join(f"{k} {py.get(f'{k}_cpu', py[k]) / r['steps'][k]['cpu_s']:.2f}x" for k in common
                              if r["steps"][k].get("cpu_s")))
        elif py:
            print(f"{n:>9} plain Python failed: {py['error'][-300:]}")
        else:
            ran = [(m, q["python"]) for m, q in results.items() if "peak_rss_mb" in q.get("python", {})]
            est = (f"; estimated peak RSS {max(ran)[1]['peak_rss_mb'] * n / max(ran)[0]:.0f} MB (linear from "
                   f"{max(ran)[0]} events)") if ran else ""
            print(f"{n:>9} plain Python not run (size > --python-max {python_max}){est}")
    ns = sorted(results)
    for a, b in zip(ns, ns[1:]):
        ra, rb = results[a], results[b]
        both = [k for k in rb["steps"] if "s" in rb["steps"][k] and "s" in ra["steps"].get(k, {})]
        for key, label in (("s", "wall"), ("cpu_s", "cpu")):
            ta = sum(ra["steps"][k].get(key) or 0.0 for k in both)
            tb = sum(rb["steps"][k].get(key) or 0.0 for k in both)
            if not ta:
                continue
            print(f"scaling {a} -> {b} events ({b / a:.0f}x), {label}: " + ", ".join(
                f"{k} {(rb['steps'][k].get(key) or 0) / ra['steps'][k][key]:.1f}x" for k in both
                if ra["steps"][k].get(key)) + f"; total {tb / ta:.1f}x")


if __name__ == "__main__":
    sys.exit(main())
