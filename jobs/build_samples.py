"""build_samples: day D's examples + catalog -> ``samples`` (every task), and the training mix.

Read -> validate -> transform -> write:
- ``examples`` dt = D, minus the ``eval_snapshot`` dt = D events (and, as a guard, any example of
  a snapshot user later than its held-out event, which could carry it in its history);
- ``catalog`` as of D (``first_seen_dt <= D``): every item must have a SID and all SIDs one
  ``sid_version``, else the job raises naming the problem and the fix;
- the items the day needs (history and target items, the seeded caption / general-LM item samples
  with every new item of D) are selected with Spark joins; the samples are built on the driver
  with the pure functions of :mod:`onerec_prod.samples.builders` (a day is small; the bootstrap
  day is the large case);
- ``samples`` is written with ``replaceWhere dt = D`` (all tasks at once; a rerun replaces).

The result carries per-task counts and token-length percentiles (p50/p90/p99 of prompt +
response), measured with the model tokenizer when one with the SID vocabulary is available, else
estimated (``extra.token_length_method`` says which).

:func:`export_training_mix` writes day D's mix (day D + seeded replay of earlier days, see
:mod:`onerec_prod.samples.mix`) as the local JSONL file the trainer reads.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from onerec_prod.config import Config
from onerec_prod.lake import JobResult, overwrite_partition, read_table, table_path, table_version
from onerec_prod.samples import builders
from onerec_prod.samples.mix import lookback_window, replay_count
from onerec_prod.samples.prompts import messages_from_json, render_training_ids
from onerec_prod.samples.rationale import RationaleSource, make_rationale_source

log = logging.getLogger(__name__)
JOB = "build_samples"
SFT_TASKS = tuple(t for t in builders.TASKS if t != "rl_prompt")
MIX_FIELDS = ("sample_id", "task", "messages", "response", "sid_version", "dt", "loss_from")
_SPECIAL_RE = re.compile(r"<\|[^|<>]+\|>|<s_[a-h]_\d+>|</?think>")


# --------------------------------------------------------------------------------------
# pure parts


def estimate_tokens(text: str) -> int:
    """Token estimate without a tokenizer: 1 per special/SID/think token + 1 per 4 other chars.

    >>> estimate_tokens("<|sid_begin|><s_a_1><s_b_2><|sid_end|> abcdefgh")
    7
    """
    specials = len(_SPECIAL_RE.findall(text))
    rest = _SPECIAL_RE.sub("", text)
    return specials + math.ceil(len(rest) / 4)


def percentile(values: Sequence[int], p: float) -> int:
    """Nearest-rank percentile (``p`` in 0..100) of a non-empty list.

    >>> percentile([1, 2, 3, 4], 50), percentile([1, 2, 3, 4], 90), percentile([5], 99)
    (2, 4, 5)
    """
    vals = sorted(values)
    k = max(math.ceil(p / 100 * len(vals)), 1)
    return int(vals[k - 1])


def token_length_stats(
    samples: Sequence[Mapping[str, Any]], *, dt: str, seed: int, per_task: int,
    tokenizer=None, max_length: int | None = None,
) -> dict[str, dict[str, int | float]]:
    """Per task: p50/p90/p99/max of prompt + response length over a seeded sample of rows.

    With ``tokenizer``: exact ids of :func:`render_training_ids` (chat template included) and
    the share over ``max_length``. Without: :func:`estimate_tokens` of the message contents +
    response (chat-template framing not counted).
    """
    by_task: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for s in samples:
        by_task[s["task"]].append(s)
    out: dict[str, dict[str, int | float]] = {}
    for task in sorted(by_task):
        rows = sorted(by_task[task], key=lambda s: builders.rank_key(seed, dt, "length", s["sample_id"]))
        rows = rows[:per_task]
        lengths = []
        for s in rows:
            msgs = messages_from_json(s["messages"])
            if tokenizer is not None:
                ids, _ = render_training_ids(tokenizer, msgs, s["response"], max_length=10**9)
                lengths.append(len(ids))
            else:
                lengths.append(sum(estimate_tokens(m["content"]) for m in msgs)
                               + estimate_tokens(s["response"]))
        stats: dict[str, int | float] = {
            "n_measured": len(lengths), "p50": percentile(lengths, 50),
            "p90": percentile(lengths, 90), "p99": percentile(lengths, 99), "max": max(lengths),
        }
        if tokenizer is not None and max_length:
            stats["over_max_length"] = round(sum(n > max_length for n in lengths) / len(lengths), 4)
        out[task] = stats
    return out


# --------------------------------------------------------------------------------------
# Spark parts


def _read_required(spark, cfg: Config, name: str, fix: str):
    path = table_path(cfg, name)
    version = table_version(spark, path)
    if version is None:
        raise FileNotFoundError(f"{JOB}: table {name!r} not found at {path}: {fix}")
    return read_table(spark, path, version), version


def _rank_col(seed: int, dt: str, purpose: str, key_col: str):
    """Spark twin of :func:`builders.rank_key`."""
    from pyspark.sql import functions as F

    return F.sha2(F.concat_ws("|", F.lit(str(seed)), F.lit(dt), F.lit(purpose), F.col(key_col)), 256)


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
        return (frame.withColumn("_k", _rank_col(c.seed, dt, purpose, "item_id"))
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


def _length_tokenizer(cfg: Config, model_dir: str | Path | None):
    """(tokenizer or None, method string) for the length percentiles."""
    from onerec_prod.sid.tokens import SID_BEGIN

    if model_dir is None:
        from onerec_prod.model.base import base_model_dir

        model_dir = base_model_dir(cfg)
        if not (Path(model_dir) / "tokenizer_config.json").exists():
            return None, "estimate: 1 per SID/special token + chars/4, chat framing excluded"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if SID_BEGIN not in tok.get_vocab():
        log.warning("%s: tokenizer at %s has no SID vocabulary; estimating lengths", JOB, model_dir)
        return None, "estimate: 1 per SID/special token + chars/4, chat framing excluded"
    return tok, f"tokenizer: {model_dir} (chat template included)"


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


def transform_persona_examples(examples):
    """Each user's last example (by ts, event_id) among those with a usable history."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    usable = examples.where(F.size("history") >= builders.MIN_HISTORY)
    w = Window.partitionBy("user_id").orderBy(F.col("ts").desc(), F.col("event_id").desc())
    return usable.withColumn("_r", F.row_number().over(w)).where(F.col("_r") == 1).drop("_r")


