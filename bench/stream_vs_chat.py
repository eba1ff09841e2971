"""Training throughput of the SID stream vs the old chat rows, in next-item targets per second.

    .venv/bin/python bench/stream_vs_chat.py [--dataset ../shared/data/beauty] [--seconds 60] \\
        [--config configs/bench/quality_cpu.yaml] [--threads 1]

Same base model, same users, same optimizer and loop (:func:`onerec_prod.train.stream_fit`'s
batching: the LM head only where a label is), one after the other in this process:

- chat rows: one ``sid_rec`` chat prompt (the user's history SIDs) per target, loss on the
  response (the target SID and end of turn), as the pipeline trained recommendation before;
- stream rows: one row per user holding the SID stream, loss on the codes of every item after
  the first (:mod:`onerec_prod.samples.stream`).

Each arm trains for ``--seconds`` of wall time; the bench prints tokens/s, targets/s and the ratio
stream / chat of targets trained per second.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path

from _common import add_threads_arg, start

log = logging.getLogger("bench.stream_vs_chat")


def _train_for(model, rows, pad_id: int, seconds: float, batch_rows: int, targets_of) -> dict:
    import torch
    import torch.nn.functional as F

    from onerec_prod.train.stream_fit import _collate

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    model.train()
    rng = random.Random(0)
    t0 = time.perf_counter()
    steps = tokens = targets = 0
    while time.perf_counter() - t0 < seconds:
        idx = rng.sample(range(len(rows)), batch_rows)
        ids, lab, attn = _collate(rows, idx, pad_id)
        h = decoder(input_ids=ids, attention_mask=attn).last_hidden_state[:, :-1]
        sel = lab[:, 1:] != -100
        loss = F.cross_entropy(head(h[sel]).float(), lab[:, 1:][sel])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
        tokens += int(attn.sum())
        targets += sum(targets_of(rows[i]) for i in idx)
    secs = time.perf_counter() - t0
    return {"steps": steps, "seconds": round(secs, 1), "tokens_per_s": round(tokens / secs),
            "targets_per_s": round(targets / secs, 1), "batch_rows": batch_rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--dataset", default="../shared/data/beauty")
    p.add_argument("--config", default="configs/bench/quality_cpu.yaml")
    p.add_argument("--work", default=None, help="Work dir (default var/bench/quality: reuses its SIDs/base).")
    p.add_argument("--seconds", type=float, default=60.0, help="Wall time per arm.")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", default=None)
    add_threads_arg(p)
    args = p.parse_args(argv)
    start(args)
    import quality

    from onerec_prod.config import REPO_ROOT, load_config
    from onerec_prod.model.base import init_base_model
    from onerec_prod.model.io import load_model, load_tokenizer
    from onerec_prod.samples.prompts import rec_messages, render_training_ids, task_response
    from onerec_prod.sid.embed import item_text
    from onerec_prod.sid.tokens import SidVocab, level_sizes, sid_to_text

    work = Path(args.work or REPO_ROOT / "var" / "bench" / "quality").resolve()
    work.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config, [f"paths.var_root={work}", *args.set])
    items, seqs, key = quality.load_sequences(args.dataset, work)
    train, _, _ = quality.split(seqs)
    sids, _, _ = quality.service_sids(cfg, items, work, key)
    base = work / "base-stream-vs-chat"
    if not any(base.glob("*.safetensors")):
        init_base_model(cfg, [item_text(it) for it in items.values()], base)
    tok = load_tokenizer(base)
    vocab = SidVocab.from_tokenizer(tok, level_sizes(cfg.sid))
    mh = cfg.samples.max_history

    stream = quality.stream_rows(train, sids, vocab, mh)
    chat = []
    for s in train:
        for t in range(1, len(s)):
            hist = [dict(items[i], sid=sids[i]) for i in s[:t]]
            chat.append(render_training_ids(tok, rec_messages(hist, think=False, max_items=mh),
                                            task_response("sid_rec", sid=sid_to_text(sids[s[t]])),
                                            cfg.train.max_length))
    n_levels = vocab.num_levels
    out = {}
    for name, rows, batch, targets_of in (
        ("chat", chat, 32, lambda r: 1),
        ("stream", stream, 128, lambda r: sum(x != -100 for x in r[1]) // n_levels),
    ):
        model = load_model(base, device="cpu", dtype="float32")
        tokens = sum(len(r[0]) for r in rows)
        targets = sum(targets_of(r) for r in rows)
        out[name] = {"rows": len(rows), "tokens_per_epoch": tokens, "targets_per_epoch": targets,
                     **_train_for(model, rows, tok.pad_token_id, args.seconds, batch, targets_of)}
        log.info("%s: %s", name, out[name])
    ratio = out["stream"]["targets_per_s"] / out["chat"]["targets_per_s"]
    out["ratio_targets_per_s"] = round(ratio, 2)
    sys.stdout.write(f"\n{'':8s} {'rows':>8s} {'tokens/epoch':>13s} {'tokens/s':>9s} {'targets/s':>10s}\n")
    for name in ("chat", "stream"):
        o = out[name]
        sys.stdout.write(f"{name:8s} {o['rows']:8d} {o['tokens_per_epoch']:13d} {o['tokens_per_s']:9d} "
                         f"{o['targets_per_s']:10.1f}\n")
    sys.stdout.write(f"stream / chat, next-item targets trained per second: {ratio:.1f}x\n")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
