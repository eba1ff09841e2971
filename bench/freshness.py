"""Freshness, measured: daily incremental training vs full retrain vs a frozen model, over replayed days.

    .venv/bin/python bench/freshness.py --dataset ../shared/data/beauty --start 2014-06-01 --days 30 \
        [--bootstrap-minutes 10] [--retrain-every 10] [--sasrec-minutes 4] [--inc-epochs 2] [--replay 3] \
        [--probe-users 1000] [--parallel --threads 1] [--json OUT] [--plot OUT.png] [--set group.key=value ...]

Protocol. Every interaction of the dataset carries a day (Beauty's timestamps are day-level). The
days before ``--start`` are the bootstrap history; the ``--days`` days from ``--start`` on are
replayed one at a time. For day D the **next-day eval set** is, for every user with an event on D
and at least one event before D, that user's first event on D (ties by the dataset's order), with
the user's items before D (the last 50) as history; each model is the one trained through D-1 and
ranks the whole catalog known on D (every item first seen on or before D: new items arrive with
the day's catalog feed and get their SIDs from text, so the trie holds them) by the trie beam.

A fixed **leave-one-out probe** (``--probe-users`` users with 3+ events before the start, seeded,
frozen at bootstrap) holds out each probe user's last event before the start: it never trains any
arm, and scoring it every ``--probe-every`` days shows forgetting of old users.

Arms, all on the same events:

1. ``incremental``: the bootstrap model, then each day continued from yesterday's weights on day
   D-1's stream rows (the users active on D-1, loss on their items new on D-1) plus a replay of
   ``--replay`` x as many older users' streams (loss on every item), ``--inc-epochs`` passes: the
   daily pipeline's recipe (stream rows + replay mix), run in process without DeepSpeed;
2. ``retrain``: from scratch on everything through D-1 with the bootstrap's time budget, every
   ``--retrain-every`` days (day 0 is the bootstrap itself), serving the latest retrain between
   (the cost of a daily retrain is extrapolated and printed);
3. ``frozen``: the bootstrap model, never updated;
4. ``mostpop``: the most popular items of the trailing ``--mostpop-window`` days through D-1;
5. ``sasrec``: SASRec (sampled softmax, 256 negatives, d=64, 2 blocks, dropout 0.5: the setting the
   quality bench chose) retrained from scratch on the retrain schedule with ``--sasrec-minutes``.

Output: per arm, pooled next-day R@10/N@10 with 95% bootstrap intervals and the number of events;
paired differences (incremental minus each other arm, same events); the probe's R@10 (forgetting);
hits on items first seen after the start (new-item coverage); training compute (tokens, seconds);
a per-day R@10 plot (PNG) of every arm; everything in ``--json``.

SIDs: the pipeline's SID service (MiniLM text embeddings + residual k-means) fit once on the whole
catalog's text and kept stable (cached in the work dir, shared with ``bench/quality.py``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import random
import sys
import time
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from _common import add_dataset_args, add_threads_arg, start
from quality import DEFAULT_STREAM, StreamRanker, load_sequences, service_sids, stream_rows

from onerec_prod.config import load_config

log = logging.getLogger("bench.freshness")
HISTORY_CAP = 50
ARMS = ("incremental", "retrain", "frozen", "mostpop", "sasrec")
SASREC = {"dim": 64, "n_blocks": 2, "n_heads": 1, "dropout": 0.5, "lr": 1e-3, "batch_size": 128,
          "epochs": 1000, "loss": "ss", "n_negatives": 256, "max_len": 50}


# --------------------------------------------------------------------------------------
# data: timed events, per-day eval sets, the probe


def load_events(dataset: str, work: Path):
    """Items and every event as ``(user, day, order, item)``, sorted by user then time."""
    from onerec_prod.datasets import load_dataset, resolve_dataset

    ds = load_dataset(resolve_dataset(dataset, work))
    items = {i: {"item_id": i, "title": it.title, "categories": it.categories, "description": it.description}
             for i, it in ds.items.items()}
    events = sorted((r.user_id, datetime.fromtimestamp(r.ts, UTC).date(), r.position, r.item_id)
                    for r in ds.interactions)
    return items, events


class Timeline:
    """Per-user event lists (oldest first) with the probe events removed from training."""

    def __init__(self, events, start_day: date, probe_users: int, seed: int) -> None:
        self.start = start_day
        self.by_user: dict[str, list[tuple[date, int, str]]] = defaultdict(list)
        for u, d, pos, it in events:
            self.by_user[u].append((d, pos, it))
        self.first_seen: dict[str, date] = {}
        for evs in self.by_user.values():
            for d, _, it in evs:
                if it not in self.first_seen or d < self.first_seen[it]:
                    self.first_seen[it] = d
        eligible = sorted(u for u, evs in self.by_user.items() if sum(1 for e in evs if e[0] < start_day) >= 3)
        picked = random.Random(seed).sample(eligible, min(probe_users, len(eligible)))
        self.probe: list[dict[str, Any]] = []
        self.held: set[tuple[str, int]] = set()  # (user, index in by_user[user]) never trained
        for u in sorted(picked):
            evs = self.by_user[u]
            k = max(i for i, e in enumerate(evs) if e[0] < start_day)
            self.held.add((u, k))
            self.probe.append({"user_id": u, "history": [e[2] for e in evs[:k]][-HISTORY_CAP:], "target": evs[k][2]})

    def train_seq(self, u: str, before: date) -> list[str]:
        """User ``u``'s trainable items strictly before day ``before`` (probe event removed)."""
        return [e[2] for i, e in enumerate(self.by_user[u]) if e[0] < before and (u, i) not in self.held]

    def train_seqs(self, before: date) -> dict[str, list[str]]:
        out = {}
        for u in self.by_user:
            s = self.train_seq(u, before)
            if s:
                out[u] = s[-HISTORY_CAP:]
        return out

    def day_eval(self, day: date) -> list[dict[str, Any]]:
        """Each user's first event on ``day`` with a non-empty history (all their items before ``day``)."""
        out = []
        for u, evs in self.by_user.items():
            on = [e for e in evs if e[0] == day]
            if not on:
                continue
            hist = [e[2] for e in evs if e[0] < day][-HISTORY_CAP:]
            if hist:
                out.append({"user_id": u, "history": hist, "target": on[0][2],
                            "new_item": self.first_seen[on[0][2]] >= self.start})
        return sorted(out, key=lambda r: r["user_id"])

    def active(self, day: date) -> list[str]:
        return sorted(u for u, evs in self.by_user.items() if any(e[0] == day for e in evs))


