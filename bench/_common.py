"""Shared command-line set-up of the benches (run as scripts, so ``bench/`` is on ``sys.path``)."""

from __future__ import annotations

import argparse
import logging

THREADS_HELP = ("torch threads (default: torch's). On a shared, oversubscribed box use 1: "
                "OpenMP spin-waits make 2 threads several times slower than 1 there.")


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)


def start(args: argparse.Namespace, level: int = logging.INFO) -> None:
    """Log format of every bench, and ``--threads`` applied before any model is built."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def add_dataset_args(p: argparse.ArgumentParser, work_help: str) -> None:
    """``--dataset``, ``--config``, ``--set`` and ``--work``: the data and config flags of the Beauty benches."""
    p.add_argument("--dataset", default="../shared/data/beauty", help="Plain-format dataset dir (or raw Beauty).")
    p.add_argument("--config", default="configs/bench/quality_cpu.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Config override.")
    p.add_argument("--work", default=None, help=work_help)
