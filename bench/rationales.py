"""Rationale sources on Beauty: how many distinct rationales each writes, and how long they are.

    nice -n 19 .venv/bin/python bench/rationales.py --tokenizer var/bench/model-stream-run1 \\
        [--dataset ../shared/data/beauty] [--work var/bench/quality] [--users N] [--examples 3] [--json OUT]

One reasoning request per user (bench/quality.py's split: history = the training items before the
last one, target = the last training item ``s[-3]``; validation and test items are never shown),
items with their SIDs (bench/quality.py's cache) and category paths. For each data-derived source
(``category``, ``evidence``): distinct rationale texts, and token lengths (mean, p50, p95, max)
with ``--tokenizer``'s tokenizer. Prints a few examples.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

from _common import start
from quality import load_sequences, service_sids, split

from onerec_prod.config import load_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--dataset", default="../shared/data/beauty")
    p.add_argument("--config", default="configs/bench/quality_cpu.yaml")
    p.add_argument("--work", default="var/bench/quality")
    p.add_argument("--users", type=int, default=None)
    p.add_argument("--examples", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    start(args)
    from onerec_prod.model.io import load_tokenizer
    from onerec_prod.samples.rationale import CategoryRationale, EvidenceRationale, RationaleRequest

    work = Path(args.work).resolve()
    cfg = load_config(args.config, [f"paths.var_root={work}"])
    items, seqs, key = load_sequences(args.dataset, work)
    train_seqs, _, _ = split(seqs)
    sids, _, _ = service_sids(cfg, items, work, key)
    reqs = [RationaleRequest(tuple(dict(items[i], sid=sids[i]) for i in s[:-1][-cfg.samples.max_history:]),
                             dict(items[s[-1]], sid=sids[s[-1]])) for s in train_seqs if len(s) >= 2]
    if args.users:
        reqs = random.Random(0).sample(reqs, min(args.users, len(reqs)))
    tok = load_tokenizer(args.tokenizer)
    out = {"requests": len(reqs)}
    for src in (CategoryRationale(), EvidenceRationale()):
        texts = src.rationales(reqs)
        lens = sorted(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
        out[src.name] = {"distinct": len(set(texts)), "distinct_share": round(len(set(texts)) / len(texts), 4),
                         "tokens_mean": round(statistics.fmean(lens), 1), "tokens_p50": lens[len(lens) // 2],
                         "tokens_p95": lens[int(0.95 * (len(lens) - 1))], "tokens_max": lens[-1],
                         "words_mean": round(statistics.fmean(len(t.split()) for t in texts), 1),
                         "examples": texts[: args.examples]}
    sys.stdout.write(json.dumps(out, indent=2) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
