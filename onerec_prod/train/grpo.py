"""RL refresh (GRPO): the loop, the day's inputs and the multi-process driver.

The pieces live in three modules: rollouts (:mod:`onerec_prod.train.grpo_rollout`: groups of G
distinct candidates from :mod:`onerec_prod.eval.beam`), loss terms as pure functions
(:mod:`onerec_prod.train.grpo_loss`: token log-probs, group advantages, clipped policy loss with
KL to the SFT reference) and rewards on token ids (:mod:`onerec_prod.train.rewards`). This module
composes them: :func:`grpo_step` (one step on one process), :func:`train_grpo` (the in-process
loop with checkpoints via :mod:`onerec_prod.train.checkpoint`) and :func:`rl_day` (the daily
stage: inputs from Delta or JSONL, before/after eval on held-out prompts, workers when asked).

Why not ``trl.GRPOTrainer``: a rollout here is a constrained beam over the SID trie (direct mode)
or a sampled rationale followed by one (think mode); TRL's generate path has no logits-processor
hook and hides the per-token masks (forced tokens are not trained). The reward functions keep
TRL's signature, so they move over unchanged.

One step (``grpo.*`` config):

1. ``prompts_per_step`` prompts (seeded per-epoch order over the day's prompts);
2. rollouts (``grpo.mode``): direct -- one beam of ``group_size`` over the user's SID stream, the
   G distinct candidates are the group; think -- G sampled rationales, each then a beam of
   ``beam_size`` final SIDs;
3. rewards (:class:`~onerec_prod.train.rewards.RecReward`: hit, rank-aware and prefix terms,
   weights ``reward_*``; plus ``format_reward`` x think-format in think mode); advantages
   ``(r - mean_g) / (std_g + 1e-4)`` per group; the share of groups with reward variance (the
   only ones with a gradient) is logged as ``signal_groups``;
4. loss on the policy's own tokens only (the candidate's SID level tokens; in think mode also the
   rationale; forced ``</think>`` and ``<|sid_begin|>`` masked): per token
   ``-min(ratio A, clip(ratio) A) + kl_coef * k3``, mean per sequence, mean over sequences;
   ``iterations`` AdamW updates per rollout batch (with 1, ratio == 1).

Why beam candidates rather than samples as the group: see :mod:`onerec_prod.train.grpo_rollout`.
The gradient of a beam group is not the on-policy estimator (candidates are the policy's top G,
not draws), but it is the signal that moves a peaked policy: the target's log-prob up when it is
in the beam, the confident wrong candidates' down (as MiniOneRec's beam-group RL).

Logged per step: reward mean/std, hit-rate (target in the group's beam), Rollout-Beam reward
(matched leading levels, 0..L), signal groups, KL, loss, clip fraction, seconds. Checkpoints
(``save_steps``) hold the model (safetensors) and the optimizer + curve; a rerun with the same
inputs resumes from the latest; every step reseeds from ``(seed, step)``.

Scale: ``grpo.nproc == 1`` and ``grpo.zero_stage == 0`` (default): this process. Otherwise
:func:`rl_day` starts ``grpo.nproc`` torchrun workers (:mod:`onerec_prod.train.grpo_worker`,
DeepSpeed ZeRO-1/2) that run the same :func:`grpo_step` on ``r::nproc`` of each step's prompts.
Not implemented: vLLM rollouts, ZeRO-3 (rollouts need whole weights), multi-node GRPO.
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
from onerec_prod.train import checkpoint
from onerec_prod.train.grpo_loss import (
    group_advantages,
    mask_tensor,
    policy_loss,
    shared_prompt_logps,
    signal_groups,
    token_logps,
)
from onerec_prod.train.grpo_rollout import RlPrompt, Rollouts, rollout, score

__all__ = ["RlPrompt", "Rollouts", "rollout", "score", "train_grpo", "grpo_step", "rl_day", "evaluate_prompts"]

log = logging.getLogger(__name__)

CKPT_PREFIX = "step-"
STATE_FILE = "grpo_state.safetensors"
MAX_GRAD_NORM = 1.0

RewardSpec = tuple[Callable[..., list], float]


@dataclass
class GrpoResult:
    model: Any
    curve: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int = 0


def step_prompts(n: int, per_step: int, step: int, seed: int) -> list[int]:
    """Indices of step ``step``'s prompts: consecutive slices of seeded per-epoch permutations."""
    out = []
    perms: dict[int, list[int]] = {}
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, j = divmod(k, n)
        if epoch not in perms:
            perm = list(range(n))
            random.Random(f"{seed}:{epoch}").shuffle(perm)
            perms[epoch] = perm
        out.append(perms[epoch][j])
    return out


