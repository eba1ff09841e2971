"""``evaluate(cfg, model_dir, dt)``: the report the gate, the DAG and the CLI use.

Reads (Delta, via :mod:`onerec_prod.lake`): ``eval_snapshot`` dt in the trailing
``eval.window_days`` days through D (each selected user's first event of a day, with the history
before it: a next-day eval of a model that never trained on those events), the ``catalog`` (every item and SID), and ``events`` dt <= D minus every
eval-snapshot event (the baselines' training data: the days the model was trained on, without the
held-out events). Then :func:`evaluate_inputs` (no Spark) does the work:

1. the trie of EVERY catalog SID of the model's sid_version known on the event's day (never only
   the test items; an event of day d is decoded under the catalog as of d);
2. constrained beam search (``eval.beam_size``) per user, think mode optional; the results of a
   model on an event it was already scored on, unchanged, come from its score cache
   (:mod:`.score_cache`, ``eval.score_cache``);
3. Recall/NDCG@K over all selected users (a user whose target has no SID still counts, as 0);
4. caption BertScore on the fixed item sample plus the day's new items;
5. MostPop (trailing ``eval.mostpop_window_days``) and SASRec on the same users and targets;
6. per-user gains (``per_user``) so the gate can run a paired test against the champion.

:func:`evaluate_models` reads the inputs once and scores several models (candidate, SFT model,
champion) on exactly the same events.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onerec_prod.config import Config
from onerec_prod.eval.bertscore import stable_hash

log = logging.getLogger(__name__)


class EvalInputError(ValueError):
    """The snapshot, the catalog and the model do not fit together (the message says how)."""


@dataclass
class EvalInputs:
    """Everything an evaluation reads, as plain Python (so it can be built without Spark)."""

    dt: str
    snapshot: list[dict[str, Any]]          # event_id, user_id, history (item ids), target_item_id
    catalog: list[dict[str, Any]]           # item_id, title, categories, sid, sid_version, first_seen_dt
    train_sequences: list[list[str]]        # per user, oldest first, eval events excluded
    data_versions: dict[str, int | None] = field(default_factory=dict)
    recent_counts: dict[str, int] | None = None  # MostPop's window: events per item (None: train_sequences)


# --------------------------------------------------------------------------------------
# reading


def window_start(dt: str, days: int) -> str:
    """First day of the trailing ``days``-day window ending on ``dt``.

    >>> window_start("2014-03-02", 3)
    '2014-02-28'
    """
    from datetime import date, timedelta

    return (date.fromisoformat(dt) - timedelta(days=days - 1)).isoformat()


def read_eval_inputs(spark, cfg: Config, dt: str) -> EvalInputs:
    """Collect the snapshot rows of the window through ``dt``, the catalog and the baselines' data."""
    from pyspark.sql import functions as F

    from onerec_prod.lake import read_table, table_path, table_version

    paths = {n: table_path(cfg, n) for n in ("eval_snapshot", "catalog", "events")}
    versions = {n: table_version(spark, p) for n, p in paths.items()}
    missing = [n for n, v in versions.items() if v is None]
    if missing:
        raise EvalInputError(f"eval dt={dt}: Delta tables {missing} do not exist under {cfg.paths.lake} "
                             "(run the day's jobs first: ingest_events, update_catalog, build_eval_snapshot)")
    snap_all = read_table(spark, paths["eval_snapshot"], versions["eval_snapshot"])
    lo = window_start(dt, cfg.eval.window_days)
    snap = snap_all.where((F.col("dt") >= lo) & (F.col("dt") <= dt)).select(
        "event_id", "user_id", "history", "target_item_id", "dt")
    snapshot = [{"event_id": r["event_id"], "user_id": r["user_id"], "history": list(r["history"] or []),
                 "target_item_id": r["target_item_id"], "dt": str(r["dt"])} for r in snap.collect()]
    if not snapshot:
        raise EvalInputError(f"eval_snapshot has no rows for dt={dt} (window {lo}..{dt}; run job "
                             f"build_eval_snapshot --date {dt})")
    cat = read_table(spark, paths["catalog"], versions["catalog"]).select(
        "item_id", "title", "categories", "sid", "sid_version", "first_seen_dt")
    catalog = [{"item_id": r["item_id"], "title": r["title"], "categories": r["categories"],
                "sid": tuple(r["sid"]) if r["sid"] is not None else None, "sid_version": r["sid_version"],
                "first_seen_dt": r["first_seen_dt"]} for r in cat.collect()]
    held_out = snap_all.where(F.col("dt") <= dt).select("event_id")
    ev = read_table(spark, paths["events"], versions["events"]).where(F.col("dt") <= dt)
    train = ev.join(held_out, "event_id", "left_anti")
    seqs = train.groupBy("user_id").agg(
        F.sort_array(F.collect_list(F.struct("ts", "source_file", "seq", "item_id"))).alias("s"))
    train_sequences = [[x["item_id"] for x in r["s"]] for r in seqs.orderBy("user_id").collect()]
    recent = None
    if cfg.eval.mostpop_window_days:
        mlo = window_start(dt, cfg.eval.mostpop_window_days)
        recent = {r["item_id"]: int(r["n"]) for r in  # counted by Spark: one row per item, not per event
                  train.where(F.col("dt") >= mlo).groupBy("item_id").agg(F.count(F.lit(1)).alias("n")).collect()}
    log.info("eval inputs dt=%s: %d snapshot users, %d catalog items, %d training sequences, versions %s",
             dt, len(snapshot), len(catalog), len(train_sequences), versions)
    return EvalInputs(dt, snapshot, catalog, train_sequences, versions, recent)


