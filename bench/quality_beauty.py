"""LEGACY chat-row quality bench (superseded by bench/quality.py, the dense SID stream).

Kept only because bench/beam.py still imports its helpers; its direct-mode eval now decodes the
SID stream (eval.beam.recommend), which chat-trained models were never trained on, so its figures
are not comparable with docs/RESULTS.md. Original purpose: the paper's protocol on full Beauty.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/quality_beauty.py --config configs/bench/quality_cpu.yaml \
        [--sids service|letter] [--work var/bench/quality_cpu] [--max-users N] [--train-steps N] \
        [--max-train-minutes M] [--model DIR (skip training)] [--json OUT] [--set group.key=value ...]

Protocol (as OneRec-Think / TIGER on Beauty): P5 sequences truncated to their last 50 items;
leave-one-out per user: train = sliding next-item targets over ``seq[:-2]``, validation
``seq[-2]`` (not used), test = ``seq[-1]`` with history ``seq[:-1]`` (<= 49 items, all of it in
the prompt when ``samples.max_history`` >= 49); beam 10 over the trie of ALL 12,101 items;
Recall/NDCG@5/10 by :mod:`onerec_prod.eval.metrics`.

Pipeline pieces: SIDs from :func:`onerec_prod.sid.service.ensure_sids` (``--sids service``, MiniLM
+ residual k-means, cached in the work dir) or the LETTER SIDs (``--sids letter``: the 13 items whose
LETTER code is taken get the next free last-level code under the same prefix); the embedded base model of
:func:`onerec_prod.model.base.init_base_model`; prompts from :mod:`onerec_prod.samples.prompts`
(``sid_rec`` + ``text2sid`` + ``caption`` samples, plus ``general_lm`` rows over each user's rendered
training history, which teach every transition of a user in one short row); decoding by
:func:`onerec_prod.eval.beam.recommend`. Training is a plain in-process AdamW loop (loss on the
response tokens only, the LM head applied at those positions only), not the DeepSpeed trainer of
``onerec-prod train``: the bench must fit an hour on 2 CPU cores, without Spark or the lake.

The baselines train on the same ``seq[:-2]`` sequences and rank for the same test users.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import add_threads_arg, start

from onerec_prod.config import Config, load_config
from onerec_prod.eval.report import PAPER_TABLE, format_table

log = logging.getLogger("bench.quality_beauty")
HISTORY_CAP = 50  # sequences truncated to their last 50 items, as OneRec-Think's Beauty data


# --------------------------------------------------------------------------------------
# data and split


@dataclass
class Split:
    train_samples: list[tuple[list[str], str]]   # (history, target) sliding over seq[:-2]
    train_sequences: list[list[str]]             # seq[:-2] per user (baselines)
    test: list[dict[str, Any]]                   # event_id (= user), user_id, history seq[:-1], target seq[-1]


def load_beauty(dataset: Path) -> tuple[dict[str, dict[str, Any]], list[tuple[str, list[str]]]]:
    """Items by P5 id (item_id, title, categories) and per-user sequences (last 50 items)."""
    items: dict[str, dict[str, Any]] = {}
    with open(dataset / "p5" / "items_p5_ids.jsonl") as f:
        for line in f:
            r = json.loads(line)
            items[r["p5_item_id"]] = {"item_id": r["p5_item_id"], "title": r["title"],
                                      "categories": r["categories"], "description": None}
    seqs = []
    with open(dataset / "p5" / "sequential_data.txt") as f:
        for line in f:
            user, *its = line.split()
            seqs.append((user, its[-HISTORY_CAP:]))
    return items, seqs


def split_leave_one_out(sequences: list[tuple[str, list[str]]]) -> Split:
    train_samples, train_sequences, test = [], [], []
    for user, s in sequences:
        if len(s) < 3:
            continue
        train_sequences.append(s[:-2])
        train_samples.extend((s[:t], s[t]) for t in range(1, len(s) - 2))
        test.append({"event_id": user, "user_id": user, "history": s[:-1], "target_item_id": s[-1]})
    return Split(train_samples, train_sequences, test)


def letter_sids(dataset: Path, items: dict[str, dict]) -> dict[str, tuple[int, ...]]:
    """LETTER SIDs by P5 id (LC-Rec id = P5 id - 1); collisions moved to a free last-level code."""
    raw = json.loads((dataset / "letter_sid" / "Beauty.index.json").read_text())
    parsed = {lc: tuple(int(tok.strip("<>").split("_")[1]) for tok in toks) for lc, toks in raw.items()}
    taken = set(parsed.values())  # never move a duplicate onto a code another item owns
    out: dict[str, tuple[int, ...]] = {}
    seen: set[tuple[int, ...]] = set()
    moved = 0
    for lc_id in sorted(parsed, key=int):
        sid = parsed[lc_id]
        if sid in seen:
            prefix = sid[:-1]
            sid = next(prefix + (c,) for c in range(256) if prefix + (c,) not in taken)
            taken.add(sid)
            moved += 1
        seen.add(sid)
        out[str(int(lc_id) + 1)] = sid
    log.info("LETTER SIDs: %d items, %d collisions moved to a free last code", len(out), moved)
    missing = set(items) - set(out)
    if missing:
        raise ValueError(f"LETTER index lacks {len(missing)} items, e.g. {sorted(missing)[:3]}")
    return out


def service_sids(cfg: Config, items: dict[str, dict], work: Path) -> tuple[dict[str, tuple[int, ...]], str]:
    """SIDs from the pipeline's SID service (codebook fit on all items), cached in ``work``."""
    cache = work / f"sids-{cfg.sid.levels}x{cfg.sid.codebook_size}+{cfg.sid.collision_size}-s{cfg.sid.seed}.json"
    if cache.exists():
        blob = json.loads(cache.read_text())
        return {k: tuple(v) for k, v in blob["sids"].items()}, blob["sid_version"]
    from onerec_prod.sid.service import ensure_sids

    rows = [dict(it, sid=None, sid_version=None) for it in items.values()]
    mapping, version = ensure_sids(cfg, rows)
    cache.write_text(json.dumps({"sid_version": version, "sids": {k: list(v) for k, v in mapping.items()}}))
    return mapping, version


