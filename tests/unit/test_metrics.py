"""Recall@K / NDCG@K on cases small enough to work out by hand (STYLE B7): exact values."""

from __future__ import annotations

import math

import pytest

from onerec_prod.eval.metrics import compute_metrics, ndcg_at_k, recall_at_k, target_rank

L2 = math.log2


@pytest.mark.parametrize(
    "ranked, target, valid, expected",
    [
        (["a", "b", "c"], "a", None, 1),               # top-1
        (["a", "b", "c"], "c", None, 3),               # last
        (["a", "b", "c"], "z", None, None),            # miss
        ([], "a", None, None),                         # empty list
        (["a", "a", "a", "b"], "b", None, 2),          # duplicates collapse: b is the 2nd distinct item
        (["b", "a", "b"], "b", None, 1),               # duplicate of the target: first occurrence counts
        ([None, "b"], "b", None, 2),                   # an invalid slot (None) still takes its rank
        (["x", "b"], "b", {"b"}, 2),                   # an invalid id keeps its slot, never matches
        (["x", "b"], "x", {"b"}, None),                # target outside the valid set never matches
        (["a"], None, None, None),                     # user without a target
        ([None, None, "b"], "b", None, 3),             # None is not deduplicated (each wastes a slot)
        ([(1, 2), (3, 4)], (3, 4), None, 2),           # SID tuples work the same
    ],
)
def test_target_rank(ranked, target, valid, expected):
    assert target_rank(ranked, target, valid) == expected


def test_recall_hand_values():
    ranked = [["a", "b", "c"], ["c", "a"], [], ["d"]]
    targets = ["b", "a", "a", "x"]
    # ranks: 2, 2, none, none
    assert recall_at_k(ranked, targets, 1) == 0.0
    assert recall_at_k(ranked, targets, 2) == 0.5      # 2 of 4 users: empty/missed users count 0
    assert recall_at_k(ranked, targets, 10) == 0.5     # K beyond every list


def test_ndcg_hand_values():
    ranked = [["a", "b", "c"], ["c", "a", "b"], ["a"], ["z", "y"]]
    targets = ["a", "b", "b", "y"]
    # ranks: 1 -> 1.0; 3 -> 1/log2(4) = 0.5; miss -> 0; 2 -> 1/log2(3)
    assert ndcg_at_k(ranked, targets, 3) == pytest.approx((1.0 + 0.5 + 0.0 + 1 / L2(3)) / 4, abs=1e-12)
    assert ndcg_at_k(ranked, targets, 2) == pytest.approx((1.0 + 0.0 + 0.0 + 1 / L2(3)) / 4, abs=1e-12)
    assert ndcg_at_k(ranked, targets, 1) == 0.25


def test_duplicates_never_count_twice():
    # the public eval padded short lists with repeats and summed every occurrence: NDCG > 1 possible
    ranked = [["a", "a", "a", "a", "a"]]
    assert ndcg_at_k(ranked, ["a"], 5) == 1.0
    assert recall_at_k(ranked, ["a"], 5) == 1.0
    # duplicates do not push the target down either: b is the 2nd distinct item
    assert ndcg_at_k([["a", "a", "b"]], ["b"], 2) == pytest.approx(1 / L2(3), abs=1e-12)


def test_ties_are_positional():
    # metrics see a ranked list: two items with equal model scores keep the order given
    assert ndcg_at_k([["a", "b"]], ["b"], 2) == pytest.approx(0.6309297535714574, abs=1e-12)


def test_mean_over_all_users_including_failures():
    ranked = [["t"]] + [[] for _ in range(9)]
    targets = ["t"] + ["u"] * 9
    assert recall_at_k(ranked, targets, 5) == 0.1
    assert ndcg_at_k(ranked, targets, 5) == 0.1


def test_compute_metrics_keys_and_values():
    got = compute_metrics([["a", "b"], ["b"]], ["b", "c"], [1, 2])
    assert got == {"recall@1": 0.0, "ndcg@1": 0.0, "recall@2": 0.5, "ndcg@2": pytest.approx(0.5 / L2(3))}
    assert list(got) == ["recall@1", "ndcg@1", "recall@2", "ndcg@2"]


@pytest.mark.parametrize(
    "ranked, targets, k, message",
    [
        ([["a"]], ["a"], 0, "k must be"),             # K = 0
        ([["a"]], ["a"], -1, "k must be"),            # negative K
        ([["a"]], ["a"], 2.0, "k must be"),           # float K
        ([["a"]], ["a", "b"], 1, "one ranked list"),  # lengths differ
        ([], [], 1, "no users"),                      # nobody to average over
    ],
)
def test_bad_arguments(ranked, targets, k, message):
    with pytest.raises(ValueError, match=message):
        recall_at_k(ranked, targets, k)
    with pytest.raises(ValueError, match=message):
        ndcg_at_k(ranked, targets, k)
