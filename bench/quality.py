"""Quality bench on any dataset in the plain format: our SID-stream model vs MostPop and SASRec.

    .venv/bin/python bench/quality.py --dataset ../shared/data/beauty \\
        [--config configs/bench/quality_cpu.yaml] [--work var/bench/quality] [--models ours,sasrec,mostpop] \\
        [--max-users N] [--val-users 3000] [--beam 10] [--exclude-history] [--train-minutes 40] \\
        [--sasrec-grid "dim=64,256;dropout=0.2,0.5"] [--json OUT] [--set group.key=value ...]

Protocol (leave-one-out, as TIGER / OneRec-Think on Beauty): each user's sequence (oldest first,
its last 50 items) is split into training items ``s[:-2]``, the validation item ``s[-2]``
(history ``s[:-2]``) and the test item ``s[-1]`` (history ``s[:-1]``, <= 49 items). The
validation item never enters training: it only selects epochs (early stopping, best checkpoint)
and the SASRec setting. Every model ranks the whole catalog: ours by a constrained beam over the
trie of every catalog SID (``--beam`` wide, the top 10 kept), SASRec by a full dot-product ranking
over every catalog item (items unseen in training included), MostPop by training counts. All
test users by default. Metrics: Recall/NDCG@5/10 with 95% bootstrap intervals over users, and
the paired difference ours - SASRec on the same users. ``--exclude-history`` adds rows where
items of the user's history are removed from the candidates (reported separately, never mixed
into the paper-protocol row).

Our model: the embedded Qwen3-architecture LM (``model`` config group) over SID streams
(:mod:`onerec_prod.samples.stream`: one row per user, loss on the codes of every item after the
first), fit in process by :func:`onerec_prod.train.stream_fit.fit_stream` with validation R@10 on
a seeded sample of ``--val-users`` users after every epoch. SIDs: the pipeline's SID service
(MiniLM text embeddings + residual k-means), cached in the work dir so a rerun skips MiniLM.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from _common import add_dataset_args, add_threads_arg, start

from onerec_prod.config import Config, load_config

log = logging.getLogger("bench.quality")
HISTORY_CAP = 50
PUBLISHED = {  # Beauty (S3-Rec/P5 split), leave-one-out: R@10 / N@10 (and R@5 / N@5 where reported)
    "OneRec-Think (paper, pretrained 1.7B)": {"recall@5": .0563, "recall@10": .0791, "ndcg@5": .0398, "ndcg@10": .0471},
    "TIGER (paper)": {"recall@5": .0454, "recall@10": .0648, "ndcg@5": .0321, "ndcg@10": .0384},
    "ActionPiece (paper)": {"recall@10": .0775, "ndcg@10": .0424},
    "SASRec+SS 256 neg (eSASRec benchmark)": {"recall@10": .0921, "ndcg@10": .0531},
}


# --------------------------------------------------------------------------------------
# data


def load_sequences(dataset: str, work: Path) -> tuple[dict[str, dict], list[tuple[str, list[str]]], str]:
    """Items ``{item_id: {item_id, title, categories, description}}``, per-user sequences (last
    ``HISTORY_CAP`` items, oldest first) and a fingerprint of the data."""
    from onerec_prod.datasets import load_dataset, resolve_dataset

    path = resolve_dataset(dataset, work)
    ds = load_dataset(path)
    items = {i: {"item_id": i, "title": it.title, "categories": it.categories, "description": it.description}
             for i, it in ds.items.items()}
    by_user: dict[str, list[tuple[int, str]]] = {}
    for r in ds.interactions:
        by_user.setdefault(r.user_id, []).append((r.position, r.item_id))
    seqs = [(u, [i for _, i in sorted(rows)][-HISTORY_CAP:]) for u, rows in by_user.items()]
    h = hashlib.sha256()
    for u, s in seqs:
        h.update((u + "\x1f" + "\x1f".join(s) + "\n").encode())
    return items, seqs, h.hexdigest()[:16]


def split(seqs):
    train, val, test = [], [], []
    for u, s in seqs:
        if len(s) < 3:
            continue
        train.append(s[:-2])
        val.append({"user_id": u, "history": s[:-2], "target": s[-2]})
        test.append({"user_id": u, "history": s[:-1], "target": s[-1]})
    return train, val, test


def sample_users(rows: list[dict], n: int | None, seed: int) -> list[dict]:
    if n is None or n >= len(rows):
        return rows
    return random.Random(seed).sample(rows, n)


def service_sids(cfg: Config, items: dict, work: Path, data_key: str):
    key = hashlib.sha256(json.dumps([cfg.sid.model_dump(), data_key], sort_keys=True).encode()).hexdigest()[:12]
    cache = work / f"sids-{key}.json"
    if cache.exists():
        blob = json.loads(cache.read_text())
        return {k: tuple(v) for k, v in blob["sids"].items()}, blob["sid_version"], 0.0
    from onerec_prod.sid.service import ensure_sids

    t0 = time.perf_counter()
    rows = [dict(it, sid=None, sid_version=None) for it in items.values()]
    mapping, version = ensure_sids(cfg, rows)
    cache.write_text(json.dumps({"sid_version": version, "sids": {k: list(v) for k, v in mapping.items()}}))
    return mapping, version, time.perf_counter() - t0


# --------------------------------------------------------------------------------------
# our model


def stream_rows(train_seqs, sids, vocab, max_items: int):
    from onerec_prod.samples.stream import stream_ids, stream_labels, stream_windows

    rows = []
    for s in train_seqs:
        for a, b, lf in stream_windows(len(s), max_items):
            ids = stream_ids(vocab, [sids[i] for i in s[a:b]])
            rows.append((ids, stream_labels(ids, vocab.begin_id, lf)))
    return rows


class StreamRanker:
    """Top-k catalog items for histories by the constrained beam over stream prompts."""

    def __init__(self, sids: dict, vocab, trie, row_items, beam: int, batch_size: int, max_items: int):
        self.sids, self.vocab, self.trie, self.row_items = sids, vocab, trie, row_items
        self.beam, self.batch_size, self.max_items = beam, batch_size, max_items

    def rank(self, model, histories: list[list[str]], k: int = 10, exclude: bool = False) -> list[list[str]]:
        from onerec_prod.eval.beam import beam_search_sids
        from onerec_prod.samples.stream import stream_prompt_ids

        prompts = [stream_prompt_ids(self.vocab, [self.sids[i] for i in h], self.max_items) for h in histories]
        res = beam_search_sids(model, prompts, self.trie, self.vocab, self.beam, batch_size=self.batch_size)
        out = []
        for h, r in zip(histories, res, strict=True):
            items = [self.row_items[self.trie.row_of(s)] for s, _ in r]
            if exclude:
                seen = set(h)
                items = [i for i in items if i not in seen]
            out.append(items[:k])
        return out


def train_ours(cfg: Config, args, items, sids, sid_version, train_seqs, val_users, work):
    import torch

    from onerec_prod.eval.api import build_catalog_trie
    from onerec_prod.eval.stats import per_user_gains
    from onerec_prod.model.base import init_base_model
    from onerec_prod.model.dropout import DropoutRates
    from onerec_prod.model.io import load_model, load_tokenizer, save_model
    from onerec_prod.sid.tokens import SidVocab, level_sizes
    from onerec_prod.train.stream_fit import FitCfg, fit_stream

    key = json.dumps([cfg.model.model_dump(), cfg.sid.model_dump(), sorted(items)[:5], len(items)], sort_keys=True)
    base = work / f"base-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if not any(base.glob("*.safetensors")):
        from onerec_prod.sid.embed import item_text
        init_base_model(cfg, [item_text(it) for it in items.values()], base)
    tok, model = load_tokenizer(base), load_model(base, device="cpu", dtype="float32")
    vocab = SidVocab.from_tokenizer(tok, level_sizes(cfg.sid))
    catalog = [dict(it, sid=sids[i]) for i, it in items.items()]
    trie, row_items = build_catalog_trie(catalog, level_sizes(cfg.sid))
    ranker = StreamRanker(sids, vocab, trie, row_items, args.beam, cfg.eval.batch_size, cfg.samples.max_history)
    rows = stream_rows(train_seqs, sids, vocab, cfg.samples.max_history)
    n_targets = sum(sum(1 for x in lab if x != -100) for _, lab in rows) // vocab.num_levels
    log.info("ours: %d stream rows, %d next-item targets, %d tokens", len(rows), n_targets,
             sum(len(i) for i, _ in rows))

    def validate(m) -> float:
        ranked = ranker.rank(m, [u["history"] for u in val_users])
        return sum(per_user_gains(ranked, [u["target"] for u in val_users], 10)["recall@10"]) / len(val_users)

    b = args.stream
    fit = FitCfg(lr=b["lr"], weight_decay=b["weight_decay"], batch_size=b["batch_size"], max_epochs=b["max_epochs"],
                 warmup_steps=b["warmup_steps"], label_smoothing=b["label_smoothing"], patience=b["patience"],
                 eval_every=b["eval_every"], dropout=DropoutRates(**b["dropout"]),
                 time_budget_s=args.train_minutes * 60 if args.train_minutes else None, seed=cfg.train.seed)
    res = fit_stream(model, rows, tok.pad_token_id, fit, validate)
    refit = None
    if args.refit:
        # the selected number of epochs, from scratch, on s[:-1] (the validation item now trains;
        # the test item still never does)
        full = [v["history"] + [v["target"]] for v in args.all_val]
        rows2 = stream_rows(full, sids, vocab, cfg.samples.max_history)
        model = load_model(base, device="cpu", dtype="float32")
        fit2 = FitCfg(**{**fit.__dict__, "max_epochs": res.best_epoch, "time_budget_s": None})
        refit = asdict(fit_stream(model, rows2, tok.pad_token_id, fit2, None))
        refit["rows"] = len(rows2)
    out_dir = work / "model-stream"
    save_model(model, tok, out_dir, {"stage": "bench_quality_stream", "parent": str(base), "dt": None,
                                     "sid_version": sid_version, "data_versions": {},
                                     "train": {k: v for k, v in asdict(res).items() if k != "history"}})
    info = {"rows": len(rows), "targets": n_targets, "params": sum(p.numel() for p in model.parameters()),
            "fit": asdict(res), "refit": refit, "tokens_per_s": round(res.tokens_per_s), "fit_cfg": b, "model_dir": str(out_dir),
            "targets_per_s": round(res.target_tokens / vocab.num_levels / max(res.seconds, 1e-9), 1)}
    del torch
    return model, ranker, info


def load_ours(cfg: Config, args, items, sids):
    """A model trained earlier by this bench (``--model DIR``): evaluate only."""
    from onerec_prod.eval.api import build_catalog_trie
    from onerec_prod.model.io import load_model, load_tokenizer, read_meta
    from onerec_prod.sid.tokens import SidVocab, level_sizes

    tok, model = load_tokenizer(args.model), load_model(args.model, device="cpu", dtype="float32")
    vocab = SidVocab.from_tokenizer(tok, level_sizes(cfg.sid))
    trie, row_items = build_catalog_trie([dict(it, sid=sids[i]) for i, it in items.items()], level_sizes(cfg.sid))
    ranker = StreamRanker(sids, vocab, trie, row_items, args.beam, cfg.eval.batch_size, cfg.samples.max_history)
    return model, ranker, {"model_dir": args.model, "params": sum(p.numel() for p in model.parameters()),
                           "train": read_meta(args.model).get("train")}


# --------------------------------------------------------------------------------------
# SASRec with a small grid, early stopping on the validation item


def parse_grid(text: str | None) -> list[dict[str, Any]]:
    """``"dim=64,256;dropout=0.2,0.5"`` -> the 4 combinations; ``"dim=64,dropout=0.5|dim=256,dropout=0.2"``
    -> those 2 points (values parsed as int/float/str)."""
    import itertools

    if not text:
        return [{}]
    if "|" in text or ";" not in text and text.count("=") > 1:  # explicit points: "a=1,b=2|a=3,b=4"
        return [parse_grid(";".join(kv.strip() for kv in point.split(",")))[0] for point in text.split("|")]
    keys, values = [], []
    for part in text.split(";"):
        k, v = part.split("=")
        keys.append(k.strip())
        vals = []
        for x in v.split(","):
            x = x.strip()
            try:
                vals.append(int(x))
            except ValueError:
                try:
                    vals.append(float(x))
                except ValueError:
                    vals.append(x)
        values.append(vals)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]


def train_sasrec_grid(args, items, train_seqs, val_users):
    from onerec_prod.eval.sasrec import SasrecParams, train_sasrec
    from onerec_prod.eval.stats import per_user_gains

    catalog = sorted(items)
    grid = parse_grid(args.sasrec_grid)
    results, best = [], None
    for point in grid:
        params = SasrecParams(**{**args.sasrec, **point})

        def validate(m, _v=val_users) -> float:
            ranked = m.recommend([u["history"] for u in _v], 10)
            return sum(per_user_gains(ranked, [u["target"] for u in _v], 10)["recall@10"]) / len(_v)

        t0 = time.perf_counter()
        model = train_sasrec(train_seqs, params, items=catalog, validate=validate,
                             time_budget_s=args.sasrec_minutes * 60 if args.sasrec_minutes else None)
        rec = {"setting": point, "params": asdict(params), "val_recall@10": model.best_score,
               "best_epoch": model.best_epoch, "epochs_run": model.epochs_run,
               "seconds": round(time.perf_counter() - t0, 1)}
        log.info("sasrec grid point %s: val R@10 %.4f (epoch %s of %s, %.0fs)", point, model.best_score,
                 model.best_epoch, model.epochs_run, rec["seconds"])
        results.append(rec)
        if best is None or model.best_score > best[0]:
            best = (model.best_score, model, rec)
    return best[1], {"grid": results, "chosen": best[2]}


def sasrec_job(args, items, train_seqs, val_users, users, threads: int | None):
    """SASRec grid, then its rankings for ``users`` (run in a child process with ``--parallel``)."""
    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    sas, info = train_sasrec_grid(args, items, train_seqs, val_users)
    if args.refit:  # the chosen setting and epoch count, from scratch, on s[:-1]
        from onerec_prod.eval.sasrec import SasrecParams, train_sasrec

        chosen = info["chosen"]
        params = SasrecParams(**{**chosen["params"], "epochs": chosen["best_epoch"]})
        sas = train_sasrec([v["history"] + [v["target"]] for v in args.all_val], params, items=sorted(items))
        info["refit"] = {"epochs": chosen["best_epoch"], "seconds": round(time.perf_counter() - t0, 1)}
    info["seconds"] = round(time.perf_counter() - t0, 1)
    ranked = {"SASRec": sas.recommend([u["history"] for u in users], 10)}
    if args.exclude_history:
        wide = sas.recommend([u["history"] for u in users], 60)
        ranked["SASRec, history excluded"] = [[i for i in r if i not in set(u["history"])][:10]
                                              for r, u in zip(wide, users, strict=True)]
    return ranked, info


# --------------------------------------------------------------------------------------
# main


DEFAULT_STREAM = {"lr": 3e-3, "weight_decay": 0.05, "batch_size": 128, "max_epochs": 200, "warmup_steps": 200,
                  "label_smoothing": 0.0, "patience": 6, "eval_every": 2,
                  "dropout": {"attention": 0.1, "hidden": 0.1, "embedding": 0.1}}
DEFAULT_SASREC = {"dim": 64, "n_blocks": 2, "n_heads": 1, "dropout": 0.5, "lr": 1e-3, "batch_size": 128,
                  "epochs": 200, "loss": "ss", "n_negatives": 256, "patience": 10, "max_len": 50}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_dataset_args(p, "Work dir (default var/bench/quality).")
    p.add_argument("--models", default="ours,sasrec,mostpop", help="Comma list of ours, sasrec, mostpop.")
    p.add_argument("--max-users", type=int, default=None, help="Score a seeded sample of N test users (default all).")
    p.add_argument("--val-users", type=int, default=3000, help="Validation users for early stopping (seeded sample).")
    p.add_argument("--beam", type=int, default=10, help="Beam width of our model (the top 10 are kept).")
    p.add_argument("--exclude-history", action="store_true", help="Also report rows without history items.")
    p.add_argument("--train-minutes", type=float, default=None, help="Time budget of our model's training.")
    p.add_argument("--stream", default="{}", help="JSON overrides of the stream fit settings: " + json.dumps(DEFAULT_STREAM))
    p.add_argument("--sasrec", default="{}", help="JSON overrides of the SASRec settings: " + json.dumps(DEFAULT_SASREC))
    p.add_argument("--sasrec-grid", default=None, help='Grid, e.g. "dim=64,256;dropout=0.2,0.5" (best on validation).')
    p.add_argument("--sasrec-minutes", type=float, default=None, help="Time budget per SASRec grid point.")
    p.add_argument("--model", default=None, help="Evaluate this model dir (trained earlier by this bench) instead of training.")
    p.add_argument("--compare", action="append", default=[], metavar="NAME=DIR",
                   help="Also rank the test users with this model dir (e.g. the RL-refreshed model) and report "
                        "its paired difference with ours (NAME minus ours, same users). Repeatable.")
    p.add_argument("--json", default=None, help="Write the results here too.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the user samples and the bootstrap.")
    p.add_argument("--refit", action="store_true",
                   help="After selecting epochs (and the SASRec setting) on the validation item, retrain each model "
                        "from scratch on s[:-1] for the selected epochs before the test (the test item never trains).")
    p.add_argument("--parallel", action="store_true",
                   help="Train SASRec in a child process (1 thread) while ours trains (use --threads 1).")
    add_threads_arg(p)
    args = p.parse_args(argv)
    args.stream = {**DEFAULT_STREAM, **json.loads(args.stream)}
    args.sasrec = {**DEFAULT_SASREC, **json.loads(args.sasrec)}
    start(args)
    from onerec_prod.config import REPO_ROOT
    from onerec_prod.eval.baselines import MostPop
    from onerec_prod.eval.report import format_table
    from onerec_prod.eval.stats import fmt_ci, paired_diff_ci, per_user_gains, summarize

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    work = Path(args.work or REPO_ROOT / "var" / "bench" / "quality").resolve()
    work.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config, [f"paths.var_root={work}", *args.set])
    t_all = time.perf_counter()
    phases: dict[str, float] = {}

    t0 = time.perf_counter()
    items, seqs, data_key = load_sequences(args.dataset, work)
    train_seqs, val, test = split(seqs)
    val_users = sample_users(val, args.val_users, args.seed)
    args.all_val = val
    users = sample_users(test, args.max_users, args.seed)
    phases["data"] = time.perf_counter() - t0
    log.info("%d items, %d users (%d scored), %d training interactions", len(items), len(test), len(users),
             sum(len(s) for s in train_seqs))
    targets = [u["target"] for u in users]
    ranked: dict[str, list[list[str]]] = {}
    results: dict[str, Any] = {"dataset": args.dataset, "n_items": len(items), "n_users": len(test),
                               "n_scored": len(users), "n_val_users": len(val_users), "beam": args.beam,
                               "phases": phases}

    if "mostpop" in models:
        mp = MostPop.fit(train_seqs)
        ranked["MostPop"] = mp.recommend([u["history"] for u in users], 10)
    pending = None
    if "sasrec" in models and args.parallel and "ours" in models:
        import concurrent.futures as cf
        import multiprocessing as mp

        pool = cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"))
        pending = pool.submit(sasrec_job, args, items, train_seqs, val_users, users, 1)
        log.info("SASRec grid runs in a child process (1 thread) beside our model's training")
    elif "sasrec" in models:
        t0 = time.perf_counter()
        sas_ranked, results["sasrec"] = sasrec_job(args, items, train_seqs, val_users, users, None)
        phases["sasrec"] = time.perf_counter() - t0
        ranked.update(sas_ranked)
    if "ours" in models:
        t0 = time.perf_counter()
        sids, sid_version, sid_s = service_sids(cfg, items, work, data_key)
        phases["sids"] = sid_s
        dup = sum(n - 1 for n in Counter(sids.values()).values() if n > 1)
        if dup:
            raise SystemExit(f"SIDs are not unique: {dup} duplicates")
        t0 = time.perf_counter()
        if args.model:
            model, ranker, results["ours"] = load_ours(cfg, args, items, sids)
        else:
            model, ranker, results["ours"] = train_ours(cfg, args, items, sids, sid_version, train_seqs, val_users,
                                                        work)
        phases["ours_train"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ranked["ours (SID stream)"] = ranker.rank(model, [u["history"] for u in users])
        for spec in args.compare:
            name, _, path = spec.partition("=")
            from onerec_prod.model.io import load_model

            other = load_model(path, device="cpu", dtype="float32")
            ranked[name] = ranker.rank(other, [u["history"] for u in users])
            del other
        phases["ours_eval"] = time.perf_counter() - t0
        results["ours"]["eval_users_per_s"] = round(len(users) / phases["ours_eval"], 1)
        if args.exclude_history:
            ranker.beam = max(ranker.beam, 20)
            ranked["ours, history excluded"] = ranker.rank(model, [u["history"] for u in users], exclude=True)

    if pending is not None:
        t0 = time.perf_counter()
        sas_ranked, results["sasrec"] = pending.result()
        phases["sasrec_wait_after_ours"] = time.perf_counter() - t0
        phases["sasrec"] = results["sasrec"]["seconds"]
        ranked.update(sas_ranked)
    gains = {name: per_user_gains(r, targets, [5, 10]) for name, r in ranked.items()}
    summary = {name: summarize(g, seed=args.seed) for name, g in gains.items()}
    results["metrics"] = summary
    if "ours (SID stream)" in gains:
        pairs = {}
        for other in ("SASRec", "MostPop"):
            if other in gains:
                pairs[other] = {m: dict(zip(("mean", "low", "high"), paired_diff_ci(
                    gains["ours (SID stream)"][m], gains[other][m], seed=args.seed), strict=True))
                    for m in ("recall@10", "ndcg@10")}
        results["paired_ours_minus"] = pairs
        compared = {}
        for spec in args.compare:
            name = spec.partition("=")[0]
            compared[name] = {m: dict(zip(("mean", "low", "high"), paired_diff_ci(
                gains[name][m], gains["ours (SID stream)"][m], seed=args.seed), strict=True))
                for m in ("recall@10", "ndcg@10")}
        results["paired_minus_ours"] = compared
    results["total_seconds"] = round(time.perf_counter() - t_all, 1)

    out = sys.stdout
    out.write(f"\n{args.dataset}: leave-one-out, history <= {HISTORY_CAP - 1}, {len(users)} of {len(test)} test users, "
              f"whole catalog ({len(items)} items), our beam {args.beam} (top 10 kept)\n")
    table = {name: {m: v["mean"] for m, v in s.items()} for name, s in summary.items()}
    table.update(PUBLISHED)
    out.write(format_table(table) + "\n\n95% bootstrap intervals (users):\n")
    for name, s in summary.items():
        out.write(f"  {name:28s} R@10 {fmt_ci(*(s['recall@10'][k] for k in ('mean', 'low', 'high')))}"
                  f"  N@10 {fmt_ci(*(s['ndcg@10'][k] for k in ('mean', 'low', 'high')))}\n")
    for other, d in results.get("paired_ours_minus", {}).items():
        out.write(f"  paired ours - {other:14s} R@10 {fmt_ci(*d['recall@10'].values())}"
                  f"  N@10 {fmt_ci(*d['ndcg@10'].values())}\n")
    for name, d in results.get("paired_minus_ours", {}).items():
        base = summary["ours (SID stream)"]
        out.write(f"  paired {name} - ours  R@10 {fmt_ci(*d['recall@10'].values())} "
                  f"({d['recall@10']['mean'] / max(base['recall@10']['mean'], 1e-12):+.1%})"
                  f"  N@10 {fmt_ci(*d['ndcg@10'].values())} "
                  f"({d['ndcg@10']['mean'] / max(base['ndcg@10']['mean'], 1e-12):+.1%})\n")
    if "sasrec" in results:
        out.write("\nSASRec grid (validation R@10 on the validation item):\n")
        for g in results["sasrec"]["grid"]:
            out.write(f"  {g['setting'] or 'default'}: val {g['val_recall@10']:.4f}, best epoch {g['best_epoch']} "
                      f"of {g['epochs_run']}, {g['seconds']:.0f}s\n")
        out.write(f"  chosen: {results['sasrec']['chosen']['params']}\n")
    if "ours" in results and "fit" in results["ours"]:
        o, f = results["ours"], results["ours"]["fit"]
        out.write(f"\nours: {o['params']} params, {o['rows']} stream rows, {o['targets']} targets; {f['epochs']} epochs "
                  f"({f['stopped']}), best epoch {f['best_epoch']} val R@10 {f['best_score']:.4f}; "
                  f"{o['tokens_per_s']} tokens/s, {o['targets_per_s']} targets/s; eval {o['eval_users_per_s']} users/s\n")
    if results.get("ours", {}).get("refit"):
        r = results["ours"]["refit"]
        out.write(f"ours refit on s[:-1]: {r['epochs']} epochs, {r['rows']} rows, {r['seconds']:.0f}s\n")
    if results.get("sasrec", {}).get("refit"):
        out.write(f"SASRec refit on s[:-1]: {results['sasrec']['refit']['epochs']} epochs\n")
    out.write("phases (s): " + ", ".join(f"{k} {v:.0f}" for k, v in phases.items())
              + f"; total {results['total_seconds']:.0f}\n")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
