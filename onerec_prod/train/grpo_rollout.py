"""GRPO rollouts: groups of G distinct candidates per prompt, decoded by :mod:`onerec_prod.eval.beam`.

Why beams and not sampling: the SID space is small and the SFT policy is peaked, so G sampled
rollouts of a prompt keep drawing the same item (or, with a free rationale, the same empty think
block): every reward of the group is equal, every advantage is 0, and the weights do not move.
A trie-constrained beam gives G *distinct* catalog items per prompt, so a group carries signal
whenever any two candidates differ in reward (with the rank-aware and prefix terms of
:class:`onerec_prod.train.rewards.RecReward`, nearly always).

Two modes (``grpo.mode``):

- ``direct`` (the serving path): the prompt is the user's SID stream
  (:func:`onerec_prod.samples.stream.stream_prompt_ids`, exactly what eval and precompute decode
  from); one beam of ``group_size`` gives the group; rollout ``k`` is the rank-``k`` candidate;
  its completion is ``<|sid_begin|>`` + the level tokens (the marker is forced, not trained).
- ``think``: the reasoning chat prompt; G rationales are *sampled* (``temperature``,
  ``min_think_tokens``) after ``<think>\\n`` -- one per rollout, so the rationales vary within a
  group -- then ``\\n</think>\\n\\n`` is forced and a beam of ``beam_size`` final SIDs is decoded
  after each rationale; the Rollout-Beam reward scores that beam; the completion trained is the
  rationale + the top SID (the forced close and marker are masked).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from onerec_prod.eval.beam import beam_search_sids, sample_rationale_ids, think_stop_ids
from onerec_prod.samples.prompts import inference_prompt_ids
from onerec_prod.samples.stream import stream_prompt_ids
from onerec_prod.samples.templates import THINK_CLOSE


@dataclass
class RlPrompt:
    """One RL prompt: chat messages (think mode), the history SIDs (direct mode), the target SID.

    ``history_sids`` empty: read from the SIDs written in the messages (the ``rl_prompt`` samples
    render the history with its SIDs).
    """

    sample_id: str
    messages: list[dict[str, str]]
    target_sid: tuple[int, ...]
    history_sids: list[tuple[int, ...]] = field(default_factory=list)

    def history(self) -> list[tuple[int, ...]]:
        if self.history_sids:
            return [tuple(s) for s in self.history_sids]
        from onerec_prod.sid.tokens import parse_sids

        text = "\n".join(m["content"] for m in self.messages if m.get("role") == "user")
        return [tuple(int(c) for c in s) for s in parse_sids(text)]


@dataclass
class Rollouts:
    """A batch of rollouts, one entry per rollout; ``group[i]`` is rollout i's prompt index."""

    prompt_ids: list[list[int]]        # what the completion follows
    completion: list[list[int]]        # trained / scored ids after prompt_ids
    train_mask: list[list[int]]        # 1 on the policy's own tokens
    beams: list[list[list[int]]]       # per rollout, its beam of SID token ids, best first
    own_rank: list[int | None]         # direct: the rollout's rank in its beam; think: None
    think_ids: list[list[int]]         # sampled rationale ids (+ stop token); [] in direct mode
    texts: list[str]                   # rationale text ("" in direct mode)
    targets: list[tuple[int, ...]]
    group: list[int]
    shared_prompt: bool = False        # direct: prompt_ids[i] == prompts[group[i]] for all i
    prompts: list[list[int]] = field(default_factory=list)  # one per group (direct mode)