def transform_stream_examples(examples):
    """Each user's last example of the day (by ts, event_id) with ``n_day``, the user's number
    of examples that day (the ``sid_stream`` row's items new on the day)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    by_user = Window.partitionBy("user_id")
    w = by_user.orderBy(F.col("ts").desc(), F.col("event_id").desc())
    return (examples.withColumn("n_day", F.count(F.lit(1)).over(by_user))
            .withColumn("_r", F.row_number().over(w)).where(F.col("_r") == 1).drop("_r"))


def _samples_frame(spark, samples: Sequence[Mapping[str, Any]]):
    from onerec_prod.schemas import load_schema

    st = load_schema("samples").spark_schema()
    names = [f.name for f in st.fields]
    return spark.createDataFrame([tuple(s[n] for n in names) for s in samples], st)


def _build_on_executors(spark, kept, items: dict, *, dt: str, sid_version: str, samples_cfg):
    """Persona + per-example tasks with ``mapInPandas`` (the category source, built per worker)."""
    from onerec_prod.schemas import load_schema

    st = load_schema("samples").spark_schema()
    names = [f.name for f in st.fields]
    items_bc = spark.sparkContext.broadcast(items)
    cfg_json = samples_cfg.model_dump_json()
    hk = {"dt": dt, "sid_version": sid_version, "max_history": samples_cfg.max_history}

    def make(kind: str):
        def fn(batches):
            import pandas as pd

            from onerec_prod.config import SamplesCfg
            from onerec_prod.samples import builders as b
            from onerec_prod.samples.rationale import make_rationale_source

            c = SamplesCfg.model_validate_json(cfg_json)
            source = make_rationale_source(c.rationale_source, c)
            for pdf in batches:
                exs = pdf.to_dict("records")
                for e in exs:
                    e["history"] = [str(i) for i in e["history"]]
                if kind == "persona":
                    rows = b.build_persona_samples(exs, items_bc.value, **hk)
                elif kind == "stream":
                    rows = b.build_stream_samples(exs, items_bc.value, **hk)
                else:
                    rows = b.build_example_samples(exs, items_bc.value, rationale_source=source, **hk)
                out = pd.DataFrame([[r[n] for n in names] for r in rows], columns=names)
                out["loss_from"] = out["loss_from"].astype("Int32")  # nullable int, not float NaN
                yield out
        return fn

    cols = ["event_id", "user_id", "history", "target_item_id", "ts"]
    persona = transform_persona_examples(kept).select(*cols).mapInPandas(make("persona"), st)
    stream = transform_stream_examples(kept).select(*cols, "n_day").mapInPandas(make("stream"), st)
    return (persona.unionByName(stream)
            .unionByName(kept.select(*cols).mapInPandas(make("examples"), st)))


def _written_stats(spark, path: str, version: int, dt: str, seed: int, per_task: int):
    """(rows per task, seeded length sample per task) read back from the written partition."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    day = read_table(spark, path, version).where(F.col("dt") == dt)
    by_task = Window.partitionBy("task")
    w = by_task.orderBy(_rank_col(seed, dt, "length", "sample_id"))
    rows = (day.select("sample_id", "task", "messages", "response")
            .withColumn("_n", F.count(F.lit(1)).over(by_task))
            .withColumn("_r", F.row_number().over(w)).where(F.col("_r") <= per_task).collect())
    counts = {r["task"]: int(r["_n"]) for r in rows}
    return counts, [{k: r[k] for k in ("sample_id", "task", "messages", "response")} for r in rows]


