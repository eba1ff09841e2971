"""GRPO refresh on the tiny model: learning on a known reward, resume, rl_day end to end."""

from __future__ import annotations

import json
import random

import pytest

from onerec_prod.samples.prompts import messages_to_json, render_history, task_messages
from onerec_prod.sid.tokens import SidVocab, sid_to_text
from onerec_prod.sid.trie import SidTrie
from onerec_prod.train.grpo import RlPrompt, rl_day, rollout, train_grpo

SIZES = [16, 16, 16, 16]


class FirstCodeReward:
    """Known reward: 1.0 when the top beam's level-0 code is ``code`` (picklable)."""

    def __init__(self, vocab: SidVocab, code: int):
        self.vocab, self.code = vocab, code

    def __call__(self, completions, beam_ids=None, **kwargs):
        return [1.0 if b and self.vocab.code_of(0, b[0][1]) == self.code else 0.0 for b in beam_ids]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny model on a shared 2-core box: one intra-op thread is ~10x faster than two contended."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def catalog(beauty_items, tiny_sids):
    return [dict(it, sid=tiny_sids[it["item_id"]]) for it in beauty_items]


def _prompts(catalog, n: int, seed: int = 1) -> list[RlPrompt]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        hist, target = rng.sample(catalog, 3), rng.choice(catalog)
        msgs = task_messages("rl_prompt", history=render_history(hist, True, 10))
        out.append(RlPrompt(f"p{i}", msgs, tuple(target["sid"])))
    return out


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, catalog):
    from onerec_prod.model.io import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    return tok, SidVocab.from_tokenizer(tok, SIZES), SidTrie.from_sids([c["sid"] for c in catalog], SIZES)


def _mean_reward(model, tok, prompts, trie, vocab, gcfg, reward) -> float:
    ro = rollout(model, tok, prompts, trie, vocab, gcfg, group=gcfg.group_size, seed=999)
    r = reward(ro.texts, beam_ids=ro.beams)
    return sum(r) / len(r)


def test_policy_learns_known_reward(make_cfg, tiny_model_dir, tiny, catalog):
    """Reward = top beam starts with code 5 (~half of the rollouts at init): it must rise."""
    from onerec_prod.model.io import load_model

    tok, vocab, trie = tiny
    gcfg = make_cfg("grpo.mode=think", "grpo.steps=4", "grpo.lr=5e-4", "grpo.kl_coef=0", "grpo.group_size=8",
                    "grpo.prompts_per_step=4", "grpo.beam_size=4").grpo
    prompts = _prompts(catalog, 4)          # every step sees the same 4 prompts
    reward = FirstCodeReward(vocab, 5)
    policy = load_model(tiny_model_dir)
    before = _mean_reward(policy, tok, prompts, trie, vocab, gcfg, reward)
    res = train_grpo(policy, None, tok, prompts, trie, vocab, gcfg, [(reward, 1.0)])
    after = _mean_reward(policy, tok, prompts, trie, vocab, gcfg, reward)
    curve = [m["reward_mean"] for m in res.curve]
    print(f"known-reward curve {curve}, before {before:.3f} after {after:.3f}")
    assert len(curve) == 4
    assert 0.0 < before < 0.9, f"the known reward must not be saturated at init (before={before})"
    assert after >= before + 0.25, (before, after, curve)
    assert sum(curve[-2:]) / 2 > curve[0], curve
    for m in res.curve:
        assert set(m) >= {"reward_mean", "reward_std", "kl", "hit_rate", "loss"}


