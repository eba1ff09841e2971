"""``onerec-prod``: the one command of the pipeline.

Every subcommand lives in its own module which defines ``add_arguments(parser)`` and
``main(args, cfg) -> int``. Only the selected subcommand's module is imported, so
``onerec-prod --help`` is fast and never loads torch or Spark.

    onerec-prod [--config configs/local.yaml] [--set group.key=value ...] COMMAND [options]
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from onerec_prod.config import ConfigError, dump_config, load_config
from onerec_prod.log import setup_logging

# name -> (module, help). Order = order in --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("onerec_prod.demo", "Replay N Beauty days through the Airflow DAG end to end, promote, serve, summarise."),
    "convert-dataset": ("onerec_prod.datasets", "Convert ../shared/data/beauty to the plain replay format."),
    "replay": ("onerec_prod.replay", "Write landing partitions raw/events|items/dt=D from a dataset, with optional faults."),
    "job": ("jobs.runner", "Run one Spark job (ingest_events, update_catalog, ...) for a date."),
    "sid-fit": ("onerec_prod.sid.cli_sid_fit", "Fit SID codebooks on the catalog: a new sid_version (forces full retraining)."),
    "sid-report": ("onerec_prod.sid.cli_sid_report", "Print the SID quality report (collisions, utilisation, balance)."),
    "init-base-model": ("onerec_prod.model.cli_init_base_model", "Create the embedded small Qwen3 base model and catalog tokenizer."),
    "train": ("onerec_prod.train.cli_train", "SFT / continued training for a date (DeepSpeed), from the champion."),
    "rl": ("onerec_prod.train.cli_rl", "GRPO refresh (Rollout-Beam reward) of the day's SFT candidate."),
    "eval": ("onerec_prod.eval.cli_eval", "Evaluate a model on an eval snapshot: Recall/NDCG, BertScore, baselines."),
    "gate": ("onerec_prod.registry.cli_gate", "Register a day's candidate and run the promotion gate against the champion."),
    "promote": ("onerec_prod.registry.cli_promote", "Move the champion alias to a version (gate must pass unless --force)."),
    "rollback": ("onerec_prod.registry.cli_rollback", "Move the champion alias back to the previous version."),
    "status": ("onerec_prod.registry.cli_status", "Which version serves, its lineage and metrics, what is pending."),
    "precompute": ("onerec_prod.serving.cli_precompute", "Think-Ahead precompute of per-user SID prefixes for a date."),
    "serve": ("onerec_prod.serving.cli_serve", "Run the online recommendation service (FastAPI)."),
    "run-day": ("onerec_prod.pipeline", "Run every stage of one day in-process (no Airflow), in DAG order."),
    "spark-server": ("onerec_prod.spark_server", "Long-lived local Spark driver that runs the DAG's Spark tasks (started by `airflow up`)."),
    "airflow": ("onerec_prod.airflow_local", "Start/stop the local Airflow (scheduler + API server), backfill a range."),
}

log = logging.getLogger("onerec_prod.cli")


def _selected(argv: list[str]) -> str | None:
    skip_next = False
    for tok in argv:
        if skip_next:
            skip_next = False
            continue
        if tok in ("--config", "--set", "-s", "--log-level", "--log-format"):
            skip_next = True
            continue
        if tok.startswith("-"):
            continue
        return tok if tok in COMMANDS else None
    return None


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onerec-prod",
        description="Daily pipeline of a reasoning generative recommender (OneRec-Think): "
        "replay/ingest logs, SIDs, samples, DeepSpeed training, GRPO, eval, gate, MLflow "
        "registry, Think-Ahead serving.",
        epilog="Config: --config FILE (default $ONEREC_CONFIG or configs/local.yaml), overridden by "
        "ONEREC__GROUP__KEY env vars, then by --set group.key=value.",
    )
    parser.add_argument("--config", default=None, help="YAML config file.")
    parser.add_argument(
        "--set", "-s", action="append", default=[], metavar="KEY=VALUE",
        help="Config override, e.g. --set train.lr=3e-4 (repeatable).",
    )
    parser.add_argument("--log-level", default="INFO", help="Logging level (default INFO).")
    parser.add_argument("--log-format", default=None, choices=("text", "json"),
                        help="Log lines as text or one JSON object each (default $ONEREC_LOG_FORMAT, else text).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = _selected(argv)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        parser.exit(2, f"onerec-prod: {e}\n")
    log.debug("resolved config:\n%s", dump_config(cfg))
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.main(args, cfg) or 0)


if __name__ == "__main__":
    sys.exit(main())