def run(
    spark, dt: str, cfg: Config, *, model_dir: str | Path | None = None,
    rationale_source: RationaleSource | None = None,
) -> JobResult:
    """Build and write day ``dt``'s samples of every task.

    Args:
        model_dir: tokenizer for the length percentiles; None = the base model dir if it has
            one with the SID vocabulary, else an estimate.
        rationale_source: overrides ``samples.rationale_source`` (runs on the driver).

    Raises:
        FileNotFoundError: examples, eval_snapshot or catalog table absent (names the job to run).
        ValueError: catalog items without SID, mixed sid_versions, or unknown items.
    """
    from pyspark.sql import functions as F

    from jobs.common import check_date, log_result

    check_date(dt)
    c = cfg.samples
    examples, ex_v = _read_required(spark, cfg, "examples", f"run build_sequences for dt={dt}")
    snapshot, ev_v = _read_required(spark, cfg, "eval_snapshot", f"run build_eval_snapshot for dt={dt}")
    catalog, cat_v = _read_required(spark, cfg, "catalog", f"run update_catalog for dt={dt}")

    day = examples.where(F.col("dt") == dt)
    flagged = transform_flag_eval(day, snapshot.where(F.col("dt") == dt)).cache()
    agg = flagged.agg(
        F.count(F.lit(1)).alias("n"),
        F.sum(F.col("_held").cast("int")).alias("held"),
        F.sum(F.col("_later").cast("int")).alias("later"),
        F.sum((F.size("history") < builders.MIN_HISTORY).cast("int")).alias("short"),
        F.sum(F.array_contains("history", F.col("target_item_id")).cast("int")).alias("repeats"),
    ).collect()[0]
    n_read, n_held, n_later = int(agg["n"]), int(agg["held"] or 0), int(agg["later"] or 0)
    kept = flagged.where(~F.col("_held") & ~F.col("_later")).drop("_held", "_later")
    n_kept = n_read - n_held - n_later
    if n_read == 0:
        log.warning("%s dt=%s: no examples for the day (did build_sequences run?)", JOB, dt)
    elif n_held == 0:
        log.warning("%s dt=%s: no example of the day is in the eval snapshot", JOB, dt)
    if n_later:
        log.warning("%s dt=%s: dropped %d examples later than their user's held-out event", JOB, dt, n_later)

    catalog_day = catalog.where(F.col("first_seen_dt") <= dt).cache()
    try:
        sid_version = validate_catalog(catalog_day)
        items, caption_items, general_items, n_new = select_day_items(catalog_day, day, dt, c)
    finally:
        catalog_day.unpersist()

    source_name = rationale_source.name if rationale_source else c.rationale_source
    on_driver = rationale_source is not None or source_name != "category" or n_kept <= c.driver_max_examples
    fallbacks = None
    if on_driver:
        source = rationale_source or make_rationale_source(c.rationale_source, c)
        exs = [r.asDict() for r in kept.collect()]
        rows = builders.build_day_samples(
            exs, items, dt=dt, sid_version=sid_version, samples_cfg=c,
            caption_items=caption_items, general_items=general_items, rationale_source=source)
        frame = _samples_frame(spark, rows)
        fallbacks = getattr(source, "fallbacks", None)
    else:
        log.info("%s dt=%s: %d examples > samples.driver_max_examples=%d: building on the executors",
                 JOB, dt, n_kept, c.driver_max_examples)
        frame = _build_on_executors(spark, kept, items, dt=dt, sid_version=sid_version, samples_cfg=c)
        item_rows = builders.build_item_samples(caption_items, general_items, dt=dt, sid_version=sid_version)
        frame = frame.unionByName(_samples_frame(spark, item_rows))
    out_path = table_path(cfg, "samples")
    try:
        written = overwrite_partition(frame.repartition("task"), spark, out_path, "samples", {"dt": dt})
    finally:
        flagged.unpersist()

    per_task, measured = _written_stats(spark, out_path, written, dt, c.seed, c.length_sample_per_task)
    n_written = sum(per_task.values())
    tok, method = _length_tokenizer(cfg, model_dir)
    lengths = token_length_stats(measured, dt=dt, seed=c.seed, per_task=c.length_sample_per_task,
                                 tokenizer=tok, max_length=cfg.train.max_length)
    result = JobResult(JOB, dt)
    result.counts = {
        "examples_read": n_read, "eval_excluded": n_held,
        "dropped_after_eval_event": n_later, "skipped_short_history": int(agg["short"] or 0),
        "repeat_targets": int(agg["repeats"] or 0), "new_items": n_new, "samples_written": n_written,
        **{f"samples:{t}": per_task.get(t, 0) for t in builders.TASKS},
    }
    if fallbacks is not None:
        result.counts["teacher_fallbacks"] = int(fallbacks)
    result.read_versions = {"examples": ex_v, "eval_snapshot": ev_v, "catalog": cat_v}
    result.written_versions = {"samples": written}
    result.extra = {"sid_version": sid_version, "rationale_source": source_name,
                    "built_on": "driver" if on_driver else "executors",
                    "token_length_method": method, "token_lengths": lengths}
    log_result(result)
    log.info("%s dt=%s token lengths (%s): %s", JOB, dt, method, json.dumps(lengths, sort_keys=True))
    return result


