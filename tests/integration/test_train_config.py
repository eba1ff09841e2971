"""Stage configs, DeepSpeed configs, launch commands and the cluster job (pure, fast)."""

from __future__ import annotations

import pytest

from onerec_prod.config import ConfigError
from onerec_prod.train.launcher import launch_command, render_pytorchjob
from onerec_prod.train.sft import (
    build_ds_config,
    latest_checkpoint,
    load_stage,
    stage_names,
    stage_train_cfg,
)


def test_every_stage_yaml_validates():
    names = stage_names()
    assert {"warmup", "stream", "align", "reasoning", "incremental", "bootstrap"} <= set(names)
    for name in names:
        stage = load_stage(name)
        assert stage.chain or stage.tasks
    assert load_stage("warmup").freeze_base and not load_stage("incremental").full_retrain
    assert load_stage("bootstrap").chain == ["warmup", "stream", "align", "reasoning"]
    assert load_stage("stream").tasks == ["sid_stream"]
    # the recommendation task's stream form stays in every later mix (no forgetting)
    assert all("sid_stream" in load_stage(n).tasks for n in ("align", "reasoning", "incremental"))


def test_unknown_stage_and_bad_override(make_cfg):
    with pytest.raises(ConfigError, match="valid: align, bootstrap"):
        load_stage("nope")
    stage = load_stage("warmup")
    t = stage_train_cfg(make_cfg().train, stage)
    assert t.weight_decay == 0.0 and t.lr == stage.train["lr"]
    # train.stage_overrides apply after the stage file; unknown keys are refused
    over = stage_train_cfg(make_cfg("train.stage_overrides={warmup: {lr: 0.5, max_steps: 7}}").train, stage)
    assert over.lr == 0.5 and over.max_steps == 7 and over.weight_decay == 0.0
    with pytest.raises(ConfigError, match="unknown TrainCfg keys"):
        stage_train_cfg(make_cfg("train.stage_overrides={warmup: {nope: 1}}").train, stage)


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_deepspeed_config_per_stage(make_cfg, zero):
    t = make_cfg(f"train.zero_stage={zero}").train
    ds = build_ds_config(t, bf16=False)
    assert ds["zero_optimization"]["stage"] == zero and ds["bf16"] == {"enabled": False}
    assert ds["train_micro_batch_size_per_gpu"] == "auto"
    assert build_ds_config(make_cfg("train.zero_stage=0").train, bf16=True) is None


def test_launch_command_and_latest_checkpoint(tmp_path):
    assert launch_command("s.json", 1, 0) is None  # in-process
    cmd = launch_command("s.json", 2, 2)
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"] and "--nproc_per_node=2" in cmd
    multi = launch_command("s.json", 1, 2, nnodes=2, rdzv_endpoint="127.0.0.1:29400")
    assert "--standalone" not in multi and "--nnodes=2" in multi and "--rdzv_backend=c10d" in multi
    with pytest.raises(ValueError, match="rendezvous"):
        launch_command("s.json", 8, 2, nnodes=10)
    for step, complete in [(2, True), (4, True), (6, False)]:
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if complete:
            (d / "trainer_state.json").write_text("{}")
    assert latest_checkpoint(tmp_path).name == "checkpoint-4"  # 6 was cut off mid-save
    assert latest_checkpoint(tmp_path / "missing") is None


def test_cluster_job_is_a_pytorchjob(make_cfg):
    cfg = make_cfg("cluster.runtime=cluster", "cluster.training_nodes=10", "cluster.gpus_per_node=8",
                   "train.nnodes=10", "train.nproc=8", "cluster.image=img:1")
    job = render_pytorchjob(cfg, "train", "2014-01-01")
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    assert job["metadata"]["name"] == "onerec-train-20140101"
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 9
    c = specs["Worker"]["template"]["spec"]["containers"][0]
    assert c["name"] == "pytorch" and c["image"] == "img:1"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "8" and job["spec"]["nprocPerNode"] == "8"
    assert c["args"][-3:] == ["train", "--date", "2014-01-01"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["ONEREC__CLUSTER__MASTER_ADDR"] == "onerec-train-20140101-master-0"