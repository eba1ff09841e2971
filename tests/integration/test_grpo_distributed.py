"""GRPO refresh on 2 CPU processes with DeepSpeed ZeRO-2 (gloo), through ``rl_day``.

- an uninterrupted run writes a safetensors model whose weights moved, one curve entry per step;
- the same run with rank 0 SIGKILLed after its step-1 checkpoint resumes from that checkpoint
  to the same final step, curve and weights.
"""

from __future__ import annotations

import json
import math
import random

import pytest

from onerec_prod.model.io import read_meta, weights_hash
from onerec_prod.samples.prompts import messages_to_json, render_history, task_messages
from onerec_prod.sid.tokens import sid_to_text
from onerec_prod.train.grpo import CKPT_PREFIX, STATE_FILE, rl_day
from onerec_prod.train.launcher import LaunchError
from tests.conftest import BEAUTY_DIR, REPO

DT = "2014-01-02"
SIZES = [16, 16, 16, 16]
OVERRIDES = ["grpo.nproc=2", "grpo.zero_stage=2", "grpo.steps=3", "grpo.save_steps=1",
             "grpo.prompts_per_step=2", "grpo.group_size=4", "grpo.beam_size=2", "grpo.max_think_tokens=4",
             "grpo.eval_prompts=2", "grpo.lr=1e-3", "grpo.kl_coef=0.05"]


def _cfg(root):
    from onerec_prod.config import load_config

    return load_config(REPO / "configs" / "test.yaml",
                       [f"paths.var_root={root}", f"paths.dataset_dir={BEAUTY_DIR}", *OVERRIDES], environ={})


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, beauty_items, tiny_sids, tiny_model_dir):
    """Day DT's rl_prompt rows (4 prompts) and the catalog, as JSONL files.

    Targets are SIDs the tiny model itself finds (the 2nd candidate of a direct-mode beam over the
    history in the prompt), so the candidates of a group earn different rewards (random targets
    would leave most groups without signal).
    """
    from onerec_prod.model.io import load_model, load_tokenizer
    from onerec_prod.sid.tokens import SidVocab
    from onerec_prod.sid.trie import SidTrie
    from onerec_prod.train.grpo import RlPrompt, rollout

    root = tmp_path_factory.mktemp("grpo_ds_inputs")
    catalog = [dict(it, sid=tiny_sids[it["item_id"]]) for it in beauty_items]
    rng = random.Random(3)
    msgs = [task_messages("rl_prompt", history=render_history(rng.sample(catalog, 3), True, 10))
            for _ in range(4)]
    gcfg = _cfg(root).grpo
    tok = load_tokenizer(tiny_model_dir)
    vocab, trie = SidVocab.from_tokenizer(tok, SIZES), SidTrie.from_sids([c["sid"] for c in catalog], SIZES)
    ro = rollout(load_model(tiny_model_dir), tok, [RlPrompt(f"p{i}", m, (0,) * 4) for i, m in enumerate(msgs)],
                 trie, vocab, gcfg, group=2, seed=123, max_items=10)
    targets = [vocab.decode_codes(ro.beams[2 * i][-1][1:]) for i in range(len(msgs))]
    samples = root / "rl.jsonl"
    with open(samples, "w") as f:
        for i, (m, t) in enumerate(zip(msgs, targets, strict=True)):
            f.write(json.dumps({"sample_id": f"p{i}", "task": "rl_prompt", "dt": DT, "sid_version": "v1",
                                "messages": messages_to_json(m), "response": sid_to_text(t),
                                "target_sid": list(t)}) + "\n")
    cat = root / "catalog.jsonl"
    cat.write_text("".join(json.dumps({"item_id": c["item_id"], "sid": list(c["sid"]), "sid_version": "v1"})
                           + "\n" for c in catalog))
    return samples, cat


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, inputs):
    """The uninterrupted 2-process ZeRO-2 run."""
    root = tmp_path_factory.mktemp("grpo_ds_ref")
    samples, cat = inputs
    res = rl_day(_cfg(root), DT, init_from=tiny_model_dir, out_dir=root / "rl", samples_path=samples,
                 catalog_path=cat)
    return res, root


def test_zero2_two_processes(reference, tiny_model_dir):
    res, root = reference
    out = root / "rl"
    assert res["model_dir"] == str(out) and res["steps"] == 3 and res["prompts"] == 4
    assert res["resumed_from"] == 0
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
    assert weights_hash(out) != weights_hash(tiny_model_dir)
    curve = res["reward_curve"]
    print("2-process ZeRO-2 curve", [(round(m["reward_mean"], 3), round(m["kl"], 5)) for m in curve])
    assert [m["step"] for m in curve] == [1, 2, 3]
    for m in curve:
        assert math.isfinite(m["reward_mean"]) and math.isfinite(m["kl"]) and m["kl"] >= 0
        assert 0 <= m["hit_rate"] <= 1 and 0 <= m["beam_reward_mean"] <= 4
    assert any(m["reward_std"] > 0 for m in curve)  # some advantage is non-zero: a real update
    assert any(m["kl"] > 0 for m in curve[1:])       # ... so the policy left the reference
    assert res["before"]["prompts"] == res["after"]["prompts"] == 2
    meta = read_meta(out)
    assert meta["stage"] == "rl" and meta["rl"]["reward_curve"] == curve
    assert not (root / "_rl_work").exists()


def test_zero2_resumes_after_kill(reference, tiny_model_dir, inputs, tmp_path):
    ref, _ = reference
    samples, cat = inputs
    cfg, out, work = _cfg(tmp_path), tmp_path / "rl", tmp_path / "_rl_work"
    with pytest.raises(LaunchError):
        rl_day(cfg, DT, init_from=tiny_model_dir, out_dir=out, samples_path=samples, catalog_path=cat,
               fault={"kill_at_step": 1})
    assert not out.exists()
    ck = work / "checkpoints" / f"{CKPT_PREFIX}1"
    assert sorted(p.name for p in (work / "checkpoints").glob(f"{CKPT_PREFIX}*")) == [ck.name]
    files = sorted(p.name for p in ck.iterdir())
    assert {"model.safetensors", STATE_FILE, "optimizer_rank0.safetensors", "optimizer_rank1.safetensors"} <= set(files)
    assert [f for f in files if not f.endswith((".safetensors", ".json", ".jinja"))] == []  # no pickle

    res = rl_day(cfg, DT, init_from=tiny_model_dir, out_dir=out, samples_path=samples, catalog_path=cat)
    assert res["resumed_from"] == 1
    assert [m["step"] for m in res["reward_curve"]] == [1, 2, 3]
    assert [m["reward_mean"] for m in res["reward_curve"]] == [m["reward_mean"] for m in ref["reward_curve"]]
    assert weights_hash(out) == weights_hash(ref["model_dir"])
    assert not work.exists()