# --------------------------------------------------------------------------------------
# training samples and loop


def build_rows(split: Split, items: dict, sids: dict, cfg: Config, seed: int,
               history_lm: bool = True) -> list[tuple[str, Any]]:
    """Shuffled sample specs: ('rec', (history, target)) for every sliding target, ('text2sid', item) for
    every item, ('caption', item) for ``samples.caption_items_per_day`` items and, with ``history_lm``,
    ('histlm', seq): the ``general_lm`` task over a user's rendered training history (loss on every
    item: all of a user's transitions in one short row, ~13x fewer tokens than the sliding rows)."""
    rng = random.Random(seed)
    rows: list[tuple[str, Any]] = [("rec", s) for s in split.train_samples]
    if history_lm:
        rows += [("histlm", s) for s in split.train_sequences if len(s) >= 2]
    ids = sorted(items, key=int)
    rows += [("text2sid", i) for i in ids]
    rows += [("caption", i) for i in rng.sample(ids, min(len(ids), cfg.samples.caption_items_per_day))]
    rng.shuffle(rows)
    return rows


def render_row(tok, row, items: dict, sids: dict, cfg: Config) -> tuple[list[int], list[int]]:
    from onerec_prod.samples.prompts import (
        rec_messages,
        render_history,
        render_training_ids,
        task_messages,
        task_response,
    )
    from onerec_prod.sid.tokens import sid_to_text

    kind, spec = row
    if kind == "histlm":
        text = render_history([dict(items[i], sid=sids[i]) for i in spec], False, cfg.samples.max_history)
        return render_training_ids(tok, [], task_response("general_lm", text=text), cfg.train.max_length)
    if kind == "rec":
        hist, target = spec
        h = [dict(items[i], sid=sids[i]) for i in hist]
        msgs = rec_messages(h, think=False, max_items=cfg.samples.max_history)
        resp = task_response("sid_rec", sid=sid_to_text(sids[target]))
    else:
        it = items[spec]
        sid = sid_to_text(sids[spec])
        if kind == "text2sid":
            msgs = task_messages("text2sid", title=it["title"], categories=it["categories"])
            resp = task_response("text2sid", sid=sid)
        else:
            msgs = task_messages("caption", sid=sid)
            resp = task_response("caption", sid=sid, title=it["title"], categories=it["categories"], description="")
    return render_training_ids(tok, msgs, resp, cfg.train.max_length)


