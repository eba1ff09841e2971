"""The promotion gate on hand-worked cases: floors, regression, modes, missing metrics."""

from __future__ import annotations

import math

import pytest

from onerec_prod.config import GateCfg
from onerec_prod.registry.gate import GateResult, gate

FLOORS = {"recall@10": 0.05, "ndcg@10": 0.02}
DELTAS = {"recall@10": 0.01, "ndcg@10": 0.01}
CHAMP = {"recall@10": 0.20, "ndcg@10": 0.10}


def cfg(mode: str = "enabled", floors=FLOORS, deltas=DELTAS, **stat) -> GateCfg:
    """Floors and absolute regressions only, unless ``stat`` sets the baseline/paired checks."""
    stat = {"beat_baselines": [], "paired_metrics": [], **stat}
    return GateCfg(mode=mode, floors=floors, max_regression=deltas, **stat)


def verdicts(result: GateResult) -> list[tuple[str, str, bool]]:
    return [(c.metric, c.kind, c.passed) for c in result.checks]


def test_first_model_checks_floors_only():
    r = gate({"recall@10": 0.06, "ndcg@10": 0.03}, None, cfg())
    # no champion: two floor checks, no regression check
    assert verdicts(r) == [("ndcg@10", "floor", True), ("recall@10", "floor", True)]
    assert (r.passed, r.passed_effective, r.first_model) == (True, True, True)
    assert "first model" in r.format_table()


def test_first_model_below_floor_fails():
    r = gate({"recall@10": 0.04, "ndcg@10": 0.03}, None, cfg())
    assert verdicts(r) == [("ndcg@10", "floor", True), ("recall@10", "floor", False)]
    assert (r.passed, r.passed_effective) == (False, False)
    assert r.failures[0].threshold == 0.05
    assert "below the floor" in r.failures[0].message


def test_regression_within_delta_passes_exactly_at_threshold():
    # 0.19 == 0.20 - 0.01: on the threshold passes (float noise tolerated)
    r = gate({"recall@10": 0.19, "ndcg@10": 0.10}, CHAMP, cfg())
    assert all(c.passed for c in r.checks)
    reg = [c for c in r.checks if c.kind == "regression" and c.metric == "recall@10"][0]
    assert reg.threshold == pytest.approx(0.19)
    assert reg.champion_value == 0.20
    assert r.passed and not r.first_model


def test_regression_beyond_delta_fails_even_above_floor():
    r = gate({"recall@10": 0.185, "ndcg@10": 0.11}, CHAMP, cfg())
    assert verdicts(r) == [
        ("ndcg@10", "floor", True),
        ("recall@10", "floor", True),
        ("ndcg@10", "regression", True),  # better than champion
        ("recall@10", "regression", False),  # 0.015 drop > 0.01
    ]
    assert not r.passed and not r.passed_effective
    assert "below the champion's 0.2000" in r.failures[0].message


def test_dry_run_logs_failures_but_does_not_block(caplog):
    caplog.set_level("WARNING", logger="onerec_prod.registry.gate")
    r = gate({"recall@10": 0.01, "ndcg@10": 0.10}, CHAMP, cfg("dry_run"))
    assert not r.passed  # the raw verdict is still FAILED
    assert r.passed_effective  # but promotion is not blocked
    assert "dry_run: not blocking" in r.verdict()
    assert any("recall@10" in m for m in caplog.messages)


def test_disabled_always_passes_and_records_checks():
    r = gate({"recall@10": 0.0}, CHAMP, cfg("disabled"))
    assert r.passed_effective and not r.passed
    assert len(r.checks) == 4  # still computed and recorded
    assert r.to_dict()["mode"] == "disabled"


def test_missing_candidate_metric_is_a_failed_check():
    r = gate({"recall@10": 0.30}, CHAMP, cfg())
    missing = [c for c in r.checks if c.metric == "ndcg@10"]
    assert [c.passed for c in missing] == [False, False]
    assert all(c.value is None for c in missing)
    assert all("missing from the candidate's report" in c.message for c in missing)
    assert not r.passed


def test_missing_champion_metric_and_nan_fail():
    r = gate({"recall@10": math.nan, "ndcg@10": 0.10}, {"recall@10": 0.2}, cfg())
    by = {(c.metric, c.kind): c for c in r.checks}
    assert not by[("recall@10", "floor")].passed  # NaN counts as missing
    assert "missing from the champion's report" in by[("ndcg@10", "regression")].message
    assert not by[("ndcg@10", "regression")].passed


def test_no_checks_configured_passes():
    r = gate({}, CHAMP, cfg(floors={}, deltas={}))
    assert r.checks == () and r.passed


