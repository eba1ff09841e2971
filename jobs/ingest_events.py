"""ingest_events: ``raw/events/dt=D`` -> ``events`` (good rows) + ``events_quarantine`` (bad rows).

Every landing line ends in exactly one of the two tables, keyed by ``(source_file, line_no)``.
Reasons, first failing wins, in this order: ``malformed_json``; ``missing_field:<col>`` /
``bad_type:<col>`` (schema column order); ``empty:<col>``; ``negative_timestamp``;
``future_timestamp`` (ts >= midnight ending D + ``data.max_future_skew_s``); ``unknown_item``;
``duplicate_event``.

* Known items = catalog rows with ``first_seen_dt <= D`` plus the valid lines of the day's own
  item feed (``raw/items/dt=D``). So ingest does not depend on whether update_catalog already ran
  for D, and a rerun after later days gives the same answer.
* Duplicates: among otherwise-valid rows, the first occurrence of an event_id in the day (by
  file, line) is kept, later ones are ``duplicate_event``; a row whose event_id is already in
  ``events`` with ``dt < D`` is ``duplicate_event``. Only earlier days count, so reruns of any day
  in date order neither lose nor double a row. Ingesting D before an earlier day can keep an event
  that the earlier day also holds: the job reports ``later_days`` so that those days are rerun
  (a date-ordered backfill does this).
* Both writes are ``replaceWhere dt = D``: a rerun replaces the day, never appends.
* A rerun never shrinks a day silently: when the landing partition now has fewer lines than the
  day's rows in ``events`` + ``events_quarantine`` (a truncated or expired landing partition),
  the job refuses (:class:`jobs.common.ShrinkRefused`, naming the counts) unless ``force``.
* ``events_written`` and ``quarantine_rows`` are counted in the written Delta versions, not
  derived from the line count; if they do not add up to ``lines_read`` the job fails.
* The day is complete only when its commit record (:mod:`jobs.day_record`) is written, LAST: the
  record is deleted before the ``events`` commit and rewritten after both commits and the count
  check, so a crash between the two commits leaves a day that readers refuse
  (``build_sequences``, ``build_eval_snapshot``) until a rerun repairs it.
"""

from __future__ import annotations

import logging

from jobs import day_record
from jobs.common import (
    ShrinkRefused,
    day_end_ts,
    for_write,
    log_result,
    parse_raw,
    partition_rows,
    read_or_empty,
    read_raw_lines,
    reason_counts,
)
from onerec_prod.config import Config
from onerec_prod.lake import JobResult, overwrite_partition, table_path
from onerec_prod.util import check_date

log = logging.getLogger(__name__)
JOB = "ingest_events"
DEFAULT_EVENT_TYPE = "purchase"


def transform_parse_events(lines, dt: str, max_future_skew_s: int):
    """Landing lines -> typed event columns and the row-local ``reason`` (future ts included)."""
    from pyspark.sql import functions as F

    parsed = parse_raw(lines, "raw_events")
    limit = day_end_ts(dt) + max_future_skew_s
    return parsed.withColumn(
        "reason",
        F.when(F.col("reason").isNotNull(), F.col("reason"))
        .when(F.col("ts") >= F.lit(limit), F.lit("future_timestamp")),
    )