def test_loss_math_hand_case():
    import torch

    from onerec_prod.train.grpo_loss import group_advantages, policy_loss

    adv = group_advantages(torch.tensor([1.0, 0.0, 2.0, 2.0]), 2)
    assert torch.allclose(adv, torch.tensor([0.7071, -0.7071, 0.0, 0.0]), atol=1e-3)
    logp = torch.log(torch.tensor([[0.5, 0.5], [0.2, 0.9]]))
    old = torch.log(torch.tensor([[0.25, 0.5], [0.2, 0.9]]))   # ratio 2 on token (0, 0): clipped at 1.2
    ref = logp.clone()
    ref[1, 1] = float(torch.log(torch.tensor(0.45)))            # k3 = 0.5 - ln 0.5 - 1 = 0.1931
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, st = policy_loss(logp, old, ref, torch.tensor([1.0, -1.0]), mask, 0.2, 0.1)
    assert torch.allclose(loss, torch.tensor([-(1.2 + 1.0) / 2, 1.0]), atol=1e-4)
    mask[1, 1] = 1.0
    loss, st = policy_loss(logp, old, ref, torch.tensor([1.0, -1.0]), mask, 0.2, 0.1)
    assert abs(float(loss[1]) - (1.0 + 1.0 + 0.1 * 0.19315) / 2) < 1e-4
    assert st["clip_frac"] == 0.25


def test_resume_repeats_the_same_run(make_cfg, tiny_model_dir, tiny, catalog, tmp_path):
    """A run that stops after its step-1 checkpoint resumes to the same weights and curve."""
    import torch

    from onerec_prod.model.io import load_model

    tok, vocab, trie = tiny
    gcfg = make_cfg("grpo.mode=think", "grpo.steps=2", "grpo.save_steps=1", "grpo.lr=1e-3",
                    "grpo.kl_coef=0.05").grpo
    prompts = _prompts(catalog, 4)
    reward = [(FirstCodeReward(vocab, 5), 1.0)]
    ref = load_model(tiny_model_dir)
    full = train_grpo(load_model(tiny_model_dir), ref, tok, prompts, trie, vocab, gcfg, reward,
                      ckpt_dir=tmp_path / "a")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["step-1"]   # last checkpoint kept
    resumed = train_grpo(load_model(tiny_model_dir), ref, tok, prompts, trie, vocab, gcfg, reward,
                         ckpt_dir=tmp_path / "a")
    assert resumed.resumed_from == 1
    assert [m["reward_mean"] for m in resumed.curve] == [m["reward_mean"] for m in full.curve]
    assert all(m["kl"] >= 0 for m in full.curve)
    for (n, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), n


@pytest.mark.parametrize("mode", ["direct", "think"])
def test_rl_day_end_to_end(make_cfg, tiny_model_dir, catalog, tmp_path, mode):
    from onerec_prod.model.io import load_model, read_meta

    cfg = make_cfg(f"grpo.mode={mode}", "grpo.steps=2", "grpo.eval_prompts=4", "grpo.format_reward=0.1")
    dt = "2014-01-02"
    samples = tmp_path / "rl.jsonl"
    with open(samples, "w") as f:
        for p in _prompts(catalog, 6):
            f.write(json.dumps({"sample_id": p.sample_id, "task": "rl_prompt", "dt": dt, "sid_version": "v1",
                                "messages": messages_to_json(p.messages),
                                "response": sid_to_text(p.target_sid),
                                "target_sid": list(p.target_sid) if p.sample_id != "p0" else None}) + "\n")
        f.write(json.dumps({"sample_id": "x", "task": "reasoning", "dt": dt, "messages": "[]"}) + "\n")
    cat = tmp_path / "catalog.jsonl"
    cat.write_text("".join(json.dumps({"item_id": c["item_id"], "sid": list(c["sid"]), "sid_version": "v1"}) + "\n"
                           for c in catalog))
    out = tmp_path / "rl"
    res = rl_day(cfg, dt, init_from=tiny_model_dir, out_dir=out, samples_path=samples, catalog_path=cat)
    assert res["model_dir"] == str(out) and res["steps"] == 2 and res["prompts"] == 6
    assert len(res["reward_curve"]) == 2 and res["before"]["prompts"] == 4
    assert 0 <= res["after"]["beam_reward_mean"] <= 4
    assert res["mode"] == mode and 0 <= res["after"]["recall"] <= 1 and 0 <= res["signal_groups"] <= 1
    assert all(0 <= m["signal_groups"] <= 1 for m in res["reward_curve"])
    meta = read_meta(out)
    assert meta["stage"] == "rl" and meta["dt"] == dt and meta["sid_version"] == "v1"
    assert meta["parent"]["dir"] == str(tiny_model_dir)
    load_model(out)
    assert not (tmp_path / "_rl_work").exists()
    again = rl_day(cfg, dt, init_from=tiny_model_dir, out_dir=out, samples_path=samples, catalog_path=cat)
    assert again["skipped"] is True