def test_to_dict_round_trip_and_table():
    r = gate({"recall@10": 0.185, "ndcg@10": 0.11}, CHAMP, cfg())
    assert GateResult.from_dict(r.to_dict()) == r
    table = r.format_table()
    assert table.splitlines()[0].split() == ["metric", "check", "vs", "value", "95%", "interval",
                                              "threshold", "champion", "n", "verdict"]
    assert "FAIL" in table and table.splitlines()[-1].startswith("gate FAILED")


def test_unknown_mode_rejected():
    bad = GateCfg.model_construct(mode="sometimes", floors={}, max_regression={})
    with pytest.raises(ValueError, match="enabled\\|dry_run\\|disabled"):
        gate({}, None, bad)


# --------------------------------------------------------------------------------------
# statistical checks: baselines on the same events, paired test vs the champion


def _gains(hits: list[int]) -> dict[str, list[float]]:
    return {"recall@10": [float(h) for h in hits], "ndcg@10": [0.5 * h for h in hits]}


def _means(g: dict[str, list[float]]) -> dict[str, float]:
    return {k: sum(v) / len(v) for k, v in g.items()}


STAT = {"floors": {}, "deltas": {}, "beat_baselines": ["mostpop"], "paired_metrics": ["recall@10", "ndcg@10"]}


def test_a_model_scoring_zero_or_at_mostpop_never_passes_first_model_included():
    zero = _gains([0] * 200)
    r = gate(_means(zero), None, cfg(**STAT), gains=zero, baselines={"mostpop": {"recall@10": 0.0, "ndcg@10": 0.0}})
    assert not r.passed and {c.kind for c in r.failures} == {"baseline"}
    tie = _gains([1] * 10 + [0] * 190)
    r = gate(_means(tie), None, cfg(**STAT), gains=tie, baselines={"mostpop": _means(tie)})
    assert not r.passed and "does not beat mostpop" in r.failures[0].message
    better = _gains([1] * 30 + [0] * 170)
    r = gate(_means(better), None, cfg(**STAT), gains=better, baselines={"mostpop": _means(tie)})
    assert r.passed and r.first_model and [c.kind for c in r.checks] == ["baseline", "baseline"]


def test_missing_baseline_fails_with_the_reason():
    g = _gains([1] * 30 + [0] * 170)
    r = gate(_means(g), None, cfg(**STAT), gains=g, baselines={})
    assert not r.passed and "gate.beat_baselines" in r.failures[0].message


def test_paired_test_blocks_a_clearly_worse_candidate():
    champ = _gains([1] * 60 + [0] * 140)
    cand = _gains([1] * 20 + [0] * 180)  # lost 40 of the champion's 60 hits, gained none
    mp = {"mostpop": {"recall@10": 0.01, "ndcg@10": 0.005}}
    r = gate(_means(cand), _means(champ), cfg(**STAT), gains=cand, champion_gains=champ, baselines=mp)
    paired = [c for c in r.checks if c.kind == "paired"]
    assert not r.passed and len(paired) == 2 and not any(c.passed for c in paired)
    c = paired[0]
    assert c.high < 0 and c.low <= c.value <= c.high and c.n == 200 and abs(c.value + 0.2) < 1e-9
    assert "beyond the noise" in c.message and "[" in r.format_table()


def test_paired_test_does_not_block_a_difference_within_noise():
    champ = _gains([1] * 30 + [0] * 170)
    # two hits lost, one gained, on other users: a single-hit net difference
    cand_hits = [1] * 28 + [0] * 2 + [1] + [0] * 169
    cand = _gains(cand_hits)
    mp = {"mostpop": {"recall@10": 0.01, "ndcg@10": 0.005}}
    r = gate(_means(cand), _means(champ), cfg(**STAT), gains=cand, champion_gains=champ, baselines=mp)
    paired = [c for c in r.checks if c.kind == "paired"]
    assert r.passed and all(c.low < 0 < c.high for c in paired) and paired[0].value < 0


def test_paired_margin_and_missing_gains():
    champ = _gains([1] * 60 + [0] * 140)
    cand = _gains([1] * 20 + [0] * 180)
    mp = {"mostpop": {"recall@10": 0.0, "ndcg@10": 0.0}}
    loose = cfg(**STAT, paired_margin=0.5)
    assert gate(_means(cand), _means(champ), loose, gains=cand, champion_gains=champ, baselines=mp).passed
    r = gate(_means(cand), _means(champ), cfg(**STAT), gains=cand, champion_gains=None, baselines=mp)
    assert not r.passed and "per-user gains missing" in r.failures[0].message


def test_too_few_events_are_not_judged():
    g = _gains([1] + [0] * 83)  # one hit in 84 events beats a MostPop with none
    mp = {"mostpop": {"recall@10": 0.0, "ndcg@10": 0.0}}
    assert gate(_means(g), None, cfg(**STAT), gains=g, baselines=mp).passed
    r = gate(_means(g), None, cfg(**STAT, min_events=200), gains=g, baselines=mp)
    assert not r.passed and "too few to judge" in r.failures[0].message and r.failures[0].n == 84