def _row_len(row) -> int:
    return len(row[1][0]) if row[0] == "rec" else len(row[1]) if row[0] == "histlm" else 0


def batches(rows: list, batch_size: int, seed: int):
    """Endless batches; within chunks of 64 batches rows are sorted by history length (less padding)."""
    rng = random.Random(seed)
    chunk = batch_size * 64
    while True:
        for lo in range(0, len(rows), chunk):
            part = sorted(rows[lo: lo + chunk], key=_row_len)
            group = [part[i: i + batch_size] for i in range(0, len(part), batch_size)]
            rng.shuffle(group)
            yield from group
        rng.shuffle(rows)


def train(cfg: Config, base_dir: Path, rows: list, items: dict, sids: dict, out_dir: Path,
          max_minutes: float | None, sid_version: str) -> tuple[Path, dict[str, Any]]:
    """Plain AdamW loop over ``rows``; returns the saved model dir and training stats."""
    import torch
    import torch.nn.functional as F

    from onerec_prod.model.io import load_model, load_tokenizer, save_model

    tcfg = cfg.train
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tok, model = load_tokenizer(base_dir), load_model(base_dir, device=dev, dtype="float32")
    model.train()
    steps = tcfg.max_steps if tcfg.max_steps > 0 else math.ceil(tcfg.epochs * len(rows) / tcfg.per_device_batch_size)
    warm = max(1, int(tcfg.warmup_ratio * steps))
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay, betas=(0.9, 0.95))
    budget_s = max_minutes * 60 if max_minutes else None
    t0 = time.perf_counter()

    def lr_factor(s: int) -> float:
        """Linear warm-up, then cosine to 10% over steps or the time budget, whichever ends first."""
        done = s / steps if budget_s is None else max(s / steps, (time.perf_counter() - t0) / budget_s)
        return min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, done))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    torch.manual_seed(tcfg.seed)
    pad = tok.pad_token_id
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    it = batches(rows, tcfg.per_device_batch_size, tcfg.seed)
    tokens, ema, step = 0, None, 0
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev == "cuda" else torch.autocast("cpu", enabled=False)
    for step in range(1, steps + 1):
        enc = [render_row(tok, r, items, sids, cfg) for r in next(it)]
        width = max(len(i) for i, _ in enc)
        ids = torch.full((len(enc), width), pad, dtype=torch.long)
        lab = torch.full((len(enc), width), -100, dtype=torch.long)
        for b, (i, lbl) in enumerate(enc):
            ids[b, : len(i)], lab[b, : len(i)] = torch.tensor(i), torch.tensor(lbl)
        attn = torch.arange(width)[None, :] < torch.tensor([len(i) for i, _ in enc])[:, None]
        ids, lab, attn = ids.to(dev), lab.to(dev), attn.long().to(dev)
        with amp:
            h = decoder(input_ids=ids, attention_mask=attn).last_hidden_state[:, :-1]
            sel = lab[:, 1:] != -100
            loss = F.cross_entropy(head(h[sel]).float(), lab[:, 1:][sel])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        tokens += int(attn.sum())
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        elapsed = time.perf_counter() - t0
        if step % tcfg.logging_steps == 0 or step == steps:
            log.info("step %d/%d loss %.4f (ema %.4f) lr %.2e %.0f tok/s %.0fs", step, steps, loss.item(), ema,
                     sched.get_last_lr()[0], tokens / elapsed, elapsed)
        if budget_s is not None and elapsed > budget_s:
            log.info("time budget of %.1f min reached at step %d/%d", max_minutes, step, steps)
            break
    model.eval()
    stats = {"steps": step, "planned_steps": steps, "samples": step * tcfg.per_device_batch_size,
             "train_rows": len(rows), "loss_ema": ema, "tokens": tokens, "seconds": round(time.perf_counter() - t0, 1),
             "device": dev}
    save_model(model, tok, out_dir, {"stage": "bench_quality", "parent": str(base_dir), "dt": None,
                                     "sid_version": sid_version, "data_versions": {}, "train": stats})
    return out_dir, stats


