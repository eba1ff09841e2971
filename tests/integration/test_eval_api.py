"""evaluate_inputs end to end on the tiny model: the trie is the whole catalog, the report is complete."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from onerec_prod.eval import api  # noqa: E402
from onerec_prod.eval.api import EvalInputError, EvalInputs, evaluate_inputs, select_users  # noqa: E402
from onerec_prod.sid.trie import SidTrie  # noqa: E402

DT = "2014-01-05"


def make_inputs(beauty_items, tiny_sids, n_items=60, n_users=6):
    items = beauty_items[:n_items]
    catalog = [{"item_id": it["item_id"], "title": it["title"], "categories": it["categories"],
                "sid": tiny_sids[it["item_id"]], "sid_version": "v1",
                "first_seen_dt": DT if k >= n_items - 2 else "2014-01-01"} for k, it in enumerate(items)]
    catalog.append({"item_id": "nosid", "title": "No SID yet", "categories": None, "sid": None,
                    "sid_version": None, "first_seen_dt": DT})
    ids = [it["item_id"] for it in items]
    snapshot = [{"event_id": f"e{u}", "user_id": f"u{u}", "history": ids[u: u + 3] + ["nosid"],
                 "target_item_id": ids[u + 3]} for u in range(n_users)]
    snapshot.append({"event_id": "e99", "user_id": "u99", "history": ids[:2], "target_item_id": "nosid"})
    train = [ids[k: k + 5] for k in range(0, n_items - 5, 3)]
    return EvalInputs(DT, snapshot, catalog, train, {"eval_snapshot": 3, "catalog": 2, "events": 5})


def test_report_and_trie_over_whole_catalog(make_cfg, tiny_model_dir, beauty_items, tiny_sids, monkeypatch):
    built: list[SidTrie] = []
    orig = SidTrie.from_sids.__func__

    def spy(cls, sids, sizes):
        t = orig(cls, sids, sizes)
        built.append(t)
        return t

    monkeypatch.setattr(SidTrie, "from_sids", classmethod(spy))
    cfg = make_cfg("eval.max_users=null", "eval.bertscore_items=2", "eval.sasrec_epochs=1",
                   "eval.caption_max_tokens=8", "eval.beam_size=10")
    inputs = make_inputs(beauty_items, tiny_sids)
    report = evaluate_inputs(cfg, tiny_model_dir, inputs)

    # the trie holds every catalog SID (60), not the 7 targets of the snapshot
    assert len(built) == 1 and built[0].num_items == 60
    targets = {r["target_item_id"] for r in inputs.snapshot}
    assert built[0].num_items > len(targets)
    assert all(built[0].contains(tiny_sids[it["item_id"]]) for it in beauty_items[:60])
    assert report["counts"]["trie_items"] == 60 and report["counts"]["targets_without_sid"] == 1
    assert report["counts"]["history_items_without_sid"] == 6

    assert report["n_users"] == 7 and report["dt"] == DT and report["sid_version"] == "v1"
    assert set(report["metrics"]) == {"recall@5", "ndcg@5", "recall@10", "ndcg@10", "bertscore_f1"}
    assert all(0.0 <= v <= 1.0 for v in report["metrics"].values())
    assert set(report["baselines"]) == {"mostpop", "sasrec"}
    assert report["bertscore"]["n_items"] == 4 and report["bertscore"]["n_new"] == 2  # 2 fixed + 2 new
    catalog_ids = {r["item_id"] for r in inputs.catalog if r["sid"] is not None}
    for ex in report["examples"]:
        assert len(ex["top5"]) == 5 and set(ex["top5"]) <= catalog_ids
    assert report["data_versions"] == {"eval_snapshot": 3, "catalog": 2, "events": 5}
    json.dumps(report)  # serialisable as is


def test_think_mode_report_has_rationales(make_cfg, tiny_model_dir, beauty_items, tiny_sids):
    cfg = make_cfg("eval.max_users=2", "eval.bertscore_items=0", "eval.baselines=[]", "eval.max_think_tokens=4")
    report = evaluate_inputs(cfg, tiny_model_dir, make_inputs(beauty_items, tiny_sids), think=True)
    assert report["think"] is True and report["n_users"] == 2
    assert all(isinstance(ex["rationale"], str) for ex in report["examples"])
    assert report["metrics"]["bertscore_f1"] is None and report["baselines"] == {}


def test_models_with_the_same_weights_are_scored_once(make_cfg, tiny_model_dir, beauty_items, tiny_sids, tmp_path):
    """An RL refresh without signal leaves the SFT weights as they were: evaluate_models scores those
    weights once and gives the twin the same per-user scores, saying so in the report."""
    import shutil

    from onerec_prod.eval.api import evaluate_models

    cfg = make_cfg("eval.max_users=null", "eval.bertscore_items=0", "eval.baselines=[]")
    twin = tmp_path / "twin"
    shutil.copytree(tiny_model_dir, twin)
    report = evaluate_models(cfg, DT, tiny_model_dir, others={"sft": twin},
                             inputs=make_inputs(beauty_items, tiny_sids))
    assert report["same_weights"] == {"sft": str(tiny_model_dir)}
    assert report["sft_metrics"] == report["metrics"] and report["n_users"] == 7
    assert report["sft_per_user"] == {k: v for k, v in report["per_user"].items() if k != "event_ids"}


def test_user_sample_is_stable_and_seeded():
    snap = [{"event_id": f"e{i}", "user_id": f"u{i}"} for i in range(50)]
    a = select_users(snap, 10, seed=0)
    assert [r["event_id"] for r in a] == [r["event_id"] for r in select_users(list(reversed(snap)), 10, seed=0)]
    assert len(a) == 10 and a != select_users(snap, 10, seed=1)
    assert len(select_users(snap, None, 0)) == 50


def test_sid_version_mismatch_is_refused(beauty_items, tiny_sids):
    catalog = make_inputs(beauty_items, tiny_sids).catalog
    with pytest.raises(EvalInputError, match="model sid_version 'v0' != catalog sid_version 'v1'"):
        api.catalog_sid_version(catalog, "v0")
    mixed = catalog[:2] + [dict(catalog[2], sid_version="v2")]
    with pytest.raises(EvalInputError, match="mixes sid_versions"):
        api.catalog_sid_version(mixed, None)


def test_cli_writes_report(make_cfg, tmp_path, monkeypatch, capsys):
    from onerec_prod import cli
    from onerec_prod.eval import cli_eval as eval_cli

    tiny_model_dir = tmp_path / "model"  # the CLI only resolves the dir; evaluate is replaced
    tiny_model_dir.mkdir()

    calls = []

    def fake_evaluate(cfg, model_dir, dt, *, think=None, device=None):
        calls.append((model_dir, dt, think, cfg.eval.max_users))
        return {"dt": dt, "n_users": 3, "think": False, "model_weights_sha256": "abcdef0123456789",
                "metrics": {"recall@5": 0.5, "recall@10": 1.0, "ndcg@5": 0.25, "ndcg@10": 0.3, "bertscore_f1": 0.7},
                "baselines": {"mostpop": {"recall@5": 0.0, "recall@10": 0.1, "ndcg@5": 0.0, "ndcg@10": 0.05}}}

    monkeypatch.setattr("onerec_prod.eval.api.evaluate", fake_evaluate)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(f"paths:\n  var_root: {tmp_path}\n")
    out = tmp_path / "r.json"
    rc = cli.main(["--config", str(cfg_file), "eval", "--model", str(tiny_model_dir), "--snapshot", DT,
                   "--out", str(out), "--max-users", "7"])
    assert rc == 0 and calls == [(tiny_model_dir, DT, None, 7)]
    saved = json.loads(out.read_text())
    assert saved["metrics"]["recall@10"] == 1.0 and saved["model"] == str(tiny_model_dir)
    printed = capsys.readouterr().out
    assert "mostpop" in printed and str(out) in printed
    # default location: <artifacts>/eval/dt=D/report-<weights hash>.json
    cli.main(["--config", str(cfg_file), "eval", "--model", str(tiny_model_dir), "--snapshot", DT])
    assert (tmp_path / "artifacts" / "eval" / f"dt={DT}" / "report-abcdef012345.json").exists()
    with pytest.raises(FileNotFoundError, match="no such directory"):
        eval_cli.resolve_model(make_cfg(), str(tmp_path / "missing"))
    with pytest.raises(SystemExit, match="expected YYYY-MM-DD"):
        cli.main(["--config", str(cfg_file), "eval", "--model", str(tiny_model_dir), "--snapshot", "2014-1-5"])


def test_bench_configs_load():
    from pathlib import Path

    from onerec_prod.config import load_config

    root = Path(__file__).resolve().parents[2] / "configs" / "bench"
    names = sorted(p.name for p in root.glob("quality_*.yaml"))
    assert names == ["quality_cpu.yaml", "quality_gpu.yaml"]
    for p in root.glob("*.yaml"):
        cfg = load_config(p, environ={})
        assert cfg.eval.beam_size == 10 and cfg.samples.max_history >= 49  # the paper protocol


def test_bertscore_f1_sanity():
    from onerec_prod.eval.bertscore import bertscore_f1, reference_caption

    ref = reference_caption({"item_id": "1", "sid": (1, 2, 3, 4), "title": "OPI Nail Lacquer",
                             "categories": "Beauty > Makeup > Nails"})
    assert ref == 'Title: "OPI Nail Lacquer". Categories: Beauty > Makeup > Nails.'
    same, close, far, empty = bertscore_f1(
        [ref, 'Title: "OPI Nail Polish". Categories: Beauty > Nails.', "zzz qqq", "  "], [ref] * 4)
    assert same == pytest.approx(1.0, abs=1e-4)
    assert 1.0 > close > far > 0.0   # a near caption beats an unrelated one
    assert empty == 0.0              # an empty caption scores 0 (not bert_score's special-token artefact)
    with pytest.raises(ValueError, match="2 candidates vs 1 references"):
        bertscore_f1(["a", "b"], ["a"])


def test_events_decode_under_their_days_catalog_and_repeat_scores_come_from_the_cache(
        make_cfg, tiny_model_dir, beauty_items, tiny_sids):
    """An event of an earlier day is decoded under the catalog as of its day (no item first seen
    later); scoring the same model again decodes only the events whose prompt or trie changed."""
    import dataclasses

    cfg = make_cfg("eval.max_users=null", "eval.bertscore_items=0", "eval.baselines=[]", "eval.beam_size=60")
    inputs = make_inputs(beauty_items, tiny_sids)
    for r in inputs.snapshot[:4]:
        r["dt"] = "2014-01-01"  # the pooled window: 4 events of an earlier day, 3 of DT
    new_items = {r["item_id"] for r in inputs.catalog if r["first_seen_dt"] == DT and r["sid"] is not None}
    first = evaluate_inputs(cfg, tiny_model_dir, inputs)
    assert first["counts"]["trie_items_by_day"] == {"2014-01-01": 58, DT: 60}
    assert first["score_cache"] == {"enabled": True, "hits": 0, "decoded": 7}
    cache_file, = (cfg.paths.var / "cache" / "eval").glob("*.json")
    lists = list(json.loads(cache_file.read_text())["ranked"].values())
    assert sorted(len(x) for x in lists) == [58] * 4 + [60] * 3  # beam 60 = the whole trie of the day
    assert sum(1 for x in lists if new_items <= set(x)) == 3 and sum(1 for x in lists if new_items & set(x)) == 3

    again = evaluate_inputs(cfg, tiny_model_dir, inputs)
    assert again["score_cache"] == {"enabled": True, "hits": 7, "decoded": 0}
    assert again["metrics"] == first["metrics"] and again["per_user"] == first["per_user"]

    # a new event and a changed history are decoded; the other 6 events come from the cache
    snap = [dict(r) for r in inputs.snapshot]
    snap[1]["history"] = list(reversed(snap[1]["history"]))
    snap.append(dict(snap[5], event_id="e100", user_id="u100"))
    third = evaluate_inputs(cfg, tiny_model_dir, dataclasses.replace(inputs, snapshot=snap))
    assert third["score_cache"] == {"enabled": True, "hits": 6, "decoded": 2}
    # the cache holds the window's events only: 8 now
    assert len(json.loads(cache_file.read_text())["ranked"]) == 8
    off = make_cfg("eval.max_users=null", "eval.bertscore_items=0", "eval.baselines=[]", "eval.beam_size=60",
                   "eval.score_cache=false", root=cfg.paths.var_root)
    assert evaluate_inputs(off, tiny_model_dir, inputs)["score_cache"] == {"enabled": False, "hits": 0, "decoded": 7}