def eval_inputs_on(spark, cfg: Config, dt: str) -> dict[str, Any]:
    """:func:`read_eval_inputs` as JSON types (a ``spark_server.SPARK_CALLS`` entry)."""
    from dataclasses import asdict

    return asdict(read_eval_inputs(spark, cfg, dt))


def load_eval_inputs(cfg: Config, dt: str, spark=None) -> EvalInputs:
    """The eval inputs of day ``dt``: read with ``spark``, or (without one) on the shared local Spark
    server when there is one, else in this process's own session."""
    if spark is not None:
        return read_eval_inputs(spark, cfg, dt)
    from onerec_prod.spark_server import run_on_spark

    d = run_on_spark(cfg, "eval_inputs", dt)
    for r in d["catalog"]:
        r["sid"] = tuple(r["sid"]) if r.get("sid") is not None else None
    return EvalInputs(**d)


# --------------------------------------------------------------------------------------
# pure parts


def select_users(snapshot: Sequence[Mapping[str, Any]], max_users: int | None, seed: int) -> list[Mapping[str, Any]]:
    """All rows (sorted by event_id), or the ``max_users`` with the smallest stable user hash.

    The sample depends only on user ids and ``seed``: the candidate and the champion are always
    scored on the same users.
    """
    rows = sorted(snapshot, key=lambda r: r["event_id"])
    if max_users is None or len(rows) <= max_users:
        return rows
    picked = sorted(rows, key=lambda r: (stable_hash(seed, str(r["user_id"])), r["event_id"]))[:max_users]
    return sorted(picked, key=lambda r: r["event_id"])


def catalog_sid_version(catalog: Sequence[Mapping[str, Any]], model_version: str | None) -> str | None:
    """The one sid_version of the catalog's SIDs, checked against the model's."""
    versions = sorted({r["sid_version"] for r in catalog if r.get("sid") is not None and r.get("sid_version")})
    if len(versions) > 1:
        raise EvalInputError(f"catalog mixes sid_versions {versions}: finish the SID refit before evaluating")
    version = versions[0] if versions else None
    if model_version is not None and version is not None and model_version != version:
        raise EvalInputError(
            f"model sid_version {model_version!r} != catalog sid_version {version!r}: evaluate a model "
            "trained on the current codebook (or retrain after the refit)")
    return version


def build_catalog_trie(catalog: Sequence[Mapping[str, Any]], sizes: Sequence[int]):
    """``(trie, item_ids)``: the trie of every catalog SID; ``item_ids[row]`` is the item of trie row ``row``."""
    from onerec_prod.sid.trie import SidTrie

    with_sid = [r for r in catalog if r.get("sid") is not None]
    if not with_sid:
        raise EvalInputError("the catalog has no item with a SID (run update_catalog with data.assign_sids)")
    trie = SidTrie.from_sids([tuple(r["sid"]) for r in with_sid], sizes)
    return trie, [r["item_id"] for r in with_sid]


