"""build_eval_snapshot: the frozen gate set of day D -> ``eval_snapshot`` (replaceWhere dt = D).

For every user of day D selected by a stable hash (:func:`eval_user_selected`: share
``data.eval_user_fraction``, salt ``data.eval_salt``), the user's FIRST event (by ts,
source_file, seq) of the user's latest calendar day (UTC date of ``ts``) in landing partition D,
kept when its history (the user's items before that day) is non-empty, taken from ``examples``
dt = D. On a daily partition that is the user's first event of D with its history through D-1; on
a bootstrap partition (all history landed as one day) it is each user's last active day: a
leave-one-out test of the bootstrap users. A next-day eval: the samples job keeps this event and every later one of the
user's day out of training (a stream stops before its first held-out item), so for these users
the day's candidate, like the champion, has seen their items through D-1 only.
"""

from __future__ import annotations

import hashlib
import logging

from jobs import day_record
from jobs.common import log_result, read_or_empty
from onerec_prod.config import Config
from onerec_prod.lake import JobResult, overwrite_partition, table_path
from onerec_prod.util import check_date

log = logging.getLogger(__name__)
JOB = "build_eval_snapshot"
_HEX = 15  # hex digits of sha256 used for the user hash (fits a bigint)


def eval_user_selected(user_id: str, fraction: float, salt: str) -> bool:
    """Plain-Python twin of the Spark selection: ``int(sha256(salt:user)[:15], 16) < fraction * 16**15``.

    >>> eval_user_selected("A1YJEY40YUW4SE", 1.0, "s")
    True
    """
    h = int(hashlib.sha256(f"{salt}:{user_id}".encode()).hexdigest()[:_HEX], 16)
    return h < int(fraction * 16**_HEX)


def eval_user_column(user_col, fraction: float, salt: str):
    """Spark column: True for users in the eval sample (same rule as :func:`eval_user_selected`)."""
    from pyspark.sql import functions as F

    h = F.conv(F.substring(F.sha2(F.concat(F.lit(f"{salt}:"), user_col), 256), 1, _HEX), 16, 10)
    return h.cast("decimal(20,0)") < F.lit(int(fraction * 16**_HEX)).cast("decimal(20,0)")


def transform_eval_snapshot(examples_day, events_day, fraction: float, salt: str):
    """Eval rows: per selected user, the first event of their latest calendar day in the partition
    (ties by source_file, seq), history non-empty."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    order = events_day.select("event_id", "source_file", "seq")
    df = examples_day.where(eval_user_column(F.col("user_id"), fraction, salt)).join(order, "event_id")
    day = F.to_date(F.from_unixtime(F.col("ts"), "yyyy-MM-dd"))
    df = df.withColumn("_day", day).withColumn("_last", F.max("_day").over(Window.partitionBy("user_id")))
    df = df.where(F.col("_day") == F.col("_last"))
    w = Window.partitionBy("user_id").orderBy(F.col("ts"), F.col("source_file"), F.col("seq"))
    first = df.withColumn("_r", F.row_number().over(w)).where(F.col("_r") == 1)
    return first.where(F.size("history") > 0).select(
        "event_id", "user_id", "history", "target_item_id", "ts", "dt")


def run(spark, dt: str, cfg: Config) -> JobResult:
    """Write day ``dt``'s eval snapshot."""
    from pyspark.sql import functions as F

    check_date(dt)
    result = JobResult(JOB, dt)
    day_record.require_day(spark, cfg, "ingest_events", dt, JOB)  # the day's events are all there
    examples, ex_version = read_or_empty(spark, cfg, "examples")
    events, ev_version = read_or_empty(spark, cfg, "events")
    snap = transform_eval_snapshot(examples.where(F.col("dt") == dt), events.where(F.col("dt") == dt),
                                   cfg.data.eval_user_fraction, cfg.data.eval_salt).cache()
    try:
        n = snap.count()
        version = overwrite_partition(snap, spark, table_path(cfg, "eval_snapshot"), "eval_snapshot",
                                      {"dt": dt})
    finally:
        snap.unpersist()
    result.counts = {"eval_events": n}
    result.read_versions = {"examples": ex_version, "events": ev_version}
    result.written_versions = {"eval_snapshot": version}
    log_result(result)
    return result


def main(argv: list[str] | None = None) -> int:
    from jobs.common import job_main

    return job_main(JOB, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
