"""Spark session with Delta Lake, tuned for the runtime in the config.

Delta's jars are resolved by Spark's own package mechanism (``spark.jars.packages`` set
by ``configure_spark_with_delta_pip``, plus hadoop-aws when a root is on ``s3a://``: the config
adds the connector's settings, see :func:`onerec_prod.storage.spark_s3a_conf`) and cached by Ivy
after the first run;
``python -m onerec_prod.spark --warm`` does that once at set-up so tests never race on it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from onerec_prod.config import SparkCfg

log = logging.getLogger(__name__)


def get_spark(cfg: SparkCfg | None = None):
    """Return the (singleton) SparkSession with Delta enabled."""
    from delta import configure_spark_with_delta_pip
    from pyspark.sql import SparkSession

    cfg = cfg or SparkCfg()
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = (
        SparkSession.builder.appName(cfg.app_name)
        .master(cfg.master)
        .config("spark.sql.extensions", "io.delta.sql.DeltaSparkSessionExtension")
        .config("spark.sql.catalog.spark_catalog", "org.apache.spark.sql.delta.catalog.DeltaCatalog")
        .config("spark.sql.shuffle.partitions", str(cfg.shuffle_partitions))
        .config("spark.default.parallelism", str(cfg.shuffle_partitions))
        .config("spark.ui.enabled", str(cfg.ui_enabled).lower())
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.adaptive.enabled", "true")
        .config("spark.databricks.delta.schema.autoMerge.enabled", "false")
        .config("spark.databricks.delta.snapshotPartitions", "2")
        .config("spark.sql.sources.partitionOverwriteMode", "static")
        .config("spark.driver.extraJavaOptions", "-Dlog4j2.level=WARN")
    )
    if cfg.master.startswith("local"):
        builder = builder.config("spark.driver.memory", cfg.driver_memory)
    for k, v in cfg.extra_conf.items():
        if k != "spark.jars.packages":
            builder = builder.config(k, v)
    # configure_spark_with_delta_pip sets spark.jars.packages itself (Delta's jars): ours (hadoop-aws
    # for s3a:// roots, from onerec_prod.storage.spark_s3a_conf) must go through it, not around it
    extra = [p.strip() for p in cfg.extra_conf.get("spark.jars.packages", "").split(",") if p.strip()]
    spark = configure_spark_with_delta_pip(builder, extra_packages=extra or None).getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    log.info("spark session up: master=%s delta=%s", cfg.master, spark.version)
    return spark


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Spark helpers. --warm resolves and caches Delta's jars.")
    p.add_argument("--warm", action="store_true", help="Start a session once (downloads jars to Ivy).")
    args = p.parse_args(argv)
    if args.warm:
        spark = get_spark()
        spark.range(3).count()
        spark.stop()
        print("spark+delta jars cached")
    return 0


if __name__ == "__main__":
    sys.exit(main())
