"""Fixed cost of a small day's Spark tasks: a JVM per task vs the shared Spark server.

    nice -n 19 .venv/bin/python bench/dataplane_fixed_cost.py [--work DIR] [--config configs/demo.yaml]

Replays the Beauty slice from 2014-02-24 (the tests' ``beauty_slice``): 02-24..28 as the bootstrap
day 2014-02-28, then the small day 2014-03-01 (a few hundred events, like one demo day). The
bootstrap day's Spark stages run once (one process, SIDs fitted). The var dir is then copied
twice and the day's five Spark stages run on each copy, each stage as its own Python process,
which is what a local Airflow task is:

* **per-task**: every process starts its own Spark session (the JVM, Delta's jars, a cold JIT);
* **shared**: ``onerec-prod spark-server`` is started once (its start-up is printed apart:
  ``airflow up`` pays it once, overlapped with Airflow's own start) and every process submits
  its job to it (``$ONEREC_SPARK_SERVER``), as the DAG's tasks do with ``spark.shared_session``.

Prints per-stage seconds (process wall time, and the stage's own ``seconds`` record) for both, and
checks that the two runs wrote the same counts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from onerec_prod.config import load_config  # noqa: E402
from onerec_prod.pipeline import SPARK_STAGES, read_record  # noqa: E402

BOOT, DAY, SLICE_FROM_TS = "2014-02-28", "2014-03-01", 1393200000
STAGE_CODE = ("import sys; from onerec_prod.log import setup_logging; setup_logging('WARNING'); "
              "from onerec_prod.config import load_config; from onerec_prod.pipeline import run_stage; "
              "run_stage(sys.argv[1], sys.argv[2], load_config())")


def _slice(work: Path, beauty: Path) -> Path:
    """The tests' Beauty slice (interactions from 2014-02-24 on, and their items)."""
    from onerec_prod.datasets import convert_beauty, load_dataset, write_dataset

    out = work / "beauty_slice"
    if (out / "items.jsonl").exists() or any(out.glob("*")):
        return out
    full = work / "beauty_full"
    convert_beauty(beauty, full)
    ds = load_dataset(full)
    rows = [(i.user_id, i.item_id, i.ts, i.event_type) for i in ds.interactions if i.ts >= SLICE_FROM_TS]
    used = {r[1] for r in rows}
    write_dataset(out, rows, [it for it in ds.items.values() if it.item_id in used])
    return out


def _env(config: str, root: Path, overrides: list[str]) -> dict[str, str]:
    from onerec_prod.airflow_local import overrides_env

    env = {k: v for k, v in os.environ.items() if not k.startswith("ONEREC")}
    env.update(overrides_env([f"paths.var_root={root}", *overrides]))
    env.update({"ONEREC_CONFIG": str(Path(config).resolve()), "PYTHONPATH": str(REPO),
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
                "TOKENIZERS_PARALLELISM": "false"})
    return env


def _run_stages(env: dict[str, str], dt: str) -> dict[str, float]:
    wall = {}
    for stage in SPARK_STAGES:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", STAGE_CODE, stage, dt], env=env, check=True, cwd=REPO)
        wall[stage] = time.perf_counter() - t0
    return wall


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=None, help="Work dir (default: a temp dir, removed after).")
    p.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"), help="Config (default demo).")
    p.add_argument("--port", type=int, default=28095, help="Port of the bench's Spark server.")
    args = p.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="bench-fixed-cost-") if args.work is None else None
    work = Path(tmp.name if tmp else args.work)
    work.mkdir(parents=True, exist_ok=True)
    # ~4k items: 256 codes per level leave most codes empty; 64 fit (as the backfill test does)
    base_over = ["sid.codebook_size=64", "sid.collision_size=64",
                 f"spark.server_port={args.port}", "spark.shared_session=true"]
    boot_root = work / "boot"
    cfg = load_config(args.config, [f"paths.var_root={boot_root}", *base_over], environ={})
    if not (boot_root / "runs" / f"dt={BOOT}" / "build_samples.json").exists():
        from onerec_prod.replay import replay

        ds = _slice(work, cfg.paths.dataset)
        replay(cfg, DAY, 1, dataset=ds, bootstrap_before=DAY)
        t0 = time.perf_counter()
        stages = [a for s in ("landing", *SPARK_STAGES) for a in ("--stage", s)]
        subprocess.run([sys.executable, "-m", "onerec_prod.cli", "--log-level", "WARNING", "run-day",
                        "--date", BOOT, *stages], env=_env(args.config, boot_root, base_over), check=True,
                       cwd=REPO, stdout=subprocess.DEVNULL)
        print(f"bootstrap day {BOOT}: Spark stages in one process {time.perf_counter() - t0:.0f}s")

    results = {}
    for mode in ("per-task", "shared"):
        root = work / mode
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(boot_root, root)
        env = _env(args.config, root, base_over)
        server = None
        if mode == "shared":
            from onerec_prod.spark_server import ENV_URL, server_url, wait_ready

            mcfg = load_config(args.config, [f"paths.var_root={root}", *base_over], environ={})
            t0 = time.perf_counter()
            server = subprocess.Popen([sys.executable, "-m", "onerec_prod.cli", "--log-level", "WARNING",
                                       "spark-server"], env=env, cwd=REPO, start_new_session=True)
            wait_ready(server_url(mcfg), 300, alive=lambda s=server: s.poll() is None)
            print(f"spark server start-up (once per `airflow up`): {time.perf_counter() - t0:.1f}s")
            env[ENV_URL] = server_url(mcfg)
        try:
            wall = _run_stages(env, DAY)
        finally:
            if server is not None:
                os.killpg(server.pid, signal.SIGTERM)
                server.wait(60)
        rcfg = load_config(args.config, [f"paths.var_root={root}", *base_over], environ={})
        recs = {s: read_record(rcfg, DAY, s) for s in SPARK_STAGES}
        results[mode] = {"wall": wall, "seconds": {s: recs[s]["seconds"] for s in SPARK_STAGES},
                         "counts": {s: recs[s]["counts"] for s in SPARK_STAGES},
                         "session": {s: (recs[s].get("extra") or {}).get("spark_session", "own") for s in SPARK_STAGES}}

    ev = results["per-task"]["counts"]["ingest_events"].get("events_written")
    print(f"\nday {DAY}: {ev} events; seconds per Spark task (process wall / stage record)")
    print(f"{'stage':<22}{'per-task':>18}{'shared':>18}")
    for s in SPARK_STAGES:
        a, b = results["per-task"], results["shared"]
        print(f"{s:<22}{a['wall'][s]:>9.1f} /{a['seconds'][s]:>6.1f}{b['wall'][s]:>9.1f} /{b['seconds'][s]:>6.1f}"
              f"  [{b['session'][s]}]")
    tot = {m: sum(r["wall"].values()) for m, r in results.items()}
    print(f"{'total':<22}{tot['per-task']:>9.1f}{'':>8}{tot['shared']:>9.1f}")
    print(f"speed-up of the day's Spark task time: {tot['per-task'] / tot['shared']:.2f}x")
    same = results["per-task"]["counts"] == results["shared"]["counts"]
    print(f"same counts in both modes: {same}")
    if not same:
        print(json.dumps({m: r["counts"] for m, r in results.items()}, indent=1))
    if tmp:
        tmp.cleanup()
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
