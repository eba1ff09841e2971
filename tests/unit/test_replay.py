"""``onerec-prod replay``: byte-identical landing files, daily item feeds, bootstrap, faults."""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from onerec_prod.datasets import Item, load_dataset, write_dataset
from onerec_prod.replay import FAULTS_FILE, FaultSpec, ReplayError, event_id, replay, synthetic_days

START, DAYS, BOOT = "2014-03-01", 3, "2014-03-01"


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_replay_twice_is_byte_identical(make_cfg, tmp_path, capsys):
    """The issue's command on the full Beauty data: `replay --start 2014-01-01 --days 3`, twice."""
    from onerec_prod.cli import main

    argv = ["--config", "configs/test.yaml", "--set", f"paths.var_root={tmp_path}", "replay",
            "--start", "2014-01-01", "--days", "3"]
    assert main(argv) == 0
    first = digest(tmp_path / "raw")
    assert main(argv) == 0
    assert digest(tmp_path / "raw") == first
    assert sorted(first) == [f"{k}/dt={d}/{f}" for k in ("events", "items")
                             for d in ("2013-12-31", "2014-01-01", "2014-01-02", "2014-01-03")
                             for f in ("_SUCCESS", "part-0000.jsonl")]  # the marker, written last
    out = capsys.readouterr().out
    assert "2013-12-31  bootstrap" in out and (tmp_path / "datasets" / "beauty").is_dir()