def direct_rollout(model, prompts: Sequence[RlPrompt], trie, vocab, *, group: int, max_items: int,
                   batch_size: int = 16) -> Rollouts:
    """Direct mode: the ``group`` best distinct catalog SIDs of each stream prompt."""
    streams = [stream_prompt_ids(vocab, p.history(), max_items) for p in prompts]
    found = beam_search_sids(model, streams, trie, vocab, group, batch_size=batch_size)
    ro = Rollouts([], [], [], [], [], [], [], [], [], shared_prompt=True, prompts=streams)
    for gi, (p, s, per) in enumerate(zip(prompts, streams, found, strict=True)):
        beam = [vocab.encode(codes)[:-1] for codes, _ in per]  # <|sid_begin|> + level tokens
        for k, ids in enumerate(beam):
            ro.prompt_ids.append(s)
            ro.completion.append(ids)
            ro.train_mask.append([0] + [1] * (len(ids) - 1))
            ro.beams.append(beam)
            ro.own_rank.append(k)
            ro.think_ids.append([])
            ro.texts.append("")
            ro.targets.append(p.target_sid)
            ro.group.append(gi)
    return ro


def think_rollout(model, tok, prompts: Sequence[RlPrompt], trie, vocab, *, group: int, beam_size: int,
                  max_think_tokens: int, temperature: float, min_think_tokens: int, seed: int,
                  greedy: bool = False, batch_size: int = 16) -> Rollouts:
    """Think mode: ``group`` sampled (or greedy) rationales per prompt, each then a SID beam."""
    stops = set(think_stop_ids(tok))
    close_ids = tok(THINK_CLOSE, add_special_tokens=False)["input_ids"]
    rep = [(gi, p) for gi, p in enumerate(prompts) for _ in range(group)]
    open_ids = [inference_prompt_ids(tok, p.messages, think=True) for _, p in rep]
    think = sample_rationale_ids(model, tok, open_ids, max_think_tokens, temperature, do_sample=not greedy,
                                 seed=seed, batch_size=max(batch_size, 32),
                                 min_new_tokens=0 if greedy else min_think_tokens)
    rationale = [[t for t in ids if t not in stops] for ids in think]
    sid_prompts = [o + r + close_ids for o, r in zip(open_ids, rationale, strict=True)]
    found = beam_search_sids(model, sid_prompts, trie, vocab, beam_size, batch_size=batch_size)
    ro = Rollouts([], [], [], [], [], [], [], [], [])
    for (gi, p), o, r, t, per in zip(rep, open_ids, rationale, think, found, strict=True):
        beam = [vocab.encode(codes)[:-1] for codes, _ in per]
        top = beam[0] if beam else [vocab.begin_id]
        ro.prompt_ids.append(o)
        ro.completion.append(r + close_ids + top)
        ro.train_mask.append([1] * len(r) + [0] * len(close_ids) + [0] + [1] * (len(top) - 1))
        ro.beams.append(beam)
        ro.own_rank.append(None)
        ro.think_ids.append(t)
        ro.texts.append(tok.decode(r, skip_special_tokens=True).strip())
        ro.targets.append(p.target_sid)
        ro.group.append(gi)
    return ro


def rollout(model, tok, prompts: Sequence[RlPrompt], trie, vocab, gcfg, *, group: int | None = None,
            seed: int = 0, greedy: bool = False, max_items: int = 50) -> Rollouts:
    """Rollouts of ``prompts`` in ``gcfg.mode`` (``group`` defaults to ``gcfg.group_size``)."""
    g = group or gcfg.group_size
    if gcfg.mode == "direct":
        return direct_rollout(model, prompts, trie, vocab, group=g, max_items=max_items)
    return think_rollout(model, tok, prompts, trie, vocab, group=g, beam_size=gcfg.beam_size,
                         max_think_tokens=gcfg.max_think_tokens, temperature=gcfg.temperature,
                         min_think_tokens=gcfg.min_think_tokens, seed=seed, greedy=greedy)


def score(rewards: Sequence[tuple[Any, float]], ro: Rollouts) -> list[float]:
    """Weighted sum of the reward functions over ``ro`` (a ``None`` counts as 0)."""
    total = [0.0] * len(ro.texts)
    for fn, w in rewards:
        vals = fn(ro.texts, completion_ids=ro.think_ids, beam_ids=ro.beams, target_sid=ro.targets,
                  own_rank=ro.own_rank)
        total = [t + w * (v or 0.0) for t, v in zip(total, vals, strict=True)]
    return total
