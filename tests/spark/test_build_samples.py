"""jobs/build_samples on tiny Delta tables: every task, eval exclusion, idempotent rerun, and the
training-mix export (onerec_prod.samples.export) over what it wrote."""

from __future__ import annotations

import json

import pytest

from jobs import day_record
from onerec_prod.config import load_config
from onerec_prod.lake import read_table, table_path
from onerec_prod.samples.builders import TASKS
from onerec_prod.samples.mix import select_replay
from onerec_prod.samples.stream import parse_stream

D1, D2 = "2014-01-01", "2014-01-02"
REPO_CFG = "configs/test.yaml"


def _cfg(root):
    from tests.conftest import REPO

    return load_config(REPO / REPO_CFG, [f"paths.var_root={root}", "samples.caption_items_per_day=4",
                                         "samples.general_lm_per_day=2", "samples.max_history=5",
                                         "samples.rationale_min_support=1"],  # co-occurrence on a small day
                       environ={})


CATALOG_DDL = ("item_id string, title string, categories string, description string, sid array<int>, "
               "sid_version string, first_seen_dt string, updated_dt string")
EXAMPLE_DDL = "event_id string, user_id string, history array<string>, target_item_id string, ts bigint, dt string"


def _write_table(spark, cfg, name, rows, ddl):
    """One plain Delta write of the whole input table (one commit; the jobs under test read it)."""
    from onerec_prod.lake import conform
    from onerec_prod.schemas import load_schema

    w = conform(spark.createDataFrame(rows, ddl), name).write.format("delta").mode("overwrite")
    parts = load_schema(name).partition_by
    (w.partitionBy(*parts) if parts else w).save(table_path(cfg, name))


def _catalog_rows(beauty_items, tiny_sids, version="v1"):
    rows = []
    for k, it in enumerate(beauty_items[:14]):
        first = D1 if k < 10 else D2
        rows.append((it["item_id"], it["title"], it["categories"], None, list(tiny_sids[it["item_id"]]),
                     version, first, first))
    # an item that lands on D3 without a SID yet: invisible to D1/D2, so no refusal
    rows.append(("future", "Future item", "Beauty > X", None, None, None, "2014-01-03", "2014-01-03"))
    return rows


def _examples(items, dt, users, start):
    """Each user buys 3 items in a row on ``dt``; history = everything bought before."""
    rows = []
    for u in range(users):
        seq = [items[(start + u * 3 + k) % len(items)] for k in range(6)]
        for k in range(3, 6):
            ts = 1000 * (0 if dt == D1 else 1) + k
            rows.append((f"{dt}-u{u}-{k}", f"u{u}", seq[:k], seq[k], ts, dt))
    return rows


def _last_events(rows, users):
    """The eval snapshot rows: each selected user's last event."""
    last = {}
    for r in rows:
        if r[1] in users and (r[1] not in last or r[4] > last[r[1]][4]):
            last[r[1]] = r
    return list(last.values())


@pytest.fixture(scope="module")
def lake(spark, tmp_path_factory, beauty_items, tiny_sids):
    import jobs.build_samples as job

    cfg = _cfg(tmp_path_factory.mktemp("samples_lake"))
    ids = [it["item_id"] for it in beauty_items[:14]]
    day1, day2 = _examples(ids[:10], D1, 4, 0), _examples(ids, D2, 4, 5)
    held = _last_events(day2, {"u1"})
    # u2's held-out event is its middle one: its later event must go too (guard against leaks)
    held.append(next(r for r in day2 if r[0] == f"{D2}-u2-4"))
    _write_table(spark, cfg, "catalog", _catalog_rows(beauty_items, tiny_sids), CATALOG_DDL)
    for dt in (D1, D2):  # the catalog above stands for both days' committed update_catalog runs
        day_record.write(cfg, "update_catalog", dt, {"catalog": {"version": 0}})
    _write_table(spark, cfg, "examples", day1 + day2, EXAMPLE_DDL)
    _write_table(spark, cfg, "eval_snapshot", held, EXAMPLE_DDL)
    held = [r[0] for r in held]
    r1 = job.run(spark, D1, cfg)
    r2 = job.run(spark, D2, cfg)
    return cfg, r1, r2, held


def _day_rows(spark, cfg, dt):
    df = read_table(spark, table_path(cfg, "samples")).where(f"dt = '{dt}'")
    return sorted((r.asDict() for r in df.collect()), key=lambda r: r["sample_id"])


