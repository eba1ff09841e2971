"""RL refresh (GRPO) over the quality bench's SID-stream SFT model: Recall/NDCG before and after.

    nice -n 19 .venv/bin/python bench/rl.py --model var/bench/model-stream-run1 \\
        [--work var/bench/quality] [--dataset ../shared/data/beauty] [--threads 1] \\
        [--minutes 15] [--val-users 1000] [--val-every 25] [--max-users N] \\
        [--set grpo.lr=1e-4 ...] [--think-users 500] [--json OUT]

Protocol: bench/quality.py's leave-one-out split (each user's last 50 items ``s``; training items
``s[:-2]``, validation item ``s[-2]``, test item ``s[-1]``) and its cached SIDs (``--work``).

- RL prompts: ``(history, next item)`` pairs of the TRAINING part only -- for every user the last
  training item ``s[-3]`` after ``s[:-3]``, plus earlier ones (``--pairs-per-user``), in a seeded
  order. The validation and test items never reach RL.
- The rollout is the pipeline's (:func:`onerec_prod.train.grpo.train_grpo`, ``grpo.mode=direct``):
  one constrained beam of ``group_size`` over the user's SID stream = the G distinct candidates
  of the group; reward hit + rank-aware + prefix (``grpo.reward_*``); KL to the SFT model.
- Every ``--val-every`` steps: R@10/N@10 on a seeded sample of validation users; the weights of
  the best validation step are kept (``--last`` keeps the final ones); the run stops at
  ``grpo.steps`` or after ``--minutes`` of RL.
- Test: every test user (or ``--max-users``), beam 10, SFT and RL on the same users: R@10, N@10
  with 95% bootstrap intervals and the paired difference RL - SFT.
- ``--think-users N``: think mode (greedy rationale, then the SID beam) on N test users for both
  models, R@10/N@10 and seconds per user (meaningful only for a model trained with reasoning rows).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import random
import sys
import time
from pathlib import Path

from _common import add_threads_arg, start
from quality import StreamRanker, load_sequences, service_sids, split

from onerec_prod.config import load_config

log = logging.getLogger("bench.rl")
DEFAULT_GRPO = ["grpo.mode=direct", "grpo.group_size=16", "grpo.prompts_per_step=32", "grpo.steps=100000",
                "grpo.lr=1e-4", "grpo.kl_coef=0.01", "grpo.reward_hit=1.0", "grpo.reward_rank=0.5",
                "grpo.reward_prefix=0.5", "grpo.eval_prompts=0"]


def rl_prompts(train_seqs, sids, pairs_per_user: int, seed: int):
    """``(history, next item)`` pairs of the training items only, as direct-mode RL prompts."""
    from onerec_prod.train.grpo import RlPrompt

    out = []
    for u, s in enumerate(train_seqs):
        for j in range(1, min(pairs_per_user, len(s) - 1) + 1):
            t = len(s) - j
            out.append(RlPrompt(f"u{u}-{t}", [], tuple(sids[s[t]]), [tuple(sids[i]) for i in s[:t]]))
    random.Random(seed).shuffle(out)
    return out


def metrics(ranker, model, users, seed: int = 0):
    from onerec_prod.eval.stats import per_user_gains

    ranked = ranker.rank(model, [u["history"] for u in users])
    return per_user_gains(ranked, [u["target"] for u in users], [5, 10])


def think_metrics(cfg, model, tok, trie, vocab, row_items, items, sids, users):
    """Think mode on ``users``: greedy rationale, then the beam (eval.beam.recommend)."""
    from onerec_prod.eval.beam import recommend
    from onerec_prod.eval.stats import per_user_gains

    t0 = time.perf_counter()
    hist = [[dict(items[i], sid=sids[i]) for i in u["history"]] for u in users]
    rec = recommend(model, tok, trie, vocab, hist, cfg.eval, think=True, max_items=cfg.samples.max_history)
    secs = time.perf_counter() - t0
    ranked = [[row_items[trie.row_of(s)] for s, _ in r][:10] for r in rec.sids]
    g = per_user_gains(ranked, [u["target"] for u in users], [10])
    n = len(users)
    return {"recall@10": sum(g["recall@10"]) / n, "ndcg@10": sum(g["ndcg@10"]) / n, "users": n,
            "ms_per_user": round(1000 * secs / n, 1),
            "rationale_tokens_mean": sum(len(tok(r)["input_ids"]) for r in rec.rationales) / n,
            "distinct_rationales": len(set(rec.rationales))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", required=True, help="SFT model dir trained by bench/quality.py.")
    p.add_argument("--dataset", default="../shared/data/beauty")
    p.add_argument("--config", default="configs/bench/quality_cpu.yaml")
    p.add_argument("--work", default="var/bench/quality", help="bench/quality.py's work dir (SID cache).")
    p.add_argument("--out", default=None, help="Where the RL model goes (default <work>/model-rl).")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"Config override (defaults: {' '.join(DEFAULT_GRPO)}).")
    p.add_argument("--minutes", type=float, default=15.0, help="RL wall-time budget.")
    p.add_argument("--val-users", type=int, default=1000)
    p.add_argument("--val-every", type=int, default=25)
    p.add_argument("--pairs-per-user", type=int, default=1)
    p.add_argument("--max-users", type=int, default=None, help="Test users (default all).")
    p.add_argument("--think-users", type=int, default=0)
    p.add_argument("--last", action="store_true", help="Keep the final weights, not the best validation step.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    add_threads_arg(p)
    args = p.parse_args(argv)
    start(args)

    from onerec_prod.eval.api import build_catalog_trie
    from onerec_prod.eval.stats import fmt_ci, paired_diff_ci, summarize
    from onerec_prod.model.io import load_model, load_tokenizer, save_model
    from onerec_prod.sid.tokens import SidVocab, level_sizes
    from onerec_prod.train.grpo import default_rewards, train_grpo

    work = Path(args.work).resolve()
    cfg = load_config(args.config, [f"paths.var_root={work}", *DEFAULT_GRPO, *args.set])
    g = cfg.grpo
    t_all = time.perf_counter()
    items, seqs, data_key = load_sequences(args.dataset, work)
    train_seqs, val, test = split(seqs)
    sids, sid_version, _ = service_sids(cfg, items, work, data_key)
    sizes = level_sizes(cfg.sid)
    tok = load_tokenizer(args.model)
    vocab = SidVocab.from_tokenizer(tok, sizes)
    trie, row_items = build_catalog_trie([dict(it, sid=sids[i]) for i, it in items.items()], sizes)
    ranker = StreamRanker(sids, vocab, trie, row_items, 10, cfg.eval.batch_size, cfg.samples.max_history)
    sft = load_model(args.model, device="cpu", dtype="float32")
    policy = load_model(args.model, device="cpu", dtype="float32")
    ref = load_model(args.model, device="cpu", dtype="float32") if g.kl_coef > 0 else None
    val_users = random.Random(args.seed).sample(val, min(args.val_users, len(val)))
    users = test if args.max_users is None else random.Random(args.seed).sample(test, args.max_users)
    prompts = rl_prompts(train_seqs, sids, args.pairs_per_user, g.seed)
    log.info("%d RL prompts (training pairs), %d validation users, %d test users", len(prompts), len(val_users),
             len(users))

    def val_score(m) -> dict[str, float]:
        gains = metrics(ranker, m, val_users)
        return {k: sum(gains[k]) / len(val_users) for k in ("recall@10", "ndcg@10")}

    v0 = val_score(policy)
    log.info("validation before RL: %s", v0)
    best = {"step": 0, **v0, "state": copy.deepcopy(policy.state_dict())}
    t_rl = time.perf_counter()
    deadline = t_rl + args.minutes * 60

    def on_step(step: int, model):
        out = {}
        if (step + 1) % args.val_every == 0:
            v = val_score(model)
            model.eval()
            out = {"val_recall@10": v["recall@10"], "val_ndcg@10": v["ndcg@10"]}
            log.info("step %d validation %s", step + 1, v)
            if v["recall@10"] + v["ndcg@10"] > best["recall@10"] + best["ndcg@10"]:
                best.update(step=step + 1, **v, state=copy.deepcopy(model.state_dict()))
        if time.perf_counter() > deadline:
            out["stop"] = True
        return out

    res = train_grpo(policy, ref, tok, prompts, trie, vocab, g, default_rewards(tok, vocab, g),
                     max_items=cfg.samples.max_history, on_step=on_step)
    curve = res.curve
    rl_seconds = time.perf_counter() - t_rl
    steps_done = len(curve)
    if not args.last:
        policy.load_state_dict(best["state"])
    policy.eval()
    out = Path(args.out or work / "model-rl")
    save_model(policy, tok, out, {"stage": "bench_rl", "parent": str(args.model), "dt": None,
                                  "sid_version": sid_version, "data_versions": {},
                                  "rl": {"curve": curve, "best_step": best["step"], "grpo": g.model_dump()}})

    t0 = time.perf_counter()
    gains = {"SFT": metrics(ranker, sft, users), "SFT + GRPO": metrics(ranker, policy, users)}
    eval_s = time.perf_counter() - t0
    summary = {k: summarize(v, seed=args.seed) for k, v in gains.items()}
    paired = {m: dict(zip(("mean", "low", "high"),
                          paired_diff_ci(gains["SFT + GRPO"][m], gains["SFT"][m], seed=args.seed), strict=True))
              for m in ("recall@10", "ndcg@10", "recall@5", "ndcg@5")}
    think = {}
    if args.think_users:
        tu = random.Random(args.seed + 1).sample(test, args.think_users)
        think = {"SFT": think_metrics(cfg, sft, tok, trie, vocab, row_items, items, sids, tu),
                 "SFT + GRPO": think_metrics(cfg, policy, tok, trie, vocab, row_items, items, sids, tu)}
        for name, mdl in (("SFT", sft), ("SFT + GRPO", policy)):
            t0 = time.perf_counter()
            gd = metrics(ranker, mdl, tu)
            think[name]["direct_recall@10"] = sum(gd["recall@10"]) / len(tu)
            think[name]["direct_ndcg@10"] = sum(gd["ndcg@10"]) / len(tu)
            think[name]["direct_ms_per_user"] = round(1000 * (time.perf_counter() - t0) / len(tu), 1)
    sig = [c["signal_groups"] for c in curve]
    blob = {"metrics": summary, "paired_rl_minus_sft": paired, "users": len(users), "steps": steps_done,
            "best_step": best["step"], "kept": "last" if args.last else "best validation",
            "rl_seconds": round(rl_seconds, 1), "eval_seconds": round(eval_s, 1),
            "signal_groups_mean": sum(sig) / max(len(sig), 1), "curve": curve, "grpo": g.model_dump(),
            "validation_before": v0, "think": think, "prompts": len(prompts),
            "total_seconds": round(time.perf_counter() - t_all, 1), "model": str(args.model), "out": str(out)}
    w = sys.stdout.write
    w(f"\nGRPO (direct mode) over {args.model}: {len(users)} test users, beam 10; {steps_done} steps x "
      f"{g.prompts_per_step} prompts x G={g.group_size}, lr {g.lr}, kl {g.kl_coef}, rewards hit/rank/prefix "
      f"{g.reward_hit}/{g.reward_rank}/{g.reward_prefix}; RL {rl_seconds:.0f}s; kept step {best['step']} "
      f"({blob['kept']})\n")
    for name, s in summary.items():
        w(f"  {name:12s} R@10 {fmt_ci(*(s['recall@10'][k] for k in ('mean', 'low', 'high')))}"
          f"  N@10 {fmt_ci(*(s['ndcg@10'][k] for k in ('mean', 'low', 'high')))}\n")
    for m in ("recall@10", "ndcg@10"):
        base = summary["SFT"][m]["mean"]
        d = paired[m]
        w(f"  paired RL - SFT {m}: {fmt_ci(d['mean'], d['low'], d['high'])} ({100 * d['mean'] / base:+.1f}%)\n")
    w(f"  groups with signal: {blob['signal_groups_mean']:.3f} (mean over steps)\n")
    w("curve (step: reward | hit-rate in group beam | signal | kl | val R@10 N@10):\n")
    for c in curve:
        if "val_recall@10" in c or c["step"] % max(args.val_every, 1) == 0:
            w(f"  {int(c['step']):4d}: {c['reward_mean']:.3f} | {c['hit_rate']:.3f} | {c['signal_groups']:.2f} | "
              f"{c['kl']:.2e} | {c.get('val_recall@10', float('nan')):.4f} {c.get('val_ndcg@10', float('nan')):.4f}\n")
    if think:
        w(f"think vs direct on {args.think_users} test users: {json.dumps(think)}\n")
    if args.json:
        Path(args.json).write_text(json.dumps(blob, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
