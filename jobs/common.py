"""Shared parts of the data-plane jobs: landing-zone reads, raw-line validation, day bounds, CLI.

Every job is ``run(spark, dt, cfg) -> JobResult`` plus pure ``transform_*`` functions; a thin
``main()`` makes it runnable as ``spark-submit jobs/<name>.py --date D [--config FILE]``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import sys
from collections.abc import Callable
from datetime import UTC, date, datetime
from pathlib import Path

from onerec_prod.config import Config
from onerec_prod.lake import JobResult, read_table, table_exists, table_path, table_version
from onerec_prod.schemas import load_schema, spark_json_fields, spark_row_reason
from onerec_prod.util import check_date

log = logging.getLogger(__name__)

LINE_COLUMNS = ("raw", "source_file", "line_no")


def day_end_ts(dt: str) -> int:
    """Unix seconds of the midnight (UTC) that ends day ``dt``."""
    d = date.fromisoformat(dt)
    return int(datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp()) + 86_400


def raw_dir(cfg: Config, kind: str, dt: str) -> str:
    """``<paths.raw>/<kind>/dt=D`` (kind: events or items)."""
    return f"{cfg.paths.raw.rstrip('/')}/{kind}/dt={dt}"


def _local_has_jsonl(path: str) -> bool | None:
    if "://" in path:
        return None  # object store: let Spark decide
    p = Path(path)
    return p.is_dir() and any(p.glob("*.jsonl"))


def read_raw_lines(spark, cfg: Config, kind: str, dt: str, required: bool = True):
    """The day's landing lines: ``raw`` (the line), ``source_file`` (``<kind>/dt=D/<file>``) and
    ``line_no`` (1-based). Blank lines are kept (they fail validation); the final newline is not a
    line. Only ``*.jsonl`` files are read (``_faults.json`` and temp files are not).

    Raises:
        FileNotFoundError: ``required`` and the partition has no ``*.jsonl`` file.
    """
    from pyspark.sql import functions as F

    path = raw_dir(cfg, kind, dt)
    present = _local_has_jsonl(path)
    if present is False:
        if required:
            raise FileNotFoundError(
                f"no landing data: {path}/*.jsonl is absent (run `onerec-prod replay --start {dt} "
                "--days 1` or wait for the log system)")
        return spark.createDataFrame([], "raw string, source_file string, line_no bigint")
    # Text source (splittable, streaming) instead of whole-file reads: exploding one huge array
    # per file was quadratic-ish (50 s for a 2 MB feed). Exact line numbers: rows of one split
    # come in file order (monotonically_increasing_id grows within a partition) and splits of
    # one file are ordered by their start offset (_metadata.file_block_start).
    from pyspark.sql import Window

    df = (spark.read.option("pathGlobFilter", "*.jsonl").text(path)
          .select(F.col("value").alias("raw"), F.col("_metadata.file_name").alias("_name"),
                  F.col("_metadata.file_block_start").alias("_start"),
                  F.monotonically_increasing_id().alias("_id")))
    w = Window.partitionBy("_name").orderBy("_start", "_id")
    return df.select(
        "raw",
        F.concat(F.lit(f"{kind}/dt={dt}/"), F.col("_name")).alias("source_file"),
        F.row_number().over(w).cast("bigint").alias("line_no"),
    )


def parse_raw(lines, schema_name: str):
    """Lines -> the same rows plus the schema's typed columns and ``reason`` (null = valid so far)."""
    from pyspark.sql import functions as F

    schema = load_schema(schema_name)
    v = F.try_parse_json(F.col("raw"))
    parsed = lines.withColumn("_v", v)
    return parsed.select(
        *LINE_COLUMNS,
        *spark_json_fields(schema, F.col("_v")),
        spark_row_reason(schema, F.col("_v"), F.col("raw")).alias("reason"),
    )


ROWS_PER_FILE = 1_000_000  # a day's partition is written as ceil(rows / this) files