# --------------------------------------------------------------------------------------
# our model: stream rows of a day, fit, rank


def day_rows(tl: Timeline, day: date, sids, vocab, max_items: int, replay: float, rng: random.Random):
    """Day ``day``'s incremental rows: active users' streams through ``day`` with loss on the items
    new that day, plus ``replay`` x as many older users' whole streams (loss on every item)."""
    from onerec_prod.samples.stream import stream_ids, stream_labels

    rows, active = [], tl.active(day)
    for u in active:
        seq = tl.train_seq(u, day + timedelta(days=1))
        n_new = len(seq) - len(tl.train_seq(u, day))
        if n_new <= 0:
            continue
        window = seq[-(max_items + 1):]
        loss_from = max(1, len(window) - n_new)
        ids = stream_ids(vocab, [sids[i] for i in window])
        rows.append((ids, stream_labels(ids, vocab.begin_id, loss_from)))
    older = sorted(set(tl.by_user) - set(active))
    pool = [u for u in older if len(tl.train_seq(u, day)) >= 2]
    picks = rng.sample(pool, min(len(pool), int(round(replay * len(rows)))))
    rows += stream_rows([tl.train_seq(u, day)[-HISTORY_CAP:] for u in picks], sids, vocab, max_items)
    return rows, len(active)