def test_days_items_bootstrap_and_order(make_cfg, beauty_slice, tmp_path):
    cfg = make_cfg()
    summary = replay(cfg, START, DAYS, dataset=beauty_slice, bootstrap_before=BOOT)
    raw = Path(cfg.paths.raw)
    dts = ["2014-02-28", "2014-03-01", "2014-03-02", "2014-03-03"]
    assert [p["dt"] for p in summary["partitions"]] == dts
    assert summary["partitions"][0]["kind"] == "bootstrap"
    ds = load_dataset(beauty_slice)
    rank = {event_id(i.user_id, i.position): i.position for i in ds.interactions}
    seen_items: set[str] = set()
    n_events = 0
    for dt in dts:
        events = read_jsonl(raw / "events" / f"dt={dt}" / "part-0000.jsonl")
        items = [r["item_id"] for r in read_jsonl(raw / "items" / f"dt={dt}" / "part-0000.jsonl")]
        assert not seen_items & set(items)  # an item lands in the feed once, on its first day
        seen_items |= set(items)
        assert {e["item_id"] for e in events} <= seen_items  # every event's item has landed
        if dt != dts[0]:
            assert items, dt  # new items arrive every day
            assert {e["ts"] // 86400 * 86400 for e in events} == {int(_midnight(dt))}
        n_events += len(events)
        # within a day, each user's events keep their sequence order
        pos = defaultdict(list)
        for e in events:
            pos[e["user_id"]].append(e["event_id"])
        for ids in pos.values():
            assert ids == sorted(ids, key=rank.__getitem__)
    until = _midnight("2014-03-04")
    assert n_events == sum(1 for i in ds.interactions if i.ts < until)


def _midnight(dt: str) -> float:
    return datetime.fromisoformat(dt).replace(tzinfo=UTC).timestamp()


def test_rerun_replaces_partition_and_drops_stale_fault_manifest(make_cfg, beauty_slice):
    cfg = make_cfg()
    replay(cfg, START, 1, dataset=beauty_slice, bootstrap_before=None, faults=FaultSpec.parse("all"))
    part = Path(cfg.paths.raw) / "events" / f"dt={START}"
    assert (part / FAULTS_FILE).exists()
    with_faults = (part / "part-0000.jsonl").read_bytes()
    replay(cfg, START, 1, dataset=beauty_slice, bootstrap_before=None)
    assert not (part / FAULTS_FILE).exists()
    assert len((part / "part-0000.jsonl").read_bytes()) < len(with_faults)
    assert sorted(p.name for p in part.iterdir()) == ["_SUCCESS", "part-0000.jsonl"]


def _expected_reason(raw: str, dt: str, skew: int, known: set[str], seen: set[str], earlier: set[str]):
    """Plain-Python quarantine rule (independent of the Spark job) for one landing line."""
    from onerec_prod.schemas import load_schema, validate_fields

    try:
        row = json.loads(raw)
    except ValueError:
        return "malformed_json"
    reason = validate_fields(load_schema("raw_events"), row)
    if reason:
        return reason
    if row["ts"] >= _midnight(dt) + 86400 + skew:
        return "future_timestamp"
    if row["item_id"] not in known:
        return "unknown_item"
    if row["event_id"] in seen or row["event_id"] in earlier:
        return "duplicate_event"
    seen.add(row["event_id"])
    return None


def test_fault_manifest_lists_exactly_the_bad_lines(make_cfg, beauty_slice):
    cfg = make_cfg()
    spec = FaultSpec.parse("all=2,seed=5")
    replay(cfg, START, 2, dataset=beauty_slice, bootstrap_before=BOOT, faults=spec)
    raw = Path(cfg.paths.raw)
    known: set[str] = set()
    earlier: set[str] = set()
    for dt in ("2014-02-28", "2014-03-01", "2014-03-02"):
        items_dir, events_dir = raw / "items" / f"dt={dt}", raw / "events" / f"dt={dt}"
        item_lines = (items_dir / "part-0000.jsonl").read_text().splitlines()
        bad_items = {f["line"]: f["reason"] for f in json.loads((items_dir / FAULTS_FILE).read_text())["faults"]} \
            if dt != "2014-02-28" else {}
        for no, line in enumerate(item_lines, 1):
            if no not in bad_items:
                known.add(json.loads(line)["item_id"])
        lines = (events_dir / "part-0000.jsonl").read_text().splitlines()
        if dt == "2014-02-28":
            assert not (events_dir / FAULTS_FILE).exists()  # the bootstrap partition is never faulted
            manifest = {"faults": []}
        else:
            manifest = json.loads((events_dir / FAULTS_FILE).read_text())
            kinds = {f["kind"] for f in manifest["faults"]}
            assert len(manifest["faults"]) == 2 * 8 and len(kinds) == 8
            assert manifest["lines"] == len(lines) == manifest["good_lines"] + 16
        seen: set[str] = set()
        got = {}
        for no, line in enumerate(lines, 1):
            reason = _expected_reason(line, dt, cfg.data.max_future_skew_s, known, seen, earlier)
            if reason:
                got[no] = reason
        assert got == {f["line"]: f["reason"] for f in manifest["faults"]}, dt
        earlier |= seen


def test_fault_spec_parsing():
    assert FaultSpec.parse("all").counts["unknown_item"] == 1
    assert FaultSpec.parse("malformed_json=3,seed=9") == FaultSpec({"malformed_json": 3}, 9)
    with pytest.raises(ReplayError, match="unknown kind 'typo'"):
        FaultSpec.parse("typo=1")
    with pytest.raises(ReplayError, match="count must be an integer"):
        FaultSpec.parse("unknown_item=x")


def test_bad_window_is_refused(make_cfg, beauty_slice):
    cfg = make_cfg()
    with pytest.raises(ReplayError, match="--bootstrap-before 2014-03-05 is after --start"):
        replay(cfg, START, 1, dataset=beauty_slice, bootstrap_before="2014-03-05")
    with pytest.raises(ReplayError, match="--start: '2014-13-01'"):
        replay(cfg, "2014-13-01", 1, dataset=beauty_slice)


def test_dataset_without_timestamps_gets_ordered_synthetic_days(make_cfg, tmp_path):
    rows = [("u1", "a", None, None), ("u1", "b", None, None), ("u2", "b", None, None),
            ("u1", "c", None, None)]
    write_dataset(tmp_path / "untimed", rows, [Item(i, i.upper(), "X") for i in "abc"])
    cfg = make_cfg("data.untimed_origin='2014-03-01'", "data.untimed_spread_days=3")
    ds = load_dataset(tmp_path / "untimed")
    days = synthetic_days(ds, date(2014, 3, 1), 3)
    u1 = [d for d, i in zip(days, ds.interactions) if i.user_id == "u1"]
    assert u1 == sorted(u1) and len(set(u1)) == 3 and u1[1] - u1[0] == 1
    summary = replay(cfg, "2014-03-01", 3, dataset=tmp_path / "untimed", bootstrap_before="2014-03-01")
    assert not summary["timed"] and "no timestamps" in summary["note"]
    landed = [e for p in sorted((Path(cfg.paths.raw) / "events").glob("dt=*"))
              for e in read_jsonl(p / "part-0000.jsonl")]
    assert sorted(e["event_id"] for e in landed) == sorted(event_id(u, k) for u, k in
                                                           [("u1", 0), ("u1", 1), ("u1", 2), ("u2", 0)])
