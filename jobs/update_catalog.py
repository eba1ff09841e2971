"""update_catalog: MERGE ``raw/items/dt=D`` into ``catalog``; bad lines -> ``items_quarantine``.

* Validation: ``schemas/raw_items.yaml`` (``malformed_json``, ``missing_field:<col>``,
  ``bad_type:<col>``, ``empty:<col>``). When an item appears on several lines of the day, the last
  line wins and earlier ones are quarantined as ``duplicate_item``.
* MERGE on ``item_id``: new items are inserted (``first_seen_dt = updated_dt = D``, sid null);
  a known item's text is updated only if it differs and D >= its ``updated_dt`` (so replaying an
  older day never reverts newer text); ``first_seen_dt`` only moves earlier. Nothing is deleted
  and no SID ever changes.
* SIDs: if some catalog row has no SID, ``onerec_prod.sid.service.ensure_sids(cfg, rows)`` is
  called with every catalog row and the SIDs of rows that had none are MERGEd in. Skipped (sid
  stays null) when ``run(..., assign_sids=False)``, ``data.assign_sids`` is false, or the service
  is not importable.
* Rerun of the same day: the MERGE matches no condition, so the table *content* is identical;
  Delta still commits a new (empty) version, so version numbers grow.
* Up to three commits (``items_quarantine``, the catalog MERGE, the SID MERGE): the day is
  complete only when its commit record (:mod:`jobs.day_record`) is written after all of them
  (deleted before the first). ``build_samples`` refuses a day without it; a rerun repairs.
"""

from __future__ import annotations

import logging

from jobs import day_record
from jobs.common import (
    delta_version,
    log_result,
    merge_metrics,
    parse_raw,
    partition_rows,
    read_raw_lines,
    reason_counts,
)
from onerec_prod.config import Config
from onerec_prod.lake import JobResult, create_if_absent, overwrite_partition, table_path
from onerec_prod.util import check_date

log = logging.getLogger(__name__)
JOB = "update_catalog"
TEXT_COLUMNS = ("title", "categories", "description")