def rollout_seed(gcfg: GrpoCfg, step: int, rank: int = 0) -> int:
    """Seed of step ``step``'s rollouts on rank ``rank`` (rank 0 = the single-process seed)."""
    return gcfg.seed * 100_003 + step + 1_000_003 * rank


def rank_share(idx: Sequence[int], rank: int, world: int) -> list[int]:
    """Rank ``rank``'s share of a step's prompt indices: ``idx[rank::world]`` (deterministic)."""
    return list(idx[rank::world])


def latest_ckpt(ckpt_dir: Path) -> Path | None:
    return checkpoint.latest(ckpt_dir, CKPT_PREFIX, STATE_FILE)


def split_chunks(units: list[list[int]], micro_batch: int, count: int | None = None) -> list[list[int]]:
    """Micro-batches of rollout indices, never splitting a unit (a direct-mode group shares one
    prompt forward): greedy fill up to ``micro_batch`` rollouts, or ``count`` near-equal runs of units."""
    if count is None:
        out: list[list[int]] = [[]]
        for u in units:
            if out[-1] and len(out[-1]) + len(u) > micro_batch:
                out.append([])
            out[-1].extend(u)
        return [c for c in out if c]
    if not 1 <= count <= len(units):
        raise ValueError(f"cannot split {len(units)} rollout units into {count} micro-batches")
    q, rem = divmod(len(units), count)
    out, lo = [], 0
    for k in range(count):
        hi = lo + q + (k < rem)
        out.append([i for u in units[lo:hi] for i in u])
        lo = hi
    return out


def chunk_units(gcfg: GrpoCfg) -> int:
    """Rollouts per indivisible unit of a micro-batch: a group in direct mode, one rollout in think."""
    return gcfg.group_size if gcfg.mode == "direct" else 1


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


def _logps(model, ro: Rollouts, ix: list[int], pad: int):
    if ro.shared_prompt:
        owners = sorted({ro.group[i] for i in ix})
        pos = {g: k for k, g in enumerate(owners)}
        return shared_prompt_logps(model, [ro.prompts[g] for g in owners], [ro.completion[i] for i in ix],
                                   [pos[ro.group[i]] for i in ix], pad)
    return token_logps(model, [ro.prompt_ids[i] for i in ix], [ro.completion[i] for i in ix], pad)


