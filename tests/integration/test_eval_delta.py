"""evaluate() reading Delta: snapshot of day D, whole catalog, training events without held-out events."""

from __future__ import annotations

import pytest

pytest.importorskip("pyspark")

from onerec_prod.eval import api  # noqa: E402

pytestmark = pytest.mark.spark
DT = "2014-01-02"


def _write(spark, cfg, beauty_items, tiny_sids):
    from onerec_prod.lake import conform, create_if_absent, table_path

    def save(df, name):  # test set-up: one plain write per table (the jobs use replaceWhere)
        path = table_path(cfg, name)
        create_if_absent(spark, path, name)
        w = conform(df, name).write.format("delta").mode("overwrite")
        (w.partitionBy("dt") if name != "catalog" else w).save(path)

    items = beauty_items[:30]
    cat_rows = [(it["item_id"], it["title"], it["categories"], None, list(tiny_sids[it["item_id"]]), "v1",
                 "2014-01-01", "2014-01-01") for it in items]
    cat = spark.createDataFrame(cat_rows, "item_id string, title string, categories string, description string, "
                                "sid array<int>, sid_version string, first_seen_dt string, updated_dt string")
    save(cat, "catalog")
    ids = [it["item_id"] for it in items]
    ev = []
    # user a: 4 events on day 1, 2 on day 2 (the last is held out); user b: 3 events day 2 (last held out)
    for k, (user, item, day) in enumerate([("a", ids[0], "2014-01-01"), ("a", ids[1], "2014-01-01"),
                                           ("a", ids[2], "2014-01-01"), ("a", ids[3], "2014-01-01"),
                                           ("a", ids[4], DT), ("a", ids[5], DT),
                                           ("b", ids[1], DT), ("b", ids[2], DT), ("b", ids[9], DT),
                                           ("c", ids[7], "2014-01-03")]):
        ev.append((f"ev{k}", user, item, 1_000 + k, "view", k, "f.jsonl", day))
    schema = ("event_id string, user_id string, item_id string, ts bigint, event_type string, seq bigint, "
              "source_file string, dt string")
    save(spark.createDataFrame(ev, schema), "events")
    snap = spark.createDataFrame(
        [("ev5", "a", ids[:5], ids[5], 1005, DT), ("ev8", "b", ids[1:3], ids[9], 1008, DT)],
        "event_id string, user_id string, history array<string>, target_item_id string, ts bigint, dt string")
    save(snap, "eval_snapshot")
    return ids


def test_evaluate_from_delta(spark, make_cfg, beauty_items, tiny_sids, tiny_model_dir, monkeypatch):
    cfg = make_cfg("eval.bertscore_items=0", "eval.baselines=[mostpop]")
    ids = _write(spark, cfg, beauty_items, tiny_sids)
    seen = []
    real_read = api.read_eval_inputs
    monkeypatch.setattr(api, "read_eval_inputs", lambda *a: seen.append(real_read(*a)) or seen[-1])
    report = api.evaluate(cfg, tiny_model_dir, DT, spark=spark)

    inputs = seen[0]
    assert sorted(r["event_id"] for r in inputs.snapshot) == ["ev5", "ev8"]
    assert len(inputs.catalog) == 30 and all(isinstance(r["sid"], tuple) for r in inputs.catalog)
    # held-out events ev5, ev8 and the later day's event are not training data; order is by ts
    assert inputs.train_sequences == [ids[0:5], ids[1:3]]
    assert set(inputs.data_versions) == {"eval_snapshot", "catalog", "events"}

    assert report["n_users"] == 2 and report["counts"]["trie_items"] == 30
    # MostPop from training events: ids[1], ids[2] lead; the targets ids[5], ids[9] were never trained on
    assert report["baselines"]["mostpop"]["recall@10"] == 0.0
    with pytest.raises(api.EvalInputError, match="no rows for dt=2014-01-09"):
        real_read(spark, cfg, "2014-01-09")
