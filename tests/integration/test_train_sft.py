"""SFT / continued training end to end on the tiny model (CPU).

- incremental day D+1 starts from day D's weights (checked by hash), reruns are no-ops, a new
  sid_version is refused (in-process: 1 process, no DeepSpeed; fast);
- 2 processes with DeepSpeed ZeRO-2 over gloo: the warm-up changes only the new rows, and a run
  whose rank 0 is SIGKILLed mid-run resumes from its own checkpoint to the same final step and
  the same weights as an uninterrupted run; checkpoints hold safetensors weights.
"""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import load_file

from onerec_prod.model.io import read_meta, weights_hash
from onerec_prod.samples.prompts import messages_to_json, render_history, task_messages, task_response
from onerec_prod.sid.tokens import sid_to_text
from onerec_prod.train import day as train_cli
from onerec_prod.train.data import write_rows_jsonl
from onerec_prod.train.launcher import LaunchError

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


def _ds_cfg(make_cfg, tiny_model_dir):
    return make_cfg(f"model.base_dir={tiny_model_dir}", "train.nproc=2", "train.zero_stage=2",
                    "train.max_steps=6", "train.save_steps=2", "train.per_device_batch_size=2")


def test_deepspeed_warmup_resumes_after_kill(make_cfg, tiny_model_dir, samples, tmp_path, monkeypatch):
    monkeypatch.setattr(train_cli, "_champion", lambda c: None)
    cfg = _ds_cfg(make_cfg, tiny_model_dir)
    data = samples("2014-01-01")
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    new = slice(int(read_meta(tiny_model_dir)["new_token_ids"][0]),
                int(read_meta(tiny_model_dir)["new_token_ids"][1]) + 1)

    # uninterrupted 2-process ZeRO-2 warm-up run
    ref = train_cli.train_stage(cfg, "2014-01-01", "warmup", tmp_path / "ref", tmp_path / "ref_work",
                                samples_path=data)
    ref_meta = read_meta(ref)
    assert ref_meta["global_step"] == 6 and ref_meta["world_size"] == 2
    got = load_file(str(ref / "model.safetensors"))
    assert sorted(got) == sorted(base)
    for name, t in base.items():
        if name == "model.embed_tokens.weight":
            assert torch.equal(got[name][: new.start], t[: new.start])
            assert torch.equal(got[name][new.stop :], t[new.stop :])
            assert not torch.equal(got[name][new], t[new])
        else:
            assert torch.equal(got[name], t), name

    # the same run, rank 0 SIGKILLed after step 3 (checkpoint-2 is the latest)
    work = tmp_path / "crash_work"
    with pytest.raises(LaunchError):
        train_cli.train_stage(cfg, "2014-01-01", "warmup", tmp_path / "crash", work,
                              samples_path=data, fault={"kill_at_step": 3})
    assert not (tmp_path / "crash").exists()
    ckpts = sorted(p.name for p in (work / "checkpoints").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-2"]
    ck = work / "checkpoints" / "checkpoint-2"
    files = sorted(p.name for p in ck.rglob("*") if p.is_file())
    assert "model.safetensors" in files and "optimizer_rank1.safetensors" in files
    assert [f for f in files if not f.endswith((".safetensors", ".json"))] == []  # no pickle

    out = train_cli.train_stage(cfg, "2014-01-01", "warmup", tmp_path / "crash", work, samples_path=data)
    meta = read_meta(out)
    assert meta["resumed_from"] == "checkpoint-2"
    assert meta["global_step"] == ref_meta["global_step"] == 6
    assert weights_hash(out) == weights_hash(ref)