def for_write(df, n_rows: int, rows_per_file: int = ROWS_PER_FILE):
    """``df`` shaped for writing one day's partition of ``n_rows`` rows: one file on a small day
    (``coalesce(1)``, no shuffle), ``ceil(n_rows / rows_per_file)`` balanced files on a large one.

    ``coalesce(1)`` on a large day pulls everything upstream of the last shuffle into ONE task (at
    10M events, build_sequences' per-user histories ran out of a 4 GB heap in it, and ingest's
    events write used one core): a ``repartition`` keeps the upstream stage's parallelism.
    """
    k = max(1, -(-int(n_rows) // rows_per_file))
    return df.coalesce(1) if k == 1 else df.repartition(k)


def delta_version(spark, path: str) -> int | None:
    """Latest committed version of the Delta table at ``path`` (None if absent).

    On a local path this lists ``_delta_log`` (commit files are written atomically, so the highest
    ``<n>.json`` is the latest version) instead of running a Spark job; elsewhere it asks Delta.
    """
    if "://" in path and not path.startswith("file:"):
        return table_version(spark, path)
    log_dir = Path(path.removeprefix("file:")) / "_delta_log"
    versions = [int(p.stem) for p in log_dir.glob("*.json") if p.stem.isdigit()] if log_dir.is_dir() else []
    return max(versions) if versions else None


def partition_rows(spark, path: str, version: int, dt: str) -> int:
    """Rows of partition ``dt`` in version ``version`` of the table at ``path``."""
    return read_table(spark, path, version).where(f"dt = '{dt}'").count()


def read_or_empty(spark, cfg: Config, name: str):
    """(DataFrame at the latest version, version) of table ``name``; an empty frame if absent."""
    path = table_path(cfg, name)
    version = delta_version(spark, path)
    if version is None:
        return spark.createDataFrame([], load_schema(name).spark_schema()), None
    return read_table(spark, path, version), version


def reason_counts(df, job: str) -> tuple[int, dict[str, int]]:
    """(rows, ``{"quarantined:<reason>": n}``) of a frame with ``reason``, in one action.

    Also logs, per reason, the first bad line (file, line number, text), so the operator sees
    what was wrong without opening the quarantine table.
    """
    from pyspark.sql import functions as F

    first = F.min(F.struct("source_file", "line_no", F.substring("raw", 1, 120).alias("raw")))
    rows = df.groupBy("reason").agg(F.count(F.lit(1)).alias("n"), first.alias("first")).collect()
    total = sum(int(r["n"]) for r in rows)
    bad = sorted((r for r in rows if r["reason"] is not None), key=lambda r: r["reason"])
    for r in bad:
        f = r["first"]
        log.warning("%s: %d line(s) quarantined as %s, first at %s:%d: %s", job, r["n"], r["reason"],
                    f["source_file"], f["line_no"], f["raw"])
    return total, {f"quarantined:{r['reason']}": int(r["n"]) for r in bad}


def merge_metrics(metrics_df) -> dict[str, int]:
    """Counts from the DataFrame a Delta MERGE returns (num_inserted_rows, num_updated_rows)."""
    row = metrics_df.collect()[0].asDict() if metrics_df is not None else {}
    return {"inserted": int(row.get("num_inserted_rows") or 0), "updated": int(row.get("num_updated_rows") or 0)}


def log_result(result: JobResult) -> None:
    log.info("%s dt=%s counts=%s read=%s written=%s", result.job, result.dt,
             json.dumps(result.counts, sort_keys=True), result.read_versions, result.written_versions)


def exists(spark, cfg: Config, name: str) -> bool:
    return table_exists(spark, table_path(cfg, name))


class ShrinkRefused(RuntimeError):
    """A rerun would replace an ingested day with fewer lines than it holds (needs ``--force``)."""


class DayIncomplete(RuntimeError):
    """An input day has no valid day commit record (see :mod:`jobs.day_record`): rerun its stage."""


def job_main(name: str, run: Callable, argv: list[str] | None = None) -> int:
    """``spark-submit jobs/<name>.py --date D [--config FILE] [--set k=v ...]``: run and print JSON."""
    from onerec_prod.config import load_config
    from onerec_prod.log import setup_logging
    from onerec_prod.spark import get_spark

    p = argparse.ArgumentParser(prog=f"jobs/{name}.py", description=f"Spark job {name} for one day.")
    p.add_argument("--date", required=True, help="Day YYYY-MM-DD.")
    p.add_argument("--config", default=None, help="Config YAML (default configs/local.yaml).")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Config override.")
    if "force" in inspect.signature(run).parameters:
        p.add_argument("--force", action="store_true",
                       help="Replace the day even if the landing partition now has fewer lines than it holds.")
    args = p.parse_args(argv)
    setup_logging("INFO")
    cfg = load_config(args.config, args.set)
    kwargs = {"force": True} if getattr(args, "force", False) else {}
    try:
        result = run(get_spark(cfg.spark), check_date(args.date), cfg, **kwargs)
    except ShrinkRefused as e:
        sys.stderr.write(f"{e}\n")
        return 3
    except DayIncomplete as e:  # an input day without its commit record (see jobs.day_record)
        sys.stderr.write(f"{e}\n")
        return 4
    sys.stdout.write(json.dumps(result.to_dict(), sort_keys=True) + "\n")
    return 0
