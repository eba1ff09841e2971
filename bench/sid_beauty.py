"""SID codebooks on the full Beauty catalog vs the LETTER SIDs, by the same report code.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/sid_beauty.py [--cache var/bench/beauty_minilm.npy]

Embeds all 12,101 items (p5/items_p5_ids.jsonl: title + categories) with MiniLM on CPU, fits the
paper configuration (3 levels x 256 + collision 256, faiss k-means, 20 iterations, seed 42),
assigns every item, and prints our report next to LETTER's. It also replays the daily case: fit on
the items first seen before ``data.bootstrap_before`` (real timestamps), then assign the later
items incrementally from the frozen codebooks.
"""

from __future__ import annotations

import argparse
import calendar
import csv
import json
import logging
import time
from pathlib import Path

import numpy as np

from onerec_prod.config import SidCfg, load_config
from onerec_prod.sid.codebook import assign_sids, fit_codebook
from onerec_prod.sid.embed import embed_texts, item_text
from onerec_prod.sid.report import format_reports, letter_report, sid_report


def _first_seen(dataset: Path) -> dict[str, int]:
    first: dict[str, int] = {}
    with open(dataset / "timestamps" / "p5_interactions_with_time.csv") as f:
        for r in csv.DictReader(f):
            iid, ts = r["p5_item_id"], int(r["unix_ts"])
            first[iid] = min(ts, first.get(iid, ts))
    return first


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="Config file (dataset dir, bootstrap date).")
    p.add_argument("--cache", default=None, help="Load/save the embeddings here (.npy).")
    p.add_argument("--json", default=None, help="Also write the reports to this JSON file.")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config)
    sid_cfg = SidCfg(levels=3, codebook_size=256, collision_size=256, kmeans_iters=20, seed=42,
                     embed_batch_size=cfg.sid.embed_batch_size)
    dataset = cfg.paths.dataset
    items = [json.loads(line) for line in open(dataset / "p5" / "items_p5_ids.jsonl")]
    texts = [item_text(r) for r in items]
    print(f"items: {len(items)}; config: {sid_cfg.model_dump()}")

    t0 = time.perf_counter()
    if args.cache and Path(args.cache).exists():
        emb = np.load(args.cache)
        t_embed = float("nan")
    else:
        emb = embed_texts(texts, sid_cfg)
        t_embed = time.perf_counter() - t0
        if args.cache:
            Path(args.cache).parent.mkdir(parents=True, exist_ok=True)
            np.save(args.cache, emb)
    t1 = time.perf_counter()
    cb = fit_codebook(emb, sid_cfg)
    t_fit = time.perf_counter() - t1
    t2 = time.perf_counter()
    sids = assign_sids(cb, emb)
    t_assign = time.perf_counter() - t2
    embed_s = "cached" if t_embed != t_embed else f"{t_embed:.1f}s ({len(items) / t_embed:.0f} items/s)"
    print(f"embed {embed_s}, fit {t_fit:.1f}s, "
          f"assign {t_assign:.2f}s; sid_version {cb.version}")

    # daily case: bootstrap fit on items seen before bootstrap_before, then incremental
    first = _first_seen(dataset)
    cut = calendar.timegm(time.strptime(cfg.data.bootstrap_before, "%Y-%m-%d"))
    boot = np.array([first[r["p5_item_id"]] < cut for r in items])
    cb_boot = fit_codebook(emb[boot], sid_cfg)
    old = assign_sids(cb_boot, emb[boot])
    t3 = time.perf_counter()
    new = assign_sids(cb_boot, emb[~boot], existing=old)
    t_inc = time.perf_counter() - t3
    print(f"incremental: fit on {int(boot.sum())} items first seen before {cfg.data.bootstrap_before}, "
          f"then {int((~boot).sum())} new items assigned in {t_inc:.2f}s")

    sizes = cb.sizes
    reports = {
        "ours (full fit)": sid_report(sids, sizes),
        "ours (boot+incr)": sid_report(old + new, sizes),
        "LETTER": letter_report(dataset),
    }
    print(format_reports(reports, sid_cfg.levels))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "timings_s": {"embed": t_embed, "fit": t_fit, "assign": t_assign, "incremental": t_inc},
            "sid_version": cb.version, "reports": reports}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