def grpo_step(policy, ref, tok, batch: Sequence[RlPrompt], trie, vocab, gcfg: GrpoCfg,
              rewards: Sequence[RewardSpec], update, *, seed: int, n_total: int | None = None,
              world: int = 1, micro_batch: int = 16, n_chunks: int | None = None,
              max_items: int = 50) -> dict[str, float]:
    """One GRPO step on this process's ``batch``: rollouts, rewards, ``gcfg.iterations`` updates.

    ``policy`` rolls out (and gives the old log-probs); ``update.model`` is what the loss is
    computed through (the policy itself, or its DeepSpeed engine), ``update.begin/backward/end``
    apply the gradients. The loss is ``sum(seq_loss) * world / n_total`` (``n_total``: rollouts of
    the step over all ranks), so gradients averaged over ``world`` ranks equal the single-process
    mean. Returns the step's local sums (:data:`SUM_KEYS`).
    """
    import torch

    from onerec_prod.eval.beam import think_stop_ids
    from onerec_prod.train.rewards import get_rollout_beam_reward

    L = vocab.num_levels
    stops = think_stop_ids(tok) if gcfg.mode == "think" else []
    pad = tok.pad_token_id if tok.pad_token_id is not None else vocab.begin_id
    policy.eval()  # no dropout: rollout-time and update-time log-probs agree
    ro = rollout(policy, tok, batch, trie, vocab, gcfg, seed=seed, max_items=max_items)
    r = torch.tensor(score(rewards, ro), dtype=torch.float32)
    beam_r = get_rollout_beam_reward(vocab)(ro.texts, beam_ids=ro.beams, target_sid=ro.targets)
    adv = group_advantages(r, ro.group, gcfg.scale_advantages)
    sig, n_groups = signal_groups(r, ro.group)
    n = len(ro.completion)
    n_total = n_total or n
    units: dict[int, list[int]] = {}
    for i, g in enumerate(ro.group):
        units.setdefault(g if ro.shared_prompt else i, []).append(i)
    chunks = split_chunks(list(units.values()), micro_batch, n_chunks)
    old, refs = [], []
    with torch.no_grad():
        for ix in chunks:
            old.append(_logps(policy, ro, ix, pad) if gcfg.iterations > 1 else None)
            refs.append(_logps(ref, ro, ix, pad) if ref is not None and gcfg.kl_coef > 0 else None)
    tot_loss, kls, clips = 0.0, [], []
    for _ in range(gcfg.iterations):
        update.begin()
        for ci, ix in enumerate(chunks):
            logp = _logps(update.model, ro, ix, pad)
            mask = mask_tensor([ro.train_mask[i] for i in ix], logp.device)
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
        "think_closed": float(sum(bool(t) and t[-1] == stops[0] for t in ro.think_ids)) if stops else 0.0,
        "groups": float(n_groups), "signal_groups": float(sig),
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
               meta: dict[str, Any] | None = None, micro_batch: int = 16, max_items: int = 50,
               on_step: Callable[[int, Any], dict[str, float] | None] | None = None) -> GrpoResult:
    """Run ``gcfg.steps`` GRPO steps on ``policy`` (in place, this process); ``ref`` frozen (None: no KL).

    With ``ckpt_dir``, resumes from its latest ``step-N`` and checkpoints every
    ``gcfg.save_steps`` steps. ``on_step(step, policy)`` (benches) may return extra figures for
    the step's curve entry (e.g. a validation metric) and ``stop: True`` to end the run there. Returns the policy and the per-step curve.
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
    last = latest_ckpt(ckpt) if ckpt else None
    if last is not None:
        state = load_tree(last / STATE_FILE)
        if int(state.get("world_size", 1)) != 1 or checkpoint.optimizer_shards(last) != 1:
            raise RuntimeError(f"checkpoint {last} was written by a multi-process run")
        checkpoint.load_weights(policy, last)
        checkpoint.load_optimizer(last, 0, opt)
        curve, start = list(state["curve"]), int(state["step"])
        log.info("GRPO: resuming from %s (step %d)", last, start)
    if ref is not None:
        ref.eval().requires_grad_(False)
    update = LocalUpdate(policy, opt)
    for step in range(start, gcfg.steps):
        t0 = time.perf_counter()
        batch = [prompts[i] for i in step_prompts(len(prompts), gcfg.prompts_per_step, step, gcfg.seed)]
        sums = grpo_step(policy, ref, tok, batch, trie, vocab, gcfg, rewards, update,
                         seed=rollout_seed(gcfg, step), micro_batch=micro_batch, max_items=max_items)
        m = step_metrics(sums, step, time.perf_counter() - t0)
        extra = dict(on_step(step, policy) or {}) if on_step is not None else {}
        stop = bool(extra.pop("stop", False))
        m.update(extra)
        curve.append(m)
        log_step(m, gcfg.steps)
        if ckpt is not None and ckpt_due(gcfg, step):
            d = save_model(policy, tok, ckpt / f"{CKPT_PREFIX}{step + 1}", {**(meta or {}), "grpo_step": step + 1})
            checkpoint.save_optimizer(d, 0, opt)
            save_tree({"step": step + 1, "curve": curve, "world_size": 1}, d / STATE_FILE)
            checkpoint.prune(ckpt, CKPT_PREFIX, d)
        if stop:
            log.info("GRPO: stopped by the caller after step %d", step + 1)
            break
    policy.eval()
    return GrpoResult(policy, curve, start)


def evaluate_prompts(model, tok, prompts: Sequence[RlPrompt], trie, vocab, gcfg: GrpoCfg, *,
                     beam: int = 10, max_items: int = 50) -> dict[str, float]:
    """Recall/NDCG@``beam`` of ``prompts``' targets in ``gcfg.mode`` (think: greedy rationale),
    plus the mean Rollout-Beam reward (matched leading levels of the best beam entry, 0..L)."""
    from onerec_prod.train.grpo_rollout import direct_rollout, think_rollout
    from onerec_prod.train.rewards import get_rollout_beam_reward, prefix_match, rank_gain

    if not prompts:
        return {"recall": float("nan"), "ndcg": float("nan"), "beam_reward_mean": float("nan"),
                "hit_rate": float("nan"), "prompts": 0, "beam": beam}
    if gcfg.mode == "direct":
        ro = direct_rollout(model, prompts, trie, vocab, group=beam, max_items=max_items)
        firsts = {}
        for i, g in enumerate(ro.group):
            firsts.setdefault(g, i)
        beams = [ro.beams[firsts[g]] if g in firsts else [] for g in range(len(prompts))]
    else:
        ro = think_rollout(model, tok, prompts, trie, vocab, group=1, beam_size=beam,
                           max_think_tokens=gcfg.max_think_tokens, temperature=1.0, min_think_tokens=0,
                           seed=gcfg.seed, greedy=True)
        beams = ro.beams
    targets = [p.target_sid for p in prompts]
    L = vocab.num_levels
    ranks = [next((k for k, s in enumerate(b) if prefix_match(s, t, vocab) == L), None)
             for b, t in zip(beams, targets, strict=True)]
    r = get_rollout_beam_reward(vocab)([""] * len(beams), beam_ids=beams, target_sid=targets)
    n = len(prompts)
    return {"recall": sum(k is not None for k in ranks) / n,
            "ndcg": sum(rank_gain(k) for k in ranks if k is not None) / n,
            "beam_reward_mean": sum(r) / n, "hit_rate": sum(k is not None for k in ranks) / n,
            "prompts": n, "beam": beam}


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
        from onerec_prod.spark_server import run_on_spark

        # on the shared local Spark server when there is one, else in this process
        got = run_on_spark(cfg, "rl_prompt_rows", dt)
        rows, versions = got["rows"], {"samples": got["version"]}
    rows.sort(key=lambda r: str(r.get("sample_id")))
    prompts = [p for p in (_prompt_from_row(r) for r in rows) if p is not None]
    sid_versions = sorted({r["sid_version"] for r in rows if r.get("sid_version")})
    return prompts, sid_versions, versions


def rl_prompt_rows_on(spark, cfg: Config, dt: str) -> dict[str, Any]:
    """The ``rl_prompt`` rows of day ``dt`` in the newest ``samples`` version, read in ``spark``'s
    process (a ``spark_server.SPARK_CALLS`` entry): ``{"rows": [...], "version": v}``."""
    from pyspark.sql import functions as F

    from onerec_prod.lake import read_table, table_path, table_version

    path = table_path(cfg, "samples")
    v = table_version(spark, path)
    if v is None:
        raise FileNotFoundError(f"samples table not found at {path}: run build_samples for dt={dt}")
    df = (read_table(spark, path, v).where((F.col("task") == "rl_prompt") & (F.col("dt") == dt))
          .select("sample_id", "messages", "target_sid", "sid_version", "response"))
    return {"rows": [r.asDict() for r in df.collect()], "version": v}


def load_catalog_sids(cfg: Config, sid_version: str | None, catalog_path: str | Path | None = None
                      ) -> list[tuple[int, ...]]:
    """Every catalog SID of ``sid_version`` (the trie is never built from targets only)."""
    if catalog_path is not None:
        rows = [json.loads(line) for line in Path(catalog_path).read_text().splitlines() if line.strip()]
    else:
        from onerec_prod.registry.pyfunc import read_catalog

        rows = read_catalog(cfg)
    sids = {tuple(int(c) for c in r["sid"]) for r in rows if r.get("sid") is not None
            and (sid_version is None or r.get("sid_version") in (None, sid_version))}
    if not sids:
        raise ValueError(f"no catalog SIDs of sid_version {sid_version!r}")
    return sorted(sids)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def default_rewards(tok, vocab, gcfg: GrpoCfg) -> list[RewardSpec]:
    """The recommendation reward (hit, rank-aware, prefix terms with the ``reward_*`` weights),
    plus ``format_reward`` x think-format in think mode when that weight is > 0."""
    from onerec_prod.eval.beam import think_stop_ids
    from onerec_prod.train.rewards import get_reward

    out: list[RewardSpec] = [(get_reward("rec", vocab=vocab, hit=gcfg.reward_hit, rank=gcfg.reward_rank,
                                         prefix=gcfg.reward_prefix), 1.0)]
    if gcfg.mode == "think" and gcfg.format_reward > 0:
        blank = [i for t, i in tok.get_vocab().items() if tok.convert_tokens_to_string([t]).strip() == ""]
        out.append((get_reward("think_format", think_end_id=think_stop_ids(tok)[0], blank_ids=blank),
                    gcfg.format_reward))
    return out


def split_eval(prompts: Sequence[RlPrompt], n_eval: int, seed: int) -> tuple[list[RlPrompt], list[RlPrompt], bool]:
    """``(train, eval, held_out)``: a seeded sample of ``n_eval`` prompts held out of training when
    at least as many remain to train on; else every prompt trains and the eval set overlaps it."""
    n_eval = min(n_eval, len(prompts))
    pick = set(random.Random(seed).sample(range(len(prompts)), n_eval))
    ev = [p for i, p in enumerate(prompts) if i in pick]
    tr = [p for i, p in enumerate(prompts) if i not in pick]
    if len(tr) >= max(n_eval, 1):
        return tr, ev, True
    return list(prompts), ev, False


WORKER_MODULE = "onerec_prod.train.grpo_worker"
RESULT_FILE = "result.json"


def write_prompts(prompts: Sequence[RlPrompt], path: Path) -> Path:
    """``prompts`` as JSONL (``sample_id, messages, target_sid, history_sids``), the workers' input."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"sample_id": p.sample_id, "messages": p.messages,
                                        "target_sid": list(p.target_sid),
                                        "history_sids": [list(s) for s in p.history_sids]}) + "\n"
                            for p in prompts))
    return path


