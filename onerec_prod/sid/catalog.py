"""The catalog's SIDs: refit them all (a new sid_version) and report on them.

:func:`refit_catalog` is the library side of ``onerec-prod sid-fit``: it reads the catalog
Delta table, fits new codebooks on every item, MERGE-updates each row's ``sid``/``sid_version``,
then moves ``<artifacts>/sid/CURRENT``. Every model and sample set of the old version becomes
incompatible. Re-running on an unchanged catalog reproduces the same version (content hash).
:func:`catalog_report` is the SID report of the catalog (``onerec-prod sid-report``).
"""

from __future__ import annotations

from typing import Any

from onerec_prod.config import Config


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


def refit_catalog(cfg: Config) -> dict[str, Any]:
    """Refit on the catalog table and activate the new version.

    Returns ``{"sid_version", "previous", "items", "report"}``.

    Raises:
        FileNotFoundError: no catalog table yet (run the update_catalog job first).
    """
    from onerec_prod.lake import read_table, table_exists, table_path
    from onerec_prod.sid.report import sid_report
    from onerec_prod.sid.service import current_version, load_codebook, refit, set_current
    from onerec_prod.spark import get_spark

    spark = get_spark(cfg.spark)
    path = table_path(cfg, "catalog")
    if not table_exists(spark, path):
        raise FileNotFoundError(f"no catalog table at {path}; run the update_catalog job first")
    cols = ["item_id", "title", "categories", "description", "sid", "sid_version"]
    rows = [r.asDict() for r in read_table(spark, path).select(*cols).collect()]
    old = current_version(cfg)
    mapping, version = refit(cfg, rows, activate=False)
    write_catalog_sids(spark, path, mapping, version)
    set_current(cfg, version)
    rep = sid_report(list(mapping.values()), load_codebook(cfg, version).sizes)
    return {"sid_version": version, "previous": old, "items": len(mapping), "report": rep}


def catalog_report(cfg) -> tuple[dict, str, str]:
    """(report, sid_version, source) for the current codebook's SIDs in the catalog."""
    from onerec_prod.lake import read_table, table_exists, table_path
    from onerec_prod.sid.report import sid_report
    from onerec_prod.sid.service import load_codebook
    from onerec_prod.spark import get_spark

    cb = load_codebook(cfg)
    spark = get_spark(cfg.spark)
    path = table_path(cfg, "catalog")
    if not table_exists(spark, path):
        return dict(cb.manifest.get("fit_report", {})), cb.version, "codebook manifest (fit time)"
    rows = read_table(spark, path).where(f"sid_version = '{cb.version}'").select("sid").collect()
    return sid_report([tuple(r["sid"]) for r in rows], cb.sizes), cb.version, f"catalog table {path}"
