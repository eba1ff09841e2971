"""build_samples: day D's examples + catalog -> ``samples`` (every registered task).

Read -> validate -> transform -> write, one step a function under :func:`run`:
- ``examples`` dt = D, minus the ``eval_snapshot`` dt = D events (and, as a guard, any example of
  a snapshot user later than its held-out event, which could carry it in its history);
- ``catalog`` as of D (``first_seen_dt <= D``): every item must have a SID and all SIDs one
  ``sid_version``, else the job raises naming the problem and the fix;
- the items the day needs (history and target items, the seeded caption / general-LM item samples
  with every new item of D) are selected with Spark joins;
- every task of :data:`onerec_prod.samples.builders.REGISTRY` is built with its pure builder, on
  the driver (a day is small) or, for large days, per source on the executors (``mapInPandas``):
  ``examples`` tasks per Arrow batch, ``users`` tasks per partition of the examples hash-partitioned
  by user; ``items`` tasks always on the driver;
- ``samples`` is written with ``replaceWhere dt = D`` (all tasks at once; a rerun replaces).

The result carries per-task counts and estimated token-length percentiles (p50/p90/p99 of prompt +
response, :mod:`onerec_prod.samples.lengths`; no tokenizer is loaded in the job).

``--export PATH`` also writes the day's training mix with
:func:`onerec_prod.samples.export.export_training_mix` (the trainer's exporter).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from jobs import day_record
from onerec_prod.config import Config
from onerec_prod.lake import JobResult, overwrite_partition, read_table, table_path, table_version
from onerec_prod.samples import builders
from onerec_prod.samples.lengths import ESTIMATE_METHOD, token_length_stats
from onerec_prod.samples.mix import rank_col
from onerec_prod.samples.rationale import RationaleSource, make_rationale_source
from onerec_prod.util import check_date

log = logging.getLogger(__name__)
JOB = "build_samples"


# --------------------------------------------------------------------------------------
# Spark parts


def _read_required(spark, cfg: Config, name: str, fix: str):
    path = table_path(cfg, name)
    version = table_version(spark, path)
    if version is None:
        raise FileNotFoundError(f"{JOB}: table {name!r} not found at {path}: {fix}")
    return read_table(spark, path, version), version


def validate_catalog(catalog_day) -> str:
    """The single sid_version of the catalog as of D; raises when a SID is missing or mixed."""
    from pyspark.sql import functions as F

    no_sid = F.col("sid").isNull() | (F.size("sid") == 0)
    r = catalog_day.agg(
        F.count(F.lit(1)).alias("n"),
        F.sum(no_sid.cast("int")).alias("missing"),
        F.slice(F.array_sort(F.collect_list(F.when(no_sid, F.col("item_id")))), 1, 5).alias("ids"),
        F.array_sort(F.collect_set(F.coalesce("sid_version", F.lit("<null>")))).alias("versions"),
    ).collect()[0]
    if not r["n"]:
        raise ValueError(f"{JOB}: the catalog has no items as of this day: run update_catalog first")
    if r["missing"]:
        raise ValueError(
            f"{JOB}: {r['missing']} catalog items have no SID (e.g. {list(r['ids'])}); run "
            "update_catalog with SID assignment (data.assign_sids=true) for this day first")
    versions = list(r["versions"])
    if len(versions) != 1 or versions[0] == "<null>":
        raise ValueError(
            f"{JOB}: catalog SIDs come from several sid_versions {versions}; samples never mix "
            "versions: finish the SID refit (every item re-assigned) before building samples")
    return versions[0]


def _item_dict(row) -> dict[str, Any]:
    return {"item_id": row["item_id"], "title": row["title"], "categories": row["categories"],
            "description": row["description"], "sid": tuple(int(c) for c in row["sid"])}


def select_day_items(catalog_day, examples_df, dt: str, samples_cfg):
    """(items the examples need by id, caption items, general-LM items, number of new items).

    Caption items: every item first seen on ``dt``, then the others by seeded rank up to
    ``caption_items_per_day`` in total; general-LM items: the first ``general_lm_per_day`` by
    another seeded rank. Two Spark actions.

    Raises:
        ValueError: an item of the examples is not in the catalog as of ``dt``.
    """
    from pyspark.sql import functions as F

    c = samples_cfg
    cols = ["item_id", "title", "categories", "description", "sid"]
    cat = catalog_day.select(*cols, "first_seen_dt")
    ref = (examples_df.select(F.explode("history").alias("item_id"))
           .union(examples_df.select(F.col("target_item_id").alias("item_id"))).distinct())
    found = ref.join(cat.select(*cols), "item_id", "left").collect()
    unknown = sorted(r["item_id"] for r in found if r["sid"] is None)
    if unknown:
        raise ValueError(f"{JOB} dt={dt}: {len(unknown)} items of the examples are not in the catalog "
                         f"as of the day (e.g. {unknown[:5]}): run update_catalog for the day first")
    referenced = {r["item_id"]: _item_dict(r) for r in found}

    def ranked(frame, purpose: str, n: int):
        return (frame.withColumn("_k", rank_col(c.seed, dt, purpose, "item_id"))
                .orderBy("_k").limit(max(n, 0)).withColumn("_p", F.lit(purpose)))

    is_new = F.col("first_seen_dt") == dt
    parts = (cat.where(is_new).withColumn("_k", F.col("item_id")).withColumn("_p", F.lit("new"))
             .unionByName(ranked(cat.where(~is_new), "caption", c.caption_items_per_day))
             .unionByName(ranked(cat, "general_lm", c.general_lm_per_day)))
    got = sorted(parts.collect(), key=lambda r: (r["_p"], r["_k"]))
    new = [_item_dict(r) for r in got if r["_p"] == "new"]
    old = [_item_dict(r) for r in got if r["_p"] == "caption"][: max(c.caption_items_per_day - len(new), 0)]
    general = [_item_dict(r) for r in got if r["_p"] == "general_lm"]
    return referenced, new + old, general, len(new)


def transform_flag_eval(day_examples, snapshot_day):
    """Day examples with ``_held`` (a snapshot event) and ``_later`` (stamped after its user's
    held-out event, so its history could contain the held-out item) flags; keep neither."""
    from pyspark.sql import functions as F

    snap = snapshot_day.select("event_id", "user_id", "ts")
    held = snap.select("event_id", F.lit(True).alias("_held"))
    eval_ts = snap.groupBy("user_id").agg(F.min("ts").alias("_eval_ts"))
    out = day_examples.join(held, "event_id", "left").join(eval_ts, "user_id", "left")
    return out.select(
        *day_examples.columns,
        F.coalesce("_held", F.lit(False)).alias("_held"),
        (F.col("_eval_ts").isNotNull() & (F.col("ts") > F.col("_eval_ts"))
         & F.col("_held").isNull()).alias("_later"),
    )


def _samples_frame(spark, samples: Sequence[Mapping[str, Any]]):
    from onerec_prod.schemas import load_schema

    st = load_schema("samples").spark_schema()
    names = [f.name for f in st.fields]
    return spark.createDataFrame([tuple(s[n] for n in names) for s in samples], st)


_CHUNK = 10_000  # rows a Python worker turns into dicts at a time


def user_tails(kept):
    """One row per user of the day, all a ``users`` task reads: the user's last example by
    ``(ts, event_id)`` (columns ``event_id, history, target_item_id, ts``), its latest example
    with enough history (``u_``-prefixed columns, null when none) and ``n_day``, the user's
    examples of the day. Reduced on Spark (partial aggregation), so a worker gets ``users`` rows,
    not the day's examples of a user."""
    from pyspark.sql import functions as F

    fields = ["event_id", "history", "target_item_id", "ts"]
    order = F.struct("ts", "event_id")
    usable = F.coalesce(F.size("history"), F.lit(0)) >= builders.MIN_HISTORY
    agg = kept.groupBy("user_id").agg(
        F.max_by(F.struct(*fields), order).alias("_l"),
        F.max_by(F.struct(*fields), F.when(usable, order)).alias("_u"),  # null orderings are skipped
        F.count(F.lit(1)).alias("n_day"))
    return agg.select("user_id", "n_day", *[F.col(f"_l.{c}").alias(c) for c in fields],
                      *[F.col(f"_u.{c}").alias(f"u_{c}") for c in fields])


