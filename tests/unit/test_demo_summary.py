"""The demo's per-day summary: rows read from the stages' run records, the table, the plot."""

from __future__ import annotations

from pathlib import Path

from onerec_prod.config import load_config
from onerec_prod.demo import day_summary, format_table, plot
from onerec_prod.pipeline import write_record

REPO = Path(__file__).resolve().parents[2]


def _cfg(tmp_path):
    return load_config(REPO / "configs" / "test.yaml", [f"paths.var_root={tmp_path}"], environ={})


def test_summary_rows_come_from_the_run_records_and_a_failed_day_shows_dashes(tmp_path):
    cfg = _cfg(tmp_path)
    d1, d2 = "2014-01-01", "2014-01-02"
    write_record(cfg, d1, "ingest_events", {"counts": {"events_written": 239, "quarantined": 8}})
    write_record(cfg, d1, "update_catalog", {"counts": {"new_items": 2, "quarantined": 3}})
    write_record(cfg, d1, "train", {"path": "incremental", "train_loss": 6.5976})
    write_record(cfg, d1, "rl_refresh", {"before": {"hit_rate": 0.25}, "after": {"hit_rate": 0.5}})
    write_record(cfg, d1, "evaluate", {
        "metrics": {"recall@10": 0.04, "ndcg@10": 0.02, "bertscore_f1": 0.61},
        "n_users": 250, "intervals": {"recall@10": {"mean": 0.04, "low": 0.0201, "high": 0.0649}},
        "sft_metrics": {"recall@10": 0.03}, "champion_metrics": {"recall@10": 0.035},
        "baselines": {"mostpop": {"recall@10": 0.01}, "sasrec": {"recall@10": 0.05}},
    })
    write_record(cfg, d1, "gate_register", {"passed": False, "passed_effective": True, "gate": {"checks": [
        {"metric": "recall@10", "kind": "baseline", "value": 0.04, "passed": True},
        {"metric": "recall@10", "kind": "paired", "value": 0.005, "low": -0.012, "high": 0.021, "passed": True}]}})
    write_record(cfg, d1, "promote", {"promoted": True, "version": 2})
    # day 2 failed after ingest: only its first record exists
    write_record(cfg, d2, "ingest_events", {"counts": {"events_written": 376, "quarantined": 0}})

    r1, r2 = day_summary(cfg, d1), day_summary(cfg, d2)
    assert r1 == {
        "dt": d1, "events": 239, "quarantined": 8, "new_items": 2, "train_path": "incremental",
        "train_loss": 6.5976, "rl_hit_before": 0.25, "rl_hit_after": 0.5, "sft_r@10": 0.03,
        "eval_n": 250, "recall@10": 0.04, "r@10_95ci": "[0.020,0.065]", "ndcg@10": 0.02, "bertscore": 0.61,
        "mostpop_r@10": 0.01, "sasrec_r@10": 0.05, "champ_r@10": 0.035, "vs_champ": "+0.005[-0.012,+0.021]",
        "gate": "pass", "champion": 2,
    }
    assert (r2["events"], r2["quarantined"], r2["train_path"], r2["gate"], r2["champion"]) == (
        376, 0, None, None, None)

    table = format_table([r1, r2]).splitlines()
    assert table[0].split() == list(r1)
    assert table[2].split()[:3] == [d1, "239", "8"]
    assert table[3].split()[3:] == ["-"] * (len(r1) - 3)  # new_items onwards: no record, no number
    assert format_table([]) == "(no days)"


