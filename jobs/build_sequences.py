"""build_sequences: events of day D -> ``examples`` (history -> target) and ``user_history``.

For each event of day D (a user's events ordered by ts, source_file, seq) the example is the last
``data.history_len`` items the user interacted with before it: the user's events of earlier days
(ordered by dt, ts, source_file, seq) followed by the earlier events of day D. The target is the
event's item. ``examples`` is written with ``replaceWhere dt = D``.

The pre-D history is derived from ``events`` where ``dt < D`` (not from ``user_history``), so the
job is a pure function of the events table: a rerun of any day, or days built out of order, give
the same examples as long as every earlier day is ingested. Rebuild a day after re-ingesting an
earlier one (ingest_events reports ``later_days``; a date-ordered backfill does it).

Refuses (:class:`jobs.day_record.DayIncomplete`) when ingest_events has no valid day commit record
for D, or no record for an earlier day present in ``events``: such a day may hold events whose
quarantine half never landed (a crash between ingest's two commits); a rerun of ingest repairs.

``user_history`` (last history_len items, chronological) is MERGEd with the state as of end of D:
a row is only replaced by a state of the same or a later day, and only when it differs, so a
rerun of D changes no content and an older day never overwrites a newer state.
"""

from __future__ import annotations

import logging

from jobs import day_record
from jobs.common import ShrinkRefused, delta_version, for_write, log_result, merge_metrics, read_or_empty
from onerec_prod.config import Config
from onerec_prod.lake import JobResult, create_if_absent, overwrite_partition, table_path
from onerec_prod.util import check_date

log = logging.getLogger(__name__)
JOB = "build_sequences"


def transform_prior_histories(prior_events, users, history_len: int):
    """Per user of ``users``: ``pre`` = last ``history_len`` item ids before day D, oldest first.

    ``prior_events`` are events with dt < D (columns user_id, item_id, dt, ts, source_file, seq).
    """
    from pyspark.sql import functions as F

    ev = prior_events.join(users.select("user_id").distinct(), "user_id", "left_semi")
    arr = F.array_sort(F.collect_list(F.struct("dt", "ts", "source_file", "seq", "item_id")))
    agg = ev.groupBy("user_id").agg(arr.alias("_a"))
    return agg.select("user_id", F.transform(
        F.slice("_a", F.greatest(F.size("_a") - history_len + 1, F.lit(1)), history_len),
        lambda x: x["item_id"]).alias("pre"))


def transform_sequences(day_events, pre, history_len: int, dt: str):
    """(examples of day D, user_history rows as of end of D) from day D's events and ``pre``."""
    from pyspark.sql import functions as F

    day = day_events.groupBy("user_id").agg(F.array_sort(F.collect_list(
        F.struct("ts", "source_file", "seq", "event_id", "item_id"))).alias("_day"))
    users = day.join(pre, "user_id", "left").withColumn(
        "pre", F.coalesce("pre", F.array().cast("array<string>")))
    users = users.withColumn("_all", F.concat("pre", F.transform("_day", lambda x: x["item_id"])))
    exploded = users.select("user_id", "pre", "_all", F.posexplode("_day").alias("k", "e"))
    n_before = F.size("pre") + F.col("k")
    examples = exploded.select(
        F.col("e.event_id").alias("event_id"), "user_id",
        F.slice("_all", F.greatest(n_before - history_len + 1, F.lit(1)),
                F.least(n_before, F.lit(history_len))).alias("history"),
        F.col("e.item_id").alias("target_item_id"), F.col("e.ts").alias("ts"), F.lit(dt).alias("dt"),
    )
    state = users.select(
        "user_id",
        F.slice("_all", F.greatest(F.size("_all") - history_len + 1, F.lit(1)), history_len).alias("items"),
        F.array_max(F.transform("_day", lambda x: x["ts"])).alias("last_ts"),
        F.lit(dt).alias("updated_dt"),
    )
    return examples, state


