"""RL refresh: a small GRPO loop with two-stage rollouts and the Rollout-Beam reward.

Why not ``trl.GRPOTrainer``: its generate path has no logits-processor hook (only
``GenerationConfig`` fields), and a rollout here is two-stage: a sampled rationale, then the SID
by trie-constrained beam search (:func:`onerec_prod.eval.beam.beam_search_sids`, the same decoder
as eval and serving). TRL's experimental ``rollout_func`` could host that, but it is marked
experimental and hides the per-token masks we need (forced tokens are not trained), so this
module is a ~300-line loop on plain transformers + torch that we own end to end. The reward
functions keep TRL's signature (:mod:`onerec_prod.train.rewards`), so they move over unchanged.

One step (``grpo.*`` config):

1. ``prompts_per_step`` prompts (seeded order over the day's ``rl_prompt`` rows), each repeated
   ``group_size`` times (G rollouts).
2. Rollout: sample a rationale after ``<think>\\n`` (``temperature``, ``max_think_tokens``, stop at
   ``</think>`` / end of turn); force ``\\n</think>\\n\\n``; then a trie-constrained beam search
   (``beam_size``) of the SID. Reward = weighted sum of reward functions; by default the
   Rollout-Beam reward (max over the beam of the leading SID levels matching the target, 0..L)
   plus ``format_reward`` x think-format (the model closed ``</think>`` itself).
3. Advantages normalised per group: ``(r - mean) / (std + 1e-4)``.
4. Loss on the sampled tokens only (rationale ids + the top beam's SID level tokens; the forced
   close and ``<|sid_begin|>`` are masked): per token ``-min(ratio A, clip(ratio, 1-eps, 1+eps) A)
   + kl_coef * k3`` with ``ratio = exp(logp - logp_old)`` (old = rollout-time policy) and
   ``k3 = exp(ref - logp) - (ref - logp) - 1`` against the frozen SFT model; mean over a
   sequence's tokens, then over sequences. ``iterations`` AdamW updates per rollout batch
   (with 1, ratio == 1 and the clip is inactive, as in TRL's default).

Logged per step: reward mean/std, KL, hit-rate (Rollout-Beam reward == L), loss, clip fraction.
Checkpoints (``save_steps``) hold the model (safetensors) and the optimizer + curve
(:func:`onerec_prod.model.io.save_tree`); a rerun with the same inputs resumes from the latest.
Every step reseeds from ``(seed, step)``, so a resumed run repeats the same rollouts.

Scale: with ``grpo.nproc == 1`` and ``grpo.zero_stage == 0`` (the default) the loop runs in this
process (CPU or one GPU, plain AdamW). Otherwise :func:`rl_day` writes a JSON spec and starts
``grpo.nproc`` torchrun workers through :mod:`onerec_prod.train.launcher`, like the SFT step
(:mod:`onerec_prod.train.grpo_worker`): gloo on CPU / nccl on GPU, the policy wrapped by
``deepspeed.initialize`` (ZeRO-1/2 from the SFT template, bf16 on GPU), rank r taking prompts
r::nproc of each step; both paths run the same :func:`grpo_step`, the step's metrics are
all-reduced, rank 0 writes checkpoints (safetensors; per-rank optimizer shards) and the final
model, and a rerun resumes from the latest checkpoint. The parent evaluates before/after
in-process as in the single-process case. Not implemented: vLLM (or any batched-server)
rollouts -- generation is HF ``generate`` + our beam on each rank -- ZeRO-3 (rollouts need
whole weights) and multi-node GRPO (``grpo.nproc`` is processes on one node).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onerec_prod.config import Config, GrpoCfg

log = logging.getLogger(__name__)

THINK_END = "</think>"
ADV_EPS = 1e-4
CKPT_PREFIX = "step-"
STATE_FILE = "grpo_state.safetensors"
MAX_GRAD_NORM = 1.0


@dataclass
class RlPrompt:
    """One RL prompt: chat messages and the target SID codes."""

    sample_id: str
    messages: list[dict[str, str]]
    target_sid: tuple[int, ...]


@dataclass
class Rollouts:
    """A batch of rollouts (one entry per rollout; prompts repeated G times)."""

    prompt_ids: list[list[int]]        # prompt up to and including "<think>\n"
    think_ids: list[list[int]]         # sampled ids (rationale, then the stop token if any)
    completion: list[list[int]]        # ids after prompt_ids: rationale, forced close, SID
    train_mask: list[list[int]]        # 1 on sampled tokens (rationale + SID levels)
    beams: list[list[list[int]]]       # beam as SID token-id sequences, best first
    texts: list[str]                   # rationale text
    targets: list[tuple[int, ...]]


# --------------------------------------------------------------------------------------
# rollouts


def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device):
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def _stop_ids(tok) -> list[int]:
    think_end = tok.convert_tokens_to_ids(THINK_END)
    if think_end is None or think_end == tok.unk_token_id:
        raise ValueError(f"tokenizer has no {THINK_END!r} token: GRPO rollouts need a reasoning tokenizer")
    stops = [int(think_end)]
    if tok.eos_token_id is not None:
        stops.append(int(tok.eos_token_id))
    return stops


def sample_rationales(model, tok, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                      do_sample: bool, seed: int, batch_size: int = 32, min_new_tokens: int = 0) -> list[list[int]]:
    """Generated ids after each prompt, cut after the first stop token (``</think>`` / EOS).

    ``min_new_tokens``: the stop tokens are suppressed before that many tokens (exploration for a
    policy that learned to close its think block at once, whose G rollouts would all coincide).
    """
    import torch

    stops = _stop_ids(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else stops[-1]
    dev = next(model.parameters()).device
    gen: dict[str, Any] = {"max_new_tokens": int(max_new_tokens), "eos_token_id": stops,
                           "pad_token_id": pad, "do_sample": bool(do_sample)}
    if min_new_tokens > 0:
        gen["min_new_tokens"] = min(int(min_new_tokens), int(max_new_tokens))
    if do_sample:
        gen.update(temperature=float(temperature), top_p=1.0, top_k=0)
    else:
        gen.update(temperature=None, top_p=None, top_k=None)
    out: list[list[int]] = []
    devices = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.inference_mode():
        torch.manual_seed(seed)
        for lo in range(0, len(prompts), batch_size):
            ids, attn = _left_pad(prompts[lo: lo + batch_size], pad, dev)
            seq = model.generate(input_ids=ids, attention_mask=attn, **gen)
            for row in seq[:, ids.shape[1]:].tolist():
                cut = next((j + 1 for j, t in enumerate(row) if t in stops), len(row))
                out.append([int(t) for t in row[:cut]])
    return out


def rollout(model, tok, prompts: Sequence[RlPrompt], trie, vocab, gcfg: GrpoCfg, *, group: int,
            seed: int, greedy: bool = False) -> Rollouts:
    """``group`` rollouts per prompt: sampled (or greedy) rationale, then constrained SID beam."""
    from onerec_prod.eval.beam import beam_search_sids
    from onerec_prod.samples.prompts import inference_prompt_ids
    from onerec_prod.samples.templates import THINK_CLOSE

    stops = set(_stop_ids(tok))
    close_ids = tok(THINK_CLOSE, add_special_tokens=False)["input_ids"]
    rep = [p for p in prompts for _ in range(group)]
    open_ids = [inference_prompt_ids(tok, p.messages, think=True) for p in rep]
    think = sample_rationales(model, tok, open_ids, gcfg.max_think_tokens, gcfg.temperature,
                              min_new_tokens=0 if greedy else gcfg.min_think_tokens,
                              do_sample=not greedy, seed=seed)
    rationale = [[t for t in ids if t not in stops] for ids in think]
    sid_prompts = [o + r + close_ids for o, r in zip(open_ids, rationale, strict=True)]
    found = beam_search_sids(model, sid_prompts, trie, vocab, gcfg.beam_size)
    completion, mask, beams = [], [], []
    for r, per in zip(rationale, found, strict=True):
        beam = [vocab.encode(codes) for codes, _ in per]
        top = beam[0][:-1] if beam else [vocab.begin_id]  # begin + level tokens (no end)
        completion.append(r + close_ids + top)
        mask.append([1] * len(r) + [0] * len(close_ids) + [0] + [1] * (len(top) - 1))
        beams.append(beam)
    texts = [tok.decode(r, skip_special_tokens=True).strip() for r in rationale]
    return Rollouts(open_ids, think, completion, mask, beams, texts, [p.target_sid for p in rep])


# --------------------------------------------------------------------------------------
# loss


def token_logps(model, prompt_ids: Sequence[Sequence[int]], completion: Sequence[Sequence[int]],
                pad_id: int):
    """``(logp, width)``: per-token log-probs of each completion (right-padded, ``(B, C)``)."""
    import torch

    dev = next(model.parameters()).device
    seqs = [list(p) + list(c) for p, c in zip(prompt_ids, completion, strict=True)]
    width = max(len(s) for s in seqs)
    cw = max(len(c) for c in completion)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
    ids, attn = ids.to(dev), attn.to(dev)
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
    rows = []
    for i, (p, c) in enumerate(zip(prompt_ids, completion, strict=True)):
        lo, n = len(p), len(c)
        lg = logits[i, lo - 1: lo - 1 + n].float()
        rows.append((i, n, torch.log_softmax(lg, -1).gather(1, ids[i, lo: lo + n, None]).squeeze(1)))
    return torch.stack([torch.nn.functional.pad(r, (0, cw - n)) for _, n, r in rows])


def _mask_tensor(masks: Sequence[Sequence[int]], device):
    import torch

    cw = max(len(m) for m in masks)
    t = torch.zeros((len(masks), cw), device=device)
    for i, m in enumerate(masks):
        t[i, : len(m)] = torch.tensor(m, dtype=torch.float32)
    return t


def policy_loss(logp, old_logp, ref_logp, adv, mask, clip_eps: float, kl_coef: float):
    """GRPO loss per sequence ``(B,)`` and token stats; all inputs ``(B, C)`` except ``adv (B,)``."""
    import torch

    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    surr = torch.minimum(ratio * a, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * a)
    per_tok = -surr
    if ref_logp is not None:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        per_tok = per_tok + kl_coef * kl
    else:
        kl = torch.zeros_like(logp)
    n = mask.sum(1).clamp(min=1)
    seq_loss = (per_tok * mask).sum(1) / n
    clipped = ((ratio - 1).abs() > clip_eps).float()
    stats = {"kl": float(((kl * mask).sum() / mask.sum().clamp(min=1)).detach()),
             "clip_frac": float(((clipped * mask).sum() / mask.sum().clamp(min=1)).detach())}
    return seq_loss, stats


def group_advantages(rewards, group: int):
    """``(r - mean_g) / (std_g + eps)`` per group of ``group`` consecutive rollouts."""
    r = rewards.view(-1, group)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + ADV_EPS)).view(-1)


# --------------------------------------------------------------------------------------
# the loop


RewardSpec = tuple[Callable[..., list], float]


@dataclass
class GrpoResult:
    model: Any
    curve: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int = 0


def score(rewards: Sequence[RewardSpec], ro: Rollouts) -> list[float]:
    """Weighted sum of the reward functions (a ``None`` counts as 0)."""
    total = [0.0] * len(ro.texts)
    for fn, w in rewards:
        vals = fn(ro.texts, completion_ids=ro.think_ids, beam_ids=ro.beams, target_sid=ro.targets)
        total = [t + w * (v or 0.0) for t, v in zip(total, vals, strict=True)]
    return total


def step_prompts(n: int, per_step: int, step: int, seed: int) -> list[int]:
    """Indices of step ``step``'s prompts: consecutive slices of seeded per-epoch permutations."""
    out = []
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, j = divmod(k, n)
        perm = list(range(n))
        random.Random(f"{seed}:{epoch}").shuffle(perm)
        out.append(perm[j])
    return out