class Ours:
    """Model construction, fitting and ranking for the three LM arms (one base, one tokenizer)."""

    def __init__(self, cfg, items, sids, sid_version, work: Path, args) -> None:
        import hashlib

        from onerec_prod.model.base import init_base_model
        from onerec_prod.model.io import load_tokenizer
        from onerec_prod.sid.embed import item_text
        from onerec_prod.sid.tokens import SidVocab, level_sizes

        self.cfg, self.items, self.sids, self.sid_version, self.args = cfg, items, sids, sid_version, args
        key = json.dumps([cfg.model.model_dump(), cfg.sid.model_dump(), sorted(items)[:5], len(items)], sort_keys=True)
        self.base = work / f"base-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
        if not any(self.base.glob("*.safetensors")):
            init_base_model(cfg, [item_text(it) for it in items.values()], self.base)
        self.tok = load_tokenizer(self.base)
        self.sizes = level_sizes(cfg.sid)
        self.vocab = SidVocab.from_tokenizer(self.tok, self.sizes)
        self.max_items = cfg.samples.max_history
        self.stream = dict(args.stream)

    def fresh(self):
        from onerec_prod.model.io import load_model

        return load_model(self.base, device="cpu", dtype="float32")

    def fit(self, model, rows, *, epochs: int, minutes: float | None, lr: float, warmup: int, seed: int):
        from onerec_prod.model.dropout import DropoutRates
        from onerec_prod.train.stream_fit import FitCfg, fit_stream

        b = self.stream
        fc = FitCfg(lr=lr, weight_decay=b["weight_decay"], batch_size=b["batch_size"], max_epochs=epochs,
                    warmup_steps=warmup, label_smoothing=b["label_smoothing"], patience=10**6,
                    eval_every=10**6, dropout=DropoutRates(**b["dropout"]),
                    time_budget_s=minutes * 60 if minutes else None, seed=seed, log_every_s=120)
        return fit_stream(model, rows, self.tok.pad_token_id, fc, None)

    def ranker(self, day: date, tl: Timeline) -> StreamRanker:
        from onerec_prod.eval.api import build_catalog_trie

        known = [dict(self.items[i], sid=self.sids[i]) for i in self.items if tl.first_seen.get(i, day) <= day]
        trie, row_items = build_catalog_trie(known, self.sizes)
        return StreamRanker(self.sids, self.vocab, trie, row_items, self.args.beam, self.cfg.eval.batch_size,
                            self.max_items)


def bootstrap_model(ours: Ours, tl: Timeline, start_day: date, args, cfg, work: Path):
    """The bootstrap model (trained on every day before the start), cached in the work dir by its
    settings so that runs varying only the daily arms share it (``--bootstrap-cache``)."""
    import hashlib

    from onerec_prod.model.io import load_model, read_meta, save_model

    key = hashlib.sha256(json.dumps([args.dataset, args.start, args.bootstrap_minutes, args.probe_users, args.seed,
                                     args.stream, cfg.model.model_dump(), cfg.sid.model_dump()],
                                    sort_keys=True).encode()).hexdigest()[:12]
    cache = work / f"freshness-boot-{key}"
    if args.bootstrap_cache and (cache / "config.json").exists():
        log.info("bootstrap model from the cache %s", cache)
        return load_model(cache, device="cpu", dtype="float32"), read_meta(cache)["bootstrap_cost"]
    t0 = time.perf_counter()
    boot = ours.fresh()
    rows = stream_rows(list(tl.train_seqs(start_day).values()), ours.sids, ours.vocab, ours.max_items)
    fit = ours.fit(boot, rows, epochs=1000, minutes=args.bootstrap_minutes, lr=args.stream["lr"],
                   warmup=args.stream["warmup_steps"], seed=cfg.train.seed)
    cost = {"seconds": time.perf_counter() - t0, "tokens": fit.tokens, "epochs": fit.epochs, "rows": len(rows)}
    if args.bootstrap_cache:
        save_model(boot, ours.tok, cache, {"stage": "bench_freshness_bootstrap", "sid_version": ours.sid_version,
                                            "bootstrap_cost": cost})
    return boot, cost


