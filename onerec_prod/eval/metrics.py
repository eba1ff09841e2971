"""Leave-one-out ranking metrics: Recall@K (= hit rate) and NDCG@K, one target per user.

Definitions (the paper's, written down so the edge cases are decided once):

* Each user has one held-out target and a ranked list of predictions, best first.
* Duplicates count once: the list is reduced to its distinct entries, first occurrence kept,
  before the cut at K (a repeated item never fills two slots, never scores twice).
* An invalid prediction (``None``, or not in ``valid`` when given) keeps its slot but never
  matches: the model spent that slot.
* ``rank`` = 1-based position of the target in the reduced list. Recall@K = 1 if rank <= K;
  NDCG@K = 1 / log2(rank + 1) if rank <= K (the ideal DCG of a single target is 1), else 0.
* K larger than the list is fine (nothing beyond the list can hit). An empty list scores 0.
* The mean runs over ALL users given: a user with no (valid) prediction, or whose target is
  ``None``, counts as 0. Nobody is dropped, nothing is averaged per shard.

    >>> recall_at_k([["a", "b"], ["c"]], ["b", "x"], k=2)
    0.5
    >>> round(ndcg_at_k([["a", "b"]], ["b"], k=2), 4)
    0.6309
"""

from __future__ import annotations

import math
from collections.abc import Container, Hashable, Sequence

Item = Hashable


def _check(ranked: Sequence[Sequence[Item]], targets: Sequence[Item], k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if len(ranked) != len(targets):
        raise ValueError(
            f"one ranked list per target expected: {len(ranked)} lists vs {len(targets)} targets"
        )
    if len(targets) == 0:
        raise ValueError("no users to evaluate (empty targets): a mean over 0 users is undefined")


def target_rank(ranked: Sequence[Item], target: Item, valid: Container | None = None) -> int | None:
    """1-based rank of ``target`` among the distinct entries of ``ranked`` (None if absent).

    >>> target_rank(["a", "a", None, "b"], "b")
    3
    """
    if target is None or (valid is not None and target not in valid):
        return None
    seen: set = set()
    rank = 0
    for item in ranked:
        if item is not None and item in seen:
            continue  # a duplicate: counted once, at its first occurrence
        if item is not None:
            seen.add(item)
        rank += 1
        if item is not None and item == target and (valid is None or item in valid):
            return rank
    return None


def recall_at_k(
    ranked: Sequence[Sequence[Item]], targets: Sequence[Item], k: int, valid: Container | None = None
) -> float:
    """Share of users whose target is in their top ``k`` distinct predictions."""
    _check(ranked, targets, k)
    hits = 0
    for preds, tgt in zip(ranked, targets, strict=True):
        r = target_rank(preds, tgt, valid)
        hits += r is not None and r <= k
    return hits / len(targets)


def ndcg_at_k(
    ranked: Sequence[Sequence[Item]], targets: Sequence[Item], k: int, valid: Container | None = None
) -> float:
    """Mean over users of ``1 / log2(rank + 1)`` when the target ranks within ``k``, else 0."""
    _check(ranked, targets, k)
    total = 0.0
    for preds, tgt in zip(ranked, targets, strict=True):
        r = target_rank(preds, tgt, valid)
        if r is not None and r <= k:
            total += 1.0 / math.log2(r + 1)
    return total / len(targets)


def compute_metrics(
    ranked: Sequence[Sequence[Item]],
    targets: Sequence[Item],
    ks: Sequence[int],
    valid: Container | None = None,
) -> dict[str, float]:
    """``{"recall@K": ..., "ndcg@K": ...}`` for every K in ``ks`` (keys in that order).

    >>> compute_metrics([["a", "b"]], ["a"], [1, 2])
    {'recall@1': 1.0, 'ndcg@1': 1.0, 'recall@2': 1.0, 'ndcg@2': 1.0}
    """
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = recall_at_k(ranked, targets, k, valid)
        out[f"ndcg@{k}"] = ndcg_at_k(ranked, targets, k, valid)
    return out
