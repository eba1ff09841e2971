"""``onerec-prod eval``: evaluate a model on a day's eval snapshot and write the JSON report.

    onerec-prod eval --model DIR|models:/name@alias --snapshot YYYY-MM-DD [--out report.json]
                     [--think] [--max-users N] [--device cpu|cuda]

The report goes to ``--out`` or ``<paths.artifacts>/eval/dt=D/report-<weights hash>.json`` and
is printed (model vs baselines table). Logging it to MLflow is the pipeline's job (gate step).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from onerec_prod.config import Config

log = logging.getLogger(__name__)


def resolve_model(cfg: Config, model: str) -> Path:
    """A local model dir for ``model`` (a directory, or ``models:/name@alias`` / ``models:/name/N``)."""
    if not model.startswith("models:/"):
        path = Path(model)
        if not path.is_dir():
            raise FileNotFoundError(f"--model {model}: no such directory (or pass models:/name@alias)")
        return path
    try:
        from onerec_prod.registry.registry import resolve_model_dir
    except ImportError:
        log.warning("onerec_prod.registry.registry unavailable: resolving %s with mlflow directly", model)
        from mlflow.artifacts import download_artifacts

        dst = Path(cfg.paths.var) / "cache" / "eval_models"
        dst.mkdir(parents=True, exist_ok=True)
        return Path(download_artifacts(artifact_uri=model, dst_path=str(dst), tracking_uri=cfg.mlflow_uri))
    return Path(resolve_model_dir(cfg, model))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Model dir, or models:/name@alias | models:/name/N.")
    parser.add_argument("--snapshot", required=True, metavar="YYYY-MM-DD", help="Day of the eval snapshot.")
    parser.add_argument("--out", default=None, help="Report path (default <artifacts>/eval/dt=D/report-<hash>.json).")
    parser.add_argument("--think", action="store_true", default=None,
                        help="Think mode: rationale first, then constrained SIDs (default: eval.think).")
    parser.add_argument("--max-users", type=int, default=None, help="Override eval.max_users.")
    parser.add_argument("--device", default=None, help="Torch device (default: cuda if available, else cpu).")


def main(args: argparse.Namespace, cfg: Config) -> int:
    from datetime import date

    from onerec_prod.eval.api import evaluate
    from onerec_prod.eval.report import format_report, report_path, write_report

    try:
        if date.fromisoformat(args.snapshot).isoformat() != args.snapshot:
            raise ValueError
    except ValueError:
        raise SystemExit(f"onerec-prod eval: --snapshot {args.snapshot!r}: expected YYYY-MM-DD") from None
    if args.max_users is not None:
        cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"max_users": args.max_users})})
    model_dir = resolve_model(cfg, args.model)
    report = evaluate(cfg, model_dir, args.snapshot, think=args.think, device=args.device)
    report["model"] = args.model
    tag = (report.get("model_weights_sha256") or model_dir.name)[:12]
    out = Path(args.out) if args.out else report_path(cfg.paths.artifacts, args.snapshot, tag)
    write_report(report, out)
    sys.stdout.write(format_report(report) + f"\nreport: {out}\n")
    log.info("eval report written to %s", out)
    return 0

