"""The driver's sample export: Delta samples partition + seeded replay -> local JSONL."""

from __future__ import annotations

import json

import pytest

from onerec_prod.train.data import PadCollator, export_samples, read_jsonl, tokenize_rows

pytestmark = pytest.mark.spark


def _rows(dt, n, sid_version="v1", task="sid_rec"):
    msgs = json.dumps([{"role": "user", "content": f"history of {dt}"}])
    return [{"sample_id": f"{dt}-{task}-{i}", "task": task, "messages": msgs, "response": f"r{i}",
             "user_id": f"u{i}", "target_item_id": None, "target_sid": None, "source_event_id": None,
             "sid_version": sid_version, "dt": dt} for i in range(n)]


def test_export_day_with_seeded_replay(spark, make_cfg, tmp_path):
    from onerec_prod.lake import overwrite_partition, table_path
    from onerec_prod.schemas import load_schema

    cfg = make_cfg("samples.replay_fraction=0.5", "samples.replay_lookback_days=2")
    path = table_path(cfg, "samples")
    schema = load_schema("samples").spark_schema()
    days = {"2014-01-01": _rows("2014-01-01", 10, "v0"), "2014-01-02": _rows("2014-01-02", 10),
            "2014-01-03": _rows("2014-01-03", 6) + _rows("2014-01-03", 2, task="rl_prompt"),
            "2014-01-04": _rows("2014-01-04", 5)}
    version = None
    for dt, rows in days.items():
        version = overwrite_partition(spark.createDataFrame(rows, schema), spark, path, "samples", {"dt": dt})

    out = tmp_path / "d3.jsonl"
    m = export_samples(cfg, "2014-01-03", ["sid_rec", "reasoning"], out, replay=True, spark=spark)
    got = read_jsonl(out)
    assert m["new_rows"] == 6 and m["replay_rows"] == 3 and m["rows"] == len(got) == 9
    assert m["data_versions"] == {"samples": version} and m["sid_versions"] == ["v1"]
    # replay: only earlier days in the lookback with the same sid_version (not v0, not the future)
    assert {r["dt"] for r in got} == {"2014-01-02", "2014-01-03"}
    assert all(r["task"] == "sid_rec" for r in got)
    again = export_samples(cfg, "2014-01-03", ["sid_rec", "reasoning"], tmp_path / "again.jsonl",
                           replay=True, spark=spark)
    assert again["sha256"] == m["sha256"]  # seeded: same file every time
    none = export_samples(cfg, "2014-01-03", ["sid_rec"], tmp_path / "no.jsonl", replay=False, spark=spark)
    assert none["rows"] == 6 and none["replay_rows"] == 0


def test_tokenize_and_collate(tiny_model_dir):
    from onerec_prod.model.io import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    rows = [{"task": "sid_rec", "messages": json.dumps([{"role": "user", "content": "hi"}]),
             "response": "<think>\n\n</think>\n\n<|sid_begin|><s_a_1><s_b_2><s_c_3><s_d_4><|sid_end|>"},
            {"task": "general_lm", "messages": "[]", "response": "Nail polish"},
            {"task": "rl_prompt", "messages": "[]", "response": "x"}]
    items = tokenize_rows(rows, tok, 64, tasks=["sid_rec", "general_lm"])
    assert len(items) == 2
    assert items[1]["labels"] == items[1]["input_ids"]  # plain text: loss on everything
    col = PadCollator(tok.pad_token_id)
    batch = col(items)
    n0, n1 = len(items[0]["input_ids"]), len(items[1]["input_ids"])
    assert batch["input_ids"].shape == (2, max(n0, n1))
    assert batch["attention_mask"].sum().item() == n0 + n1 == col.tokens_seen
    assert (batch["labels"][1, n1:] == -100).all() and (batch["input_ids"][1, n1:] == tok.pad_token_id).all()