# --------------------------------------------------------------------------------------
# evaluation


def evaluate_model(cfg: Config, model_dir: Path, users: list[dict], items: dict, sids: dict) -> dict[str, Any]:
    """Recall/NDCG of the model for ``users`` (constrained beam over all catalog SIDs)."""
    import torch

    from onerec_prod.eval.api import build_catalog_trie
    from onerec_prod.eval.beam import recommend
    from onerec_prod.eval.metrics import compute_metrics
    from onerec_prod.model.io import load_model, load_tokenizer
    from onerec_prod.sid.tokens import SidVocab, level_sizes

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    catalog = [dict(it, sid=sids[i]) for i, it in sorted(items.items(), key=lambda kv: int(kv[0]))]
    trie, row_items = build_catalog_trie(catalog, level_sizes(cfg.sid))
    tok, model = load_tokenizer(model_dir), load_model(model_dir, device=dev)
    vocab = SidVocab.from_tokenizer(tok, level_sizes(cfg.sid))
    hists = [[dict(items[i], sid=sids[i]) for i in u["history"]] for u in users]
    t0 = time.perf_counter()
    recs = recommend(model, tok, trie, vocab, hists, cfg.eval, think=False, max_items=cfg.samples.max_history)
    secs = time.perf_counter() - t0
    ranked = [[row_items[trie.row_of(s)] for s, _ in r] for r in recs.sids]
    out: dict[str, Any] = compute_metrics(ranked, [u["target_item_id"] for u in users], cfg.eval.ks)
    out.update(seconds=round(secs, 1), users_per_s=round(len(users) / secs, 2), trie_items=trie.num_items)
    return out


