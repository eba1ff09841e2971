"""Register a day's candidate, gate it against the champion, record it (``onerec-prod gate``:
:mod:`.cli_gate`; the pipeline's ``gate_register`` stage).

The report is the eval JSON of day D: ``metrics``, ``per_user`` and ``baselines`` of the candidate
and, when a champion exists, ``champion_metrics`` / ``champion_per_user`` (the champion scored on
the SAME events by the same run). The verdict is data: every check is logged to MLflow (step
``gate`` of day D) and tagged on the version. ``challenger`` moves to the candidate only if the
gate passes (``passed_effective``: a ``dry_run`` failure does not block).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

from onerec_prod.config import Config

log = logging.getLogger(__name__)

META_FILE = "onerec_meta.json"


def lineage_from_model(model_dir: str | Path) -> dict[str, Any]:
    """Lineage fields of a model dir's ``onerec_meta.json`` ({} if absent)."""
    meta = Path(model_dir) / META_FILE
    if not meta.is_file():
        return {}
    data = json.loads(meta.read_text())
    keys = ("sid_version", "parent", "parent_version", "dt", "stage", "data_versions", "data_snapshot")
    return {k: data[k] for k in keys if k in data}


def _numeric(metrics: dict[str, Any] | None) -> dict[str, float]:
    out = {}
    for k, v in (metrics or {}).items():
        if isinstance(v, int | float) and not isinstance(v, bool) and not math.isnan(float(v)):
            out[k] = float(v)
    return out


def _gains(per_user: dict[str, Any] | None) -> dict[str, list[float]] | None:
    """The per-user gain lists of an eval report's ``per_user`` block (None when absent)."""
    if not per_user:
        return None
    return {k: [float(x) for x in v] for k, v in per_user.items() if k != "event_ids"}


def gate_and_register(
    cfg: Config, dt: str, model_dir: str | Path, report: dict[str, Any], lineage: dict[str, Any],
    *, catalog: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Register the candidate, gate it against the champion, record everything, maybe set challenger.

    ``catalog`` (rows with SIDs): register the candidate as an MLflow pyfunc recommender (see
    :func:`onerec_prod.registry.registry.register`).

    Returns:
        ``{"version", "champion_version", "passed", "passed_effective", "mode",
        "challenger_set", "champion_metrics_source", "gate": GateResult.to_dict(), "table"}``.
    """
    from onerec_prod.registry import registry, tracking
    from onerec_prod.registry.gate import gate

    if "metrics" not in report:
        raise ValueError("eval report has no 'metrics' (expected the JSON of `onerec-prod eval`)")
    champ_version = registry.aliases(cfg).get(registry.CHAMPION)
    evaluated_against = report.get("champion_version")
    if report.get("champion_metrics") and evaluated_against is not None and str(evaluated_against) != str(champ_version):
        raise registry.RegistryError(
            f"the eval report compared with champion version {evaluated_against}, but the champion is now "
            f"{champ_version}: rerun evaluate so the gate compares with the serving champion")
    version = registry.register(cfg, model_dir, dt, lineage, catalog=catalog)

    cand = _numeric(report["metrics"])
    champ_metrics: dict[str, float] | None = None
    source = "none (first model)"
    if champ_version is not None:
        if report.get("champion_metrics"):
            champ_metrics, source = _numeric(report["champion_metrics"]), "report (same snapshot)"
        else:
            info = registry.status(cfg)["champion"] or {}
            champ_metrics = _numeric(info.get("metrics") or {})
            source = f"registry tag of version {champ_version} (its own eval snapshot)"
            log.warning(
                "report has no champion_metrics: comparing with champion v%s's recorded metrics, "
                "which come from another snapshot", champ_version,
            )
    elif report.get("champion_metrics"):
        log.warning("report has champion_metrics but the registry has no champion: floors only")

    same_events = champ_metrics is not None and source.startswith("report")
    result = gate(cand, champ_metrics, cfg.gate,
                  gains=_gains(report.get("per_user")),
                  champion_gains=_gains(report.get("champion_per_user")) if same_events else None,
                  baselines={k: _numeric(v) for k, v in (report.get("baselines") or {}).items()},
                  intervals=report.get("intervals"), seed=cfg.eval.seed)
    gate_dict = result.to_dict() | {"champion_version": champ_version, "champion_metrics_source": source}
    registry.record_gate(cfg, version, gate_dict, cand)

    metrics: dict[str, float] = {f"candidate/{k}": v for k, v in cand.items()}
    metrics |= {f"champion/{k}": v for k, v in (champ_metrics or {}).items()}
    for c in result.checks:
        base = f"gate/{c.metric}/{c.kind}"
        metrics[f"{base}/passed"] = float(c.passed)
        if c.value is not None:
            metrics[f"{base}/value"] = c.value
        if c.threshold is not None:
            metrics[f"{base}/threshold"] = c.threshold
        if c.champion_value is not None:
            metrics[f"{base}/champion"] = c.champion_value
    metrics["gate/passed"] = float(result.passed)
    metrics["gate/passed_effective"] = float(result.passed_effective)

    challenger = bool(result.passed_effective and version != champ_version)
    with tempfile.TemporaryDirectory(prefix="onerec-gate-") as tmp:
        from onerec_prod.eval.report import plot_report

        artifacts: dict[str, Any] = {"gate.json": gate_dict, "eval_report.json": report, "lineage.json": lineage,
                                     "gate_table.txt": result.format_table()}
        try:  # the figure is for people; a plotting problem never blocks the gate
            artifacts["eval_plot.png"] = plot_report(report, Path(tmp) / "eval_plot.png")
        except Exception as e:  # noqa: BLE001
            log.warning("gate dt=%s: eval plot not drawn (%s: %s)", dt, type(e).__name__, e)
        tracking.log_step(
            cfg, dt, "gate",
            metrics=metrics,
            tags={"gate_mode": result.mode, "gate_passed": str(result.passed).lower(),
                  "model_version": version, "champion_version": champ_version or "",
                  "champion_metrics_source": source},
            artifacts=artifacts,
        )
    if challenger:
        registry.set_challenger(cfg, version)
    log.info("gate of %s v%s: %s", cfg.registry.model_name, version, result.verdict())
    return {
        "version": version,
        "champion_version": champ_version,
        "passed": result.passed,
        "passed_effective": result.passed_effective,
        "mode": result.mode,
        "challenger_set": challenger,
        "champion_metrics_source": source,
        "gate": gate_dict,
        "table": result.format_table(),
    }