# --------------------------------------------------------------------------------------
# training mix export


def export_training_mix(
    spark, dt: str, cfg: Config, out_path: str | Path, *, tasks: Sequence[str] | None = None,
    replay: bool = True,
) -> Path:
    """Write day ``dt``'s training mix as JSONL: the day's samples + a seeded replay sample.

    Replay: ``round(n_day * samples.replay_fraction)`` rows (at most what exists) from the
    ``samples.replay_lookback_days`` days before ``dt``, same tasks and sid_version, chosen by
    :func:`onerec_prod.samples.builders.rank_key` (``purpose="replay"``), as in
    :func:`onerec_prod.samples.mix.select_replay`. Rows are in the seeded mix order; fields
    ``sample_id, task, messages`` (JSON string, as in the table)``, response, sid_version, dt``
    plus ``replay`` (bool). A ``<out_path>.manifest.json`` records counts, the Delta version
    read and the file's sha256. Written to a temp file, then renamed.

    Args:
        tasks: tasks to export; default every SFT task (all but ``rl_prompt``, whose response
            is a bare reference SID for the RL reward, not an SFT target).
        replay: False = the day's rows only (e.g. the bootstrap alignment stages).
    """
    import hashlib

    from pyspark.sql import functions as F

    c = cfg.samples
    tasks = list(tasks or SFT_TASKS)
    unknown = sorted(set(tasks) - set(builders.TASKS))
    if unknown:
        raise ValueError(f"unknown tasks {unknown} (valid: {', '.join(builders.TASKS)})")
    df, version = _read_required(spark, cfg, "samples", f"run build_samples for dt={dt}")
    df = df.where(F.col("task").isin(tasks)).select(*MIX_FIELDS)
    new = [r.asDict() for r in df.where(F.col("dt") == dt).collect()]
    if not new:
        raise FileNotFoundError(f"{JOB}: no samples of tasks {tasks} for dt={dt}: run build_samples first")
    versions = sorted({r["sid_version"] for r in new})
    if len(versions) != 1:
        raise ValueError(f"{JOB}: samples of dt={dt} mix sid_versions {versions}; rebuild the day")
    start, end = lookback_window(dt, c.replay_lookback_days)
    window = df.where((F.col("dt") >= start) & (F.col("dt") < end) & (F.col("sid_version") == versions[0]))
    n = replay_count(len(new), c.replay_fraction, window.count()) if (replay and c.replay_fraction > 0) else 0
    replay = ([r.asDict() for r in window.withColumn("_k", _rank_col(c.seed, dt, "replay", "sample_id"))
               .orderBy("_k").limit(n).drop("_k").collect()] if n else [])
    rows = [dict(r, replay=False) for r in new] + [dict(r, replay=True) for r in replay]
    rows.sort(key=lambda r: builders.rank_key(c.seed, dt, "order", r["sample_id"]))

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    h = hashlib.sha256()
    with open(tmp, "w") as f:
        for r in rows:
            line = json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n"
            h.update(line.encode())
            f.write(line)
    os.replace(tmp, out)
    manifest = {
        "path": str(out), "dt": dt, "rows": len(rows), "new_rows": len(new), "replay_rows": len(replay),
        "tasks": dict(sorted(Counter(r["task"] for r in rows).items())), "sid_versions": versions,
        "sha256": h.hexdigest(), "data_versions": {"samples": version},
        "replay_window": [start, end],
    }
    Path(f"{out}.manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    log.info("%s: exported mix dt=%s: %d rows (%d replayed from [%s, %s)) to %s",
             JOB, dt, len(rows), len(replay), start, end, out)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m jobs.build_samples --date D [--config F] [--set k=v] [--model-dir DIR] [--export PATH]``."""
    from jobs.common import check_date
    from onerec_prod.config import load_config
    from onerec_prod.log import setup_logging
    from onerec_prod.spark import get_spark

    p = argparse.ArgumentParser(prog="jobs/build_samples.py", description="Build day D's training samples.")
    p.add_argument("--date", required=True, help="Day YYYY-MM-DD.")
    p.add_argument("--config", default=None, help="Config YAML (default configs/local.yaml).")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Config override.")
    p.add_argument("--model-dir", default=None, help="Tokenizer dir for the token-length percentiles.")
    p.add_argument("--export", default=None, metavar="PATH", help="Also write the day's training mix JSONL.")
    args = p.parse_args(argv)
    setup_logging("INFO")
    cfg = load_config(args.config, args.set)
    dt = check_date(args.date)
    spark = get_spark(cfg.spark)
    result = run(spark, dt, cfg, model_dir=args.model_dir).to_dict()
    if args.export:
        result["export"] = str(export_training_mix(spark, dt, cfg, args.export))
    sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
