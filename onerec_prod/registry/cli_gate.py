"""``onerec-prod gate --date D --model DIR --report report.json``: register, gate, maybe challenger
(:func:`onerec_prod.registry.release.gate_and_register`). The exit code is 0 whether the gate
passes or fails; the table and the verdict are printed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from onerec_prod.config import Config
from onerec_prod.registry.release import META_FILE, gate_and_register, lineage_from_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--date", required=True, help="Day D (YYYY-MM-DD) of the candidate.")
    parser.add_argument("--model", required=True, help="Candidate model dir.")
    parser.add_argument("--report", required=True, help="Eval report JSON (metrics, champion_metrics).")
    parser.add_argument(
        "--lineage", default=None,
        help="Optional JSON file of lineage (parent_version, sid_version, data_versions, ...); "
        f"defaults come from the model's {META_FILE}.",
    )
    parser.add_argument("--json", action="store_true", help="Print the result as JSON too.")


def main(args: argparse.Namespace, cfg: Config) -> int:
    report = json.loads(Path(args.report).read_text())
    lineage = lineage_from_model(args.model)
    if args.lineage:
        lineage |= json.loads(Path(args.lineage).read_text())
    lineage.setdefault("data_snapshot", report.get("snapshot", args.date))
    out = gate_and_register(cfg, args.date, args.model, report, lineage)
    print(out["table"])
    print(
        f"{cfg.registry.model_name} version {out['version']} (dt={args.date}); champion: "
        f"{out['champion_version'] or 'none'} [{out['champion_metrics_source']}]; challenger "
        + ("set to this version" if out["challenger_set"] else "NOT moved")
    )
    if args.json:
        print(json.dumps({k: v for k, v in out.items() if k != "table"}, indent=2, sort_keys=True))
    return 0