def _latest_ckpt(ckpt_dir: Path) -> Path | None:
    if not ckpt_dir.is_dir():
        return None
    done = [p for p in ckpt_dir.glob(f"{CKPT_PREFIX}*") if p.name[len(CKPT_PREFIX):].isdigit()
            and (p / STATE_FILE).exists()]
    return max(done, key=lambda p: int(p.name[len(CKPT_PREFIX):]), default=None)


def _load_weights(policy, ckpt: Path) -> None:
    """Checkpoint weights (safetensors) into ``policy`` (tied ``lm_head`` may be absent)."""
    from safetensors.torch import load_file

    weights = {}
    for f in sorted(ckpt.glob("model*.safetensors")):
        weights.update(load_file(str(f)))
    missing, _ = policy.load_state_dict(weights, strict=False)
    if [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"checkpoint {ckpt} lacks weights {missing[:3]}")
    policy.tie_weights()


def _prune_ckpts(ckpt: Path, keep: Path) -> None:
    for old_d in ckpt.glob(f"{CKPT_PREFIX}*"):
        if old_d != keep:
            shutil.rmtree(old_d, ignore_errors=True)


def rollout_seed(gcfg: GrpoCfg, step: int, rank: int = 0) -> int:
    """Seed of step ``step``'s rollouts on rank ``rank`` (rank 0 = the single-process seed)."""
    return gcfg.seed * 100_003 + step + 1_000_003 * rank