# --------------------------------------------------------------------------------------
# SASRec arm (a child process with --parallel)


def sasrec_arm(items, tl: Timeline, days: list[date], every: int, minutes: float, probe_days: set[int],
               threads: int | None) -> dict[str, Any]:
    """SASRec retrained from scratch every ``every`` days; its rankings of each day's eval set."""
    import torch

    from onerec_prod.eval.sasrec import SasrecParams, train_sasrec

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if threads:
        torch.set_num_threads(threads)
    universe = sorted(items)
    ranked, probe, cost, model = {}, {}, {"seconds": 0.0, "retrains": 0}, None
    for i, day in enumerate(days):
        if i % every == 0:
            t0 = time.perf_counter()
            model = train_sasrec(list(tl.train_seqs(day).values()), SasrecParams(**SASREC), items=universe,
                                 time_budget_s=minutes * 60)
            cost["seconds"] += time.perf_counter() - t0
            cost["retrains"] += 1
            log.info("sasrec retrained through %s (%d epochs, %.0fs)", day - timedelta(days=1), model.epochs_run,
                     time.perf_counter() - t0)
        ev = tl.day_eval(day)
        ranked[str(day)] = model.recommend([r["history"] for r in ev], 10)
        if i in probe_days:
            probe[str(day)] = model.recommend([r["history"] for r in tl.probe], 10)
    return {"ranked": ranked, "probe": probe, "cost": cost}