def read_prompts(path: str | Path) -> list[RlPrompt]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [RlPrompt(r["sample_id"], r["messages"], tuple(int(c) for c in r["target_sid"]),
                     [tuple(s) for s in r.get("history_sids") or []]) for r in rows]


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

    Returns ``{model_dir, mode, steps, reward_curve, before, after, prompts, train_prompts,
    eval_held_out, signal_groups, resumed_from, seconds}``: ``before``/``after`` are :func:`evaluate_prompts` (Recall/NDCG at
    ``eval.beam_size``, Rollout-Beam reward) on ``grpo.eval_prompts`` of the day's prompts, held out
    of training when there are enough; ``reward_curve`` one entry per step
    (:func:`step_metrics`); ``signal_groups`` the mean share of groups with signal. Re-running with
    the same inputs is a no-op.
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
    from onerec_prod.train.day import candidates_dir

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
    t_start = time.perf_counter()
    max_items = cfg.samples.max_history
    n_day = len(prompts)
    prompts, eval_set, held_out = split_eval(prompts, gcfg.eval_prompts, gcfg.seed)
    ev = {"beam": cfg.eval.beam_size, "max_items": max_items}
    before = evaluate_prompts(policy, tok, eval_set, trie, vocab, gcfg, **ev)
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
                         ckpt_dir=ckpt, meta=meta, max_items=max_items)
    after = evaluate_prompts(res.model, tok, eval_set, trie, vocab, gcfg, **ev)
    summary = {"mode": gcfg.mode, "steps": gcfg.steps, "prompts": n_day, "train_prompts": len(prompts),
               "reward_curve": res.curve,
               "before": before, "after": after, "eval_held_out": held_out, "resumed_from": res.resumed_from,
               "signal_groups": (sum(c["signal_groups"] for c in res.curve) / len(res.curve)) if res.curve else 0.0,
               "catalog_items": trie.num_items, "seconds": round(time.perf_counter() - t_start, 1)}
    save_model(res.model, tok, out, {**meta, "rl": summary})
    shutil.rmtree(work, ignore_errors=True)
    log.info("rl dt=%s (%s): recall@%d %.3f -> %.3f, ndcg %.3f -> %.3f (%d eval prompts) -> %s", dt, gcfg.mode,
             before["beam"], before["recall"], after["recall"], before["ndcg"], after["ndcg"], before["prompts"], out)
    return {**summary, "model_dir": str(out)}
