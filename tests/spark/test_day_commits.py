"""Day-level commit records (jobs/day_record.py): a real kill -9 between a stage's Delta commits.

``ingest_events`` (events, then events_quarantine) and ``update_catalog`` (items_quarantine, then
the catalog MERGE) each run in a subprocess (``python -m jobs.<name>``, its own Spark driver) that
SIGKILLs itself right after its first commit (``$ONEREC_CHAOS_CRASH_AT``). Then: the landing lines
are not all in the tables, the day's record is absent, the next stages refuse naming it, and an
in-process rerun completes, with rows counted in the Delta tables.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DT = "2014-03-01"
TS = 1393660800 + 3600  # 2014-03-01 01:00 UTC


def _write_raw(cfg, kind: str, lines: list[str]) -> None:
    d = Path(cfg.paths.raw) / kind / f"dt={DT}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "part-0000.jsonl").write_text("\n".join(lines) + "\n")


ITEMS = [
    json.dumps({"item_id": "i1", "title": "first", "categories": "Beauty"}),
    json.dumps({"item_id": "i2", "title": "two"}),
    json.dumps({"item_id": "i1", "title": "last", "categories": "Beauty > Nails"}),  # i1's first is duplicate_item
    '{"item_id": "i9", "title": "bro',
    json.dumps({"item_id": "i3", "title": 42}),
    json.dumps({"item_id": "i4", "title": "four"}),
]
EVENTS = [json.dumps({"event_id": f"e{i}", "user_id": f"u{i % 3}", "item_id": f"i{1 + i % 2}", "ts": TS + i})
          for i in range(8)] + [json.dumps({"event_id": "bad", "user_id": "u1", "item_id": "nope", "ts": TS}),
                                "not json"]


def _killed_job(cfg, job: str, point: str) -> subprocess.Popen:
    """``python -m jobs.<job>`` for DT on ``cfg``'s lake, SIGKILLed by the chaos hook at ``point``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONEREC")}
    env.update(PYTHONPATH=str(REPO), ONEREC_CHAOS_CRASH_AT=f"{job}:{point}")
    sets = [f"paths.var_root={cfg.paths.var_root}", f"paths.dataset_dir={cfg.paths.dataset_dir}",
            "data.assign_sids=false"]
    cmd = [sys.executable, "-m", f"jobs.{job}", "--date", DT, "--config", str(REPO / "configs" / "test.yaml")]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def test_kill_9_between_commits_leaves_a_refused_day_and_a_rerun_repairs(spark, make_cfg, monkeypatch):
    from delta.tables import DeltaTable

    from jobs import day_record
    from jobs.build_eval_snapshot import run as build_eval_snapshot
    from jobs.build_samples import run as build_samples
    from jobs.build_sequences import run as build_sequences
    from jobs.day_record import ChaosCrash, DayIncomplete
    from jobs.ingest_events import run as ingest
    from jobs.update_catalog import run as update_catalog
    from onerec_prod.lake import read_table, table_exists, table_path

    cfg = make_cfg("data.assign_sids=false")
    _write_raw(cfg, "items", ITEMS)
    _write_raw(cfg, "events", EVENTS)

    def rows(table: str) -> int:
        path = table_path(cfg, table)
        if not table_exists(spark, path):
            return 0
        df = read_table(spark, path)
        return df.where(f"dt = '{DT}'").count() if "dt" in df.columns else df.count()

    # the two jobs write disjoint tables: killed side by side to spend one JVM start's wall time
    procs = {"update_catalog": _killed_job(cfg, "update_catalog", "items_quarantine"),
             "ingest_events": _killed_job(cfg, "ingest_events", "events")}
    try:
        for job, p in procs.items():
            out = p.communicate(timeout=600)[0]
            assert p.returncode == -signal.SIGKILL, (job, p.returncode, out[-3000:])
            assert f"SIGKILL of this process (pid {p.pid})" in out, out[-3000:]
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(30)

    # the first commit of each landed, the second did not: lines are missing from the tables
    assert (rows("events"), rows("events_quarantine")) == (8, 0)  # 10 lines landed
    assert (rows("catalog"), rows("items_quarantine")) == (0, 3)  # 6 lines landed
    assert day_record.read(cfg, "ingest_events", DT) is None
    assert day_record.read(cfg, "update_catalog", DT) is None

    # the next stages refuse, naming the missing record and the rerun
    with pytest.raises(DayIncomplete, match=rf"build_sequences dt={DT}: ingest_events has no day commit record "
                                            rf"for dt={DT} \(.*_day_commits/ingest_events/dt={DT}\.json\).*"
                                            rf"rerun `onerec-prod job ingest_events --date {DT}`"):
        build_sequences(spark, DT, cfg)
    with pytest.raises(DayIncomplete, match=rf"build_eval_snapshot dt={DT}: ingest_events has no day commit"):
        build_eval_snapshot(spark, DT, cfg)
    with pytest.raises(DayIncomplete, match=rf"build_samples dt={DT}: update_catalog has no day commit"):
        build_samples(spark, DT, cfg)
    assert not table_exists(spark, table_path(cfg, "examples"))

    # a rerun completes the day: each landing line in exactly one table, counted in Delta rows
    cat = update_catalog(spark, DT, cfg, assign_sids=False)
    assert (rows("catalog"), rows("items_quarantine")) == (3, 3)
    assert rows("catalog") + rows("items_quarantine") == len(ITEMS) == cat.counts["lines_read"]
    ing = ingest(spark, DT, cfg)
    assert (rows("events"), rows("events_quarantine")) == (8, 2)
    assert rows("events") + rows("events_quarantine") == len(EVENTS) == ing.counts["lines_read"]
    rec = day_record.require_day(spark, cfg, "ingest_events", DT, "test")
    assert rec["tables"] == {"events": {"version": ing.written_versions["events"], "rows": 8},
                             "events_quarantine": {"version": ing.written_versions["events_quarantine"], "rows": 2}}
    assert day_record.require_day(spark, cfg, "update_catalog", DT, "test")["tables"]["items_quarantine"]["rows"] == 3
    assert build_sequences(spark, DT, cfg).counts["examples_written"] == rows("examples") == 8

    # a rerun that crashes after its first commit (here on a landing partition that grew by two
    # lines) deletes the old record first: no stale record vouches for the half-written day
    _write_raw(cfg, "events", EVENTS + [json.dumps({"event_id": f"x{i}", "user_id": "u9", "item_id": "i4",
                                                    "ts": TS + 100 + i}) for i in range(2)])
    monkeypatch.setenv(day_record.CHAOS_ENV, "ingest_events:events:raise")
    with pytest.raises(ChaosCrash):
        ingest(spark, DT, cfg)
    monkeypatch.delenv(day_record.CHAOS_ENV)
    assert (rows("events"), rows("events_quarantine")) == (10, 2)
    with pytest.raises(DayIncomplete, match="ingest_events has no day commit record"):
        build_sequences(spark, DT, cfg)
    assert rows("examples") == 8  # untouched
    ingest(spark, DT, cfg)
    assert rows("events") + rows("events_quarantine") == len(EVENTS) + 2
    assert build_sequences(spark, DT, cfg).counts["examples_written"] == rows("examples") == 10

    # a record must match the table: a day rewritten without one is refused
    DeltaTable.forPath(spark, table_path(cfg, "events")).delete(f"dt = '{DT}' AND event_id = 'x1'")
    with pytest.raises(DayIncomplete, match=r"says events holds 10 rows for the day but it holds 9"):
        build_sequences(spark, DT, cfg)
