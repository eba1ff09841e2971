"""Image build step: put Delta and the s3a connector on Spark's JVM classpath.

On one machine ``onerec_prod.spark.get_spark`` lets Spark resolve Delta's jars at session start
(``spark.jars.packages``). In the cluster the driver JVM is started by ``spark-submit`` before
any Python runs, so packages requested from Python come too late; and executors must not
resolve anything at run time. This script starts one local session that resolves Delta (the
version pinned by delta-spark) and hadoop-aws (the version of the Hadoop client bundled in
pyspark), then copies every resolved jar into ``pyspark/jars``.

    python infra/docker/fetch_spark_jars.py [--dry-run]
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path
from urllib.parse import urlparse


def hadoop_version(jars_dir: Path) -> str:
    """Version of the Hadoop client bundled in pyspark (hadoop-aws must match it exactly)."""
    for jar in sorted(jars_dir.glob("hadoop-client-api-*.jar")):
        m = re.fullmatch(r"hadoop-client-api-(.+)\.jar", jar.name)
        if m:
            return m.group(1)
    raise SystemExit(f"no hadoop-client-api-*.jar in {jars_dir}: is pyspark installed?")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="Print the packages, resolve nothing.")
    args = p.parse_args(argv)

    import pyspark

    jars_dir = Path(pyspark.__file__).parent / "jars"
    extra = [f"org.apache.hadoop:hadoop-aws:{hadoop_version(jars_dir)}"]
    print("extra packages:", ", ".join(extra))
    if args.dry_run:
        return 0

    from delta import configure_spark_with_delta_pip
    from pyspark.sql import SparkSession

    builder = (
        SparkSession.builder.master("local[1]").appName("fetch-jars").config("spark.ui.enabled", "false")
    )
    spark = configure_spark_with_delta_pip(builder, extra_packages=extra).getOrCreate()
    resolved = spark.sparkContext.getConf().get("spark.jars", "")
    spark.stop()
    present = {j.name for j in jars_dir.glob("*.jar")}
    copied = 0
    for uri in filter(None, resolved.split(",")):
        src = Path(urlparse(uri).path)
        if src.name in present:
            continue
        shutil.copy2(src, jars_dir / src.name)
        copied += 1
    if copied == 0:
        raise SystemExit("no jars resolved: check spark.jars.packages resolution")
    print(f"copied {copied} jars into {jars_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