def transform_parse_items(lines):
    """Item-feed lines -> typed item columns and ``reason`` (``duplicate_item`` for superseded lines)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    parsed = parse_raw(lines, "raw_items")
    ok = F.col("reason").isNull()
    latest_first = Window.partitionBy("item_id", ok).orderBy(F.col("source_file").desc(),
                                                            F.col("line_no").desc())
    return parsed.withColumn(
        "reason", F.when(~ok, F.col("reason"))
        .when(F.row_number().over(latest_first) > 1, F.lit("duplicate_item")),
    )


def transform_catalog_updates(items, dt: str):
    """Valid item rows -> catalog-shaped source rows of the MERGE (sid null, both dates = D)."""
    from pyspark.sql import functions as F

    return items.where(F.col("reason").isNull()).select(
        "item_id", "title", "categories", "description",
        F.lit(None).cast("array<int>").alias("sid"), F.lit(None).cast("string").alias("sid_version"),
        F.lit(dt).alias("first_seen_dt"), F.lit(dt).alias("updated_dt"),
    )


def merge_catalog(spark, path: str, updates) -> dict[str, int]:
    """MERGE catalog-shaped ``updates`` into the catalog at ``path``; returns inserted/updated counts."""
    from delta.tables import DeltaTable

    text_same = " AND ".join(f"t.{c} <=> s.{c}" for c in TEXT_COLUMNS)
    metrics = (
        DeltaTable.forPath(spark, path).alias("t")
        .merge(updates.alias("s"), "t.item_id = s.item_id")
        .whenMatchedUpdate(
            condition=f"NOT ({text_same}) AND s.updated_dt >= t.updated_dt",
            set={**{c: f"s.{c}" for c in TEXT_COLUMNS}, "updated_dt": "s.updated_dt",
                 "first_seen_dt": "least(t.first_seen_dt, s.first_seen_dt)"},
        )
        .whenMatchedUpdate(condition="s.first_seen_dt < t.first_seen_dt",
                           set={"first_seen_dt": "s.first_seen_dt"})
        .whenNotMatchedInsertAll()
        .execute()
    )
    return merge_metrics(metrics)


def assign_missing_sids(spark, cfg: Config, path: str) -> dict[str, int | str | None]:
    """Give catalog rows without a SID one from the SID service; existing SIDs never change."""
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    try:
        from onerec_prod.sid.service import current_version, ensure_sids
    except ImportError as e:
        log.warning("%s: SID service not importable (%s); sid left null", JOB, e)
        return {"sids_assigned": 0, "sid_status": "unavailable"}
    cat = DeltaTable.forPath(spark, path).toDF()
    if cat.where("sid IS NULL").limit(1).count() == 0:
        return {"sids_assigned": 0, "sid_status": "complete"}
    # Only the first fit embeds every item; afterwards the items that have a SID are needed for
    # their codes alone (collision avoidance), so their text stays out of the driver.
    fit = current_version(cfg) is None
    text = [F.col(c) if fit else F.when(F.col("sid").isNull(), F.col(c)).alias(c) for c in TEXT_COLUMNS]
    rows = [
        {"item_id": r["item_id"], "title": r["title"], "categories": r["categories"],
         "description": r["description"], "sid": list(r["sid"]) if r["sid"] is not None else None,
         "sid_version": r["sid_version"]}
        for r in cat.select("item_id", *text, "sid", "sid_version").orderBy("item_id").collect()
    ]
    mapping, version = ensure_sids(cfg, rows)
    missing = {r["item_id"] for r in rows if r["sid"] is None}
    new = [(iid, [int(x) for x in mapping[iid]], version) for iid in sorted(missing) if iid in mapping]
    if not new:
        return {"sids_assigned": 0, "sid_status": "complete", "sid_version": version}
    src = spark.createDataFrame(new, "item_id string, sid array<int>, sid_version string")
    (
        DeltaTable.forPath(spark, path).alias("t")
        .merge(src.alias("s"), "t.item_id = s.item_id")
        .whenMatchedUpdate(condition="t.sid IS NULL", set={"sid": "s.sid", "sid_version": "s.sid_version"})
        .execute()
    )
    return {"sids_assigned": len(new), "sid_status": "assigned", "sid_version": version}


def run(spark, dt: str, cfg: Config, assign_sids: bool = True) -> JobResult:
    """MERGE day ``dt``'s item feed into the catalog, quarantine bad lines, assign new SIDs."""
    from pyspark.sql import functions as F

    check_date(dt)
    result = JobResult(JOB, dt)
    path = table_path(cfg, "catalog")
    create_if_absent(spark, path, "catalog")
    result.read_versions = {"catalog": delta_version(spark, path)}
    items = transform_parse_items(read_raw_lines(spark, cfg, "items", dt)).cache()
    try:
        n_lines, counts = reason_counts(items, JOB)
        bad = items.where(F.col("reason").isNotNull()).select(
            "raw", "reason", "source_file", "line_no", F.lit(dt).alias("dt"))
        day_record.invalidate(cfg, JOB, dt)  # the day is incomplete until the record is rewritten
        q_version = overwrite_partition(bad.coalesce(1), spark, table_path(cfg, "items_quarantine"),
                                        "items_quarantine", {"dt": dt})
        day_record.chaos_point(JOB, "items_quarantine")
        merged = merge_catalog(spark, path, transform_catalog_updates(items, dt))
        day_record.chaos_point(JOB, "catalog")
    finally:
        items.unpersist()
    sid_info: dict = {"sids_assigned": 0, "sid_status": "skipped"}
    if assign_sids and cfg.data.assign_sids:
        sid_info = assign_missing_sids(spark, cfg, path)
    result.counts = {"lines_read": n_lines, "quarantined": sum(counts.values()), **counts,
                     "new_items": merged["inserted"], "updated_items": merged["updated"],
                     "sids_assigned": int(sid_info["sids_assigned"])}
    result.extra = {k: v for k, v in sid_info.items() if k != "sids_assigned"}
    result.written_versions = {"catalog": delta_version(spark, path), "items_quarantine": q_version}
    q_rows = partition_rows(spark, table_path(cfg, "items_quarantine"), q_version, dt)
    if q_rows != result.counts["quarantined"]:
        raise RuntimeError(f"{JOB} dt={dt}: {result.counts['quarantined']} lines quarantined but "
                           f"items_quarantine holds {q_rows} rows for the day: rerun the day")
    day_record.write(cfg, JOB, dt, {"catalog": {"version": result.written_versions["catalog"]},
                                    "items_quarantine": {"version": q_version, "rows": q_rows}},
                     {"lines_read": n_lines})
    log_result(result)
    return result


def main(argv: list[str] | None = None) -> int:
    from jobs.common import job_main

    return job_main(JOB, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
