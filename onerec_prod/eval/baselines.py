"""Baselines scored next to the model in every report, on the same users and targets.

* :class:`MostPop`: items ranked by their count in the training events (ties: item id), the
  same list for everyone; nothing is excluded (the history items stay eligible, as for the model).
* SASRec (:mod:`onerec_prod.eval.sasrec`): a standard self-attentive sequential recommender
  trained on the same training sequences, full ranking over every item.

:func:`run_baselines` trains the configured ones and returns their metrics.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from onerec_prod.eval.metrics import compute_metrics

log = logging.getLogger(__name__)

BASELINES = ("mostpop", "sasrec")


class MostPop:
    """Most popular items of the training events.

    >>> MostPop.fit([["a", "b"], ["b", "c"], ["b"]]).recommend([["x"]], k=2)
    [['b', 'a']]
    """

    def __init__(self, ranking: list[str], counts: dict[str, int]) -> None:
        self.ranking = ranking
        self.counts = counts

    @classmethod
    def fit(cls, sequences: Iterable[Sequence[str]]) -> MostPop:
        return cls.from_counts(Counter(item for seq in sequences for item in seq))

    @classmethod
    def from_counts(cls, counts: Mapping[str, int]) -> MostPop:
        """From events per item (e.g. counted by Spark): the same ranking as :meth:`fit`.

        >>> MostPop.from_counts({"a": 1, "b": 3, "c": 1}).ranking
        ['b', 'a', 'c']
        """
        ranking = sorted(counts, key=lambda it: (-counts[it], str(it)))
        return cls(ranking, dict(counts))

    def recommend(self, histories: Sequence[Sequence[str]], k: int) -> list[list[str]]:
        top = self.ranking[:k]
        return [list(top) for _ in histories]


def run_baselines(
    names: Sequence[str],
    train_sequences: Sequence[Sequence[str]],
    histories: Sequence[Sequence[str]],
    targets: Sequence[str],
    ks: Sequence[int],
    *,
    sasrec_params: dict[str, Any] | None = None,
    seed: int = 0,
    mostpop_counts: Mapping[str, int] | None = None,
    sasrec_cache: tuple[Any, str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Train each baseline in ``names`` on ``train_sequences`` and score it on ``histories``/``targets``.

    ``mostpop_counts``: MostPop's events per item come from these instead (e.g. the trailing days':
    on a next-day eval recent popularity is a far stronger baseline than all-time counts).
    ``sasrec_cache``: ``(cache_dir, dt)``: warm-start SASRec from the newest cached earlier day and
    train it on the sequences that changed since (:func:`onerec_prod.eval.sasrec.warm_sasrec`).

    Raises:
        ValueError: an unknown baseline name (the message lists the valid ones).
    """
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baselines {unknown} (valid: {', '.join(BASELINES)})")
    from onerec_prod.eval.stats import per_user_gains, summarize

    k_max = max(ks)
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        t0 = time.perf_counter()
        if name == "mostpop":
            pop = MostPop.fit(train_sequences) if mostpop_counts is None else MostPop.from_counts(mostpop_counts)
            ranked = pop.recommend(histories, k_max)
        else:
            from onerec_prod.eval.sasrec import SasrecParams, train_sasrec, warm_sasrec

            params = SasrecParams(**(sasrec_params or {}), seed=seed)
            warm: dict[str, Any] = {}
            if sasrec_cache is not None:
                model, warm = warm_sasrec(train_sequences, params, *sasrec_cache)
            else:
                model = train_sasrec(train_sequences, params)
            ranked = model.recommend(histories, k_max)
        metrics = compute_metrics(ranked, targets, ks)
        if name == "sasrec" and warm:
            metrics["warm_start"] = warm
        metrics["intervals"] = summarize(per_user_gains(ranked, targets, k_max), seed=seed)
        metrics["seconds"] = round(time.perf_counter() - t0, 2)
        log.info("baseline %s: %s", name, {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)})
        out[name] = metrics
    return out