def score_baselines(cfg: Config, split: Split, users: list[dict]) -> tuple[dict, dict]:
    """MostPop and SASRec trained once on ``seq[:-2]``; metrics on ``users`` and on every test user."""
    from onerec_prod.eval.baselines import MostPop
    from onerec_prod.eval.metrics import compute_metrics
    from onerec_prod.eval.sasrec import SasrecParams, train_sasrec

    k = max(cfg.eval.ks)
    models = {}
    if "mostpop" in cfg.eval.baselines:
        models["mostpop"] = MostPop.fit(split.train_sequences)
    if "sasrec" in cfg.eval.baselines:
        t0 = time.perf_counter()
        models["sasrec"] = train_sasrec(split.train_sequences, SasrecParams(
            epochs=cfg.eval.sasrec_epochs, dim=cfg.eval.sasrec_dim, max_len=cfg.eval.sasrec_max_len,
            seed=cfg.eval.seed))
        log.info("sasrec trained in %.0fs", time.perf_counter() - t0)
    sample, every = {}, {}
    for name, model in models.items():
        for group, out in ((users, sample), (split.test, every)):
            ranked = model.recommend([u["history"] for u in group], k)
            out[name] = compute_metrics(ranked, [u["target_item_id"] for u in group], cfg.eval.ks)
    return sample, every


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/bench/quality_cpu.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Config override.")
    p.add_argument("--sids", choices=["service", "letter"], default="service")
    p.add_argument("--work", default=None, help="Work dir (default var/bench/<config stem>).")
    p.add_argument("--max-users", type=int, default=None, help="Override eval.max_users (seeded sample).")
    p.add_argument("--train-steps", type=int, default=None, help="Override train.max_steps.")
    p.add_argument("--max-train-minutes", type=float, default=None, help="Stop training after M minutes.")
    p.add_argument("--model", default=None, help="Evaluate this trained model dir (skip training).")
    p.add_argument("--json", default=None, help="Write the results here too.")
    p.add_argument("--no-history-lm", action="store_true",
                   help="Train without the general_lm rows over users' training histories.")
    add_threads_arg(p)
    args = p.parse_args(argv)
    start(args)
    from onerec_prod.config import REPO_ROOT

    work = Path(args.work or REPO_ROOT / "var" / "bench" / Path(args.config).stem).resolve()
    work.mkdir(parents=True, exist_ok=True)
    overrides = [f"paths.var_root={work}", *args.set]
    if args.max_users is not None:
        overrides.append(f"eval.max_users={args.max_users}")
    if args.train_steps is not None:
        overrides.append(f"train.max_steps={args.train_steps}")
    cfg = load_config(args.config, overrides)
    t_all = time.perf_counter()

    items, seqs = load_beauty(cfg.paths.dataset)
    split = split_leave_one_out(seqs)
    log.info("Beauty: %d items, %d users, %d sliding train samples", len(items), len(split.test),
             len(split.train_samples))
    if args.sids == "letter":
        if cfg.sid.num_levels != 4 or cfg.sid.codebook_size != 256 or cfg.sid.collision_size != 256:
            raise SystemExit("--sids letter needs sid.levels=3, codebook_size=256, collision_size=256 (4 x 256)")
        sids, sid_version = letter_sids(cfg.paths.dataset, items), "letter"
    else:
        sids, sid_version = service_sids(cfg, items, work)

    from onerec_prod.eval.api import select_users

    users = select_users(split.test, cfg.eval.max_users, cfg.eval.seed)
    results: dict[str, Any] = {"config": args.config, "sids": args.sids, "sid_version": sid_version,
                               "n_test_users": len(users), "n_all_users": len(split.test)}
    if args.model:
        model_dir = Path(args.model)
    else:
        from onerec_prod.model.base import catalog_texts_from_dataset, init_base_model

        key = json.dumps([cfg.model.model_dump(), cfg.sid.model_dump()], sort_keys=True)
        base = work / f"base-{hashlib.sha256(key.encode()).hexdigest()[:12]}"  # model + SID sizes only
        if not any(base.glob("*.safetensors")):
            init_base_model(cfg, catalog_texts_from_dataset(cfg), base)
        rows = build_rows(split, items, sids, cfg, cfg.samples.seed, history_lm=not args.no_history_lm)
        model_dir, results["train"] = train(cfg, base, rows, items, sids, work / f"model-{args.sids}",
                                            args.max_train_minutes, sid_version)
    results["model_dir"] = str(model_dir)
    results["model"] = evaluate_model(cfg, model_dir, users, items, sids)
    results["baselines"], results["baselines_all_users"] = score_baselines(cfg, split, users)
    results["total_seconds"] = round(time.perf_counter() - t_all, 1)

    table = {f"ours ({args.sids} SIDs)": results["model"], **results["baselines"], **PAPER_TABLE}
    if len(users) < len(split.test):
        table.update({f"{k} (all users)": v for k, v in results["baselines_all_users"].items()})
    sys.stdout.write(f"\nBeauty leave-one-out, beam {cfg.eval.beam_size}, {len(users)} of {len(split.test)} "
                     f"test users (seed {cfg.eval.seed}), {results['total_seconds']:.0f}s total\n")
    sys.stdout.write(format_table(table) + "\n")
    if "train" in results:
        tr = results["train"]
        sys.stdout.write(f"training: {tr['steps']} steps, {tr['samples']} samples of {tr['train_rows']} rows, "
                         f"{tr['tokens']} tokens, {tr['seconds']}s on {tr['device']}, loss(ema) {tr['loss_ema']:.3f}\n")
    sys.stdout.write(f"beam search: {results['model']['users_per_s']} users/s\n")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
