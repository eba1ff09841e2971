"""``onerec-prod train``: SFT / continued training of day D (:func:`onerec_prod.train.day.train_day`).

    onerec-prod train --date D [--stage incremental] [--init-from DIR] [--samples PATH]
                      [--out DIR] [--force]
"""

from __future__ import annotations

import argparse

from onerec_prod.config import Config
from onerec_prod.train.day import train_day


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--date", required=True, help="Day D (YYYY-MM-DD).")
    parser.add_argument("--stage", default=None,
                        help="Stage under configs/train/ (default: train.stage; 'bootstrap' = "
                        "warmup -> align -> reasoning from the base model).")
    parser.add_argument("--init-from", default=None, help="Init model dir (default: champion, else base).")
    parser.add_argument("--samples", default=None, help="JSONL of sample rows instead of the Delta table.")
    parser.add_argument("--out", default=None, help="Output dir (default <models>/candidates/dt=D/sft).")
    parser.add_argument("--force", action="store_true", help="Retrain even if the output is up to date.")


def main(args: argparse.Namespace, cfg: Config) -> int:
    out = train_day(cfg, args.date, args.init_from, args.samples, stage=args.stage,
                    out_dir=args.out, force=args.force)
    print(out)
    return 0
