"""``onerec-prod sid-fit``: refit SID codebooks on the whole catalog (a new sid_version).

Reads the catalog Delta table, fits new codebooks on every item, MERGE-updates each row's
``sid``/``sid_version``, then moves ``<artifacts>/sid/CURRENT``. Every model and sample set of the
old version becomes incompatible: retrain from the base model afterwards. Re-running on an
unchanged catalog reproduces the same version (content hash), so the command is idempotent.
"""

from __future__ import annotations

import json


def write_catalog_sids(spark, path: str, mapping: dict[str, tuple[int, ...]], version: str) -> None:
    """MERGE ``sid`` and ``sid_version`` of every item in ``mapping`` into the catalog at ``path``."""
    from delta.tables import DeltaTable

    upd = spark.createDataFrame(
        [(iid, [int(c) for c in sid], version) for iid, sid in mapping.items()],
        "item_id string, sid array<int>, sid_version string",
    )
    (DeltaTable.forPath(spark, path).alias("t")
     .merge(upd.alias("u"), "t.item_id = u.item_id")
     .whenMatchedUpdate(set={"sid": "u.sid", "sid_version": "u.sid_version"})
     .execute())


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="Print the result as JSON.")


def main(args, cfg) -> int:
    from onerec_prod.lake import read_table, table_exists, table_path
    from onerec_prod.sid.report import format_reports, sid_report
    from onerec_prod.sid.service import current_version, load_codebook, refit, set_current
    from onerec_prod.spark import get_spark

    spark = get_spark(cfg.spark)
    path = table_path(cfg, "catalog")
    if not table_exists(spark, path):
        print(f"onerec-prod sid-fit: no catalog table at {path}; run the update_catalog job first")
        return 2
    cols = ["item_id", "title", "categories", "description", "sid", "sid_version"]
    rows = [r.asDict() for r in read_table(spark, path).select(*cols).collect()]
    old = current_version(cfg)
    mapping, version = refit(cfg, rows, activate=False)
    write_catalog_sids(spark, path, mapping, version)
    set_current(cfg, version)
    rep = sid_report(list(mapping.values()), load_codebook(cfg, version).sizes)
    if args.json:
        print(json.dumps({"sid_version": version, "previous": old, "report": rep}, indent=2))
    else:
        print(f"sid_version {version} (previous {old}); {len(mapping)} catalog items rewritten")
        if version != old:
            print("models and samples of the previous version are incompatible: retrain from the base model")
        print(format_reports({version: rep}, cfg.sid.levels))
    return 0
