"""Pipeline stage runs on a real MLflow sqlite store: what the MLflow UI shows for a day.

A stage's run opens before the stage runs and ends FAILED if it raises; a retry is a new run, so
the failure stays visible; every run holds the resolved config (params + config.yaml), the code
version and the caller's tags; per-step curves land at their optimizer step, whether they come
from the stage's record (GRPO's ``reward_curve``) or from a training process started inside the
stage (``log_training_step``, ``mlflow_trainer_callback``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)
DAY = "2014-01-09"


def _land(cfg, day):
    from onerec_prod.replay import write_partition

    for kind in ("events", "items"):  # one line each, with the completeness marker (written last)
        write_partition(Path(cfg.paths.raw) / kind / f"dt={day}", ["{}"], None)


def test_failed_stage_leaves_a_failed_run_and_the_retry_a_new_one(make_cfg, tmp_path):
    from onerec_prod import pipeline
    from onerec_prod.registry import tracking

    cfg = make_cfg()
    with pytest.raises(pipeline.StageError):
        pipeline.run_stage("landing", DAY, cfg, run_tags={"airflow.run_id": "scheduled__x", "airflow.try_number": 1})
    _land(cfg, DAY)
    pipeline.run_stage("landing", DAY, cfg, run_tags={"airflow.run_id": "scheduled__x", "airflow.try_number": 2})

    failed, ok = tracking.stage_attempts(cfg, DAY, "landing")
    assert (failed.info.status, ok.info.status) == ("FAILED", "FINISHED")
    assert failed.data.tags["error_type"] == "StageError" and "no landing data" in failed.data.tags["error"]
    assert failed.info.end_time >= failed.info.start_time and failed.info.run_name == "landing #1"
    assert ok.data.tags["airflow.try_number"] == "2" and ok.data.metrics["files"] == 2.0
    # resolved config as params, plus the whole file; code version as MLflow's system tag
    assert ok.data.params["train.lr"] == str(cfg.train.lr) and ok.data.params["env"] == "test"
    assert len(ok.data.params) > 100  # more than one log_batch's worth
    c = tracking.client(cfg)
    art = Path(c.download_artifacts(ok.info.run_id, "config.yaml", str(tmp_path)))
    assert "registry:" in art.read_text()
    assert ok.data.tags["mlflow.source.git.commit"] == tracking.git_sha()
    assert ok.data.tags["mlflow.parentRunId"] == tracking.day_run_id(cfg, DAY).run_id
    # the day is under way, not done: its last stage has not run
    assert c.get_run(tracking.day_run_id(cfg, DAY).run_id).info.status == "RUNNING"


def test_curves_land_at_their_steps_and_versions_are_params(make_cfg):
    from onerec_prod.registry import tracking

    cfg = make_cfg()
    child = ("from onerec_prod.registry.tracking import log_training_step as f\n"
             "for s in (1, 2, 3): assert f({'loss': 4.0 - s, 'learning_rate': 1e-3 * s}, s)\n")
    with tracking.stage_run(cfg, DAY, "rl_refresh", last=True) as run:
        # a training process started by the stage (torchrun worker) logs into the same run
        subprocess.run([sys.executable, "-c", child], check=True, timeout=120)
        run.finish({"steps": 3, "reward_curve": [{"step": i, "reward_mean": 0.1 * i, "signal_groups": 0.5}
                                                 for i in (1, 2, 3)],
                    "meta": {"data_versions": {"rl": {"samples": 11}}}, "model_dir": "/x"})
    c = tracking.client(cfg)
    hist = c.get_metric_history(run.run_id, "train/loss")
    assert [(m.step, m.value) for m in hist] == [(1, 3.0), (2, 2.0), (3, 1.0)]
    assert [m.step for m in c.get_metric_history(run.run_id, "reward_curve/reward_mean")] == [1, 2, 3]
    data = c.get_run(run.run_id).data
    assert "meta.data_versions.rl.samples" not in data.metrics
    assert data.params["record.meta.data_versions.rl.samples"] == "11"
    assert c.get_run(tracking.day_run_id(cfg, DAY).run_id).info.status == "FINISHED"  # the last stage finished
    # outside a stage run the hook is a no-op
    assert tracking.log_training_step({"loss": 1.0}, 1) is False


def test_hf_trainer_callback_logs_at_the_global_step(make_cfg):
    from transformers import TrainerState

    from onerec_prod.registry import tracking

    cfg = make_cfg()
    cb = tracking.mlflow_trainer_callback()
    with tracking.stage_run(cfg, DAY, "train") as run:
        for step in (10, 20):
            state = TrainerState(global_step=step, is_world_process_zero=True)
            cb.on_log(None, state, None, logs={"loss": 1.0 / step, "learning_rate": 3e-4, "epoch": 0.5})
        run.finish({"train_loss": 0.07})
    hist = tracking.client(cfg).get_metric_history(run.run_id, "train/loss")
    assert [m.step for m in hist] == [10, 20]
