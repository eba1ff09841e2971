"""Pure data-plane transforms on few-row frames (real Spark), and the SID hook of update_catalog."""

from __future__ import annotations

import json

DT = "2014-03-02"
TS = 1393718400  # 2014-03-02 00:00 UTC


def _lines(spark, raws: list[str]):
    return spark.createDataFrame([(r, "events/dt=x/part-0000.jsonl", i + 1) for i, r in enumerate(raws)],
                                 "raw string, source_file string, line_no bigint")


def test_spark_validation_gives_the_python_validators_reasons(spark):
    from jobs.common import parse_raw
    from onerec_prod.schemas import load_schema, validate_fields

    ok = {"event_id": "e1", "user_id": "u1", "item_id": "i1", "ts": TS}
    cases = [
        json.dumps(ok),                                   # valid
        json.dumps(dict(ok, event_type="click")),         # valid, optional column set
        '{"event_id": "e1", "user_id": "u1"',             # truncated JSON
        '["e1", "u1", "i1", 1]',                          # JSON but not an object
        "",                                               # blank line
        json.dumps({k: v for k, v in ok.items() if k != "item_id"}),  # missing field
        json.dumps(dict(ok, user_id=None)),               # JSON null counts as missing
        json.dumps(dict(ok, ts=str(TS))),                 # ts as a string
        json.dumps(dict(ok, ts=1.5)),                     # ts with a fraction
        json.dumps(dict(ok, item_id=7)),                  # item_id as a number
        json.dumps(dict(ok, event_type=True)),            # optional column, wrong type
        json.dumps(dict(ok, user_id="  ")),               # blank string (non_empty check)
        json.dumps(dict(ok, ts=-5)),                      # negative timestamp (min check)
        json.dumps(dict(ok, item_id=7, ts=-5)),           # two defects: the first column wins
    ]
    schema = load_schema("raw_events")
    got = [r["reason"] for r in parse_raw(_lines(spark, cases), "raw_events").orderBy("line_no").collect()]

    def py_reason(raw):
        try:
            return validate_fields(schema, json.loads(raw))
        except ValueError:
            return "malformed_json"

    assert got == [py_reason(r) for r in cases]
    assert got[:4] == [None, None, "malformed_json", "malformed_json"]


def test_resolve_events_unknown_item_and_duplicates(spark):
    from jobs.ingest_events import transform_parse_events, transform_resolve_events, transform_split_events

    def ev(eid, item="i1", ts=TS):
        return json.dumps({"event_id": eid, "user_id": "u", "item_id": item, "ts": ts})

    raws = [
        ev("a"),                          # 1 kept
        ev("b", item="nope"),             # 2 unknown_item
        ev("a"),                          # 3 duplicate of line 1
        ev("old"),                        # 4 already in an earlier day
        ev("c", ts=TS + 2 * 86_400),      # 5 beyond end of day + 1 day skew: future
        ev("d", ts=TS + 86_400 + 10),     # 6 within the skew: kept
        ev("b"),                          # 7 kept: the earlier "b" was not a valid row
    ]
    parsed = transform_parse_events(_lines(spark, raws), DT, 86_400)
    known = spark.createDataFrame([("i1",)], "item_id string")
    earlier = spark.createDataFrame([("old",)], "event_id string")
    good, bad = transform_split_events(transform_resolve_events(parsed, known, earlier), DT)
    assert sorted((r["event_id"], r["seq"]) for r in good.collect()) == [("a", 1), ("b", 7), ("d", 6)]
    assert sorted((r["line_no"], r["reason"]) for r in bad.collect()) == [
        (2, "unknown_item"), (3, "duplicate_event"), (4, "duplicate_event"), (5, "future_timestamp")]


