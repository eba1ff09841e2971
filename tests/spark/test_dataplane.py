"""Data plane on real Spark + Delta (issue 4): exact quarantine, reruns, backfill order.

One replay of a small real Beauty slice (bootstrap 2014-02-24..28, then 2014-03-01 and 03-02,
with injected faults) is run through the four jobs twice:

* lake A, daily order: each day's four jobs, day after day; then day 2014-03-01 is rerun;
* lake B, fresh, backfill order: each job over all days, job after job (build_eval_snapshot,
  a function of the compared examples and events, is left out to save time).

The module fixture builds its configs with ``load_config`` like ``make_cfg`` does, because
``make_cfg`` is function-scoped and the lakes are shared by the tests of this module.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest

DAYS = ["2014-02-28", "2014-03-01", "2014-03-02"]  # = slice_plan["days"]: bootstrap, then 2 days
REPO = Path(__file__).resolve().parents[2]
TABLES = ("events", "events_quarantine", "catalog", "items_quarantine", "examples", "user_history",
          "eval_snapshot")


def _cfg(root: Path, raw: Path, dataset: Path):
    from onerec_prod.config import load_config

    return load_config(REPO / "configs" / "test.yaml",
                       [f"paths.var_root={root}", f"paths.raw_root={raw}", f"paths.dataset_dir={dataset}"],
                       environ={})


def _freeze(v):
    return tuple(_freeze(x) for x in v) if isinstance(v, list) else v


def table_rows(spark, cfg, name: str) -> list[tuple]:
    """Every row of a table, as sorted tuples (arrays as tuples)."""
    from onerec_prod.lake import read_table, table_path

    df = read_table(spark, table_path(cfg, name))
    return sorted(tuple(_freeze(v) for v in r) for r in df.collect())


def snapshot(spark, cfg) -> dict[str, list[tuple]]:
    from onerec_prod.lake import table_exists, table_path

    return {t: table_rows(spark, cfg, t) for t in TABLES if table_exists(spark, table_path(cfg, t))}


def run_day(spark, cfg, dt, results):
    from jobs.runner import JOBS, run_job

    for name in JOBS:
        kw = {"assign_sids": False} if name == "update_catalog" else {}
        results[(name, dt)] = run_job(spark, name, dt, cfg, **kw)


@pytest.fixture(scope="module")
def lakes(spark, beauty_slice, slice_plan, tmp_path_factory):
    from jobs.runner import JOBS, run_job
    from onerec_prod.replay import FaultSpec, replay

    assert slice_plan["days"] == DAYS
    root = tmp_path_factory.mktemp("dataplane")
    raw = root / "raw"
    cfg_a = _cfg(root / "a", raw, beauty_slice)
    summary = replay(cfg_a, DAYS[1], len(DAYS) - 1, faults=FaultSpec.parse(slice_plan["faults"]),
                     bootstrap_before=slice_plan["bootstrap_before"])
    assert [p["dt"] for p in summary["partitions"]] == DAYS

    res_a: dict = {}
    for dt in DAYS:
        run_day(spark, cfg_a, dt, res_a)
    first = snapshot(spark, cfg_a)
    res_rerun: dict = {}
    run_day(spark, cfg_a, DAYS[1], res_rerun)
    rerun = snapshot(spark, cfg_a)

    cfg_b = _cfg(root / "b", raw, beauty_slice)
    for name in JOBS[:-1]:  # eval_snapshot is a function of examples + events, compared below
        for dt in DAYS:
            kw = {"assign_sids": False} if name == "update_catalog" else {}
            run_job(spark, name, dt, cfg_b, **kw)
    backfill = snapshot(spark, cfg_b)
    return {"raw": raw, "cfg": cfg_a, "first": first, "rerun": rerun, "backfill": backfill,
            "results": res_a, "rerun_results": res_rerun}


def _raw_lines(raw: Path, kind: str, dt: str) -> list[str]:
    return (raw / kind / f"dt={dt}" / "part-0000.jsonl").read_text().splitlines()


def _manifest(raw: Path, kind: str, dt: str) -> dict:
    return json.loads((raw / kind / f"dt={dt}" / "_faults.json").read_text())


def test_faults_are_quarantined_exactly_with_their_reasons(lakes):
    raw, snap = lakes["raw"], lakes["first"]
    for kind, table in (("events", "events_quarantine"), ("items", "items_quarantine")):
        got = {(r[4], r[3], r[1]) for r in snap[table]}  # (dt, line_no, reason)
        want = {(dt, f["line"], f["reason"]) for dt in DAYS[1:] for f in _manifest(raw, kind, dt)["faults"]}
        assert want and got == want, kind
        # the quarantine keeps the raw line and names its file
        for raw_line, _, source_file, line_no, dt in snap[table]:
            assert source_file == f"{kind}/dt={dt}/part-0000.jsonl"
            assert _raw_lines(raw, kind, dt)[line_no - 1] == raw_line


def test_no_good_row_is_lost_and_none_doubled(lakes):
    raw, snap = lakes["raw"], lakes["first"]
    events = snap["events"]
    assert len({r[0] for r in events}) == len(events)  # event_id unique across days
    for dt in DAYS:
        lines = _raw_lines(raw, "events", dt)
        bad = {f["line"] for f in _manifest(raw, "events", dt)["faults"]} if dt != DAYS[0] else set()
        want = sorted((json.loads(line)["event_id"], no) for no, line in enumerate(lines, 1) if no not in bad)
        got = sorted((r[0], r[5]) for r in events if r[7] == dt)
        assert got == want, dt
    counts = lakes["results"][("ingest_events", DAYS[1])].counts
    manifest = Counter(f["reason"] for f in _manifest(raw, "events", DAYS[1])["faults"])
    assert {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("quarantined:")} == manifest
    # rows in the Delta tables, not counts derived from each other: every line is in exactly one
    for dt in DAYS:
        n_events = sum(1 for r in events if r[7] == dt)
        n_quarantined = sum(1 for r in snap["events_quarantine"] if r[4] == dt)
        assert n_events + n_quarantined == len(_raw_lines(raw, "events", dt)), dt
        day = lakes["results"][("ingest_events", dt)].counts
        assert (day["events_written"], day["quarantine_rows"]) == (n_events, n_quarantined), dt


def _write_raw(cfg, kind: str, dt: str, lines: list[str]) -> None:
    d = Path(cfg.paths.raw) / kind / f"dt={dt}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "part-0000.jsonl").write_text("\n".join(lines) + "\n")


def test_item_feed_loses_nothing_and_a_rerun_never_shrinks_a_day(spark, make_cfg):
    """Item feed: each line is a catalog row (its item's last line of the day) or quarantined,
    duplicate_item included, counted in the tables. Events: a rerun on a truncated landing
    partition is refused with the counts and leaves the day intact; --force replaces it."""
    from jobs.common import ShrinkRefused
    from jobs.ingest_events import run as ingest
    from jobs.update_catalog import run as update_catalog
    from onerec_prod.lake import read_table, table_path

    cfg, dt = make_cfg(), "2014-03-01"
    items = [
        json.dumps({"item_id": "i1", "title": "first", "categories": "Beauty"}),
        json.dumps({"item_id": "i2", "title": "two"}),
        json.dumps({"item_id": "i1", "title": "second"}),
        '{"item_id": "i9", "title": "bro',
        json.dumps({"item_id": "i3", "title": 42}),
        json.dumps({"item_id": "i1", "title": "last", "categories": "Beauty > Nails"}),
        json.dumps({"item_id": "i4", "title": "four"}),
    ]
    _write_raw(cfg, "items", dt, items)
    res = update_catalog(spark, dt, cfg, assign_sids=False)
    catalog = {r["item_id"]: r["title"] for r in read_table(spark, table_path(cfg, "catalog")).collect()}
    quarantined = {(r["line_no"], r["reason"]) for r in
                   read_table(spark, table_path(cfg, "items_quarantine")).where(f"dt = '{dt}'").collect()}
    assert catalog == {"i1": "last", "i2": "two", "i4": "four"}
    assert quarantined == {(1, "duplicate_item"), (3, "duplicate_item"), (4, "malformed_json"),
                           (5, "bad_type:title")}
    assert len(catalog) + len(quarantined) == len(items) == res.counts["lines_read"]
    assert res.counts["new_items"] == len(catalog) and res.counts["quarantined"] == len(quarantined)

    ts = 1393660800 + 3600  # 2014-03-01 01:00 UTC
    events = [json.dumps({"event_id": f"e{i}", "user_id": f"u{i % 3}", "item_id": f"i{1 + i % 2}", "ts": ts + i})
              for i in range(8)] + [json.dumps({"event_id": "bad", "user_id": "u1", "item_id": "nope", "ts": ts})]
    _write_raw(cfg, "events", dt, events)
    first = ingest(spark, dt, cfg)
    assert (first.counts["events_written"], first.counts["quarantine_rows"]) == (8, 1)

    def day_rows():
        return (read_table(spark, table_path(cfg, "events")).where(f"dt = '{dt}'").count(),
                read_table(spark, table_path(cfg, "events_quarantine")).where(f"dt = '{dt}'").count())

    _write_raw(cfg, "events", dt, events[:5])  # the landing partition was truncated / expired
    with pytest.raises(ShrinkRefused, match=r"has 5 lines but the day already holds 8 events \+ 1 quarantined = 9"):
        ingest(spark, dt, cfg)
    assert day_rows() == (8, 1)  # untouched
    forced = ingest(spark, dt, cfg, force=True)
    assert day_rows() == (5, 0) and forced.counts["events_written"] == 5

    # build_sequences on a day whose events are gone keeps the day's examples
    from jobs.build_sequences import run as build_sequences

    def examples():
        return read_table(spark, table_path(cfg, "examples")).where(f"dt = '{dt}'").count()

    assert build_sequences(spark, dt, cfg).counts["examples_written"] == 5 and examples() == 5
    (Path(cfg.paths.raw) / "events" / f"dt={dt}" / "part-0000.jsonl").write_text("")
    ingest(spark, dt, cfg, force=True)
    assert day_rows() == (0, 0)
    with pytest.raises(ShrinkRefused, match="examples already holds 5 rows"):
        build_sequences(spark, dt, cfg)
    assert examples() == 5
    build_sequences(spark, dt, cfg, force=True)
    assert examples() == 0


def test_unknown_item_is_quarantined_not_dropped(lakes):
    snap = lakes["first"]
    unknown = [r for r in snap["events_quarantine"] if r[1] == "unknown_item"]
    assert len(unknown) == 2 * (len(DAYS) - 1)
    event_ids = {r[0] for r in snap["events"]}
    for r in unknown:
        row = json.loads(r[0])
        assert row["item_id"].startswith("unknown-") and row["event_id"] not in event_ids
    catalog_ids = {r[0] for r in snap["catalog"]}
    assert all(r[2] in catalog_ids for r in snap["events"])  # every kept event's item is known


def test_rerun_of_a_day_gives_identical_tables(lakes):
    first, rerun = lakes["first"], lakes["rerun"]
    for t in TABLES:
        assert rerun[t] == first[t], t
    again = lakes["rerun_results"]
    assert again[("update_catalog", DAYS[1])].counts["new_items"] == 0
    assert again[("build_sequences", DAYS[1])].counts["users_updated"] == 0
    assert again[("ingest_events", DAYS[1])].counts["later_days"] == 1


def test_backfill_order_on_a_fresh_lake_gives_identical_tables(lakes):
    for t in TABLES:
        if t != "eval_snapshot":  # not built in lake B (it only reads examples and events)
            assert lakes["backfill"][t] == lakes["first"][t], t


def test_examples_and_history_match_the_plain_python_reference(lakes):
    from jobs.build_sequences import reference_sequences

    cfg, snap = lakes["cfg"], lakes["first"]
    h = cfg.data.history_len
    cols = ["event_id", "user_id", "item_id", "ts", "event_type", "seq", "source_file", "dt"]
    events = sorted((dict(zip(cols, r)) for r in snap["events"]),
                    key=lambda e: (e["dt"], e["ts"], e["source_file"], e["seq"]))
    prior: dict[str, list[str]] = {}
    want_examples, state = [], {}
    for dt in DAYS:
        day = [e for e in events if e["dt"] == dt]
        ex, st = reference_sequences(prior, day, h, dt)
        want_examples += ex
        for e in day:
            prior.setdefault(e["user_id"], []).append(e["item_id"])
        state.update({u: (items, ts, dt) for u, (items, ts) in st.items()})
    want = sorted((e["event_id"], e["user_id"], tuple(e["history"]), e["target_item_id"], e["ts"], e["dt"])
                  for e in want_examples)
    assert snap["examples"] == want
    assert snap["user_history"] == sorted((u, tuple(i), ts, dt) for u, (i, ts, dt) in state.items())
    assert any(len(r[2]) > 0 for r in snap["examples"] if r[5] == DAYS[1])  # bootstrap history is used


def test_eval_snapshot_is_first_event_of_hashed_users(lakes):
    from jobs.build_eval_snapshot import eval_user_selected

    cfg, snap = lakes["cfg"], lakes["first"]
    ev = {r[0]: r for r in snap["events"]}
    for dt in DAYS:
        rows = [r for r in snap["eval_snapshot"] if r[5] == dt]
        assert rows, dt
        users = {r[1] for r in rows}
        assert len(users) == len(rows)
        assert all(eval_user_selected(u, cfg.data.eval_user_fraction, cfg.data.eval_salt) for u in users)
        # exactly: per selected user, the first event of their latest calendar day in the partition,
        # kept when its history is non-empty
        def day_of(e):
            return datetime.fromtimestamp(e[3], UTC).date()

        by_user: dict[str, list] = {}
        for ex in snap["examples"]:
            if ex[5] == dt and eval_user_selected(ex[1], cfg.data.eval_user_fraction, cfg.data.eval_salt):
                by_user.setdefault(ex[1], []).append((ev[ex[0]], ex))
        want = []
        for pairs in by_user.values():
            last_day = max(day_of(e) for e, _ in pairs)
            e, ex = min(((e, ex) for e, ex in pairs if day_of(e) == last_day), key=lambda p: (p[0][3], p[0][6], p[0][5]))
            if ex[2]:
                want.append(ex)
        assert sorted(rows) == sorted(want)
        for r in rows:
            assert ev[r[0]][2] == r[3] and len(r[2]) > 0


def test_job_entry_points(lakes, capsys):
    """`spark-submit jobs/NAME.py --date D --config ...` and `onerec-prod job` reach the same run()."""
    from jobs import build_eval_snapshot
    from onerec_prod.cli import main as cli_main

    cfg = lakes["cfg"]
    sets = ["--set", f"paths.var_root={cfg.paths.var_root}", "--set", f"paths.raw_root={cfg.paths.raw_root}"]
    assert build_eval_snapshot.main(["--date", DAYS[2], "--config", "configs/test.yaml", *sets]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    want = sum(1 for r in lakes["first"]["eval_snapshot"] if r[5] == DAYS[2])
    assert out["job"] == "build_eval_snapshot" and out["counts"] == {"eval_events": want}
    assert cli_main(["--config", "configs/test.yaml", *sets, "job", "all", "--date", "2014-3-1"]) == 2
    assert "expected YYYY-MM-DD" in capsys.readouterr().out


def test_shared_spark_server_writes_the_same_tables(lakes, spark, beauty_slice, tmp_path, caplog):
    """The local runtime's one warm Spark driver (``onerec-prod spark-server``) runs the jobs sent
    by the tasks' ``run_stage`` and writes exactly what in-process runs write (lake A); a job's own
    error reaches the task with its type and message; a task on another Spark config is refused
    (and then runs in its own session)."""
    import os
    import signal
    import subprocess
    import sys

    from onerec_prod import spark_server
    from onerec_prod.airflow_local import overrides_env
    from onerec_prod.config import load_config
    from onerec_prod.pipeline import run_stage

    sets = [f"paths.var_root={tmp_path / 'c'}", f"paths.raw_root={lakes['raw']}",
            f"paths.dataset_dir={beauty_slice}", "spark.shared_session=true", "spark.server_port=28491",
            "spark.server_stages=[landing,build_eval_snapshot]", "data.assign_sids=false"]
    cfg = load_config(REPO / "configs" / "test.yaml", sets, environ={})
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONEREC")}
    env.update(overrides_env(sets), ONEREC_CONFIG=str(REPO / "configs" / "test.yaml"))
    url = spark_server.server_url(cfg)
    proc = subprocess.Popen([sys.executable, "-m", "onerec_prod.cli", "spark-server"], env=env, cwd=REPO,
                            start_new_session=True)
    try:
        assert spark_server.wait_ready(url, 300, alive=lambda: proc.poll() is None)["ready"]
        from jobs.runner import JOBS

        for dt in DAYS:
            for name in JOBS:
                got = spark_server.submit(url, cfg, name, dt)
                assert got["counts"] == lakes["results"][(name, dt)].counts, (name, dt)
        assert snapshot(spark, cfg) == lakes["first"]
        # through the stage runner, as an Airflow task with $ONEREC_SPARK_SERVER calls it
        os.environ[spark_server.ENV_URL] = url
        try:
            rec = run_stage("build_eval_snapshot", DAYS[2], cfg)
        finally:
            del os.environ[spark_server.ENV_URL]
        assert rec["extra"]["spark_session"] == "shared"
        assert rec["counts"] == lakes["results"][("build_eval_snapshot", DAYS[2])].counts
        with pytest.raises(FileNotFoundError, match="no landing data"):
            spark_server.submit(url, cfg, "ingest_events", "2014-03-09")
        other = load_config(REPO / "configs" / "test.yaml", [*sets, "spark.shuffle_partitions=3"], environ={})
        with pytest.raises(spark_server.SparkServerUnavailable, match="spark config differs"):
            spark_server.submit(url, other, "ingest_events", DAYS[1])
        # a model task's Spark read (SPARK_CALLS): the same JSON on the server as in-process
        os.environ[spark_server.ENV_URL] = url
        try:
            remote = spark_server.run_on_spark(cfg, "eval_inputs", DAYS[2])
        finally:
            del os.environ[spark_server.ENV_URL]
        local = spark_server.run_job(spark, "eval_inputs", DAYS[2], cfg)
        assert remote == local
        from onerec_prod.lake import table_path

        want_events = (spark.read.format("delta").load(table_path(cfg, "eval_snapshot"))
                       .where(f"dt = '{DAYS[2]}'").count())  # eval.window_days=1
        assert len(remote["snapshot"]) == want_events > 0
        with pytest.raises(ValueError, match="unknown Spark job .not_a_call."):
            spark_server.submit(url, cfg, "not_a_call", DAYS[2])
        # a whole stage of spark.server_stages runs inside the server (what the demo does with the
        # model stages): its log streams into the task's log, its record is the in-process one, and
        # its error keeps its type
        from onerec_prod.pipeline import StageError, dispatch_stage, read_record

        os.environ[spark_server.ENV_URL] = url
        try:
            with caplog.at_level(logging.INFO):
                rec = dispatch_stage("build_eval_snapshot", DAYS[2], cfg)
            with pytest.raises(StageError, match="no landing data for dt=2014-03-09"):
                dispatch_stage("landing", "2014-03-09", cfg)
        finally:
            del os.environ[spark_server.ENV_URL]
        assert rec["counts"] == lakes["results"][("build_eval_snapshot", DAYS[2])].counts
        assert rec["extra"]["spark_session"] == "shared"
        assert read_record(cfg, DAYS[2], "build_eval_snapshot")["seconds"] == rec["seconds"]
        streamed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[spark-server]")]
        assert any(f"stage build_eval_snapshot dt={DAYS[2]}: start" in m for m in streamed), streamed[:5]
        with pytest.raises(ValueError, match="not one of spark.server_stages"):
            spark_server.submit(url, cfg, "stage:evaluate", DAYS[2])
        assert spark_server.health(url)["jobs_run"] == 4 * len(DAYS) + 7
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    assert spark_server.health(url, timeout_s=1) is None
