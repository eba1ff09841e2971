"""Delta Lake helpers: table paths, versions, partition-scoped overwrite, schema conformance.

All writes of a day's partition go through :func:`overwrite_partition` (``replaceWhere``),
which is atomic and checks that every written row matches the predicate; keyed tables
are MERGEd by the jobs themselves. Every read records the Delta version it saw.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from onerec_prod.config import Config
from onerec_prod.schemas import load_schema

log = logging.getLogger(__name__)


def table_path(cfg: Config, name: str) -> str:
    """Location of Delta table ``name`` under ``paths.lake_root``."""
    load_schema(name)  # unknown tables fail here, naming the known ones
    return f"{cfg.paths.lake.rstrip('/')}/{name}"


def table_exists(spark, path: str) -> bool:
    from delta.tables import DeltaTable

    return DeltaTable.isDeltaTable(spark, path)


def table_version(spark, path: str) -> int | None:
    """Latest committed version of the Delta table at ``path`` (None if absent)."""
    from delta.tables import DeltaTable

    if not DeltaTable.isDeltaTable(spark, path):
        return None
    return int(DeltaTable.forPath(spark, path).history(1).collect()[0]["version"])


def conform(df, name: str):
    """Select and cast ``df`` to the columns of schema ``name`` (raises if one is missing)."""
    from pyspark.sql import functions as F

    schema = load_schema(name)
    missing = [c for c in schema.column_names if c not in df.columns]
    if missing:
        raise ValueError(f"dataframe for table {name!r} lacks columns {missing}")
    st = schema.spark_schema()
    return df.select([F.col(f.name).cast(f.dataType).alias(f.name) for f in st.fields])


def create_if_absent(spark, path: str, name: str) -> None:
    """Create an empty Delta table with the schema's columns and partitioning."""
    if table_exists(spark, path):
        return
    schema = load_schema(name)
    empty = spark.createDataFrame([], schema.spark_schema())
    w = empty.write.format("delta").mode("ignore")
    if schema.partition_by:
        w = w.partitionBy(*schema.partition_by)
    w.save(path)
    log.info("created delta table %s at %s", name, path)


def _predicate(values: dict[str, str]) -> str:
    parts = []
    for col, val in values.items():
        safe = str(val).replace("'", "''")
        parts.append(f"`{col}` = '{safe}'")
    return " AND ".join(parts)


def overwrite_partition(df, spark, path: str, name: str, partition: dict[str, str]) -> int:
    """Atomically replace the rows of ``partition`` (e.g. ``{"dt": D}``) with ``df``.

    Uses Delta ``replaceWhere``: a rerun replaces, never appends, and a row outside the
    partition fails the write instead of spilling. Returns the new table version.
    """
    schema = load_schema(name)
    create_if_absent(spark, path, name)
    out = conform(df, name)
    w = out.write.format("delta").mode("overwrite").option("replaceWhere", _predicate(partition))
    if schema.partition_by:
        w = w.partitionBy(*schema.partition_by)
    w.save(path)
    return table_version(spark, path)


def read_table(spark, path: str, version: int | None = None):
    r = spark.read.format("delta")
    if version is not None:
        r = r.option("versionAsOf", version)
    return r.load(path)


@dataclass
class JobResult:
    """What a job did: counts for the run summary and Delta versions for lineage."""

    job: str
    dt: str
    counts: dict[str, int] = field(default_factory=dict)
    read_versions: dict[str, int | None] = field(default_factory=dict)
    written_versions: dict[str, int | None] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "job": self.job, "dt": self.dt, "counts": dict(self.counts),
            "read_versions": dict(self.read_versions),
            "written_versions": dict(self.written_versions), "extra": dict(self.extra),
        }