def rank_share(idx: Sequence[int], rank: int, world: int) -> list[int]:
    """Rank ``rank``'s share of a step's prompt indices: ``idx[rank::world]`` (deterministic)."""
    return list(idx[rank::world])


def _chunks(n: int, micro_batch: int, count: int | None = None) -> list[list[int]]:
    """Micro-batches of ``range(n)``: slices of ``micro_batch``, or ``count`` near-equal slices."""
    if count is None:
        return [list(range(lo, min(lo + micro_batch, n))) for lo in range(0, n, micro_batch)]
    if not 1 <= count <= n:
        raise ValueError(f"cannot split {n} rollouts into {count} micro-batches")
    q, rem = divmod(n, count)
    out, lo = [], 0
    for k in range(count):
        hi = lo + q + (k < rem)
        out.append(list(range(lo, hi)))
        lo = hi
    return out


class LocalUpdate:
    """Single process: gradients accumulate over micro-batches, then clip + AdamW step."""

    def __init__(self, policy, opt):
        self.model, self.opt = policy, opt

    def begin(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def backward(self, loss) -> None:
        loss.backward()

    def end(self) -> None:
        import torch

        torch.nn.utils.clip_grad_norm_(self.model.parameters(), MAX_GRAD_NORM)
        self.opt.step()


# local sums of one step; summed over ranks, then turned into the curve entry by step_metrics
SUM_KEYS = ("n", "reward_sum", "reward_sq", "beam_sum", "hits", "kl_sum", "kl_n", "clip_sum", "clip_n",
            "loss", "think_closed", "groups", "signal_groups")


def grpo_step(policy, ref, tok, batch: Sequence[RlPrompt], trie, vocab, gcfg: GrpoCfg,
              rewards: Sequence[RewardSpec], update, *, seed: int, n_total: int | None = None,
              world: int = 1, micro_batch: int = 16, n_chunks: int | None = None) -> dict[str, float]:
    """One GRPO step on this process's ``batch``: rollouts, rewards, ``gcfg.iterations`` updates.

    ``policy`` rolls out (and gives the old log-probs); ``update.model`` is what the loss is
    computed through (the policy itself, or its DeepSpeed engine), ``update.begin/backward/end``
    apply the gradients. The loss is ``sum(seq_loss) * world / n_total`` (``n_total``: rollouts of
    the step over all ranks), so gradients averaged over ``world`` ranks equal the single-process
    mean. Returns the step's local sums (:data:`SUM_KEYS`).
    """
    import torch

    from onerec_prod.train.rewards import get_rollout_beam_reward

    G, L = gcfg.group_size, vocab.num_levels
    think_end = _stop_ids(tok)[0]
    pad = tok.pad_token_id if tok.pad_token_id is not None else _stop_ids(tok)[-1]
    policy.eval()  # no dropout: rollout-time and update-time log-probs agree
    ro = rollout(policy, tok, batch, trie, vocab, gcfg, group=G, seed=seed)
    r = torch.tensor(score(rewards, ro), dtype=torch.float32)
    beam_r = get_rollout_beam_reward(vocab)(ro.texts, beam_ids=ro.beams, target_sid=ro.targets)
    adv = group_advantages(r, G)
    n = len(ro.texts)
    n_total = n_total or n
    chunks = _chunks(n, micro_batch, n_chunks)
    old, refs = [], []
    with torch.no_grad():
        for ix in chunks:
            args = ([ro.prompt_ids[i] for i in ix], [ro.completion[i] for i in ix], pad)
            old.append(token_logps(policy, *args) if gcfg.iterations > 1 else None)
            refs.append(token_logps(ref, *args) if ref is not None and gcfg.kl_coef > 0 else None)
    tot_loss, kls, clips = 0.0, [], []
    for _ in range(gcfg.iterations):
        update.begin()
        for ci, ix in enumerate(chunks):
            logp = token_logps(update.model, [ro.prompt_ids[i] for i in ix], [ro.completion[i] for i in ix], pad)
            mask = _mask_tensor([ro.train_mask[i] for i in ix], logp.device)
            o = old[ci] if old[ci] is not None else logp.detach()
            seq_loss, st = policy_loss(logp, o, refs[ci], adv[ix].to(logp.device), mask,
                                       gcfg.clip_eps, gcfg.kl_coef)
            total = seq_loss.sum()
            update.backward(total * (world / n_total))
            tot_loss += float(total.detach()) / n_total / gcfg.iterations
            kls.append(st["kl"])
            clips.append(st["clip_frac"])
        update.end()
    return {
        "n": float(n), "reward_sum": float(r.double().sum()), "reward_sq": float((r.double() ** 2).sum()),
        "beam_sum": float(sum(beam_r)), "hits": float(sum(v == L for v in beam_r)),
        "kl_sum": float(sum(kls)), "kl_n": float(len(kls)),
        "clip_sum": float(sum(clips)), "clip_n": float(len(clips)), "loss": tot_loss,
        "think_closed": float(sum(bool(t) and t[-1] == think_end for t in ro.think_ids)),
        # groups whose rollouts got different rewards: only they carry a gradient (GRPO's signal)
        "groups": float(n // G), "signal_groups": float((r.view(-1, G).std(1) > 0).sum()) if G > 1 else 0.0,
    }


def step_metrics(sums: dict[str, float], step: int, seconds: float) -> dict[str, float]:
    """The curve entry of step ``step`` (0-based) from the step's sums over all ranks."""
    n = sums["n"]
    mean = sums["reward_sum"] / n
    var = max(sums["reward_sq"] - n * mean * mean, 0.0) / (n - 1) if n > 1 else 0.0
    return {
        "step": step + 1,
        "reward_mean": mean, "reward_std": math.sqrt(var),
        "beam_reward_mean": sums["beam_sum"] / n,
        "hit_rate": sums["hits"] / n,
        "kl": sums["kl_sum"] / max(sums["kl_n"], 1.0), "clip_frac": sums["clip_sum"] / max(sums["clip_n"], 1.0),
        "loss": sums["loss"],
        "think_closed": sums["think_closed"] / n,
        "signal_groups": sums.get("signal_groups", 0.0) / max(sums.get("groups", 0.0), 1.0),
        "seconds": seconds,
    }


def log_step(m: dict[str, float], steps: int) -> None:
    log.info("GRPO step %d/%d reward %.3f±%.3f beam %.3f hit %.3f groups-with-signal %.2f kl %.2e loss %.4f "
             "clip %.3f (%.1fs)", m["step"], steps, m["reward_mean"], m["reward_std"], m["beam_reward_mean"],
             m["hit_rate"], m["signal_groups"], m["kl"], m["loss"], m["clip_frac"], m["seconds"])


def ckpt_due(gcfg: GrpoCfg, step: int) -> bool:
    """Checkpoint after step ``step`` (0-based)? Every ``save_steps``, never at the last step."""
    return bool(gcfg.save_steps) and (step + 1) % gcfg.save_steps == 0 and step + 1 < gcfg.steps


def train_grpo(policy, ref, tok, prompts: Sequence[RlPrompt], trie, vocab, gcfg: GrpoCfg,
               rewards: Sequence[RewardSpec], *, ckpt_dir: str | Path | None = None,
               meta: dict[str, Any] | None = None, micro_batch: int = 16) -> GrpoResult:
    """Run ``gcfg.steps`` GRPO steps on ``policy`` (in place, this process); ``ref`` frozen (None: no KL).

    With ``ckpt_dir``, resumes from its latest ``step-N`` and checkpoints every
    ``gcfg.save_steps`` steps. Returns the policy and the per-step curve.
    """
    import torch

    from onerec_prod.model.io import load_tree, save_model, save_tree

    if not prompts:
        raise ValueError("train_grpo: no prompts")
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=gcfg.lr,
                            weight_decay=0.0)
    curve: list[dict[str, float]] = []
    start = 0
    ckpt = Path(ckpt_dir) if ckpt_dir else None
    last = _latest_ckpt(ckpt) if ckpt else None
    if last is not None:
        state = load_tree(last / STATE_FILE)
        if "optimizer" not in state:
            raise RuntimeError(f"checkpoint {last} was written by a multi-process run")
        _load_weights(policy, last)
        opt.load_state_dict(state["optimizer"])
        curve, start = list(state["curve"]), int(state["step"])
        log.info("GRPO: resuming from %s (step %d)", last, start)
    if ref is not None:
        ref.eval().requires_grad_(False)
    update = LocalUpdate(policy, opt)
    for step in range(start, gcfg.steps):
        t0 = time.perf_counter()
        batch = [prompts[i] for i in step_prompts(len(prompts), gcfg.prompts_per_step, step, gcfg.seed)]
        sums = grpo_step(policy, ref, tok, batch, trie, vocab, gcfg, rewards, update,
                         seed=rollout_seed(gcfg, step), micro_batch=micro_batch)
        m = step_metrics(sums, step, time.perf_counter() - t0)
        curve.append(m)
        log_step(m, gcfg.steps)
        if ckpt is not None and ckpt_due(gcfg, step):
            d = save_model(policy, tok, ckpt / f"{CKPT_PREFIX}{step + 1}", {**(meta or {}), "grpo_step": step + 1})
            save_tree({"step": step + 1, "optimizer": opt.state_dict(), "curve": curve}, d / STATE_FILE)
            _prune_ckpts(ckpt, d)
    policy.eval()
    return GrpoResult(policy, curve, start)


def evaluate_prompts(model, tok, prompts: Sequence[RlPrompt], trie, vocab, gcfg: GrpoCfg) -> dict[str, float]:
    """Greedy rationale + beam on ``prompts``: mean Rollout-Beam reward and hit-rate (reward == L)."""
    from onerec_prod.train.rewards import get_rollout_beam_reward

    if not prompts:
        return {"beam_reward_mean": float("nan"), "hit_rate": float("nan"), "prompts": 0}
    ro = rollout(model, tok, prompts, trie, vocab, gcfg, group=1, seed=gcfg.seed, greedy=True)
    r = get_rollout_beam_reward(vocab)(ro.texts, beam_ids=ro.beams, target_sid=ro.targets)
    return {"beam_reward_mean": sum(r) / len(r), "hit_rate": sum(v == vocab.num_levels for v in r) / len(r),
            "prompts": len(r)}


# --------------------------------------------------------------------------------------
# inputs of a day


def _prompt_from_row(row: dict[str, Any]) -> RlPrompt | None:
    from onerec_prod.samples.prompts import messages_from_json
    from onerec_prod.sid.tokens import parse_sids

    msgs = row["messages"]
    msgs = messages_from_json(msgs) if isinstance(msgs, str) else list(msgs)
    target = row.get("target_sid")
    if target is None:
        found = parse_sids(row.get("response") or "")
        target = found[0] if found else None
    if target is None:
        return None
    return RlPrompt(str(row.get("sample_id")), msgs, tuple(int(c) for c in target))


def load_rl_prompts(cfg: Config, dt: str, samples_path: str | Path | None = None
                    ) -> tuple[list[RlPrompt], list[str], dict[str, Any]]:
    """Day ``dt``'s ``rl_prompt`` rows: ``(prompts, sid_versions, data_versions)``.

    From a JSONL (rows with ``task, messages`` and ``target_sid`` or a SID in ``response``) or
    from the Delta ``samples`` table (one pinned version).
    """
    if samples_path is not None:
        rows = [json.loads(line) for line in Path(samples_path).read_text().splitlines() if line.strip()]
        rows = [r for r in rows if r.get("task", "rl_prompt") == "rl_prompt"
                and r.get("dt", dt) == dt]
        versions: dict[str, Any] = {"samples_file": str(samples_path)}
    else:
        from pyspark.sql import functions as F

        from onerec_prod.lake import read_table, table_path, table_version
        from onerec_prod.spark import get_spark

        spark = get_spark(cfg.spark)
        path = table_path(cfg, "samples")
        v = table_version(spark, path)
        if v is None:
            raise FileNotFoundError(f"samples table not found at {path}: run build_samples for dt={dt}")
        df = (read_table(spark, path, v).where((F.col("task") == "rl_prompt") & (F.col("dt") == dt))
              .select("sample_id", "messages", "target_sid", "sid_version", "response"))
        rows = [r.asDict() for r in df.collect()]
        versions = {"samples": v}
    rows.sort(key=lambda r: str(r.get("sample_id")))
    prompts = [p for p in (_prompt_from_row(r) for r in rows) if p is not None]
    sid_versions = sorted({r["sid_version"] for r in rows if r.get("sid_version")})
    return prompts, sid_versions, versions


def load_catalog_sids(cfg: Config, sid_version: str | None, catalog_path: str | Path | None = None
                      ) -> list[tuple[int, ...]]:
    """Every catalog SID of ``sid_version`` (the trie is never built from targets only)."""
    if catalog_path is not None:
        rows = [json.loads(line) for line in Path(catalog_path).read_text().splitlines() if line.strip()]
    else:
        from onerec_prod.lake import read_table, table_path, table_version
        from onerec_prod.spark import get_spark

        spark = get_spark(cfg.spark)
        path = table_path(cfg, "catalog")
        v = table_version(spark, path)
        if v is None:
            raise FileNotFoundError(f"catalog table not found at {path}: run update_catalog first")
        rows = [r.asDict() for r in read_table(spark, path, v).select("sid", "sid_version").collect()]
    sids = {tuple(int(c) for c in r["sid"]) for r in rows if r.get("sid") is not None
            and (sid_version is None or r.get("sid_version") in (None, sid_version))}
    if not sids:
        raise ValueError(f"no catalog SIDs of sid_version {sid_version!r}")
    return sorted(sids)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def default_rewards(tok, vocab, gcfg: GrpoCfg) -> list[RewardSpec]:
    """Rollout-Beam reward, plus ``format_reward`` x think-format when that weight is > 0."""
    from onerec_prod.train.rewards import get_reward

    out: list[RewardSpec] = [(get_reward("rollout_beam", vocab=vocab), 1.0)]
    if gcfg.format_reward > 0:
        blank = [i for t, i in tok.get_vocab().items() if tok.convert_tokens_to_string([t]).strip() == ""]
        out.append((get_reward("think_format", think_end_id=_stop_ids(tok)[0], blank_ids=blank),
                    gcfg.format_reward))
    return out


WORKER_MODULE = "onerec_prod.train.grpo_worker"
RESULT_FILE = "result.json"


def write_prompts(prompts: Sequence[RlPrompt], path: Path) -> Path:
    """``prompts`` as JSONL (``sample_id, messages, target_sid``), the workers' input."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"sample_id": p.sample_id, "messages": p.messages,
                                        "target_sid": list(p.target_sid)}) + "\n" for p in prompts))
    return path


def read_prompts(path: str | Path) -> list[RlPrompt]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [RlPrompt(r["sample_id"], r["messages"], tuple(int(c) for c in r["target_sid"])) for r in rows]


def _train_workers(cfg: Config, init: Path, work: Path, ckpt: Path, prompts: Sequence[RlPrompt],
                   sids: Sequence[Sequence[int]], sizes: list[int], meta: dict[str, Any],
                   fault: dict[str, Any] | None) -> GrpoResult:
    """Run the GRPO steps on ``grpo.nproc`` torchrun workers (:mod:`onerec_prod.train.grpo_worker`).

    Rank 0 writes the trained model to ``work/final`` and the curve to ``work/result.json``;
    returns them loaded like :func:`train_grpo`'s result.
    """
    import torch

    from onerec_prod.model.io import load_model
    from onerec_prod.train.launcher import launch

    gcfg = cfg.grpo
    final = work / "final"
    sids_path = work / "catalog_sids.json"
    sids_path.write_text(json.dumps([list(s) for s in sids]))
    (work / RESULT_FILE).unlink(missing_ok=True)
    spec = {
        "config": cfg.model_dump(mode="json"),
        "init_dir": str(init),
        "out_dir": str(final),
        "work_dir": str(work),
        "ckpt_dir": str(ckpt),
        "prompts_path": str(write_prompts(prompts, work / "prompts.jsonl")),
        "sids_path": str(sids_path),
        "sid_sizes": list(sizes),
        "meta": meta,
        "run_key": meta["run_key"],
        "force_cpu": not torch.cuda.is_available(),
        "fault": fault or {},
    }
    log.info("GRPO on %d processes (ZeRO-%d)", gcfg.nproc, gcfg.zero_stage)
    launch(spec, work / "spec.json", nproc=gcfg.nproc, zero_stage=gcfg.zero_stage, entry_module=WORKER_MODULE)
    res = json.loads((work / RESULT_FILE).read_text()) if (work / RESULT_FILE).exists() else {}
    if res.get("run_key") != meta["run_key"]:
        raise RuntimeError(f"GRPO workers finished but wrote no result for run {meta['run_key']} in {work}")
    return GrpoResult(load_model(final), list(res["curve"]), int(res["resumed_from"]))


def rl_day(cfg: Config, dt: str, init_from: str | Path | None = None, out_dir: str | Path | None = None,
           *, samples_path: str | Path | None = None, catalog_path: str | Path | None = None,
           force: bool = False, fault: dict[str, Any] | None = None) -> dict[str, Any]:
    """GRPO refresh of day ``dt``'s SFT candidate into ``candidates/dt=D/rl``.

    Returns ``{model_dir, steps, reward_curve, before, after, prompts, resumed_from}``
    (``before``/``after``: greedy Rollout-Beam reward and hit-rate on up to
    ``grpo.eval_prompts`` of the day's prompts). Re-running with the same inputs is a no-op.
    ``grpo.nproc > 1`` or ``grpo.zero_stage > 0``: the steps run on torchrun workers (DeepSpeed);
    ``fault`` (tests, chaos drills) goes to them, e.g. ``{"kill_at_step": 1}`` makes rank 0
    SIGKILL itself after step 1 (and its checkpoint, if one is due).
    """
    import torch

    from onerec_prod.model.io import (
        keyed_checkpoint_dir,
        load_model,
        load_tokenizer,
        read_meta,
        save_model,
        weights_hash,
    )
    from onerec_prod.sid.tokens import SidVocab, level_sizes
    from onerec_prod.sid.trie import SidTrie
    from onerec_prod.train.cli import candidates_dir

    gcfg = cfg.grpo
    init = Path(init_from) if init_from else candidates_dir(cfg, dt) / "sft"
    out = Path(out_dir) if out_dir else candidates_dir(cfg, dt) / "rl"
    work = out.parent / f"_{out.name}_work"
    pmeta = read_meta(init)
    prompts, sid_versions, data_versions = load_rl_prompts(cfg, dt, samples_path)
    if not prompts:
        raise ValueError(f"rl dt={dt}: no rl_prompt samples (run build_samples for dt={dt})")
    if len(sid_versions) > 1:
        raise ValueError(f"rl dt={dt}: rl prompts mix sid_versions {sid_versions}")
    sid_version = pmeta.get("sid_version") or (sid_versions[0] if sid_versions else None)
    if sid_versions and pmeta.get("sid_version") and sid_versions[0] != pmeta["sid_version"]:
        raise ValueError(f"model {init} has sid_version {pmeta['sid_version']!r} but the rl prompts of "
                         f"dt={dt} use {sid_versions[0]!r}: train an SFT model on this codebook first")
    sizes = level_sizes(cfg.sid)
    sids = load_catalog_sids(cfg, sid_version, catalog_path)
    trie = SidTrie.from_sids(sids, sizes)
    parent_sha = pmeta.get("weights_sha256") or weights_hash(init)
    key = _digest([parent_sha, [(p.sample_id, p.target_sid) for p in prompts], gcfg.model_dump(), sizes,
                   trie.num_items])
    done = read_meta(out)
    if not force and done.get("run_key") == key:
        log.info("rl dt=%s already refreshed with the same inputs: %s", dt, out)
        return {**done.get("rl", {}), "model_dir": str(out), "skipped": True}

    torch.manual_seed(gcfg.seed)
    tok = load_tokenizer(init)
    vocab = SidVocab.from_tokenizer(tok, sizes)
    policy = load_model(init)
    eval_set = [prompts[i] for i in sorted(random.Random(gcfg.seed).sample(range(len(prompts)),
                                                                          min(gcfg.eval_prompts, len(prompts))))]
    before = evaluate_prompts(policy, tok, eval_set, trie, vocab, gcfg)
    ckpt = keyed_checkpoint_dir(work / "checkpoints", key, force=force)
    meta = {
        "dt": dt, "stage": "rl", "sid_version": sid_version, "sid_sizes": sizes,
        "parent": {"dir": str(init), "weights_sha256": parent_sha, "stage": pmeta.get("stage"),
                   "dt": pmeta.get("dt"), "version": pmeta.get("parent_version")},
        "parent_version": pmeta.get("parent_version"),
        "data_versions": {**(pmeta.get("data_versions") or {}), "rl": data_versions},
        "config_hash": cfg.digest(), "run_key": key,
    }
    if gcfg.nproc > 1 or gcfg.zero_stage > 0:
        del policy
        res = _train_workers(cfg, init, work, ckpt, prompts, sids, sizes, meta, fault)
    else:
        ref = load_model(init) if gcfg.kl_coef > 0 else None
        res = train_grpo(policy, ref, tok, prompts, trie, vocab, gcfg, default_rewards(tok, vocab, gcfg),
                         ckpt_dir=ckpt, meta=meta)
    after = evaluate_prompts(res.model, tok, eval_set, trie, vocab, gcfg)
    summary = {"steps": gcfg.steps, "prompts": len(prompts), "reward_curve": res.curve,
               "before": before, "after": after, "resumed_from": res.resumed_from,
               "catalog_items": trie.num_items}
    save_model(res.model, tok, out, {**meta, "rl": summary})
    shutil.rmtree(work, ignore_errors=True)
    log.info("rl dt=%s: beam reward %.3f -> %.3f, hit-rate %.3f -> %.3f (%d eval prompts) -> %s", dt,
             before["beam_reward_mean"], after["beam_reward_mean"], before["hit_rate"], after["hit_rate"],
             before["prompts"], out)
    return {**summary, "model_dir": str(out)}