def test_shared_prompt_logps_equal_full_forward(tiny_model_dir, tiny, catalog):
    """Direct mode's prompt-once log-probs equal one full forward per candidate."""
    import torch

    from onerec_prod.model.io import load_model
    from onerec_prod.train.grpo_loss import shared_prompt_logps, token_logps
    from onerec_prod.train.grpo_rollout import direct_rollout

    tok, vocab, trie = tiny
    model = load_model(tiny_model_dir)
    prompts = [RlPrompt(p.sample_id, [], p.target_sid, [tuple(c["sid"]) for c in catalog[i: i + 2 + i]])
               for i, p in enumerate(_prompts(catalog, 3))]
    ro = direct_rollout(model, prompts, trie, vocab, group=4, max_items=10)
    assert ro.group == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert all(len({tuple(c) for c in ro.completion[g * 4: g * 4 + 4]}) == 4 for g in range(3))  # distinct
    shared = shared_prompt_logps(model, ro.prompts, ro.completion, ro.group, tok.pad_token_id)
    full = token_logps(model, ro.prompt_ids, ro.completion, tok.pad_token_id)
    assert torch.allclose(shared, full, atol=1e-4), (shared - full).abs().max()


def test_direct_mode_raises_the_target(make_cfg, tiny_model_dir, tiny, catalog):
    """Targets = the 4th candidate of each prompt's beam: the hit reward must move them up."""
    from onerec_prod.model.io import load_model
    from onerec_prod.train.grpo import default_rewards, evaluate_prompts
    from onerec_prod.train.grpo_rollout import direct_rollout

    tok, vocab, trie = tiny
    gcfg = make_cfg("grpo.mode=direct", "grpo.steps=6", "grpo.lr=5e-4", "grpo.kl_coef=0", "grpo.group_size=8",
                    "grpo.prompts_per_step=4", "grpo.reward_rank=0.5").grpo
    policy = load_model(tiny_model_dir)
    hists = [[tuple(c["sid"]) for c in catalog[3 * i: 3 * i + 3]] for i in range(4)]
    ro = direct_rollout(policy, [RlPrompt(f"p{i}", [], (0,) * 4, h) for i, h in enumerate(hists)], trie, vocab,
                        group=8, max_items=10)
    targets = [vocab.decode_codes(ro.beams[8 * i][3][1:]) for i in range(4)]
    prompts = [RlPrompt(f"p{i}", [], tuple(t), h) for i, (t, h) in enumerate(zip(targets, hists, strict=True))]
    before = evaluate_prompts(policy, tok, prompts, trie, vocab, gcfg, beam=8, max_items=10)
    res = train_grpo(policy, None, tok, prompts, trie, vocab, gcfg, default_rewards(tok, vocab, gcfg),
                     max_items=10)
    after = evaluate_prompts(policy, tok, prompts, trie, vocab, gcfg, beam=8, max_items=10)
    print("direct mode ndcg@8", before, after)
    assert before["recall"] == 1.0 and all(m["signal_groups"] == 1.0 for m in res.curve)
    assert after["ndcg"] > before["ndcg"] + 0.1, (before, after)