# --------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_dataset_args(p, "Work dir (default var/bench/quality: shares its SID cache).")
    p.add_argument("--start", default="2014-06-01", help="First replayed day (the bootstrap trains on the days before).")
    p.add_argument("--days", type=int, default=30, help="Replayed days.")
    p.add_argument("--arms", default=",".join(ARMS), help="Comma list of " + ", ".join(ARMS) + ".")
    p.add_argument("--bootstrap-minutes", type=float, default=10.0, help="Time budget of the bootstrap and of each retrain.")
    p.add_argument("--retrain-every", type=int, default=10, help="Days between full retrains (ours and SASRec).")
    p.add_argument("--sasrec-minutes", type=float, default=4.0, help="Time budget of each SASRec (re)train.")
    p.add_argument("--inc-epochs", type=int, default=2, help="Passes over each day's incremental rows.")
    p.add_argument("--inc-lr", type=float, default=1e-3, help="Peak LR of the incremental updates.")
    p.add_argument("--replay", type=float, default=3.0, help="Replayed older users per active user of the day.")
    p.add_argument("--mostpop-window", type=int, default=30, help="MostPop: trailing days of events.")
    p.add_argument("--probe-users", type=int, default=1000, help="Leave-one-out probe users (frozen at bootstrap).")
    p.add_argument("--probe-every", type=int, default=5, help="Score the probe every N days (and on the last day).")
    p.add_argument("--beam", type=int, default=10, help="Beam width of the LM arms.")
    p.add_argument("--stream", default="{}", help="JSON overrides of the fit settings: " + json.dumps(DEFAULT_STREAM))
    p.add_argument("--parallel", action="store_true", help="Run the SASRec arm in a child process (1 thread).")
    p.add_argument("--bootstrap-cache", action="store_true",
                   help="Keep the bootstrap model in the work dir and reuse it when the settings match (its "
                        "recorded cost is reported again).")
    p.add_argument("--json", default=None, help="Write the results here too.")
    p.add_argument("--plot", default=None, help="Per-day R@10 plot (PNG) of every arm.")
    p.add_argument("--seed", type=int, default=0)
    add_threads_arg(p)
    args = p.parse_args(argv)
    args.stream = {**DEFAULT_STREAM, **json.loads(args.stream)}
    start(args)
    from onerec_prod.config import REPO_ROOT
    from onerec_prod.eval.baselines import MostPop
    from onerec_prod.eval.stats import fmt_ci, paired_diff_ci, per_user_gains, summarize

    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = sorted(set(arms) - set(ARMS))
    if bad:
        p.error(f"unknown arms {bad} (valid: {', '.join(ARMS)})")
    work = Path(args.work or REPO_ROOT / "var" / "bench" / "quality").resolve()
    work.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config, [f"paths.var_root={work}", *args.set])
    t_all = time.perf_counter()
    start_day = date.fromisoformat(args.start)
    days = [start_day + timedelta(days=i) for i in range(args.days)]
    probe_days = {i for i in range(args.days) if i % args.probe_every == 0 or i == args.days - 1}

    items, events = load_events(args.dataset, work)
    tl = Timeline(events, start_day, args.probe_users, args.seed)
    evals = {str(d): tl.day_eval(d) for d in days}
    n_events = sum(len(v) for v in evals.values())
    if n_events == 0:
        raise SystemExit(f"no next-day eval events in {days[0]}..{days[-1]}: choose --start inside the data")
    log.info("%d items, %d users; bootstrap through %s (%d events), %d replayed days, %d next-day eval events, "
             "%d probe users", len(items), len(tl.by_user), start_day - timedelta(days=1),
             sum(len(s) for s in tl.train_seqs(start_day).values()), len(days), n_events, len(tl.probe))

    ranked: dict[str, dict[str, list[list[str]]]] = {a: {} for a in arms}
    probe: dict[str, dict[str, list[list[str]]]] = {a: {} for a in arms}
    cost: dict[str, dict[str, float]] = {a: {"seconds": 0.0, "tokens": 0} for a in arms}
    pending = None
    if "sasrec" in arms:
        if args.parallel:
            import concurrent.futures as cf
            import multiprocessing as mp

            pool = cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"))
            pending = pool.submit(sasrec_arm, items, tl, days, args.retrain_every, args.sasrec_minutes,
                                  probe_days, 1)
        else:
            res = sasrec_arm(items, tl, days, args.retrain_every, args.sasrec_minutes, probe_days, None)
            ranked["sasrec"], probe["sasrec"], cost["sasrec"] = res["ranked"], res["probe"], res["cost"]
    lm_arms = [a for a in ("incremental", "retrain", "frozen") if a in arms]
    if lm_arms:
        _, _, data_key = load_sequences(args.dataset, work)  # the quality bench's key: shares its SID cache
        sids, sid_version, _ = service_sids(cfg, items, work, data_key)
        ours = Ours(cfg, items, sids, sid_version, work, args)
        boot, boot_cost = bootstrap_model(ours, tl, start_day, args, cfg, work)
        log.info("bootstrap: %d rows, %d epochs, %d tokens, %.0fs", boot_cost["rows"], boot_cost["epochs"],
                 boot_cost["tokens"], boot_cost["seconds"])
        models = {a: (boot if a == "frozen" else copy.deepcopy(boot)) for a in lm_arms}
        rng = random.Random(args.seed)
        for i, day in enumerate(days):
            if i > 0 and "incremental" in models:
                t0 = time.perf_counter()
                rows, n_active = day_rows(tl, day - timedelta(days=1), sids, ours.vocab, ours.max_items,
                                          args.replay, rng)
                if rows:
                    f = ours.fit(models["incremental"], rows, epochs=args.inc_epochs, minutes=None,
                                 lr=args.inc_lr, warmup=10, seed=cfg.train.seed + i)
                    cost["incremental"]["tokens"] += f.tokens
                cost["incremental"]["seconds"] += time.perf_counter() - t0
                log.info("incremental %s: %d rows (%d active users), %.1fs", day - timedelta(days=1), len(rows),
                         n_active, time.perf_counter() - t0)
            if i > 0 and i % args.retrain_every == 0 and "retrain" in models:
                t0 = time.perf_counter()
                m = ours.fresh()
                rows = stream_rows(list(tl.train_seqs(day).values()), sids, ours.vocab, ours.max_items)
                f = ours.fit(m, rows, epochs=1000, minutes=args.bootstrap_minutes, lr=args.stream["lr"],
                             warmup=args.stream["warmup_steps"], seed=cfg.train.seed)
                models["retrain"] = m
                cost["retrain"]["tokens"] += f.tokens
                cost["retrain"]["seconds"] += time.perf_counter() - t0
                log.info("retrain through %s: %d rows, %d epochs, %.0fs", day - timedelta(days=1), len(rows),
                         f.epochs, time.perf_counter() - t0)
            rk = ours.ranker(day, tl)
            for a, m in models.items():
                ranked[a][str(day)] = rk.rank(m, [r["history"] for r in evals[str(day)]])
                if i in probe_days:
                    probe[a][str(day)] = rk.rank(m, [r["history"] for r in tl.probe])
            log.info("day %s: %d events; R@10 %s", day, len(evals[str(day)]),
                     {a: round(sum(per_user_gains(ranked[a][str(day)], [r["target"] for r in evals[str(day)]],
                                                  10)["recall@10"]) / max(1, len(evals[str(day)])), 4)
                      for a in models})
        cost["_bootstrap"] = boot_cost
    if "mostpop" in arms:
        for day in days:
            lo = day - timedelta(days=args.mostpop_window)
            window = [[e[2] for e in evs if lo <= e[0] < day] for evs in tl.by_user.values()]
            mp_ = MostPop.fit(window)
            ranked["mostpop"][str(day)] = mp_.recommend([r["history"] for r in evals[str(day)]], 10)
            probe["mostpop"][str(day)] = mp_.recommend([r["history"] for r in tl.probe], 10)
    if pending is not None:
        res = pending.result()
        ranked["sasrec"], probe["sasrec"], cost["sasrec"] = res["ranked"], res["probe"], res["cost"]

    # ---- pooled metrics, paired differences, forgetting, new items
    pooled_targets = [r["target"] for d in days for r in evals[str(d)]]
    is_new = [r["new_item"] for d in days for r in evals[str(d)]]
    gains = {a: per_user_gains([x for d in days for x in ranked[a][str(d)]], pooled_targets, [5, 10]) for a in arms}
    summary = {a: summarize(g, seed=args.seed) for a, g in gains.items()}
    pairs = {}
    if "incremental" in arms:
        for other in arms:
            if other != "incremental":
                pairs[other] = {m: dict(zip(("mean", "low", "high"), paired_diff_ci(
                    gains["incremental"][m], gains[other][m], seed=args.seed), strict=True))
                    for m in ("recall@10", "ndcg@10")}
    last_probe = str(days[max(probe_days)])
    probe_r10 = {a: {d: sum(per_user_gains(r, [x["target"] for x in tl.probe], 10)["recall@10"]) / len(tl.probe)
                     for d, r in sorted(probe[a].items())} for a in arms if probe[a]}
    new_hits = {a: {"hits@10": int(sum(h for h, n in zip(gains[a]["recall@10"], is_new, strict=True) if n)),
                    "events": int(sum(is_new))} for a in arms}
    per_day = {a: {str(d): sum(per_user_gains(ranked[a][str(d)], [r["target"] for r in evals[str(d)]],
                                              10)["recall@10"]) / max(1, len(evals[str(d)])) for d in days}
               for a in arms}
    results = {"dataset": args.dataset, "start": args.start, "days": args.days, "events": n_events,
               "events_per_day": {str(d): len(evals[str(d)]) for d in days}, "args": {
                   k: v for k, v in vars(args).items() if k not in ("stream",)}, "stream": args.stream,
               "metrics": summary, "paired_incremental_minus": pairs, "probe_recall@10": probe_r10,
               "new_items": new_hits, "per_day_recall@10": per_day, "cost": cost,
               "total_seconds": round(time.perf_counter() - t_all, 1)}

    out = sys.stdout
    out.write(f"\n{args.dataset}: {args.days} replayed days from {args.start}, next-day eval (first event of each "
              f"user on day D, history through D-1), {n_events} events pooled "
              f"({min(results['events_per_day'].values())}-{max(results['events_per_day'].values())} a day); "
              f"beam {args.beam} over the catalog known on D\n\n")
    out.write(f"{'arm':12s} {'R@10 [95% CI]':28s} {'N@10 [95% CI]':28s} {'probe R@10':>10s} {'new-item hits':>14s}"
              f" {'train s':>8s} {'tokens':>11s}\n")
    for a in arms:
        s = summary[a]
        pr = probe_r10.get(a, {}).get(last_probe)
        out.write(f"{a:12s} {fmt_ci(*(s['recall@10'][k] for k in ('mean', 'low', 'high'))):28s} "
                  f"{fmt_ci(*(s['ndcg@10'][k] for k in ('mean', 'low', 'high'))):28s} "
                  f"{'-' if pr is None else f'{pr:.4f}':>10s} "
                  f"{new_hits[a]['hits@10']:>6d}/{new_hits[a]['events']:<7d} "
                  f"{cost[a].get('seconds', 0):>8.0f} {int(cost[a].get('tokens', 0)):>11d}\n")
    out.write("\npaired differences, incremental minus (same events, 95% bootstrap):\n")
    for other, d in pairs.items():
        rel = {m: d[m]["mean"] / summary[other][m]["mean"] if summary[other][m]["mean"] else float("nan")
               for m in ("recall@10", "ndcg@10")}
        out.write(f"  - {other:10s} R@10 {fmt_ci(*d['recall@10'].values())} ({rel['recall@10']:+.1%})"
                  f"  N@10 {fmt_ci(*d['ndcg@10'].values())} ({rel['ndcg@10']:+.1%})\n")
    if "_bootstrap" in cost:
        b = cost["_bootstrap"]
        inc, ret = cost.get("incremental", {}), cost.get("retrain", {})
        n_ret = max(1, len([i for i in range(1, args.days) if i % args.retrain_every == 0]))
        per_retrain = ret.get("seconds", 0) / n_ret if ret.get("seconds") else b["seconds"]
        daily = per_retrain * (args.days - 1)
        results["compute"] = {"bootstrap": b, "per_retrain_s": per_retrain, "daily_retrain_extrapolated_s": daily,
                              "incremental_s": inc.get("seconds"), "retrain_as_run_s": ret.get("seconds")}
        out.write(f"\ncompute: bootstrap {b['seconds']:.0f}s ({b['epochs']} epochs, {b['tokens']} tokens); "
                  f"one retrain {per_retrain:.0f}s; incremental, all {args.days - 1} updates "
                  f"{inc.get('seconds', 0):.0f}s ({inc.get('tokens', 0)} tokens)\n")
        if inc.get("seconds"):
            out.write(f"  incremental / daily retrain (extrapolated, {args.days - 1} retrains): "
                      f"{inc['seconds'] / daily:.3f} of the seconds\n")
            if ret.get("seconds"):
                out.write(f"  incremental / retrain as run (every {args.retrain_every} days): "
                          f"{inc['seconds'] / ret['seconds']:.3f} of the seconds, "
                          f"{inc['tokens'] / max(1, ret['tokens']):.3f} of the tokens\n")
    out.write("\nprobe R@10 by day (forgetting): " + "; ".join(
        f"{a} " + " ".join(f"{v:.3f}" for v in probe_r10[a].values()) for a in probe_r10) + "\n")
    out.write(f"total {results['total_seconds']:.0f}s\n")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(9, 4))
        for a in arms:
            ax.plot([date.fromisoformat(d) for d in per_day[a]], list(per_day[a].values()), marker=".", label=a)
        ax.set_ylabel("next-day R@10")
        ax.set_title(f"{Path(args.dataset).name}: next-day R@10 per day ({n_events} events)")
        ax.legend()
        fig.autofmt_xdate()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
