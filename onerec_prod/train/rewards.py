"""Reward functions of the RL refresh (GRPO), scored on token ids, never on decoded text.

Every reward has TRL's signature ``f(completions, **kwargs) -> list[float | None]`` (one value
per rollout; ``None`` skips it), so it also plugs into ``trl.GRPOTrainer``. Parameterised
rewards are small picklable objects built by a factory; :data:`REWARDS` maps a name to its
factory and :func:`get_reward` raises with the valid names on an unknown one.

- ``rollout_beam``: the Rollout-Beam reward (DESIGN.md §5): for each rollout, the max over its
  beam of the number of leading SID levels that match the target (``0..L``).
- ``think_format``: 1.0 for a well-formed think block: at least ``min_tokens`` non-blank rationale
  tokens, then ``</think>`` (exactly once), else 0.0.
- ``rec``: the reward of the RL refresh (:class:`RecReward`), in two readings:

  * direct mode (a rollout is one of the G distinct candidates of a constrained beam, at rank
    ``k``): ``hit x [candidate == target] + prefix x matched_levels / L
    - rank x [candidate != target] / log2(k + 2)``. The rank term is the rank-aware part: a wrong
    candidate costs more the higher it sits (it takes a slot the target needs), so groups carry
    signal even when no candidate hits;
  * think mode (Rollout-Beam, the OneRec-Think paper: a rollout is a rationale followed by a beam
    of final SIDs): ``hit x 1 / log2(k + 2)`` when the target is at rank ``k`` of that beam (0 when
    absent) ``+ prefix x (max matched levels over the beam) / L``.

Why ids: decoding with ``skip_special_tokens=True`` drops the SID markers, and a decoded string
can be re-tokenized differently; the token ids are what the policy produced.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from onerec_prod.sid.tokens import SidVocab

RewardFn = Callable[..., list[float | None]]


def _as_beam(item: Any) -> list[Sequence[int]]:
    """A rollout's completion as a beam: a flat id list is a beam of one sequence."""
    if item is None:
        return []
    seq = list(item)
    if seq and all(isinstance(x, int) for x in seq):
        return [seq]
    return [list(s) for s in seq]


def prefix_match(ids: Sequence[int], target: Sequence[int], vocab: SidVocab) -> int:
    """Leading SID levels of ``ids`` that match ``target`` (0 when ``<|sid_begin|>`` is missing).

    ``ids`` is read from its first ``<|sid_begin|>`` on (so a whole completion, rationale
    included, works too); level ``l`` must be a level-``l`` token with the target's code.

    >>> v = SidVocab(begin_id=1, end_id=2, level_ids=((10, 11), (20, 21)))
    >>> prefix_match([1, 11, 20, 2], (1, 0), v), prefix_match([1, 11, 21], (1, 0), v)
    (2, 1)
    """
    ids = [int(t) for t in ids]
    try:
        start = ids.index(vocab.begin_id) + 1
    except ValueError:
        return 0
    n = 0
    for level, code in enumerate(target[: vocab.num_levels]):
        pos = start + level
        if pos >= len(ids) or vocab.code_of(level, ids[pos]) != int(code):
            break
        n += 1
    return n


class RolloutBeamReward:
    """Rollout-Beam reward (picklable); build with :func:`get_rollout_beam_reward`.

    Call as ``reward(completions, completion_ids=..., target_sid=...)`` or with ``beam_ids=``:
    per rollout, a beam (list of SID token-id sequences) or one flat id sequence.
    """

    __name__ = "rollout_beam"

    def __init__(self, vocab: SidVocab, normalize: bool = False):
        self.vocab = vocab
        self.normalize = normalize

    def __call__(self, completions, completion_ids=None, target_sid=None, beam_ids=None,
                 **kwargs) -> list[float | None]:
        """Max over each rollout's beam of the leading levels matching ``target_sid``.

        Args:
            completions: one entry per rollout (only its length is used).
            completion_ids: per rollout, a beam of id sequences or one id sequence.
            target_sid: per rollout, the target codes (``None`` skips the rollout).
            beam_ids: overrides ``completion_ids`` (the GRPO loop passes the beam here and the
                rationale ids as ``completion_ids``).

        Returns:
            One float per rollout in ``0..L`` (``0..1`` with ``normalize``), or None.

        >>> v = SidVocab(begin_id=1, end_id=2, level_ids=((10, 11), (20, 21)))
        >>> r = get_rollout_beam_reward(v)
        >>> r(["a", "b"], completion_ids=[[[1, 10, 21], [1, 11, 20]], [5, 6]], target_sid=[(1, 0), (1, 0)])
        [2.0, 0.0]
        """
        beams = beam_ids if beam_ids is not None else completion_ids
        if beams is None or target_sid is None:
            raise ValueError("rollout_beam reward needs completion_ids (or beam_ids) and target_sid")
        if not (len(beams) == len(target_sid) == len(completions)):
            raise ValueError(f"rollout_beam: {len(completions)} completions, {len(beams)} beams, "
                             f"{len(target_sid)} targets")
        out: list[float | None] = []
        for beam, target in zip(beams, target_sid, strict=True):
            if target is None:
                out.append(None)
                continue
            best = max((prefix_match(seq, target, self.vocab) for seq in _as_beam(beam)), default=0)
            out.append(best / self.vocab.num_levels if self.normalize else float(best))
        return out


def get_rollout_beam_reward(vocab: SidVocab, normalize: bool = False) -> RolloutBeamReward:
    """Factory of the Rollout-Beam reward for ``vocab`` (``normalize``: divide by L)."""
    return RolloutBeamReward(vocab, normalize)