def test_sequences_with_short_history(spark):
    from jobs.build_sequences import transform_prior_histories, transform_sequences

    cols = "event_id string, user_id string, item_id string, dt string, ts bigint, source_file string, seq bigint"
    prior = spark.createDataFrame([
        ("p1", "u1", "x", "2014-03-01", 10, "f", 1),
        ("p2", "u1", "y", "2014-03-01", 10, "f", 2),
        ("p0", "u1", "w", "2014-02-28", 99, "f", 1),   # earlier day sorts first despite larger ts
        ("p3", "u9", "z", "2014-03-01", 10, "f", 3),   # not active on D: not read
    ], cols)
    day = spark.createDataFrame([
        ("e2", "u1", "b", DT, 20, "f", 5),
        ("e1", "u1", "a", DT, 20, "f", 4),
        ("e3", "u2", "c", DT, 20, "f", 6),             # new user: empty history
    ], cols)
    pre = transform_prior_histories(prior, day, 2)
    examples, state = transform_sequences(day, pre, 2, DT)
    got = {r["event_id"]: (r["history"], r["target_item_id"]) for r in examples.collect()}
    assert got == {"e1": (["x", "y"], "a"), "e2": (["y", "a"], "b"), "e3": ([], "c")}
    st = {r["user_id"]: (r["items"], r["last_ts"], r["updated_dt"]) for r in state.collect()}
    assert st == {"u1": (["a", "b"], 20, DT), "u2": (["c"], 20, DT)}


def test_catalog_merge_updates_text_never_reverts_or_deletes(spark, make_cfg):
    from jobs.update_catalog import merge_catalog, transform_catalog_updates
    from onerec_prod.lake import create_if_absent, read_table, table_path

    cfg = make_cfg()
    path = table_path(cfg, "catalog")
    create_if_absent(spark, path, "catalog")

    def feed(dt, rows):
        df = spark.createDataFrame([(i, t, "Beauty", None, None) for i, t in rows],
                                   "item_id string, title string, categories string, description string, "
                                   "reason string")
        return merge_catalog(spark, path, transform_catalog_updates(df, dt))

    assert feed("2014-03-02", [("a", "A v1"), ("b", "B v1")]) == {"inserted": 2, "updated": 0}
    assert feed("2014-03-03", [("a", "A v2")]) == {"inserted": 0, "updated": 1}
    # an older day (a backfill): a's newer text is kept, both items were first seen earlier
    assert feed("2014-03-01", [("a", "A v1"), ("b", "B v1")]) == {"inserted": 0, "updated": 2}
    rows = {r["item_id"]: (r["title"], r["first_seen_dt"], r["updated_dt"])
            for r in read_table(spark, path).collect()}
    assert rows == {"a": ("A v2", "2014-03-01", "2014-03-03"), "b": ("B v1", "2014-03-01", "2014-03-02")}


def test_update_catalog_assigns_sids_once(spark, make_cfg, beauty_slice, slice_plan):
    """assign_sids=True with the real SID service: every item gets a distinct SID; they never move."""
    from jobs.update_catalog import assign_missing_sids, run
    from onerec_prod.lake import read_table, table_path
    from onerec_prod.replay import replay

    day = slice_plan["days"][1]
    cfg = make_cfg("sid.collision_size=64")  # ~250 items in a 16x16x16 space: room for collisions
    replay(cfg, day, 1, dataset=beauty_slice, bootstrap_before=None)
    first = run(spark, day, cfg, assign_sids=True)
    assert first.counts["new_items"] > 16 and first.counts["sids_assigned"] == first.counts["new_items"]
    path = table_path(cfg, "catalog")
    sids = {r["item_id"]: (tuple(r["sid"]), r["sid_version"]) for r in read_table(spark, path).collect()}
    assert len({s for s, _ in sids.values()}) == len(sids) and len({v for _, v in sids.values()}) == 1
    assert assign_missing_sids(spark, cfg, path) == {"sids_assigned": 0, "sid_status": "complete"}
    assert {r["item_id"]: (tuple(r["sid"]), r["sid_version"]) for r in read_table(spark, path).collect()} == sids


def test_a_large_day_is_written_as_several_balanced_files_a_small_one_as_one(spark):
    """``for_write``: one file (no shuffle) up to ``rows_per_file`` rows, else ceil(rows / it)."""
    from jobs.common import for_write

    df = spark.range(25).repartition(4)
    assert for_write(df, 25, rows_per_file=10).rdd.getNumPartitions() == 3
    sizes = sorted(len(p) for p in for_write(df, 25, rows_per_file=10).rdd.glom().collect())
    assert sum(sizes) == 25 and sizes[-1] - sizes[0] <= 1  # balanced
    assert for_write(df, 10, rows_per_file=10).rdd.getNumPartitions() == 1
    assert for_write(df, 0, rows_per_file=10).rdd.getNumPartitions() == 1
