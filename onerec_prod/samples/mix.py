"""The daily training mix: day D's samples plus a seeded replay sample of earlier days.

Incremental training continues yesterday's model on today's data; replaying a slice of older
samples keeps it from forgetting. Everything is a function of ``(seed, D, sample_id)``:

- replay candidates are samples with ``D - lookback_days <= dt < D`` (same ``sid_version`` and
  tasks as day D; the caller filters those);
- ``round(len(new) * fraction)`` of them are taken (all if fewer), those with the smallest
  ``rank_key(seed, D, "replay", sample_id)``;
- the mix is ordered by ``rank_key(seed, D, "order", sample_id)``.

The table-scale export (:func:`onerec_prod.samples.export.export_training_mix`) selects the replay
rows with the same key in Spark (:func:`rank_col`, ``sha2``), so it and :func:`select_replay` agree
row for row (tested).
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Mapping, Sequence
from typing import Any

from onerec_prod.samples.builders import rank_key


def replay_count(n_new: int, fraction: float, n_available: int) -> int:
    """Replay rows for ``n_new`` new rows: ``round(n_new * fraction)`` (half up), capped.

    >>> replay_count(10, 0.5, 100), replay_count(3, 0.5, 100), replay_count(10, 0.5, 2)
    (5, 2, 2)
    """
    if fraction < 0:
        raise ValueError(f"replay fraction must be >= 0, got {fraction}")
    return min(int(math.floor(n_new * fraction + 0.5)), n_available)


def lookback_window(dt: str, lookback_days: int) -> tuple[str, str]:
    """``[start, end)`` of the replay window as dt strings (``end`` is ``dt`` itself).

    >>> lookback_window("2014-01-10", 3)
    ('2014-01-07', '2014-01-10')
    """
    day = _dt.date.fromisoformat(dt)
    return (day - _dt.timedelta(days=lookback_days)).isoformat(), day.isoformat()


def select_replay(
    candidates: Sequence[Mapping[str, Any]], *, n_new: int, dt: str, fraction: float, seed: int
) -> list[Mapping[str, Any]]:
    """The seeded replay sample of ``candidates`` (already filtered to the window)."""
    n = replay_count(n_new, fraction, len(candidates))
    ranked = sorted(candidates, key=lambda s: rank_key(seed, dt, "replay", s["sample_id"]))
    return ranked[:n]


def rank_col(seed: int, dt: str, purpose: str, key_col: str):
    """Spark twin of :func:`onerec_prod.samples.builders.rank_key` over column ``key_col``."""
    from pyspark.sql import functions as F

    return F.sha2(F.concat_ws("|", F.lit(str(seed)), F.lit(dt), F.lit(purpose), F.col(key_col)), 256)


def order_mix(
    new: Sequence[Mapping[str, Any]], replay: Sequence[Mapping[str, Any]], *, dt: str, seed: int
) -> list[dict[str, Any]]:
    """New dicts of ``new`` + ``replay`` with a ``replay`` flag, in the seeded mix order."""
    rows = [dict(s, replay=False) for s in new] + [dict(s, replay=True) for s in replay]
    rows.sort(key=lambda s: rank_key(seed, dt, "order", s["sample_id"]))
    return rows


def daily_mix(
    new: Sequence[Mapping[str, Any]], older: Sequence[Mapping[str, Any]], *, dt: str,
    fraction: float, seed: int, lookback_days: int,
) -> list[dict[str, Any]]:
    """Day ``dt``'s samples plus the replay sample of ``older`` (window applied here).

    Returns new dicts with a ``replay`` flag, in the seeded mix order.
    """
    start, end = lookback_window(dt, lookback_days)
    window = [s for s in older if start <= s["dt"] < end]
    replay = select_replay(window, n_new=len(new), dt=dt, fraction=fraction, seed=seed)
    return order_mix(new, replay, dt=dt, seed=seed)