def per_day_intervals(days: Sequence[str], gains: Mapping[str, Sequence[float]], k: int,
                      seed: int) -> dict[str, dict[str, dict]]:
    """``{dt: {"recall@k": {mean, low, high, n}, "ndcg@k": ...}}``: the pooled window split by the
    day of each eval event (a drop on one day shows even when the pooled mean hides it)."""
    _, summarize = _stats()
    by_day: dict[str, list[int]] = {}
    for i, d in enumerate(days):
        by_day.setdefault(d, []).append(i)
    keys = [f"recall@{k}", f"ndcg@{k}"]
    return {d: summarize({m: [gains[m][i] for i in idx] for m in keys}, seed=seed)
            for d, idx in sorted(by_day.items())}


def _pick_device(device: str | None) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _stats():
    from onerec_prod.eval.stats import per_user_gains, summarize

    return per_user_gains, summarize


def evaluate_inputs(cfg: Config, model_dir: str | Path, inputs: EvalInputs, *, think: bool | None = None,
                    device: str | None = None, with_baselines: bool = True) -> dict[str, Any]:
    """Score the model at ``model_dir`` on ``inputs`` and return the report (see :mod:`.report`).

    ``with_baselines=False`` skips MostPop/SASRec (e.g. when re-scoring the champion on a snapshot
    whose baselines the candidate's report already carries).
    """
    from onerec_prod.eval.baselines import run_baselines
    from onerec_prod.eval.bertscore import caption_bertscore, sample_caption_items
    from onerec_prod.eval.metrics import compute_metrics
    from onerec_prod.model.io import load_model, load_tokenizer, read_meta
    from onerec_prod.sid.tokens import SidVocab, level_sizes

    ecfg = cfg.eval
    think = ecfg.think if think is None else think
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    meta = read_meta(model_dir)
    sid_version = catalog_sid_version(inputs.catalog, meta.get("sid_version"))
    sizes = level_sizes(cfg.sid)
    trie, row_items = build_catalog_trie(inputs.catalog, sizes)
    by_id = {r["item_id"]: r for r in inputs.catalog}
    users = select_users(inputs.snapshot, ecfg.max_users, ecfg.seed)
    histories, dropped = [], 0
    for u in users:
        h = [by_id[i] for i in u["history"] if i in by_id and by_id[i].get("sid") is not None]
        dropped += len(u["history"]) - len(h)
        histories.append(h)
    targets = [u["target_item_id"] for u in users]
    no_sid = sum(1 for t in targets if t not in by_id or by_id[t].get("sid") is None)
    if dropped or no_sid:
        log.warning("eval: %d history items without a SID dropped from prompts; %d targets have no SID "
                    "(they count as misses)", dropped, no_sid)

    dev = _pick_device(device)
    tok, model = load_tokenizer(model_dir), load_model(model_dir, device=dev)
    vocab = SidVocab.from_tokenizer(tok, sizes)
    timing["load_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    ranked, rationales, cache_stats, trie_items_by_day = _rank(cfg, inputs, users, histories, meta, sid_version,
                                                               (trie, row_items), model, tok, vocab, think)
    timing["recommend_s"] = time.perf_counter() - t1
    timing["users_per_s"] = len(users) / max(timing["recommend_s"], 1e-9)
    metrics: dict[str, Any] = compute_metrics(ranked, targets, ecfg.ks)
    per_user_gains, summarize = _stats()
    gains = per_user_gains(ranked, targets, ecfg.ks)
    intervals = summarize({k: v for k, v in gains.items() if k.endswith(f"@{max(ecfg.ks)}")}, seed=ecfg.seed)
    per_user = {"event_ids": [u["event_id"] for u in users], **{k: [round(x, 6) for x in v] for k, v in gains.items()}}
    events_per_day: dict[str, int] = {}
    for u in users:
        events_per_day[str(u.get("dt", inputs.dt))] = events_per_day.get(str(u.get("dt", inputs.dt)), 0) + 1
    per_day = per_day_intervals([str(u.get("dt", inputs.dt)) for u in users], gains, max(ecfg.ks), ecfg.seed)

    t2 = time.perf_counter()
    bert: dict[str, Any] = {"bertscore_f1": None}
    if ecfg.bertscore_items > 0:
        new_ids = [r["item_id"] for r in inputs.catalog if r.get("first_seen_dt") == inputs.dt]
        sample = sample_caption_items(inputs.catalog, ecfg.bertscore_items, ecfg.seed, new_ids)
        bert = caption_bertscore(model, tok, sample, new_item_ids=new_ids, max_new_tokens=ecfg.caption_max_tokens,
                                 model_dir=ecfg.bertscore_model_dir, batch_size=ecfg.batch_size)
    metrics["bertscore_f1"] = bert["bertscore_f1"]
    timing["bertscore_s"] = time.perf_counter() - t2
    del model

    t3 = time.perf_counter()
    baselines = run_baselines(
        ecfg.baselines, inputs.train_sequences, [u["history"] for u in users], targets, ecfg.ks,
        sasrec_params={"epochs": ecfg.sasrec_epochs, "dim": ecfg.sasrec_dim, "max_len": ecfg.sasrec_max_len,
                       "device": dev},
        seed=ecfg.seed, mostpop_counts=inputs.recent_counts,
        sasrec_cache=(cfg.paths.var / "cache" / "sasrec", inputs.dt) if ecfg.sasrec_warm_start else None,
    ) if (ecfg.baselines and with_baselines) else {}
    timing["baselines_s"] = time.perf_counter() - t3
    timing["total_s"] = time.perf_counter() - t0

    report = {
        "dt": inputs.dt,
        "model_dir": str(model_dir),
        "model_weights_sha256": meta.get("weights_sha256"),
        "sid_version": sid_version,
        "n_users": len(users),
        "think": think,
        "metrics": metrics,
        "intervals": intervals,
        "per_user": per_user,
        "events_per_day": dict(sorted(events_per_day.items())),
        "per_day": per_day,
        "window": {"from": window_start(inputs.dt, ecfg.window_days), "to": inputs.dt,
                   "mostpop_days": ecfg.mostpop_window_days},
        "baselines": baselines,
        "bertscore": bert,
        "score_cache": cache_stats,
        "counts": {"snapshot_users": len(inputs.snapshot), "catalog_items": len(inputs.catalog),
                   "trie_items": trie.num_items, "trie_items_by_day": trie_items_by_day, "targets_without_sid": no_sid,
                   "history_items_without_sid": dropped, "train_sequences": len(inputs.train_sequences)},
        "data_versions": dict(inputs.data_versions),
        "config": ecfg.model_dump(mode="json"),
        "timing": {k: round(v, 3) for k, v in timing.items()},
        "examples": [
            {"user_id": u["user_id"], "target": t, "top5": r[:5],
             **({"rationale": rationales[i]} if rationales else {})}
            for i, (u, t, r) in enumerate(zip(users[:3], targets[:3], ranked[:3], strict=False))
        ],
    }
    log.info("eval dt=%s users=%d %s baselines=%s (%.1fs)", inputs.dt, len(users),
             {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()},
             {n: round(b.get("recall@10", 0.0), 4) for n, b in baselines.items()}, timing["total_s"])
    return report