def reference_sequences(prior: dict[str, list[str]], day_events: list[dict], history_len: int, dt: str):
    """Plain single-process twin of :func:`transform_sequences` (tests, ``bench/dataplane.py``).

    Args:
        prior: user -> item ids before day D, oldest first (only the last history_len are used).
        day_events: ``events`` dicts of day D (any order).

    Returns:
        (examples dicts, ``{user_id: (items, last_ts)}`` state as of end of D).
    """
    examples = []
    state: dict[str, tuple[list[str], int]] = {}
    hist = {}
    for e in sorted(day_events, key=lambda e: (e["user_id"], e["ts"], e["source_file"], e["seq"])):
        h = hist.setdefault(e["user_id"], list(prior.get(e["user_id"], []))[-history_len:])
        examples.append({"event_id": e["event_id"], "user_id": e["user_id"], "history": h[-history_len:],
                         "target_item_id": e["item_id"], "ts": e["ts"], "dt": dt})
        h = h + [e["item_id"]]
        hist[e["user_id"]] = h[-history_len:]
        state[e["user_id"]] = (hist[e["user_id"]], max(e["ts"], state.get(e["user_id"], ([], e["ts"]))[1]))
    return examples, state


def merge_user_history(spark, path: str, state) -> dict[str, int]:
    """MERGE the end-of-D states: insert new users; replace older-or-same-day rows that differ."""
    from delta.tables import DeltaTable

    metrics = (
        DeltaTable.forPath(spark, path).alias("t")
        .merge(state.alias("s"), "t.user_id = s.user_id")
        .whenMatchedUpdateAll(condition="s.updated_dt > t.updated_dt OR (s.updated_dt = t.updated_dt "
                                        "AND NOT (s.items <=> t.items AND s.last_ts <=> t.last_ts))")
        .whenNotMatchedInsertAll()
        .execute()
    )
    m = merge_metrics(metrics)
    return {"users_inserted": m["inserted"], "users_updated": m["updated"]}


def run(spark, dt: str, cfg: Config, force: bool = False) -> JobResult:
    """Build day ``dt``'s examples and MERGE its user histories.

    A day with no events never replaces examples the day already has with an empty partition
    (the events were lost, or ingest has not run): :class:`jobs.common.ShrinkRefused`, unless
    ``force``. A day with no events and no examples writes nothing.
    """
    from pyspark.sql import functions as F

    check_date(dt)
    result = JobResult(JOB, dt)
    h = cfg.data.history_len
    day_record.require_day(spark, cfg, "ingest_events", dt, JOB)
    events, ev_version = read_or_empty(spark, cfg, "events")
    earlier_days = {r["dt"] for r in events.where(F.col("dt") < dt).select("dt").distinct().collect()}
    day_record.require_days(cfg, "ingest_events", earlier_days, f"{JOB} dt={dt}")
    cols = ["event_id", "user_id", "item_id", "dt", "ts", "source_file", "seq"]
    day_events = events.where(F.col("dt") == dt).select(*cols).cache()
    pre = None
    try:
        n_events = day_events.count()
        n_users = day_events.select("user_id").distinct().count()
        if n_events == 0:
            log.warning("%s dt=%s: no events for the day (did ingest_events run?)", JOB, dt)
            held, _ = read_or_empty(spark, cfg, "examples")
            n_held = held.where(F.col("dt") == dt).count()
            if n_held and not force:
                raise ShrinkRefused(
                    f"{JOB} dt={dt}: no events for the day, but examples already holds {n_held} rows for it; "
                    "refusing to replace them with an empty partition. Rerun ingest_events for the day, or "
                    "rerun with --force to empty it.")
            if not n_held:
                result.counts = {"events_read": 0, "examples_written": 0, "users": 0}
                result.read_versions = {"events": ev_version}
                log_result(result)
                return result
        # the one expensive step (all earlier events); cached so both outputs reuse it
        pre = transform_prior_histories(events.where(F.col("dt") < dt).select(*cols), day_events, h).cache()
        examples, state = transform_sequences(day_events, pre, h, dt)
        ex_version = overwrite_partition(for_write(examples, n_events), spark, table_path(cfg, "examples"),
                                         "examples", {"dt": dt})
        uh_path = table_path(cfg, "user_history")
        create_if_absent(spark, uh_path, "user_history")
        uh_read = delta_version(spark, uh_path)
        merged = merge_user_history(spark, uh_path, state)
    finally:
        day_events.unpersist()
        if pre is not None:
            pre.unpersist()
    result.counts = {"events_read": n_events, "examples_written": n_events,
                     "users": n_users,
                     **merged}
    result.read_versions = {"events": ev_version, "user_history": uh_read}
    result.written_versions = {"examples": ex_version, "user_history": delta_version(spark, uh_path)}
    log_result(result)
    return result


def main(argv: list[str] | None = None) -> int:
    from jobs.common import job_main

    return job_main(JOB, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
