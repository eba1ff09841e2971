"""The promotion gate: data (floors, baselines, a paired test vs the champion) plus a mode. Pure.

Every metric here is higher-is-better. Four kinds of check:

- ``floor``: ``candidate[m] >= floors[m]`` (always, the first model included);
- ``baseline``: ``candidate[m] > baseline[m]`` for every baseline of ``beat_baselines`` (MostPop
  by default) scored on the SAME eval events, every metric of ``baseline_metrics`` (always, the
  first model included): a model that does not beat MostPop is never promoted, and a model that
  scores 0 never passes (0 is not above anything);
- ``paired`` (only when there is a champion): the paired bootstrap interval of
  ``candidate - champion`` over the same users (per-user gains from the eval report), level
  ``confidence``; the check fails only when the whole interval lies below ``-paired_margin``, i.e.
  the candidate is worse beyond the noise, never on a single-hit difference;
- ``regression`` (only when there is a champion): ``candidate[m] >= champion[m] - max_regression[m]``
  for metrics without per-user gains (the caption BertScore); both values from the same snapshot.

A metric missing (or NaN) on either side fails its check with a message saying which side.
``mode``: ``enabled`` blocks on any failure; ``dry_run`` computes and logs the failures but
``passed_effective`` is True; ``disabled`` also computes and records the checks (so the numbers
stay visible) and always passes.

    >>> from onerec_prod.config import GateCfg
    >>> g = GateCfg(floors={"recall@10": 0.05}, max_regression={"recall@10": 0.01})
    >>> r = gate({"recall@10": 0.10}, {"recall@10": 0.12}, g)
    >>> (r.passed, [c.passed for c in r.checks])
    (False, [True, False])
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

log = logging.getLogger(__name__)

EPS = 1e-12  # float noise tolerance on comparisons


class _GateCfgLike(Protocol):
    mode: str
    floors: dict[str, float]
    max_regression: dict[str, float]
    beat_baselines: list[str]
    baseline_metrics: list[str]
    paired_metrics: list[str]
    confidence: float
    paired_margin: float
    n_boot: int


@dataclass(frozen=True)
class Check:
    """One gate check and its verdict."""

    metric: str
    kind: Literal["floor", "baseline", "paired", "regression"]
    value: float | None
    threshold: float | None
    champion_value: float | None
    passed: bool
    message: str = ""
    low: float | None = None        # interval of ``value`` (candidate's metric, or the paired difference)
    high: float | None = None
    reference: str | None = None    # what ``value`` is compared with: champion, mostpop, ...
    n: int | None = None            # events the interval rests on


@dataclass(frozen=True)
class GateResult:
    """All checks plus the verdicts.

    ``passed``: every check passed (the raw verdict). ``passed_effective``: what promotion
    uses (= ``passed`` when enabled, True in ``dry_run`` and ``disabled``).
    """

    mode: str
    checks: tuple[Check, ...]
    passed: bool
    passed_effective: bool
    first_model: bool
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "passed": self.passed,
            "passed_effective": self.passed_effective,
            "first_model": self.first_model,
            "checks": [asdict(c) for c in self.checks],
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GateResult:
        return cls(
            mode=d["mode"],
            checks=tuple(Check(**c) for c in d.get("checks", [])),
            passed=bool(d["passed"]),
            passed_effective=bool(d["passed_effective"]),
            first_model=bool(d.get("first_model", False)),
            notes=tuple(d.get("notes", [])),
        )

    def verdict(self) -> str:
        """One line: ``PASSED``, ``FAILED`` or ``FAILED (dry_run: not blocking)`` etc."""
        if self.passed:
            text = "PASSED"
        elif self.passed_effective:
            text = f"FAILED ({self.mode}: not blocking)"
        else:
            text = "FAILED"
        return f"gate {text} [mode={self.mode}, {len(self.checks) - len(self.failures)}/{len(self.checks)} checks passed" + (
            ", first model: floors and baselines]" if self.first_model else "]"
        )

    def format_table(self) -> str:
        """A fixed-width table of every check, then the verdict line."""

        def num(x: float | None) -> str:
            return "-" if x is None else f"{x:.4f}"

        def ci(c: Check) -> str:
            return "" if c.low is None or c.high is None else f"[{c.low:.4f}, {c.high:.4f}]"

        head = ("metric", "check", "vs", "value", "95% interval", "threshold", "champion", "n", "verdict")
        rows = [
            (c.metric, c.kind, c.reference or "-", num(c.value), ci(c) or "-", num(c.threshold),
             num(c.champion_value), "-" if c.n is None else str(c.n), "ok" if c.passed else "FAIL")
            for c in self.checks
        ]
        widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
        line = lambda r: "  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip()  # noqa: E731
        out = [line(head), line(["-" * w for w in widths]), *map(line, rows)]
        out += [f"  ! {c.metric} ({c.kind}): {c.message}" for c in self.failures]
        out += [f"  note: {n}" for n in self.notes]
        out.append(self.verdict())
        return "\n".join(out)


def _num(metrics: dict[str, float] | None, key: str) -> float | None:
    if metrics is None or key not in metrics or metrics[key] is None:
        return None
    try:
        v = float(metrics[key])
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def _paired(a, b, n_boot: int, seed: int, level: float) -> tuple[float, float, float]:
    from onerec_prod.eval.stats import paired_diff_ci

    return paired_diff_ci(a, b, n_boot=n_boot, seed=seed, level=level)


def gate(
    candidate: dict[str, float],
    champion: dict[str, float] | None,
    gate_cfg: _GateCfgLike,
    *,
    gains: dict[str, list[float]] | None = None,
    champion_gains: dict[str, list[float]] | None = None,
    baselines: dict[str, dict[str, float]] | None = None,
    intervals: dict[str, dict[str, float]] | None = None,
    seed: int = 0,
) -> GateResult:
    """Run every check of ``gate_cfg`` on ``candidate`` vs the baselines and ``champion``.

    Args:
        candidate: the candidate's metrics on the eval events.
        champion: the champion's metrics on the SAME events; None = first model (no champion checks).
        gate_cfg: ``GateCfg``.
        gains / champion_gains: per-user gains (``{"recall@10": [...]}``, same users, same order)
            of the candidate and the champion: the paired checks need both.
        baselines: ``{"mostpop": {"recall@10": ...}}`` scored on the same events.
        intervals: the candidate's own bootstrap intervals (``{metric: {"low", "high", "n"}}``),
            printed beside the floors.
    """
    if gate_cfg.mode not in ("enabled", "dry_run", "disabled"):
        raise ValueError(f"gate mode must be enabled|dry_run|disabled, got {gate_cfg.mode!r}")
    intervals = intervals or {}
    beat = list(getattr(gate_cfg, "beat_baselines", []) or [])
    base_metrics = list(getattr(gate_cfg, "baseline_metrics", []) or [])
    paired_metrics = list(getattr(gate_cfg, "paired_metrics", []) or [])
    level = float(getattr(gate_cfg, "confidence", 0.95))
    margin = float(getattr(gate_cfg, "paired_margin", 0.0))
    n_boot = int(getattr(gate_cfg, "n_boot", 1000))

    def ci(metric: str) -> dict[str, Any]:
        i = intervals.get(metric) or {}
        return {"low": i.get("low"), "high": i.get("high"), "n": i.get("n")}

    checks: list[Check] = []
    min_events = int(getattr(gate_cfg, "min_events", 0) or 0)
    if min_events:
        n = max((len(v) for v in (gains or {}).values()), default=0)
        ok = n >= min_events
        checks.append(Check("events", "floor", float(n), float(min_events), None, ok,
                            "" if ok else f"only {n} eval events: too few to judge (gate.min_events={min_events})",
                            n=n))
    for metric, floor in sorted(gate_cfg.floors.items()):
        v = _num(candidate, metric)
        if v is None:
            checks.append(Check(metric, "floor", None, floor, _num(champion, metric), False,
                                f"metric {metric!r} missing from the candidate's report"))
        else:
            ok = v >= floor - EPS
            msg = "" if ok else f"{v:.4f} is below the floor {floor:.4f}"
            checks.append(Check(metric, "floor", v, floor, _num(champion, metric), ok, msg, **ci(metric)))
    for name in beat:
        for metric in base_metrics:
            v, b = _num(candidate, metric), _num((baselines or {}).get(name), metric)
            if v is None or b is None:
                side = "candidate's report" if v is None else f"baseline {name!r} of the report"
                checks.append(Check(metric, "baseline", v, b, _num(champion, metric), False,
                                    f"metric {metric!r} missing from the {side} (gate.beat_baselines needs it)",
                                    reference=name))
                continue
            ok = v > b + EPS
            msg = "" if ok else f"{v:.4f} does not beat {name} ({b:.4f}) on the same events"
            checks.append(Check(metric, "baseline", v, b, _num(champion, metric), ok, msg, reference=name,
                                **ci(metric)))
    notes = []
    if champion is None:
        notes.append("no champion: champion checks skipped (first model: floors and baselines only)")
    else:
        for metric in paired_metrics:
            a, b = (gains or {}).get(metric), (champion_gains or {}).get(metric)
            cv = _num(champion, metric)
            if not a or not b or len(a) != len(b):
                why = ("per-user gains missing from the report" if not a or not b
                       else f"per-user gains cover {len(a)} vs {len(b)} users")
                checks.append(Check(metric, "paired", None, -margin, cv, False,
                                    f"{why}: the paired test needs both models on the same users",
                                    reference="champion"))
                continue
            mean, lo, hi = _paired(a, b, n_boot, seed, level)
            ok = hi >= -margin - EPS
            msg = "" if ok else (f"worse than the champion beyond the noise: difference {mean:+.4f}, "
                                 f"{level:.0%} interval [{lo:+.4f}, {hi:+.4f}] lies below {-margin:+.4f}")
            checks.append(Check(metric, "paired", mean, -margin, cv, ok, msg, low=lo, high=hi,
                                reference="champion", n=len(a)))
        for metric, delta in sorted(gate_cfg.max_regression.items()):
            v, cv = _num(candidate, metric), _num(champion, metric)
            if v is None or cv is None:
                side = "candidate's" if v is None else "champion's"
                checks.append(Check(metric, "regression", v, None if cv is None else cv - delta, cv, False,
                                    f"metric {metric!r} missing from the {side} report", reference="champion"))
                continue
            threshold = cv - delta
            ok = v >= threshold - EPS
            msg = "" if ok else f"{v:.4f} is {cv - v:.4f} below the champion's {cv:.4f} (max drop {delta:.4f})"
            checks.append(Check(metric, "regression", v, threshold, cv, ok, msg, reference="champion"))
    passed = all(c.passed for c in checks)
    effective = passed if gate_cfg.mode == "enabled" else True
    result = GateResult(gate_cfg.mode, tuple(checks), passed, effective, champion is None, tuple(notes))
    for c in result.failures:
        log.warning("gate check failed (%s): %s %s: %s", gate_cfg.mode, c.metric, c.kind, c.message)
    return result
