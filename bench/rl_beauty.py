"""GRPO refresh on Beauty: Recall/NDCG of an SFT model before and after the Rollout-Beam RL step.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/rl_beauty.py --model var/bench/quality_cpu/model \
        [--config configs/bench/quality_cpu.yaml] [--work var/bench/quality_cpu] [--eval-users 1000] \
        [--threads 1] [--set grpo.steps=30 ...] [--json OUT]

Input: a model trained by ``bench/quality_beauty.py`` (the same config, so the same SIDs: they are
read from that bench's work-dir cache). Protocol: the paper's leave-one-out split of full Beauty.
RL prompts are sliding ``(history, next item)`` pairs of the TRAINING part of each sequence
(``seq[:-2]``; never a test target), drawn with a fixed seed; the rollout is the pipeline's own
(:func:`onerec_prod.train.grpo.train_grpo`: sampled rationale, then the trie-constrained beam
over all 12,101 items; reward = Rollout-Beam, the matched leading SID levels of the best beam
entry, 0..4). Before and after: beam-10 Recall/NDCG@5/10 on the same seeded sample of test users,
plus the reward curve. Single process; the numbers are what they are, whichever way they go.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ helpers (quality_beauty)

from _common import add_threads_arg, start  # noqa: E402
from quality_beauty import evaluate_model, load_beauty, service_sids, split_leave_one_out  # noqa: E402

from onerec_prod.config import REPO_ROOT, load_config  # noqa: E402
from onerec_prod.eval.report import format_table  # noqa: E402

log = logging.getLogger("bench.rl_beauty")
DEFAULT_GRPO = ["grpo.steps=30", "grpo.group_size=8", "grpo.prompts_per_step=8", "grpo.beam_size=10",
                "grpo.lr=5e-5", "grpo.kl_coef=0.01", "grpo.max_think_tokens=16", "grpo.eval_prompts=0"]


def rl_prompts(split, items, sids, n: int, seed: int, max_items: int):
    """``n`` seeded (history, target) pairs of the training split as :class:`RlPrompt`."""
    from onerec_prod.samples.prompts import rec_messages
    from onerec_prod.train.grpo import RlPrompt

    rng = random.Random(seed)
    picks = rng.sample(range(len(split.train_samples)), min(n, len(split.train_samples)))
    out = []
    for i in picks:
        hist, target = split.train_samples[i]
        msgs = rec_messages([dict(items[h], sid=sids[h]) for h in hist], think=False, max_items=max_items)
        out.append(RlPrompt(f"train-{i}", msgs, tuple(sids[target])))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/bench/quality_cpu.yaml")
    p.add_argument("--model", required=True, help="SFT model dir from bench/quality_beauty.py.")
    p.add_argument("--work", default=None, help="quality_beauty's work dir (SID cache; default var/bench/<stem>).")
    p.add_argument("--out", default=None, help="Where the refreshed model goes (default <work>/rl-model).")
    p.add_argument("--eval-users", type=int, default=1000, help="Seeded sample of test users.")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"Config override (defaults: {' '.join(DEFAULT_GRPO)}).")
    add_threads_arg(p)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    start(args)

    work = Path(args.work or REPO_ROOT / "var" / "bench" / Path(args.config).stem).resolve()
    cfg = load_config(args.config, [f"paths.var_root={work}", *DEFAULT_GRPO, *args.set])
    items, seqs = load_beauty(cfg.paths.dataset)
    split = split_leave_one_out(seqs)
    sids, sid_version = service_sids(cfg, items, work)

    from onerec_prod.eval.api import build_catalog_trie, select_users

    users = select_users(split.test, args.eval_users, cfg.eval.seed)
    from onerec_prod.model.io import load_model, load_tokenizer, save_model
    from onerec_prod.sid.tokens import SidVocab, level_sizes
    from onerec_prod.train.grpo import default_rewards, train_grpo

    g = cfg.grpo
    t0 = time.perf_counter()
    before = evaluate_model(cfg, Path(args.model), users, items, sids)
    log.info("before: %s", before)
    sizes = level_sizes(cfg.sid)
    catalog = [dict(it, sid=sids[i]) for i, it in items.items()]
    trie, _ = build_catalog_trie(catalog, sizes)
    tok = load_tokenizer(args.model)
    vocab = SidVocab.from_tokenizer(tok, sizes)
    policy, ref = load_model(args.model), (load_model(args.model) if g.kl_coef > 0 else None)
    prompts = rl_prompts(split, items, sids, g.steps * g.prompts_per_step, g.seed, cfg.samples.max_history)
    t1 = time.perf_counter()
    res = train_grpo(policy, ref, tok, prompts, trie, vocab, g, default_rewards(tok, vocab, g))
    rl_seconds = time.perf_counter() - t1
    out = Path(args.out or work / "rl-model")
    save_model(res.model, tok, out, {"stage": "bench_rl", "parent": str(args.model), "dt": None,
                                     "sid_version": sid_version, "data_versions": {},
                                     "rl": {"curve": res.curve}})
    after = evaluate_model(cfg, out, users, items, sids)

    print(f"\nGRPO refresh on Beauty (leave-one-out; {len(users)} seeded test users; beam {cfg.eval.beam_size}; "
          f"{g.steps} steps x {g.prompts_per_step} prompts x G={g.group_size}, lr {g.lr}, kl {g.kl_coef}; "
          f"RL {rl_seconds:.0f}s)\n")
    print(format_table({"SFT (before)": before, "SFT + GRPO (after)": after}))
    print("\nreward curve (step: mean Rollout-Beam reward of the rollouts, 0..4 | hit-rate | "
          "groups with reward variance | KL)")
    for c in res.curve:
        print(f"  {int(c['step']):3d}: {c['reward_mean']:.3f} | {c['hit_rate']:.3f} | "
              f"{c.get('signal_groups', 0.0):.2f} | {c['kl']:.2e}")
    from onerec_prod.model.io import weights_hash

    print(f"weights: SFT {weights_hash(args.model)[:12]} -> after GRPO {weights_hash(out)[:12]}")
    blob = {"before": before, "after": after, "curve": res.curve, "grpo": g.model_dump(),
            "users": len(users), "rl_seconds": round(rl_seconds, 1),
            "total_seconds": round(time.perf_counter() - t0, 1), "model": str(args.model)}
    if args.json:
        Path(args.json).write_text(json.dumps(blob, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