def _rank(cfg: Config, inputs: EvalInputs, users: Sequence[Mapping[str, Any]], histories: list[list[dict]],
          meta: Mapping[str, Any], sid_version: str | None, day_trie, model, tok, vocab, think: bool):
    """Top-B item ids per user: each event decoded under the catalog as of its own day
    (:func:`.score_cache.trie_rows`: the items a recommender could have shown then), results of
    unchanged events taken from the model's score cache (``eval.score_cache``; never in think mode).

    Returns ``(ranked, rationales or None, cache stats, trie items per day)``."""
    from onerec_prod.eval import score_cache as sc
    from onerec_prod.eval.beam import recommend
    from onerec_prod.sid.tokens import level_sizes

    ecfg = cfg.eval
    days = [str(u.get("dt", inputs.dt))[:10] for u in users]
    day_rows = {d: sc.trie_rows(inputs.catalog, d) for d in sorted(set(days))}
    settings = json.dumps({"beam": ecfg.beam_size, "max_items": cfg.samples.max_history, "sid_version": sid_version})
    digests = {d: sc.rows_digest(rows) for d, rows in day_rows.items()}
    keys = [sc.event_key(str(u["event_id"]), [str(i) for i in u["history"]], digests[d], settings)
            for u, d in zip(users, days, strict=True)]
    cache = (sc.ScoreCache(cfg.paths.var / "cache" / "eval", meta["weights_sha256"])
             if ecfg.score_cache and not think and meta.get("weights_sha256") else None)
    ranked: list[list[str] | None] = cache.lookup(keys) if cache else [None] * len(users)
    rationales: list[str | None] | None = [None] * len(users) if think else None
    for d in sorted({days[i] for i, r in enumerate(ranked) if r is None}):
        idx = [i for i, r in enumerate(ranked) if r is None and days[i] == d]
        if len(day_rows[d]) == len(day_trie[1]):  # nothing first seen after d: the eval day's trie
            trie, items = day_trie
        else:
            trie, items = build_catalog_trie(day_rows[d], level_sizes(cfg.sid))
        recs = recommend(model, tok, trie, vocab, [histories[i] for i in idx], ecfg, think=think,
                         max_items=cfg.samples.max_history)
        for j, (i, per_user) in enumerate(zip(idx, recs.sids, strict=True)):
            ranked[i] = [items[trie.row_of(sid)] for sid, _ in per_user]
            if rationales is not None and recs.rationales:
                rationales[i] = recs.rationales[j]
    stats = {"enabled": cache is not None, "hits": cache.hits if cache else 0,
             "decoded": len(users) - (cache.hits if cache else 0)}
    if cache is not None:
        cache.save(keys, ranked)
    return ranked, rationales, stats, {d: len(rows) for d, rows in day_rows.items()}


