"""Config validation names the bad key; every shipped config and schema loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from onerec_prod.config import ConfigError, load_config
from onerec_prod.schemas import SchemaError, all_schemas, load_schema, validate_fields

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_top_level_config_loads(path):
    cfg = load_config(path, environ={})
    assert cfg.sid.num_levels == cfg.sid.levels + 1


def test_unknown_key_names_itself_and_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["train.lrr=1e-4"], environ={})
    msg = str(e.value)
    assert "train.lrr: unknown key" in msg and "lr" in msg and "max_steps" in msg


def test_bad_value_names_key_and_value():
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["sid.levels=x", "eval.beam_size=0"], environ={})
    msg = str(e.value)
    assert "2 problems" in msg and "sid.levels" in msg and "'x'" in msg and "eval.beam_size" in msg


def test_cross_field_check_explains():
    with pytest.raises(ConfigError, match="num_kv_heads"):
        load_config(overrides=["model.num_heads=4", "model.num_kv_heads=3"], environ={})


def test_server_stages_are_pipeline_stages():
    from onerec_prod.config import PIPELINE_STAGES
    from onerec_prod.pipeline import STAGES

    assert PIPELINE_STAGES == STAGES  # the config's list of valid names is the DAG's stages
    cfg = load_config(overrides=["spark.server_stages=[train,evaluate]"], environ={})
    assert cfg.spark.server_stages == ["train", "evaluate"]
    with pytest.raises(ConfigError, match="unknown stages \\['evaluation'\\]"):
        load_config(overrides=["spark.server_stages=[train,evaluation]"], environ={})


def test_env_then_cli_override_order():
    env = {"ONEREC__TRAIN__LR": "0.5", "ONEREC__SID__LEVELS": "2"}
    cfg = load_config(overrides=["train.lr=0.25"], environ=env)
    assert cfg.train.lr == 0.25 and cfg.sid.levels == 2


def test_dates_from_yaml_env_and_cli_stay_iso_strings(tmp_path):
    # YAML (and so an env/CLI override) reads an unquoted 2014-01-01 as a date object
    f = tmp_path / "c.yaml"
    f.write_text("airflow:\n  start_date: 2013-12-31\n")
    cfg = load_config(f, overrides=["data.replay_start=2014-01-02"],
                      environ={"ONEREC__AIRFLOW__END_DATE": "2014-01-03"})
    assert (cfg.airflow.start_date, cfg.airflow.end_date, cfg.data.replay_start) == (
        "2013-12-31", "2014-01-03", "2014-01-02")


def test_relative_paths_resolve_under_var_root(tmp_path):
    cfg = load_config(overrides=[f"paths.var_root={tmp_path}"], environ={})
    assert cfg.paths.lake == str(tmp_path / "lake")
    assert load_config(REPO / "configs" / "cluster.yaml", environ={}).paths.lake.startswith("s3a://")


def test_all_schemas_load_with_keys_and_partitions():
    schemas = all_schemas()
    assert {"events", "events_quarantine", "catalog", "user_history", "samples", "eval_snapshot",
            "think_ahead", "raw_events", "raw_items"} <= set(schemas)
    ev = load_schema("events")
    assert ev.partition_by == ("dt",) and ev.key == ("event_id",)
    assert "event_id STRING NOT NULL" in ev.ddl().replace("`", "")


def test_unknown_schema_lists_known():
    with pytest.raises(SchemaError, match="known: .*catalog"):
        load_schema("nope")


@pytest.mark.parametrize("row,reason", [
    ({"event_id": "e", "user_id": "u", "item_id": "i", "ts": 5}, None),
    ({"event_id": "e", "user_id": "u", "ts": 5}, "missing_field:item_id"),
    ({"event_id": "e", "user_id": "u", "item_id": "i", "ts": "5"}, "bad_type:ts"),
    ({"event_id": "e", "user_id": "u", "item_id": "i", "ts": True}, "bad_type:ts"),
    ({"event_id": "e", "user_id": "u", "item_id": "i", "ts": -1}, "negative_timestamp"),
    ({"event_id": " ", "user_id": "u", "item_id": "i", "ts": 5}, "empty:event_id"),
])
def test_row_validator(row, reason):
    assert validate_fields(load_schema("raw_events"), row) == reason
