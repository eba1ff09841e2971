"""``onerec-prod precompute --date D [--model DIR|models:/name@alias] [--model-version V]``.

Resolves the model once (default ``models:/<registry.model_name>@champion``) to a version number
and a local directory, then writes Think-Ahead prefixes of day ``D`` for that version
(:func:`onerec_prod.serving.precompute.precompute`). Prints one JSON summary line.
"""

from __future__ import annotations

import argparse
import json
import logging

from onerec_prod.config import Config

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--date", required=True, help="Day of the precompute (YYYY-MM-DD).")
    parser.add_argument(
        "--model", default=None,
        help="Model dir or models:/name@alias | models:/name/N (default: models:/<name>@champion).",
    )
    parser.add_argument(
        "--model-version", default=None,
        help="Version label of a --model DIR (default: 'local-' + a hash of its weights record).",
    )
    parser.add_argument("--no-table", action="store_true", help="Write the export only, not Delta think_ahead.")


def main(args: argparse.Namespace, cfg: Config) -> int:
    from onerec_prod.registry.registry import resolve_model
    from onerec_prod.serving.precompute import precompute

    version, model_dir = resolve_model(cfg, args.model, args.model_version)
    log.info("precompute: model %s (version %s) for %s", model_dir, version, args.date)
    res = precompute(cfg, args.date, model_dir, version, write_table=not args.no_table)
    print(json.dumps({"model_version": version, **res}, sort_keys=True, default=str))
    return 0