def evaluate_models(cfg: Config, dt: str, candidate: str | Path, *, others: Mapping[str, str | Path] | None = None,
                    spark=None, device: str | None = None, inputs: EvalInputs | None = None) -> dict[str, Any]:
    """The candidate's report, with every model of ``others`` (``{"champion": dir, "sft": dir}``) scored
    on the SAME inputs, read once (or given as ``inputs``): ``report[f"{name}_metrics"]`` and
    ``report[f"{name}_per_user"]``. A model whose weights hash equals an already scored model's is
    not scored again (``report["same_weights"][name]`` says whose scores it got)."""
    from onerec_prod.model.io import read_meta

    inputs = inputs if inputs is not None else load_eval_inputs(cfg, dt, spark)
    report = evaluate_inputs(cfg, candidate, inputs, device=device)
    scored = {report.get("model_weights_sha256"): report} if report.get("model_weights_sha256") else {}
    for name, model_dir in (others or {}).items():
        sha = read_meta(model_dir).get("weights_sha256")
        if sha and sha in scored:
            # the same weights give the same scores: e.g. an RL refresh with no signal left the SFT
            # model's weights as they were; reuse them instead of scoring the model again
            other = scored[sha]
            report.setdefault("same_weights", {})[name] = other["model_dir"]
            log.info("eval dt=%s: %s has the same weights (%s) as %s: its scores are reused", dt, name,
                     sha[:12], other["model_dir"])
        else:
            other = evaluate_inputs(cfg, model_dir, inputs, device=device, with_baselines=False)
            if sha:
                scored[sha] = other
        if other["per_user"]["event_ids"] != report["per_user"]["event_ids"]:
            raise EvalInputError(f"{name} was scored on other events than the candidate (internal error)")
        report[f"{name}_metrics"] = other["metrics"]
        report[f"{name}_per_user"] = {k: v for k, v in other["per_user"].items() if k != "event_ids"}
        report[f"{name}_intervals"] = other["intervals"]
        report[f"{name}_per_day"] = other["per_day"]
    return report


def evaluate(cfg: Config, model_dir: str | Path, dt: str, *, spark=None, think: bool | None = None,
             device: str | None = None, with_baselines: bool = True) -> dict[str, Any]:
    """The eval report of the model at ``model_dir`` on the eval snapshot of day ``dt``."""
    inputs = load_eval_inputs(cfg, dt, spark)
    return evaluate_inputs(cfg, model_dir, inputs, think=think, device=device, with_baselines=with_baselines)