def test_every_task_written_and_counted(spark, lake):
    cfg, r1, r2, _ = lake
    rows = _day_rows(spark, cfg, D2)
    per_task = {t: sum(r["task"] == t for r in rows) for t in TASKS}
    # 12 examples - 2 held out - 1 after a held-out event = 9; 4 users; 4 new items on D2
    assert per_task == {"persona": 4, "seqrec": 9, "caption": 4, "text2sid": 4, "general_lm": 2,
                        "sid_rec": 9, "sid_stream": 4, "reasoning": 9, "rl_prompt": 9}
    # one stream per user; its loss starts at the user's first kept item of the day
    streams = {r["user_id"]: r for r in rows if r["task"] == "sid_stream"}
    # u0, u3: 3 items before the day + 3 kept; u1: 3 + 2 (its last is held out); u2: 3 + 1 (held out
    # its middle event, its later one dropped): the held-out events never enter a stream
    assert {u: (len(parse_stream(r["response"])), r["loss_from"]) for u, r in streams.items()} == {
        "u0": (6, 3), "u1": (5, 3), "u2": (4, 3), "u3": (6, 3)}
    assert all(r["loss_from"] is None for r in rows if r["task"] != "sid_stream")
    assert {k: v for k, v in r2.counts.items() if k.startswith("samples:")} == {
        f"samples:{t}": n for t, n in per_task.items()}
    assert r2.counts["eval_excluded"] == 2 and r2.counts["dropped_after_eval_event"] == 1
    assert r2.counts["new_items"] == 4 and r2.extra["built_on"] == "driver"
    assert len({r["sample_id"] for r in rows}) == len(rows)
    assert {r["sid_version"] for r in rows} == {"v1"}
    captions = {r["target_item_id"] for r in rows if r["task"] == "caption"}
    assert captions == {"11", "12", "13", "14"}  # the day's new items
    lengths = r2.extra["token_lengths"]
    assert set(lengths) == set(TASKS) and all(v["p50"] <= v["p90"] <= v["p99"] for v in lengths.values())
    assert r2.extra["token_length_method"].startswith("estimate")
    assert r1.counts["eval_excluded"] == 0 and r1.counts["samples:sid_rec"] == 12


def test_eval_snapshot_events_are_absent(spark, lake):
    cfg, _, _, held = lake
    rows = _day_rows(spark, cfg, D2)
    assert len(held) == 2 and not {r["source_event_id"] for r in rows} & set(held)
    assert f"{D2}-u2-5" not in {r["source_event_id"] for r in rows}
    # persona of u2 comes from its last kept event, before the held-out one
    assert next(r for r in rows if r["task"] == "persona" and r["user_id"] == "u2")["source_event_id"] == f"{D2}-u2-3"


def test_rerun_is_idempotent(spark, lake):
    import jobs.build_samples as job

    cfg, _, r2, _ = lake
    before = _day_rows(spark, cfg, D2)
    again = job.run(spark, D2, cfg)
    assert _day_rows(spark, cfg, D2) == before
    assert again.counts == r2.counts
    assert again.written_versions["samples"] > r2.written_versions["samples"]
    assert len(_day_rows(spark, cfg, D1)) == sum(v for k, v in lake[1].counts.items() if k.startswith("samples:"))


def test_executor_path_builds_the_same_rows(spark, lake):
    import jobs.build_samples as job

    cfg, r1, _, _ = lake
    before = _day_rows(spark, cfg, D1)
    # the default evidence rationales, with the co-occurrence clause (the day's counts) in use:
    # on the executors every Arrow batch must quote the whole day's shares, as the driver did
    assert cfg.samples.rationale_source == "evidence"
    cooc = [r for r in before if r["task"] == "reasoning" and "buyers of" in r["response"]]
    assert len(cooc) >= 3, [r["response"] for r in before if r["task"] == "reasoning"]
    big = cfg.model_copy(update={"samples": cfg.samples.model_copy(update={"driver_max_examples": 0})})
    r = job.run(spark, D1, big)
    assert r.extra["built_on"] == "executors" and r.counts == r1.counts
    assert _day_rows(spark, cfg, D1) == before


def test_export_training_mix(spark, lake, tmp_path):
    from onerec_prod.samples.export import export_training_mix

    cfg, _, _, _ = lake
    out = export_training_mix(spark, D2, cfg, tmp_path / "mix.jsonl")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    new = [r for r in rows if not r["replay"]]
    replay = [r for r in rows if r["replay"]]
    assert len(new) == 45 and {r["dt"] for r in new} == {D2}  # 54 samples minus 9 rl_prompt
    assert len(replay) == 23 and {r["dt"] for r in replay} == {D1}  # round(45 * 0.5), half up
    assert "rl_prompt" not in {r["task"] for r in rows}
    assert set(rows[0]) == {"sample_id", "task", "messages", "response", "sid_version", "dt", "loss_from", "replay"}
    # the Spark selection equals the pure one on the same candidates
    cands = [r for r in _day_rows(spark, cfg, D1) if r["task"] != "rl_prompt"]
    pure = select_replay(cands, n_new=len(new), dt=D2, fraction=cfg.samples.replay_fraction,
                         seed=cfg.samples.seed)
    assert sorted(r["sample_id"] for r in replay) == sorted(r["sample_id"] for r in pure)
    manifest = json.loads((tmp_path / "mix.jsonl.manifest.json").read_text())
    again = export_training_mix(spark, D2, cfg, tmp_path / "again.jsonl")
    assert again.read_bytes() == out.read_bytes()
    assert manifest["rows"] == 68 and manifest["replay_rows"] == 23


def test_catalog_problems_are_refused(spark, beauty_items, tiny_sids):
    from jobs.build_samples import validate_catalog

    schema = CATALOG_DDL
    rows = _catalog_rows(beauty_items, tiny_sids)[:14]
    assert validate_catalog(spark.createDataFrame(rows, schema)) == "v1"
    no_sid = [rows[0][:4] + (None, None) + rows[0][6:]] + rows[1:]
    with pytest.raises(ValueError, match=r"1 catalog items have no SID \(e.g. \['1'\]\)"):
        validate_catalog(spark.createDataFrame(no_sid, schema))
    mixed = [rows[0], rows[1][:5] + ("v2",) + rows[1][6:]] + rows[2:]
    with pytest.raises(ValueError, match=r"sid_versions \['v1', 'v2'\]"):
        validate_catalog(spark.createDataFrame(mixed, schema))
