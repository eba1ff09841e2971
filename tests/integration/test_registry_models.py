"""Registered versions are real MLflow models with readable lineage (MLflow sqlite store).

A tiny real recommender (the embedded Qwen3 with the SID vocabulary) and a catalog with SIDs are
registered for two days. Then ``mlflow.pyfunc.load_model("models:/onerec@champion")`` must answer
a history with ranked catalog item ids; each version's markdown description must carry the gate
table, the Delta versions and the parent, and be rewritten on promote and rollback (with the
reason); the Delta inputs must be MLflow dataset inputs with their table versions.
"""

from __future__ import annotations

import shutil

import pytest

from tests.conftest import gate_record

pytestmark = pytest.mark.timeout(600)


def _gate(passed: bool, champion: str | None) -> dict:
    return gate_record(champion, passed=passed)


def test_champion_loads_as_pyfunc_and_versions_explain_themselves(make_cfg, tiny_model_dir, tiny_sids,
                                                                  beauty_items, tmp_path):
    import mlflow
    import pandas as pd

    from onerec_prod.registry import registry, tracking

    cfg = make_cfg()
    catalog = [{**it, "sid": list(tiny_sids[it["item_id"]]), "sid_version": "s1"} for it in beauty_items]
    day1, day2 = tmp_path / "d1", tmp_path / "d2"
    shutil.copytree(tiny_model_dir, day1)
    shutil.copytree(tiny_model_dir, day2)
    (day2 / "day2.txt").write_text("a different candidate")  # new weights hash -> a new version
    next(day2.glob("*.safetensors")).rename(day2 / "x.bin")  # the folder hash, not the tensor hash, now applies

    v1 = registry.register(cfg, day1, "2014-01-01", {"data_versions": {"catalog": 2, "events": 5}},
                           catalog=catalog)
    registry.record_gate(cfg, v1, _gate(True, None), {"recall_at_10": 0.12})
    registry.promote(cfg, v1, actor="airflow:onerec_daily", reason="daily gate passed dt=2014-01-01")
    v2 = registry.register(cfg, day2, "2014-01-02", {"parent_version": v1,
                                                     "data_versions": {"catalog": 3, "events": 7}})
    registry.record_gate(cfg, v2, _gate(True, v1), {"recall_at_10": 0.13})
    registry.promote(cfg, v2, actor="airflow:onerec_daily", reason="daily gate passed dt=2014-01-02")
    registry.rollback(cfg, actor="oncall", reason="CTR dropped 8% after the promote")

    # the champion (v1 again) answers through MLflow's own loader
    mlflow.set_tracking_uri(cfg.mlflow_uri)
    mlflow.set_registry_uri(cfg.mlflow_uri)
    model = mlflow.pyfunc.load_model(f"models:/{cfg.registry.model_name}@champion")
    sig = model.metadata.signature
    assert sig.inputs.input_names() == ["history"] and [s.name for s in sig.outputs.inputs] == ["items", "scores"]
    history = [it["item_id"] for it in beauty_items[:4]]
    out = model.predict(pd.DataFrame({"history": [history, history[:1]]}), params={"k": 3})
    assert list(out.columns) == ["items", "scores"] and len(out) == 2
    known = {it["item_id"] for it in beauty_items}
    for items, scores in zip(out["items"], out["scores"]):
        assert 1 <= len(items) <= 3 and set(items) <= known and len(set(items)) == len(items)
        assert list(scores) == sorted(scores, reverse=True)
    # the input example stored with the model is a valid request
    assert model.metadata.get_input_schema() is not None
    # the project's own loader still finds the weights inside the pyfunc model (hash checked)
    assert (registry.version_dir(cfg, v1) / "config.json").is_file()

    c = tracking.client(cfg)
    name = cfg.registry.model_name
    d1 = c.get_model_version(name, v1).description
    d2 = c.get_model_version(name, v2).description
    # v2: rolled back, with its reason; gate table, parent, data versions
    assert "rolled back" in d2 and "CTR dropped 8% after the promote" in d2
    assert "| ndcg_at_10 | regression | 0.0700 | 0.0650 | 0.0700 | yes |" in d2
    assert f"parent version: {v1}" in d2 and "| events | 7 |" in d2 and "| catalog | 3 |" in d2
    assert c.get_model_version(name, v2).tags["rollback_reason"] == "CTR dropped 8% after the promote"
    # v1: promoted, replaced by v2, restored by the rollback, with actors and reasons
    assert "daily gate passed dt=2014-01-01" in d1 and f"replaced by v{v2}" in d1
    assert "restored" in d1 and "oncall" in d1 and "parent version: none (bootstrap)" in d1

    # Delta inputs of each registration are MLflow datasets with their table versions
    run = c.get_run(c.get_model_version(name, v2).run_id)
    got = {i.dataset.name: i.dataset for i in run.inputs.dataset_inputs}
    assert {"catalog@v3", "events@v7"} <= set(got)
    assert '"delta_table_version": 7' in got["events@v7"].source and got["events@v7"].source_type == "delta_table"