def user_tail_examples(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The examples of a :func:`user_tails` row (the last one, and the last usable one when it is
    another): with every other example of the user dropped, the ``users`` builders
    (last usable example for persona, last example and ``n_day`` for the stream) give the same rows."""
    def ex(prefix: str) -> dict[str, Any]:
        return {"event_id": row[f"{prefix}event_id"], "user_id": row["user_id"],
                "history": [str(i) for i in row[f"{prefix}history"]],
                "target_item_id": row[f"{prefix}target_item_id"], "ts": int(row[f"{prefix}ts"]),
                "n_day": int(row["n_day"])}

    out = [ex("")]
    u = row["u_event_id"]
    if isinstance(u, str) and u != row["event_id"]:
        out.append(ex("u_"))
    return out


def day_cooccurrence(kept, items_bc, max_history: int):
    """The ``evidence`` rationale source's co-occurrence counts over the whole day's reasoning
    requests: counted per partition on the executors, then summed. Only the counts (bounded by
    the number of leaf categories) reach the driver, never the day's examples; a partition is
    counted in chunks of ``_CHUNK`` rows, so a worker never holds a partition's examples."""
    from onerec_prod.samples.rationale import EvidenceRationale

    def per_partition(rows):
        from itertools import islice

        from onerec_prod.samples import builders as b

        total = EvidenceRationale.cooccurrence([])
        rows = iter(rows)
        while chunk := list(islice(rows, _CHUNK)):
            exs = [dict(r.asDict(), history=[str(i) for i in r["history"]]) for r in chunk]
            total = EvidenceRationale.merge_counts(
                total, EvidenceRationale.cooccurrence(b.reasoning_requests(exs, items_bc.value, max_history)))
        yield total

    cols = ["event_id", "user_id", "history", "target_item_id", "ts"]
    return kept.select(*cols).rdd.mapPartitions(per_partition).fold(
        EvidenceRationale.cooccurrence([]), EvidenceRationale.merge_counts)


def _build_on_executors(spark, kept, items: dict, *, dt: str, sid_version: str, samples_cfg):
    """The ``users`` and ``examples`` tasks of the registry on the executors (``mapInPandas``).

    ``examples`` tasks: per Arrow batch (any split gives the same rows). ``users`` tasks: per
    Arrow batch of :func:`user_tails` (one row per user: the only examples those builders read),
    so no worker holds a partition of the day. The rationale source is rebuilt per worker
    from the config (sources with ``executors = True``: ``category``, and ``evidence`` with the
    day's co-occurrence counts from :func:`day_cooccurrence`, so every batch writes what one call
    over the whole day writes); the teacher stays on the driver.
    """
    from onerec_prod.schemas import load_schema

    st = load_schema("samples").spark_schema()
    names = [f.name for f in st.fields]
    items_bc = spark.sparkContext.broadcast(items)
    counts_bc = None
    if samples_cfg.rationale_source == "evidence":
        counts_bc = spark.sparkContext.broadcast(day_cooccurrence(kept, items_bc, samples_cfg.max_history))
    cfg_json = samples_cfg.model_dump_json()
    hk = {"dt": dt, "sid_version": sid_version, "max_history": samples_cfg.max_history}

    def make(source: str):
        def fn(batches):
            import pandas as pd

            from onerec_prod.config import SamplesCfg
            from onerec_prod.samples import builders as b
            from onerec_prod.samples.rationale import make_rationale_source

            c = SamplesCfg.model_validate_json(cfg_json)
            source_ = make_rationale_source(c.rationale_source, c)
            if counts_bc is not None:
                source_.counts = counts_bc.value
            for pdf in batches:
                if source == "users":  # one user_tails row per user: its last (and last usable) example
                    exs = [e for r in pdf.to_dict("records") for e in user_tail_examples(r)]
                else:
                    exs = pdf.to_dict("records")
                    for e in exs:
                        e["history"] = [str(i) for i in e["history"]]
                rows = b.build_source_samples(source, exs, items_bc.value, rationale_source=source_, **hk)
                out = pd.DataFrame([[r[n] for n in names] for r in rows], columns=names)
                out["loss_from"] = out["loss_from"].astype("Int32")  # nullable int, not float NaN
                yield out
        return fn

    cols = ["event_id", "user_id", "history", "target_item_id", "ts"]
    ex = kept.select(*cols)
    users = user_tails(ex).mapInPandas(make("users"), st)
    return users.unionByName(ex.mapInPandas(make("examples"), st))


def _written_stats(spark, path: str, version: int, dt: str, seed: int, per_task: int):
    """(rows per task, seeded length sample per task) read back from the written partition."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    day = read_table(spark, path, version).where(F.col("dt") == dt)
    by_task = Window.partitionBy("task")
    w = by_task.orderBy(rank_col(seed, dt, "length", "sample_id"))
    rows = (day.select("sample_id", "task", "messages", "response")
            .withColumn("_n", F.count(F.lit(1)).over(by_task))
            .withColumn("_r", F.row_number().over(w)).where(F.col("_r") <= per_task).collect())
    counts = {r["task"]: int(r["_n"]) for r in rows}
    return counts, [{k: r[k] for k in ("sample_id", "task", "messages", "response")} for r in rows]


# --------------------------------------------------------------------------------------
# the steps of run


@dataclass
class _Inputs:
    examples: Any
    snapshot: Any
    catalog: Any
    versions: dict[str, int]


def read_inputs(spark, cfg: Config, dt: str) -> _Inputs:
    """The three input tables at their latest versions; FileNotFoundError names the job to run."""
    got, versions = {}, {}
    for name, job in (("examples", "build_sequences"), ("eval_snapshot", "build_eval_snapshot"),
                      ("catalog", "update_catalog")):
        got[name], versions[name] = _read_required(spark, cfg, name, f"run {job} for dt={dt}")
    return _Inputs(got["examples"], got["eval_snapshot"], got["catalog"], versions)


def split_eval(day, snapshot_day, dt: str):
    """(flagged frame, cached; kept examples; counts): the day's examples minus the eval events."""
    from pyspark.sql import functions as F

    flagged = transform_flag_eval(day, snapshot_day).cache()
    agg = flagged.agg(
        F.count(F.lit(1)).alias("n"),
        F.sum(F.col("_held").cast("int")).alias("held"),
        F.sum(F.col("_later").cast("int")).alias("later"),
        F.sum((F.size("history") < builders.MIN_HISTORY).cast("int")).alias("short"),
        F.sum(F.array_contains("history", F.col("target_item_id")).cast("int")).alias("repeats"),
    ).collect()[0]
    counts = {"examples_read": int(agg["n"]), "eval_excluded": int(agg["held"] or 0),
              "dropped_after_eval_event": int(agg["later"] or 0),
              "skipped_short_history": int(agg["short"] or 0), "repeat_targets": int(agg["repeats"] or 0)}
    kept = flagged.where(~F.col("_held") & ~F.col("_later")).drop("_held", "_later")
    if counts["examples_read"] == 0:
        log.warning("%s dt=%s: no examples for the day (did build_sequences run?)", JOB, dt)
    elif counts["eval_excluded"] == 0:
        log.warning("%s dt=%s: no example of the day is in the eval snapshot", JOB, dt)
    if counts["dropped_after_eval_event"]:
        log.warning("%s dt=%s: dropped %d examples later than their user's held-out event", JOB, dt,
                    counts["dropped_after_eval_event"])
    return flagged, kept, counts


def day_catalog(catalog, day, dt: str, samples_cfg):
    """(sid_version, items by id, caption items, general-LM items, number of new items)."""
    from pyspark.sql import functions as F

    catalog_day = catalog.where(F.col("first_seen_dt") <= dt).cache()
    try:
        sid_version = validate_catalog(catalog_day)
        return (sid_version, *select_day_items(catalog_day, day, dt, samples_cfg))
    finally:
        catalog_day.unpersist()


def build_frame(spark, kept, n_kept: int, items, caption_items, general_items, *, dt: str,
                sid_version: str, samples_cfg, rationale_source: RationaleSource | None):
    """(samples frame of every registered task, built_on, teacher fallbacks or None).

    On the driver unless the day has more than ``samples.driver_max_examples`` kept examples and
    the configured rationale source runs on executors (``category``, ``evidence``); the teacher
    and an explicit ``rationale_source`` object run on the driver.
    """
    c = samples_cfg
    source = rationale_source or make_rationale_source(c.rationale_source, c)
    if rationale_source is not None or not source.executors or n_kept <= c.driver_max_examples:
        rows = builders.build_day_samples(
            [r.asDict() for r in kept.collect()], items, dt=dt, sid_version=sid_version, samples_cfg=c,
            caption_items=caption_items, general_items=general_items, rationale_source=source)
        return _samples_frame(spark, rows), "driver", getattr(source, "fallbacks", None)
    log.info("%s dt=%s: %d examples > samples.driver_max_examples=%d: building on the executors",
             JOB, dt, n_kept, c.driver_max_examples)
    frame = _build_on_executors(spark, kept, items, dt=dt, sid_version=sid_version, samples_cfg=c)
    item_rows = builders.build_item_samples(caption_items, general_items, dt=dt, sid_version=sid_version)
    return frame.unionByName(_samples_frame(spark, item_rows)), "executors", None


def run(spark, dt: str, cfg: Config, *, rationale_source: RationaleSource | None = None) -> JobResult:
    """Build and write day ``dt``'s samples of every registered task.

    Args:
        rationale_source: overrides ``samples.rationale_source`` (runs on the driver).

    Raises:
        FileNotFoundError: examples, eval_snapshot or catalog table absent (names the job to run).
        ValueError: catalog items without SID, mixed sid_versions, or unknown items.
    """
    from pyspark.sql import functions as F

    from jobs.common import log_result

    check_date(dt)
    c = cfg.samples
    # the day's catalog (its items and their SIDs) is complete only with update_catalog's record
    day_record.require_day(spark, cfg, "update_catalog", dt, JOB)
    inputs = read_inputs(spark, cfg, dt)
    day = inputs.examples.where(F.col("dt") == dt)
    flagged, kept, counts = split_eval(day, inputs.snapshot.where(F.col("dt") == dt), dt)
    n_kept = counts["examples_read"] - counts["eval_excluded"] - counts["dropped_after_eval_event"]
    sid_version, items, caption_items, general_items, n_new = day_catalog(inputs.catalog, day, dt, c)
    frame, built_on, fallbacks = build_frame(
        spark, kept, n_kept, items, caption_items, general_items, dt=dt, sid_version=sid_version,
        samples_cfg=c, rationale_source=rationale_source)
    out_path = table_path(cfg, "samples")
    try:
        written = overwrite_partition(frame.repartition("task"), spark, out_path, "samples", {"dt": dt})
    finally:
        flagged.unpersist()

    per_task, measured = _written_stats(spark, out_path, written, dt, c.seed, c.length_sample_per_task)
    lengths = token_length_stats(measured, dt=dt, seed=c.seed, per_task=c.length_sample_per_task)
    result = JobResult(JOB, dt)
    result.counts = {**counts, "new_items": n_new, "samples_written": sum(per_task.values()),
                     **{f"samples:{t}": per_task.get(t, 0) for t in builders.TASKS}}
    if fallbacks is not None:
        result.counts["teacher_fallbacks"] = int(fallbacks)
    result.read_versions = dict(inputs.versions)
    result.written_versions = {"samples": written}
    result.extra = {"sid_version": sid_version,
                    "rationale_source": rationale_source.name if rationale_source else c.rationale_source,
                    "built_on": built_on, "token_length_method": ESTIMATE_METHOD, "token_lengths": lengths}
    log_result(result)
    log.info("%s dt=%s token lengths (%s): %s", JOB, dt, ESTIMATE_METHOD, json.dumps(lengths, sort_keys=True))
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m jobs.build_samples --date D [--config F] [--set k=v] [--export PATH]``."""
    from onerec_prod.config import load_config
    from onerec_prod.log import setup_logging
    from onerec_prod.samples.export import export_training_mix
    from onerec_prod.spark import get_spark

    p = argparse.ArgumentParser(prog="jobs/build_samples.py", description="Build day D's training samples.")
    p.add_argument("--date", required=True, help="Day YYYY-MM-DD.")
    p.add_argument("--config", default=None, help="Config YAML (default configs/local.yaml).")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Config override.")
    p.add_argument("--export", default=None, metavar="PATH", help="Also write the day's training mix JSONL.")
    args = p.parse_args(argv)
    setup_logging("INFO")
    cfg = load_config(args.config, args.set)
    dt = check_date(args.date)
    spark = get_spark(cfg.spark)
    result = run(spark, dt, cfg).to_dict()
    if args.export:
        result["export"] = str(export_training_mix(spark, dt, cfg, args.export))
    sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
