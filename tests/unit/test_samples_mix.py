"""Daily mix: replay count, lookback window, seeded selection, order."""

from __future__ import annotations

import pytest

from onerec_prod.samples.mix import daily_mix, lookback_window, replay_count, select_replay

DT = "2014-01-10"


def _rows(dt, n, prefix):
    return [{"sample_id": f"{prefix}{i}", "dt": dt, "task": "sid_rec"} for i in range(n)]


@pytest.mark.parametrize("n_new, fraction, avail, expected", [
    (10, 0.5, 100, 5),   # plain
    (3, 0.5, 100, 2),    # 1.5 rounds half up
    (10, 0.5, 2, 2),     # capped by what exists
    (10, 0.0, 100, 0),   # replay off
    (0, 0.5, 100, 0),    # empty day
    (4, 2.0, 100, 8),    # more replay than new rows
])
def test_replay_count(n_new, fraction, avail, expected):
    assert replay_count(n_new, fraction, avail) == expected


def test_replay_count_rejects_negative_fraction():
    with pytest.raises(ValueError, match=">= 0"):
        replay_count(1, -0.1, 1)


def test_lookback_window_ends_before_the_day():
    assert lookback_window(DT, 3) == ("2014-01-07", DT)
    assert lookback_window("2014-03-01", 1) == ("2014-02-28", "2014-03-01")


def test_select_replay_is_seeded_and_order_independent():
    cand = _rows("2014-01-09", 40, "old")
    a = select_replay(cand, n_new=10, dt=DT, fraction=0.5, seed=13)
    b = select_replay(list(reversed(cand)), n_new=10, dt=DT, fraction=0.5, seed=13)
    assert [r["sample_id"] for r in a] == [r["sample_id"] for r in b] and len(a) == 5
    c = select_replay(cand, n_new=10, dt=DT, fraction=0.5, seed=14)
    d = select_replay(cand, n_new=10, dt="2014-01-11", fraction=0.5, seed=13)
    assert {r["sample_id"] for r in c} != {r["sample_id"] for r in a}
    assert {r["sample_id"] for r in d} != {r["sample_id"] for r in a}


def test_daily_mix_replays_only_the_window_and_flags_rows():
    new = _rows(DT, 6, "new")
    older = _rows("2014-01-09", 10, "in") + _rows("2014-01-01", 10, "old") + _rows(DT, 2, "same")
    mix = daily_mix(new, older, dt=DT, fraction=0.5, seed=13, lookback_days=3)
    assert len(mix) == 9
    assert sum(r["replay"] for r in mix) == 3
    assert all(r["sample_id"].startswith("in") for r in mix if r["replay"])
    assert {r["sample_id"] for r in mix if not r["replay"]} == {r["sample_id"] for r in new}
    assert mix == daily_mix(list(reversed(new)), older, dt=DT, fraction=0.5, seed=13, lookback_days=3)
    assert "replay" not in new[0]  # inputs untouched
