"""Rewards of the RL refresh: hand cases with exact values, registry, pickling."""

from __future__ import annotations

import doctest
import pickle

import pytest

from onerec_prod.sid.tokens import SidVocab
from onerec_prod.train import rewards
from onerec_prod.train.rewards import (
    get_rec_reward,
    get_reward,
    get_rollout_beam_reward,
    get_think_format_reward,
)

# begin=1, end=2; level l code c -> 100 * (l + 1) + c (4 levels x 4 codes)
VOCAB = SidVocab(begin_id=1, end_id=2,
                 level_ids=tuple(tuple(100 * (l + 1) + c for c in range(4)) for l in range(4)))
B, E = 1, 2


def sid(*codes):
    return [B] + [100 * (l + 1) + c for l, c in enumerate(codes)] + [E]


TARGET = (1, 2, 3, 0)


def test_rollout_beam_hand_cases():
    beams = [
        [sid(1, 2, 3, 0)],                         # exact match
        [sid(1, 2, 0, 0)],                         # prefix only (2 levels)
        [sid(1, 0, 3, 0)],                         # first level only; later matches do not count
        [sid(0, 2, 3, 0)],                         # no match at level 0
        [[B, 201, 202, 303, 400, E]],              # malformed: level-b token at level a
        [[101, 202, 303, 400, E]],                 # malformed: missing <|sid_begin|>
        [[B, 101, 202]],                           # truncated after two levels
        [],                                        # empty beam
        [sid(0, 0, 0, 0), sid(1, 2, 3, 1), sid(1, 0, 0, 0)],  # beam max: the 2nd beam, 3 levels
        sid(1, 2, 3, 0),                           # a flat sequence is a beam of one
        [7, 8, 9] + sid(1, 2, 0, 0)[:-1],          # full completion: read from the first begin
    ]
    r = get_rollout_beam_reward(VOCAB)
    got = r([""] * len(beams), completion_ids=beams, target_sid=[TARGET] * len(beams))
    assert got == [4.0, 2.0, 1.0, 0.0, 0.0, 0.0, 2.0, 0.0, 3.0, 4.0, 2.0]


def test_rollout_beam_beam_ids_override_normalize_and_skip():
    r = get_rollout_beam_reward(VOCAB, normalize=True)
    got = r(["", ""], completion_ids=[[5], [5]], beam_ids=[[sid(1, 2, 0, 0)], [sid(1, 2, 3, 0)]],
            target_sid=[TARGET, None])               # None target: skipped
    assert got == [0.5, None]


def test_rollout_beam_length_mismatch():
    with pytest.raises(ValueError, match="completions"):
        get_rollout_beam_reward(VOCAB)(["a"], completion_ids=[[sid(1, 2, 3, 0)]] * 2, target_sid=[TARGET])


def test_think_format_hand_cases():
    end, nl = 9, 0
    ids = [
        [4, 5, end],              # well formed
        [4, 5, end, B, 101],      # well formed, SID after it
        [end],                    # empty rationale
        [nl, nl, end],            # blank rationale
        [4, 5, 6],                # no closing </think> (ran out of tokens)
        [4, end, 5, end],         # closed twice
    ]
    r = get_think_format_reward(think_end_id=end, blank_ids=[nl])
    assert r([""] * len(ids), completion_ids=ids) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_registry_and_pickle():
    r = get_reward("rollout_beam", vocab=VOCAB)
    f = get_reward("think_format", think_end_id=9)
    for fn in (r, f):
        back = pickle.loads(pickle.dumps(fn))
        assert type(back) is type(fn)
    assert pickle.loads(pickle.dumps(r))([""], completion_ids=[[sid(1, 2, 3, 0)]], target_sid=[TARGET]) == [4.0]
    with pytest.raises(KeyError, match="valid: rollout_beam, think_format, rec"):
        get_reward("recall")


def test_doctests():
    res = doctest.testmod(rewards)
    assert res.attempted >= 4 and res.failed == 0


def test_rec_reward_direct_mode_hand_cases():
    """Direct mode: the rollout is the candidate at ``own_rank`` of its group's beam."""
    beam = [sid(1, 2, 0, 0), sid(0, 0, 0, 0), sid(1, 2, 3, 0), sid(1, 2, 3, 1)]
    r = get_rec_reward(VOCAB, hit=1.0, rank=0.5, prefix=0.5)
    got = r([""] * 4, beam_ids=[beam] * 4, target_sid=[TARGET] * 4, own_rank=[0, 1, 2, 3])
    log2 = __import__("math").log2
    want = [0.5 * 2 / 4 - 0.5 / log2(2),   # 2 levels right, wrong item at rank 0: the largest penalty
            0.0 - 0.5 / log2(3),           # nothing right at rank 1
            1.0 + 0.5,                     # the hit: no rank penalty
            0.5 * 3 / 4 - 0.5 / log2(5)]   # 3 levels right at rank 3
    assert got == pytest.approx(want)
    # every candidate differs in reward: the group carries signal although only one hits
    assert len(set(round(v, 9) for v in got)) == 4
    # without the rank term, candidates with equal prefixes tie
    flat = get_rec_reward(VOCAB, hit=1.0, rank=0.0, prefix=0.0)
    assert flat([""] * 4, beam_ids=[beam] * 4, target_sid=[TARGET] * 4, own_rank=[0, 1, 2, 3]) == [0, 0, 1, 0]


def test_rec_reward_rollout_beam_reading():
    """Think mode (own_rank None): the target's rank in the beam of final SIDs, plus best prefix."""
    r = get_rec_reward(VOCAB, hit=1.0, rank=0.5, prefix=0.5)
    beams = [[sid(1, 2, 3, 0)], [sid(0, 0, 0, 0), sid(1, 0, 0, 0), sid(1, 2, 3, 0)], [sid(1, 2, 0, 0)], []]
    got = r([""] * 4, beam_ids=beams, target_sid=[TARGET] * 4)
    assert got == pytest.approx([1.0 + 0.5, 1 / __import__("math").log2(4) + 0.5, 0.25, 0.0])
    assert r([""], beam_ids=[[sid(1, 2, 3, 0)]], target_sid=[None]) == [None]
    assert pickle.loads(pickle.dumps(r)).one([sid(1, 2, 3, 0)], TARGET, 0) == 1.5