def test_plot_writes_a_png_even_with_missing_values(tmp_path):
    cfg = _cfg(tmp_path)
    write_record(cfg, "2014-01-01", "ingest_events", {"counts": {"events_written": 10, "quarantined": 1}})
    rows = [day_summary(cfg, "2014-01-01"), day_summary(cfg, "2014-01-02")]
    out = plot(rows, tmp_path / "plots" / "summary.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fault_check_matches_injected_lines_with_quarantined_ones(tmp_path):
    from onerec_prod.demo import fault_check

    cfg = _cfg(tmp_path)
    parts = [
        {"dt": "2013-12-31", "kind": "bootstrap", "events": 100, "event_faults": 0, "item_faults": 0},
        {"dt": "2014-01-01", "kind": "day", "events": 20, "event_faults": 8, "item_faults": 3},
    ]
    write_record(cfg, "2013-12-31", "ingest_events", {"counts": {"events_written": 100, "quarantined": 0}})
    write_record(cfg, "2013-12-31", "update_catalog", {"counts": {"quarantined": 0}})
    write_record(cfg, "2014-01-01", "ingest_events", {"counts": {"events_written": 20, "quarantined": 8}})
    write_record(cfg, "2014-01-01", "update_catalog", {"counts": {"quarantined": 3}})
    ok = fault_check(cfg, parts)
    assert ok == {"event_faults": 8, "item_faults": 3, "events_quarantined": 8, "items_quarantined": 3,
                  "good_events": 120, "events_written": 120, "nothing_lost": True}

    # counted in the tables: they agree with the records
    rows = {("events", "2013-12-31"): 100, ("events", "2014-01-01"): 20, ("events_quarantine", "2014-01-01"): 8,
            ("items_quarantine", "2014-01-01"): 3}
    counted = fault_check(cfg, parts, rows)
    assert counted["nothing_lost"] is True and counted["records_agree"] is True and counted["counted_in"] == "delta"
    # a record that claims rows the table does not hold: the table wins, and it is said
    short = rows | {("events", "2014-01-01"): 19}
    lost = fault_check(cfg, parts, short)
    assert lost["events_written"] == 119 and lost["records_agree"] is False and lost["nothing_lost"] is False

    # one bad line that was neither written nor quarantined: said, not hidden
    write_record(cfg, "2014-01-01", "ingest_events", {"counts": {"events_written": 20, "quarantined": 7}})
    assert fault_check(cfg, parts)["nothing_lost"] is False


def test_task_seconds_come_from_airflow_metadata_db(tmp_path):
    """Per-task seconds per day, read from Airflow's sqlite tables (the columns Airflow 3 has)."""
    import sqlite3

    from onerec_prod.airflow_local import airflow_home, task_durations
    from onerec_prod.demo import task_seconds_rows

    cfg = _cfg(tmp_path)
    airflow_home(cfg).mkdir(parents=True)
    con = sqlite3.connect(airflow_home(cfg) / "airflow.db")
    con.execute("CREATE TABLE dag_run (id INTEGER, dag_id TEXT, run_id TEXT, logical_date TEXT)")
    con.execute("CREATE TABLE task_instance (id TEXT, dag_id TEXT, run_id TEXT, task_id TEXT, "
                "duration FLOAT, state TEXT)")
    con.executemany("INSERT INTO dag_run VALUES (?, 'onerec_daily', ?, ?)",
                    [(1, "r1", "2014-01-01 00:00:00.000000"), (2, "r2", "2014-01-02 00:00:00.000000")])
    con.executemany("INSERT INTO task_instance VALUES (?, 'onerec_daily', ?, ?, ?, ?)", [
        ("a", "r1", "ingest_events", 23.04, "success"), ("b", "r1", "incremental_sft", 40.0, "success"),
        ("c", "r1", "bootstrap_alignment", 0.0, "skipped"), ("d", "r1", "build_samples", 35.0, "success"),
        ("e", "r2", "ingest_events", 9.0, "failed"), ("f", "r2", "build_samples", None, "upstream_failed"),
    ])
    con.commit()
    con.close()
    got = task_durations(cfg)
    assert got == {"2014-01-01": {"ingest_events": 23.0, "incremental_sft": 40.0, "build_samples": 35.0},
                   "2014-01-02": {"ingest_events": 9.0}}
    rows = task_seconds_rows(got, ["2014-01-01", "2014-01-02", "2014-01-03"])
    assert list(rows[0]) == ["dt", "ingest_events", "build_samples", "incremental_sft", "spark_total", "total"]
    assert rows[0]["spark_total"] == 58.0 and rows[0]["total"] == 98.0
    assert rows[1]["build_samples"] is None and rows[1]["total"] == 9.0
    assert rows[2]["total"] is None  # a day Airflow never ran
