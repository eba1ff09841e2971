"""The promotion gate: data (floors, max regression vs champion) plus a mode. Pure.

Every metric here is higher-is-better. Two kinds of check:

- ``floor``: ``candidate[m] >= floors[m]`` (always, the first model included);
- ``regression``: ``candidate[m] >= champion[m] - max_regression[m]`` (only when there is a
  champion; both values must come from the same eval snapshot).

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


@dataclass(frozen=True)
class Check:
    """One gate check and its verdict."""

    metric: str
    kind: Literal["floor", "regression"]
    value: float | None
    threshold: float | None
    champion_value: float | None
    passed: bool
    message: str = ""


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
            ", first model: floors only]" if self.first_model else "]"
        )

    def format_table(self) -> str:
        """A fixed-width table of every check, then the verdict line."""

        def num(x: float | None) -> str:
            return "-" if x is None else f"{x:.4f}"

        head = ("metric", "check", "value", "threshold", "champion", "verdict")
        rows = [
            (c.metric, c.kind, num(c.value), num(c.threshold), num(c.champion_value), "ok" if c.passed else "FAIL")
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


def gate(
    candidate: dict[str, float],
    champion: dict[str, float] | None,
    gate_cfg: _GateCfgLike,
) -> GateResult:
    """Run every floor and regression check of ``gate_cfg`` on ``candidate`` vs ``champion``.

    Args:
        candidate: the candidate's metrics on the eval snapshot.
        champion: the champion's metrics on the SAME snapshot; None = first model (floors only).
        gate_cfg: ``GateCfg`` (``mode``, ``floors``, ``max_regression``).
    """
    if gate_cfg.mode not in ("enabled", "dry_run", "disabled"):
        raise ValueError(f"gate mode must be enabled|dry_run|disabled, got {gate_cfg.mode!r}")
    checks: list[Check] = []
    for metric, floor in sorted(gate_cfg.floors.items()):
        v = _num(candidate, metric)
        if v is None:
            checks.append(Check(metric, "floor", None, floor, _num(champion, metric), False,
                                f"metric {metric!r} missing from the candidate's report"))
        else:
            ok = v >= floor - EPS
            msg = "" if ok else f"{v:.4f} is below the floor {floor:.4f}"
            checks.append(Check(metric, "floor", v, floor, _num(champion, metric), ok, msg))
    notes = []
    if champion is None:
        notes.append("no champion: regression checks skipped (first model)")
    else:
        for metric, delta in sorted(gate_cfg.max_regression.items()):
            v, cv = _num(candidate, metric), _num(champion, metric)
            if v is None or cv is None:
                side = "candidate's" if v is None else "champion's"
                checks.append(Check(metric, "regression", v, None if cv is None else cv - delta, cv, False,
                                    f"metric {metric!r} missing from the {side} report"))
                continue
            threshold = cv - delta
            ok = v >= threshold - EPS
            msg = "" if ok else f"{v:.4f} is {cv - v:.4f} below the champion's {cv:.4f} (max drop {delta:.4f})"
            checks.append(Check(metric, "regression", v, threshold, cv, ok, msg))
    passed = all(c.passed for c in checks)
    effective = passed if gate_cfg.mode == "enabled" else True
    result = GateResult(gate_cfg.mode, tuple(checks), passed, effective, champion is None, tuple(notes))
    for c in result.failures:
        log.warning("gate check failed (%s): %s %s: %s", gate_cfg.mode, c.metric, c.kind, c.message)
    return result
