"""``onerec-prod rl``: GRPO refresh (Rollout-Beam reward) of day D's SFT candidate.

    onerec-prod rl --date D [--init-from DIR] [--out DIR] [--samples JSONL] [--catalog JSONL] [--force]

Default input ``<paths.models>/candidates/dt=D/sft``, output ``.../dt=D/rl``; prompts are the
day's ``rl_prompt`` rows of the Delta ``samples`` table, the trie every catalog SID. Prints a JSON
summary (reward curve, greedy beam reward / hit-rate before and after, model dir).
"""

from __future__ import annotations

import argparse
import json

from onerec_prod.config import Config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--date", required=True, help="Day D (YYYY-MM-DD).")
    parser.add_argument("--init-from", default=None, help="Model to refresh (default: the day's SFT candidate).")
    parser.add_argument("--out", default=None, help="Output dir (default <models>/candidates/dt=D/rl).")
    parser.add_argument("--samples", default=None,
                        help="JSONL of rl_prompt rows instead of the Delta samples table.")
    parser.add_argument("--catalog", default=None,
                        help="JSONL of catalog rows (sid, sid_version) instead of the Delta catalog.")
    parser.add_argument("--force", action="store_true", help="Rerun even if the output is up to date.")


def main(args: argparse.Namespace, cfg: Config) -> int:
    from onerec_prod.train.grpo import rl_day

    res = rl_day(cfg, args.date, init_from=args.init_from, out_dir=args.out, samples_path=args.samples,
                 catalog_path=args.catalog, force=args.force)
    brief = {k: v for k, v in res.items() if k != "reward_curve"}
    brief["reward_mean_by_step"] = [round(m["reward_mean"], 4) for m in res.get("reward_curve", [])]
    print(json.dumps(brief, sort_keys=True, default=str))
    return 0
