"""SFT / continued training end to end on the tiny model (CPU).

- incremental day D+1 starts from day D's weights (checked by hash), reruns are no-ops, a new
  sid_version is refused (in-process: 1 process, no DeepSpeed; fast);
- 2 processes with DeepSpeed ZeRO-2 over gloo: the warm-up changes only the new rows; a run
  SIGKILLed inside an optimizer step, or while writing a checkpoint, resumes from its last
  complete checkpoint: it records the global step, optimizer / scheduler step counts and RNG
  digest it restored on each rank, equal to what the killed run saved, runs only the remaining
  steps and ends on the uninterrupted run's weights (a restart from scratch fails all of that);
  a checkpoint torn by the kill (no ``trainer_state.json``) is ignored; checkpoints hold
  safetensors and JSON only.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from onerec_prod.model.io import load_tree, read_meta, weights_hash
from onerec_prod.samples.prompts import messages_to_json, render_history, task_messages, task_response
from onerec_prod.sid.tokens import sid_to_text
from onerec_prod.train import checkpoint
from onerec_prod.train import day as train_cli
from onerec_prod.train.data import write_rows_jsonl
from onerec_prod.train.launcher import LaunchError
from onerec_prod.train.sft import latest_checkpoint
from tests.conftest import BEAUTY_DIR, REPO

TASKS = ["text2sid", "seqrec", "caption", "sid_rec", "reasoning", "general_lm"]


def make_rows(items, sids, dt, n=48, sid_version="v1", seed=0):
    """``n`` sample rows of day ``dt`` over every trainable task (the samples table's columns)."""
    rng = random.Random(f"{dt}-{seed}")
    rows = []
    for k in range(n):
        it = items[rng.randrange(len(items))]
        hist = [dict(h, sid=sids[h["item_id"]]) for h in rng.sample(items, 3)]
        sid = sid_to_text(sids[it["item_id"]])
        task = TASKS[k % len(TASKS)]
        if task == "text2sid":
            msgs = task_messages(task, title=it["title"], categories=it["categories"])
            resp = task_response(task, sid=sid)
        elif task == "caption":
            msgs = task_messages(task, sid=sid)
            resp = task_response(task, sid=sid, title=it["title"], categories=it["categories"],
                                 description="")
        elif task in ("seqrec", "sid_rec"):
            msgs = task_messages(task, history=render_history(hist, False, 10))
            resp = task_response(task, sid=sid)
        elif task == "reasoning":
            msgs = task_messages(task, history=render_history(hist, True, 10))
            resp = task_response(task, sid=sid, rationale="The user buys nail products.")
        else:
            msgs, resp = [], f"{it['title']} {it['categories']}"
        rows.append({"sample_id": f"{dt}-{k:04d}", "task": task, "messages": messages_to_json(msgs),
                     "response": resp, "sid_version": sid_version, "dt": dt})
    return rows


@pytest.fixture
def samples(tmp_path, beauty_items, tiny_sids):
    def _write(dt, sid_version="v1", n=48):
        path = tmp_path / "samples" / f"dt={dt}.jsonl"
        write_rows_jsonl(make_rows(beauty_items, tiny_sids, dt, n, sid_version), path,
                         {"data_versions": {"samples": 7}})
        return path

    return _write


def test_incremental_days_chain_by_hash(make_cfg, tiny_model_dir, samples, monkeypatch):
    cfg = make_cfg(f"model.base_dir={tiny_model_dir}", "train.nproc=1", "train.zero_stage=0",
                   "train.max_steps=3", "train.save_steps=2")
    champ: dict = {}
    monkeypatch.setattr(train_cli, "_champion", lambda c: champ.get("now"))

    day1 = train_cli.train_day(cfg, "2014-01-01", samples_path=samples("2014-01-01"))
    m1 = read_meta(day1)
    assert m1["parent"]["kind"] == "base"
    assert m1["parent"]["weights_sha256"] == weights_hash(tiny_model_dir)
    assert m1["global_step"] == 3 and m1["sid_version"] == "v1" and m1["dt"] == "2014-01-01"
    assert m1["data_versions"]["samples"] == 7
    assert day1 == tmp_path_of(cfg) / "models" / "candidates" / "dt=2014-01-01" / "sft"
    assert not (day1.parent / "_sft_work" / "incremental" / "checkpoints").exists()
    assert not [p for p in day1.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]

    mtime = (day1 / "model.safetensors").stat().st_mtime_ns  # same inputs: a no-op
    assert train_cli.train_day(cfg, "2014-01-01", samples_path=samples("2014-01-01")) == day1
    assert (day1 / "model.safetensors").stat().st_mtime_ns == mtime

    champ["now"] = ("1", day1)
    day2 = train_cli.train_day(cfg, "2014-01-02", samples_path=samples("2014-01-02"))
    m2 = read_meta(day2)
    assert m2["parent"]["kind"] == "champion" and m2["parent_version"] == "1"
    assert m2["parent"]["weights_sha256"] == weights_hash(day1) == m1["weights_sha256"]
    assert weights_hash(day2) == m2["weights_sha256"] != m1["weights_sha256"]

    champ["now"] = ("2", day2)
    with pytest.raises(train_cli.SidVersionMismatch, match="--stage bootstrap"):
        train_cli.train_day(cfg, "2014-01-03", samples_path=samples("2014-01-03", "v2"))


def test_plain_hf_dir_gets_sid_vocab(make_cfg, beauty_items, samples, tmp_path, monkeypatch):
    """A base dir without SID tokens (like a real Qwen3 dir) is expanded before training."""
    from onerec_prod.model.base import build_model, ensure_base_model, train_tokenizer
    from onerec_prod.model.io import load_tokenizer, save_model
    from onerec_prod.sid.tokens import SidVocab

    plain_cfg = make_cfg()
    tok = train_tokenizer([f"{it['title']} {it['categories']}" for it in beauty_items], 1000)
    plain = save_model(build_model(plain_cfg.model, tok), tok, tmp_path / "plain", {"stage": "hf"})
    cfg = make_cfg(f"model.base_dir={plain}", "train.nproc=1", "train.zero_stage=0",
                   "train.max_steps=1", "train.save_steps=5")
    monkeypatch.setattr(train_cli, "_champion", lambda c: None)
    assert ensure_base_model(cfg) == plain  # used in place, not copied
    copy = ensure_base_model(cfg, out=tmp_path / "expanded")
    SidVocab.from_tokenizer(load_tokenizer(copy), [16, 16, 16, 16])
    out = train_cli.train_day(cfg, "2014-01-01", samples_path=samples("2014-01-01", n=12))
    SidVocab.from_tokenizer(load_tokenizer(out), [16, 16, 16, 16])
    assert read_meta(out)["parent"]["dir"] == str(plain)


def tmp_path_of(cfg):
    from pathlib import Path

    return Path(cfg.paths.var_root)


DS_OVERRIDES = ["train.nproc=2", "train.zero_stage=2", "train.max_steps=6", "train.save_steps=2",
                "train.per_device_batch_size=2"]
DT = "2014-01-01"


def _ds_cfg(root, tiny_model_dir):
    from onerec_prod.config import load_config

    return load_config(REPO / "configs" / "test.yaml",
                       [f"paths.var_root={root}", f"paths.dataset_dir={BEAUTY_DIR}",
                        f"model.base_dir={tiny_model_dir}", *DS_OVERRIDES], environ={})


@pytest.fixture(scope="module")
def ds_run(tmp_path_factory, tiny_model_dir, beauty_items, tiny_sids):
    """Samples of day DT and the uninterrupted 2-process ZeRO-2 warm-up run on them."""
    root = tmp_path_factory.mktemp("sft_ds")
    data = root / "samples.jsonl"
    write_rows_jsonl(make_rows(beauty_items, tiny_sids, DT, 48), data, {"data_versions": {"samples": 7}})
    ref = train_cli.train_stage(_ds_cfg(root, tiny_model_dir), DT, "warmup", root / "ref", root / "ref_work",
                                samples_path=data)
    return data, ref


def _saved_state(ck) -> list[dict]:
    """What the killed run saved in checkpoint ``ck``, per rank, in the resumed run's terms."""
    state = json.loads((ck / "trainer_state.json").read_text())
    sched = json.loads((ck / "scheduler.json").read_text())
    out = []
    for rank in range(2):
        opt = load_tree(checkpoint.optimizer_file(ck, rank))
        out.append({"checkpoint": ck.name, "global_step": state["global_step"],
                    "optimizer_step": checkpoint.optimizer_steps(opt["base"]),
                    "engine_global_steps": opt["engine"]["global_steps"],
                    "scheduler_step": sched["last_epoch"],
                    "rng_sha256": checkpoint.rng_digest(load_tree(checkpoint.rng_file(ck, rank)))})
    return out


def _resume_and_check(cfg, root, work, data, ref, ck) -> None:
    """Resume; the run must have loaded ``ck``'s optimizer and RNG state on both ranks, run only
    the remaining steps and end on the uninterrupted run's weights (a restart from scratch runs
    6 steps and restores nothing)."""
    saved = _saved_state(ck)
    assert all(s["global_step"] == s["optimizer_step"] == s["engine_global_steps"] == 2 for s in saved)
    out = train_cli.train_stage(cfg, DT, "warmup", root / "out", work, samples_path=data)
    meta = read_meta(out)
    assert meta["resumed_from"] == ck.name
    assert meta["restored"] == saved
    assert meta["steps_run"] == 6 - 2 and meta["global_step"] == read_meta(ref)["global_step"] == 6
    assert weights_hash(out) == weights_hash(ref)


def test_deepspeed_warmup_only_moves_new_rows(ds_run, tiny_model_dir):
    _, ref = ds_run
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    new = slice(int(read_meta(tiny_model_dir)["new_token_ids"][0]),
                int(read_meta(tiny_model_dir)["new_token_ids"][1]) + 1)
    ref_meta = read_meta(ref)
    assert ref_meta["global_step"] == 6 and ref_meta["world_size"] == 2
    assert ref_meta["resumed_from"] is None and ref_meta["restored"] is None and ref_meta["steps_run"] == 6
    got = load_file(str(ref / "model.safetensors"))
    assert sorted(got) == sorted(base)
    for name, t in base.items():
        if name == "model.embed_tokens.weight":
            assert torch.equal(got[name][: new.start], t[: new.start])
            assert torch.equal(got[name][new.stop :], t[new.stop :])
            assert not torch.equal(got[name][new], t[new])
        else:
            assert torch.equal(got[name], t), name


def test_deepspeed_resumes_after_kill_inside_an_optimizer_step(ds_run, tiny_model_dir, tmp_path, capfd):
    """Rank 0 SIGKILLed inside step 3's optimizer step; checkpoint-2 is the latest."""
    data, ref = ds_run
    cfg, work = _ds_cfg(tmp_path, tiny_model_dir), tmp_path / "work"
    with pytest.raises(LaunchError):
        train_cli.train_stage(cfg, DT, "warmup", tmp_path / "out", work, samples_path=data,
                              fault={"kill_at_step": 3, "at": "optimizer_step"})
    assert "fault injection: SIGKILL rank 0 at optimizer_step of step 3" in capfd.readouterr().err
    assert not (tmp_path / "out").exists()
    ckdir = work / "checkpoints"
    assert sorted(p.name for p in ckdir.glob("checkpoint-*")) == ["checkpoint-2"]
    ck = ckdir / "checkpoint-2"
    files = sorted(p.name for p in ck.rglob("*") if p.is_file())
    assert {"model.safetensors", "optimizer_rank0.safetensors", "optimizer_rank1.safetensors",
            "rng_state_0.safetensors", "rng_state_1.safetensors", "trainer_state.json"} <= set(files)
    assert [f for f in files if not f.endswith((".safetensors", ".json"))] == []  # no pickle
    _resume_and_check(cfg, tmp_path, work, data, ref, ck)


def test_deepspeed_ignores_a_checkpoint_torn_by_a_kill(ds_run, tiny_model_dir, tmp_path, capfd):
    """Rank 1 SIGKILLed while writing checkpoint-4, after its optimizer shard and before its RNG
    shard: rank 0 waits at the barrier, so ``trainer_state.json`` (the complete marker) is never
    written, and the resume starts from checkpoint-2 (without the barrier rank 0 marks it)."""
    data, ref = ds_run
    cfg, work = _ds_cfg(tmp_path, tiny_model_dir), tmp_path / "work"
    with pytest.raises(LaunchError):
        train_cli.train_stage(cfg, DT, "warmup", tmp_path / "out", work, samples_path=data,
                              fault={"kill_at_step": 4, "at": "checkpoint_write", "rank": 1})
    assert "fault injection: SIGKILL rank 1 at checkpoint_write of step 4" in capfd.readouterr().err
    ckdir = work / "checkpoints"
    assert sorted(p.name for p in ckdir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    torn = sorted(p.name for p in (ckdir / "checkpoint-4").iterdir())
    assert "optimizer_rank1.safetensors" in torn  # rank 1 got that far
    assert "rng_state_1.safetensors" not in torn, torn  # ... and no further
    assert "trainer_state.json" not in torn, torn  # never marked complete
    assert latest_checkpoint(ckdir) == ckdir / "checkpoint-2"
    _resume_and_check(cfg, tmp_path, work, data, ref, ckdir / "checkpoint-2")
