"""Precompute from Delta (catalog + user_history) into Delta ``think_ahead``: active users, rerun-safe."""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytest.importorskip("pyspark")

pytestmark = pytest.mark.spark

DT = "2014-01-10"
SID_VERSION = "sid-test"


def _write_inputs(spark, cfg, beauty_items, tiny_sids) -> list[str]:
    from onerec_prod.lake import conform, table_path

    ids = [it["item_id"] for it in beauty_items[:60]]
    cat = [(it["item_id"], it["title"], it["categories"], None,
            list(tiny_sids[it["item_id"]]) if i < 50 else None, SID_VERSION if i < 50 else None,
            "2014-01-01", "2014-01-01") for i, it in enumerate(beauty_items[:60])]
    cat_df = spark.createDataFrame(cat, "item_id string, title string, categories string, description string, "
                                        "sid array<int>, sid_version string, first_seen_dt string, updated_dt string")
    def noon(d: str) -> int:
        return int(datetime.fromisoformat(f"{d}T12:00:00+00:00").timestamp())

    hist = [
        ("u_active", ids[:4], noon(DT), DT),
        ("u_recent", ids[10:13], noon("2014-01-08"), "2014-01-08"),
        ("u_old", ids[20:22], noon("2013-12-01"), "2013-12-01"),  # outside serving.active_days=3
        ("u_nosid", ids[55:58], noon(DT), DT),  # only items without a SID: skipped
        # row rewritten on DT (a bootstrap partition) but its newest event is old: not active
        ("u_backlog", ids[30:33], noon("2013-06-01"), DT),
    ]
    hist_df = spark.createDataFrame(hist, "user_id string, items array<string>, last_ts bigint, updated_dt string")
    for df, name in ((cat_df, "catalog"), (hist_df, "user_history")):
        conform(df, name).write.format("delta").mode("overwrite").save(table_path(cfg, name))
    return ids


def test_precompute_from_delta_is_idempotent(spark, make_cfg, beauty_items, tiny_sids, tiny_model_dir, tmp_path,
                                             capsys):
    from pyspark.sql import functions as F

    from onerec_prod import cli
    from onerec_prod.lake import read_table, table_path
    from onerec_prod.serving import cli_precompute
    from onerec_prod.serving.precompute import export_root, latest_export, precompute

    cfg = make_cfg("serving.active_days=3")
    model_dir = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model_dir)
    meta = json.loads((model_dir / "onerec_meta.json").read_text())
    (model_dir / "onerec_meta.json").write_text(json.dumps({**meta, "sid_version": SID_VERSION}))
    ids = _write_inputs(spark, cfg, beauty_items, tiny_sids)

    # through the CLI: onerec-prod precompute --date D --model DIR --model-version 4
    argv = ["precompute", "--date", DT, "--model", str(model_dir), "--model-version", "4"]
    assert cli_precompute.main(cli.build_parser(argv).parse_args(argv), cfg) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["model_version"] == "4"
    assert (res["users"], res["skipped_users"], res["items"]) == (2, 1, 50)
    assert set(res["read_versions"]) == {"user_history", "catalog"}
    # rerun of the same (dt, version): replaces, never appends (same inputs, given in memory to
    # spare the Spark reads)
    catalog = [{"item_id": it["item_id"], "title": it["title"], "categories": it["categories"],
                "sid": tiny_sids[it["item_id"]], "sid_version": SID_VERSION} for it in beauty_items[:50]]
    active = {"u_active": ids[:4], "u_recent": ids[10:13], "u_nosid": ids[55:58]}
    res2 = precompute(cfg, DT, model_dir, "4", spark=spark, histories=active, catalog=catalog)
    assert res2["table_version"] > res["table_version"]

    ta = read_table(spark, table_path(cfg, "think_ahead"))
    rows = {(r["user_id"], r["model_version"]): r for r in ta.where(F.col("dt") == DT).collect()}
    assert set(rows) == {("u_active", "4"), ("u_recent", "4")}
    r = rows[("u_active", "4")]
    assert r["history_len"] == 4 and r["sid_version"] == SID_VERSION and r["rationale"] is None
    k, b = cfg.serving.prefix_levels, cfg.serving.prefix_beam
    assert 1 <= len(r["prefixes"]) <= b and all(len(p) == k for p in r["prefixes"])
    assert list(r["scores"]) == sorted(r["scores"], reverse=True)

    _, manifest = latest_export(export_root(cfg), model_version="4")
    assert manifest["counts"] == {"users": 2, "items": 50}
    assert all(isinstance(v, int) for v in res["read_versions"].values())  # Delta versions read, for lineage