def transform_resolve_events(parsed, known_item_ids, earlier_event_ids):
    """Add ``unknown_item`` and ``duplicate_event`` reasons.

    Args:
        parsed: output of :func:`transform_parse_events`.
        known_item_ids: one column ``item_id`` (catalog as of D plus the day's valid item feed).
        earlier_event_ids: one column ``event_id`` (events of days before D).
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    known = known_item_ids.select("item_id").distinct().withColumn("_known", F.lit(True))
    earlier = earlier_event_ids.select("event_id").distinct().withColumn("_earlier", F.lit(True))
    df = parsed.join(F.broadcast(known), "item_id", "left").join(earlier, "event_id", "left")
    df = df.withColumn(
        "reason", F.when(F.col("reason").isNotNull(), F.col("reason"))
        .when(F.col("_known").isNull(), F.lit("unknown_item")))
    w = Window.partitionBy("event_id", F.col("reason").isNull()).orderBy("source_file", "line_no")
    rank = F.when(F.col("reason").isNull(), F.row_number().over(w))
    return df.withColumn(
        "reason", F.when(F.col("reason").isNotNull(), F.col("reason"))
        .when(F.col("_earlier").isNotNull() | (rank > 1), F.lit("duplicate_event")),
    ).drop("_known", "_earlier")


def transform_split_events(resolved, dt: str):
    """(events rows of day D, quarantine rows of day D) from :func:`transform_resolve_events`."""
    from pyspark.sql import functions as F

    good = resolved.where(F.col("reason").isNull()).select(
        "event_id", "user_id", "item_id", "ts",
        F.coalesce("event_type", F.lit(DEFAULT_EVENT_TYPE)).alias("event_type"),
        F.col("line_no").alias("seq"), "source_file", F.lit(dt).alias("dt"),
    )
    bad = resolved.where(F.col("reason").isNotNull()).select(
        "raw", "reason", "source_file", "line_no", F.lit(dt).alias("dt"))
    return good, bad


def reference_ingest(lines, dt: str, max_future_skew_s: int, known_item_ids, earlier_event_ids):
    """Plain single-process twin of the Spark transforms (used by tests and ``bench/dataplane.py``).

    Args:
        lines: ``(source_file, line_no, raw)`` tuples of day ``dt``.
        known_item_ids, earlier_event_ids: sets, as in :func:`transform_resolve_events`.

    Returns:
        (good rows as ``events`` dicts, bad rows as ``events_quarantine`` dicts).
    """
    import json

    from onerec_prod.schemas import load_schema, validate_fields

    schema = load_schema("raw_events")
    limit = day_end_ts(dt) + max_future_skew_s
    seen: set[str] = set()
    good, bad = [], []
    for source_file, line_no, raw in sorted(lines, key=lambda t: (t[0], t[1])):
        try:
            row = json.loads(raw)
        except ValueError:
            row = None
        reason = validate_fields(schema, row) if row is not None else "malformed_json"
        if reason is None and row["ts"] >= limit:
            reason = "future_timestamp"
        if reason is None and row["item_id"] not in known_item_ids:
            reason = "unknown_item"
        if reason is None and (row["event_id"] in earlier_event_ids or row["event_id"] in seen):
            reason = "duplicate_event"
        if reason is None:
            seen.add(row["event_id"])
            good.append({"event_id": row["event_id"], "user_id": row["user_id"], "item_id": row["item_id"],
                         "ts": row["ts"], "event_type": row.get("event_type") or DEFAULT_EVENT_TYPE,
                         "seq": line_no, "source_file": source_file, "dt": dt})
        else:
            bad.append({"raw": raw, "reason": reason, "source_file": source_file, "line_no": line_no,
                        "dt": dt})
    return good, bad


def known_items(spark, cfg: Config, dt: str):
    """(item_id frame: catalog with first_seen_dt <= D + valid lines of raw/items/dt=D, catalog version)."""
    from pyspark.sql import functions as F

    catalog, version = read_or_empty(spark, cfg, "catalog")
    feed = parse_raw(read_raw_lines(spark, cfg, "items", dt, required=False), "raw_items")
    ids = catalog.where(F.col("first_seen_dt") <= dt).select("item_id").unionByName(
        feed.where(F.col("reason").isNull()).select("item_id"))
    return ids, version


def run(spark, dt: str, cfg: Config, force: bool = False) -> JobResult:
    """Validate and land day ``dt``; returns counts and the Delta versions read and written.

    Raises :class:`ShrinkRefused` when the landing partition has fewer lines than the day already
    holds, unless ``force``.
    """
    from pyspark.sql import functions as F

    check_date(dt)
    result = JobResult(JOB, dt)
    lines = read_raw_lines(spark, cfg, "events", dt)
    known, cat_version = known_items(spark, cfg, dt)
    events, ev_version = read_or_empty(spark, cfg, "events")
    earlier = events.where(F.col("dt") < dt).select("event_id")
    parsed = transform_parse_events(lines, dt, cfg.data.max_future_skew_s)
    resolved = transform_resolve_events(parsed, known, earlier).cache()
    try:
        good, bad = transform_split_events(resolved, dt)
        n_lines, counts = reason_counts(resolved, JOB)
        n_bad = sum(counts.values())
        quarantine, _ = read_or_empty(spark, cfg, "events_quarantine")
        held_events = events.where(F.col("dt") == dt).count()
        held_bad = quarantine.where(F.col("dt") == dt).count()
        if held_events + held_bad > n_lines:
            msg = (f"{JOB} dt={dt}: the landing partition has {n_lines} lines but the day already holds "
                   f"{held_events} events + {held_bad} quarantined = {held_events + held_bad} lines; "
                   "a rerun would shrink the day (truncated or expired landing data?)")
            if not force:
                raise ShrinkRefused(msg + ". Restore the landing partition, or rerun with --force to "
                                    "replace the day with what landed now.")
            log.warning("%s; replacing it anyway (--force)", msg)
        day_record.invalidate(cfg, JOB, dt)  # from here until the record is rewritten, the day is incomplete
        ev_written = overwrite_partition(for_write(good, n_lines - n_bad), spark, table_path(cfg, "events"), "events",
                                         {"dt": dt})
        day_record.chaos_point(JOB, "events")
        q_written = overwrite_partition(bad.coalesce(1), spark, table_path(cfg, "events_quarantine"),
                                        "events_quarantine", {"dt": dt})
    finally:
        resolved.unpersist()
    ev_rows = partition_rows(spark, table_path(cfg, "events"), ev_written, dt)
    q_rows = partition_rows(spark, table_path(cfg, "events_quarantine"), q_written, dt)
    if ev_rows + q_rows != n_lines or q_rows != n_bad:
        raise RuntimeError(f"{JOB} dt={dt}: {n_lines} lines read but the tables hold {ev_rows} events + "
                           f"{q_rows} quarantined (expected {n_bad}) for the day: rerun the day")
    later = sorted(r["dt"] for r in events.where(F.col("dt") > dt).select("dt").distinct().collect())
    if later:
        log.warning("%s dt=%s: later days %s are already ingested; if this run changed day %s, rerun "
                    "ingest_events and build_sequences for them in date order", JOB, dt,
                    ", ".join(later[:5]) + (" ..." if len(later) > 5 else ""), dt)
    result.counts = {"lines_read": n_lines, "events_written": ev_rows, "quarantined": n_bad,
                     "quarantine_rows": q_rows, **counts, "later_days": len(later)}
    result.read_versions = {"catalog": cat_version, "events": ev_version}
    result.written_versions = {"events": ev_written, "events_quarantine": q_written}
    day_record.write(cfg, JOB, dt, {"events": {"version": ev_written, "rows": ev_rows},
                                    "events_quarantine": {"version": q_written, "rows": q_rows}},
                     {"lines_read": n_lines})
    log_result(result)
    return result


def main(argv: list[str] | None = None) -> int:
    from jobs.common import job_main

    return job_main(JOB, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