class ThinkFormatReward:
    """Well-formed think block on ids (picklable); build with :func:`get_think_format_reward`."""

    __name__ = "think_format"

    def __init__(self, think_end_id: int, blank_ids: Sequence[int] = (), min_tokens: int = 1):
        self.think_end_id = int(think_end_id)
        self.blank_ids = frozenset(int(i) for i in blank_ids)
        self.min_tokens = int(min_tokens)

    def __call__(self, completions, completion_ids=None, **kwargs) -> list[float | None]:
        """1.0 when the rationale ids hold >= ``min_tokens`` non-blank tokens, then ``</think>`` once.

        Args:
            completions: one entry per rollout (only its length is used).
            completion_ids: per rollout, the ids generated after ``<think>`` (rationale, then
                ``</think>`` when the model closed the block; anything may follow it).

        Returns:
            1.0 or 0.0 per rollout.

        >>> r = get_think_format_reward(think_end_id=9, blank_ids=[0])
        >>> r(["", "", "", ""], completion_ids=[[4, 5, 9], [0, 9], [4, 5], [4, 9, 9]])
        [1.0, 0.0, 0.0, 0.0]
        """
        if completion_ids is None or len(completion_ids) != len(completions):
            raise ValueError("think_format reward needs completion_ids, one per completion")
        out: list[float | None] = []
        for ids in completion_ids:
            ids = [int(t) for t in ids]
            if ids.count(self.think_end_id) != 1:
                out.append(0.0)
                continue
            body = ids[: ids.index(self.think_end_id)]
            ok = sum(t not in self.blank_ids for t in body) >= self.min_tokens
            out.append(1.0 if ok else 0.0)
        return out


def get_think_format_reward(think_end_id: int, blank_ids: Sequence[int] = (),
                            min_tokens: int = 1) -> ThinkFormatReward:
    """Factory of the think-format reward (``blank_ids``: whitespace-only token ids)."""
    return ThinkFormatReward(think_end_id, blank_ids, min_tokens)


def rank_gain(rank: int) -> float:
    """DCG gain of rank ``rank`` (0-based): ``1 / log2(rank + 2)``.

    >>> rank_gain(0), round(rank_gain(2), 3)
    (1.0, 0.5)
    """
    return 1.0 / math.log2(rank + 2)


class RecReward:
    """Reward of a recommendation rollout (picklable); build with :func:`get_rec_reward`.

    Call as ``reward(completions, beam_ids=..., target_sid=..., own_rank=...)``: per rollout the
    beam (SID token-id sequences, best first) and, in direct mode, the rank of the rollout's own
    candidate in it (``own_rank[i]`` None or ``own_rank`` None: the Rollout-Beam reading).
    """

    __name__ = "rec"

    def __init__(self, vocab: SidVocab, hit: float = 1.0, rank: float = 0.0, prefix: float = 0.0):
        self.vocab, self.hit, self.rank, self.prefix = vocab, float(hit), float(rank), float(prefix)

    def one(self, beam: Sequence[Sequence[int]], target: Sequence[int], own: int | None) -> float:
        """Reward of one rollout (see the module docstring).

        >>> v = SidVocab(begin_id=1, end_id=2, level_ids=((10, 11), (20, 21)))
        >>> r = get_rec_reward(v, hit=1.0, rank=0.5, prefix=0.5)
        >>> beam = [[1, 11, 21], [1, 11, 20]]
        >>> r.one(beam, (1, 0), own=1), r.one(beam, (1, 0), own=0), round(r.one(beam, (1, 0), own=None), 3)
        (1.5, -0.25, 1.131)
        """
        levels = self.vocab.num_levels
        match = [prefix_match(seq, target, self.vocab) for seq in beam]
        if own is not None:
            m = match[own]
            hit = m == levels
            return self.hit * hit + self.prefix * m / levels - (0.0 if hit else self.rank * rank_gain(own))
        at = next((k for k, m in enumerate(match) if m == levels), None)
        return (self.hit * (rank_gain(at) if at is not None else 0.0)
                + self.prefix * max(match, default=0) / levels)

    def __call__(self, completions, beam_ids=None, target_sid=None, own_rank=None, **kwargs) -> list[float | None]:
        if beam_ids is None or target_sid is None:
            raise ValueError("rec reward needs beam_ids and target_sid")
        if not (len(beam_ids) == len(target_sid) == len(completions)):
            raise ValueError(f"rec: {len(completions)} completions, {len(beam_ids)} beams, {len(target_sid)} targets")
        owns = own_rank if own_rank is not None else [None] * len(beam_ids)
        return [None if t is None else self.one(_as_beam(b), t, o)
                for b, t, o in zip(beam_ids, target_sid, owns, strict=True)]


def get_rec_reward(vocab: SidVocab, hit: float = 1.0, rank: float = 0.0, prefix: float = 0.0) -> RecReward:
    """Factory of the recommendation reward (weights of the hit, rank-aware and prefix terms)."""
    return RecReward(vocab, hit, rank, prefix)


REWARDS: dict[str, Callable[..., RewardFn]] = {
    "rollout_beam": get_rollout_beam_reward,
    "think_format": get_think_format_reward,
    "rec": get_rec_reward,
}


def get_reward(name: str, **params: Any) -> RewardFn:
    """Build reward ``name`` with ``params``; an unknown name lists the valid ones.

    >>> get_reward("nope")
    Traceback (most recent call last):
    ...
    KeyError: "unknown reward 'nope' (valid: rollout_beam, think_format, rec)"
    """
    try:
        factory = REWARDS[name]
    except KeyError:
        raise KeyError(f"unknown reward {name!r} (valid: {', '.join(REWARDS)})") from None
    return factory(**params)
