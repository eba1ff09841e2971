"""Constrained beam search: ours vs Hugging Face ``generate`` with ``prefix_allowed_tokens_fn``.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/beam.py [--model DIR] [--config configs/bench/quality_cpu.yaml] \
        [--sids letter|service] [--users 32] [--beams 10,32] [--batch-size 8] [--threads 1] [--work DIR]

Same model, same Beauty test users (history ``seq[:-1]``, prompts from ``rec_messages``), same
trie of all 12,101 catalog SIDs; for every beam size B of ``--beams``, B results per user. HF runs
``generate(num_beams=B, num_return_sequences=B, max_new_tokens=levels,
prefix_allowed_tokens_fn=<trie walk>)`` from ``prompt + <|sid_begin|>``.

Timing: both decoders run in this one process, on the same users and batch size (users per
forward), one after the other per beam size. Each is timed by wall clock and by process CPU time;
on a shared, oversubscribed machine the CPU-time ratio is the steadier one (with ``--threads 1``
it is the work done, without the time spent waiting for a core). ``--repeats N`` runs each decoder
N times, alternating, and keeps the fastest run of each.

Agreement: HF ranks finished beams by ``sum(log p) / generated_length ** length_penalty``; every
SID has the same length, so its order equals ours (plain sums) and ``hf_score * levels`` equals
our score. Both use log_softmax over the full vocabulary then mask, so top-1 and the top-10 sets
must match up to float noise on near-ties; the bench prints how many users agree.

Without ``--model`` a fresh embedded model is built and its SID embedding rows are redrawn
(seeded, std 0.5): a random model's SID scores are near-uniform and ties would make the
agreement check meaningless. Pass a trained model (e.g. bench/quality_beauty.py's) for realism.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ helpers (quality_beauty)

from _common import add_threads_arg, start  # noqa: E402
from quality_beauty import letter_sids, load_beauty, service_sids, split_leave_one_out  # noqa: E402

from onerec_prod.config import REPO_ROOT, load_config  # noqa: E402

log = logging.getLogger("bench.beam")


def hf_beam(model, prompts, trie, vocab, beam: int, batch_size: int, pad_id: int):
    """HF generate with a per-token Python prefix function; returns [(codes, score_sum)] per prompt."""
    import torch

    from onerec_prod.eval.beam import _left_pad

    levels = trie.num_levels
    out = []
    for lo in range(0, len(prompts), batch_size):
        batch = [p + [vocab.begin_id] for p in prompts[lo: lo + batch_size]]
        ids, attn, _ = _left_pad(batch, pad_id, model.device)
        width = ids.shape[1]

        def allowed(_batch_id: int, seq: torch.Tensor, width: int = width) -> list[int]:
            gen = seq[width:].tolist()
            codes = [vocab.code_of(lvl, t) for lvl, t in enumerate(gen)]
            if None in codes or len(codes) >= levels:
                return [vocab.end_id]
            return [vocab.level_ids[len(codes)][c] for c in trie.allowed(codes)] or [vocab.end_id]

        with torch.inference_mode():
            res = model.generate(input_ids=ids, attention_mask=attn, num_beams=beam, num_return_sequences=beam,
                                 max_new_tokens=levels, min_new_tokens=levels, do_sample=False,
                                 prefix_allowed_tokens_fn=allowed, length_penalty=1.0, early_stopping=True,
                                 output_scores=True, return_dict_in_generate=True, pad_token_id=pad_id,
                                 eos_token_id=vocab.end_id, temperature=None, top_p=None, top_k=None)
        seqs = res.sequences[:, width:].tolist()
        scores = res.sequences_scores.tolist()
        for b in range(len(batch)):
            rows = []
            for j in range(b * beam, (b + 1) * beam):
                codes = tuple(vocab.code_of(lvl, t) for lvl, t in enumerate(seqs[j][:levels]))
                rows.append((codes, scores[j] * levels))
            out.append(rows)
    return out


def _timed(fn):
    """``(result, (wall seconds, process CPU seconds))`` of ``fn()``."""
    w0, c0 = time.perf_counter(), time.process_time()
    res = fn()
    return res, (time.perf_counter() - w0, time.process_time() - c0)


def _report(beam: int, n: int, ours, hf, trie, t_ours, t_hf) -> str:
    """Throughput, ratio and agreement lines of one beam size."""
    top1 = sum(a[0][0] == b[0][0] for a, b in zip(ours, hf, strict=True))
    same_set = sum({s for s, _ in a} == {s for s, _ in b} for a, b in zip(ours, hf, strict=True))
    same_order = sum([s for s, _ in a] == [s for s, _ in b] for a, b in zip(ours, hf, strict=True))
    hf_valid = sum(trie.contains(s) for r in hf for s, _ in r)
    gap = max(abs(sa - dict(b).get(s, sa)) for a, b in zip(ours, hf, strict=True) for s, sa in a)
    return (
        f"beam {beam}:\n"
        f"  ours (eval.beam.beam_search_sids):                 {n / t_ours[1]:8.2f} users/s by CPU time "
        f"({t_ours[1]:.2f}s), {n / t_ours[0]:8.2f} by wall ({t_ours[0]:.2f}s)\n"
        f"  HF generate + prefix_allowed_tokens_fn:             {n / t_hf[1]:8.2f} users/s by CPU time "
        f"({t_hf[1]:.2f}s), {n / t_hf[0]:8.2f} by wall ({t_hf[0]:.2f}s)\n"
        f"  speed-up ours/HF: {t_hf[1] / t_ours[1]:.2f}x by CPU time, {t_hf[0] / t_ours[0]:.2f}x by wall\n"
        f"  agreement: top-1 {top1}/{n}, same top-{beam} set {same_set}/{n}, same order {same_order}/{n}; "
        f"HF results in catalog {hf_valid}/{sum(len(r) for r in hf)}; max |score diff| {gap:.2e}\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/bench/quality_cpu.yaml")
    p.add_argument("--model", default=None, help="Trained model dir (default: fresh model, sharpened SID rows).")
    p.add_argument("--sids", choices=["service", "letter"], default="letter")
    p.add_argument("--users", type=int, default=32)
    p.add_argument("--beams", default="10,32", help="Comma-separated beam sizes, each timed and checked.")
    p.add_argument("--repeats", type=int, default=1, help="Runs per decoder and beam size (fastest kept).")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--work", default=None)
    add_threads_arg(p)
    args = p.parse_args(argv)
    start(args)
    import torch

    from onerec_prod.eval.api import build_catalog_trie
    from onerec_prod.eval.beam import beam_search_sids
    from onerec_prod.model.io import load_model, load_tokenizer
    from onerec_prod.samples.prompts import inference_prompt_ids, rec_messages
    from onerec_prod.sid.tokens import SidVocab, level_sizes

    work = Path(args.work or REPO_ROOT / "var" / "bench" / "beam").resolve()
    work.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config, [f"paths.var_root={work}"])
    items, seqs = load_beauty(cfg.paths.dataset)
    split = split_leave_one_out(seqs)
    sids = letter_sids(cfg.paths.dataset, items) if args.sids == "letter" else service_sids(cfg, items, work)[0]
    sizes = level_sizes(cfg.sid)
    trie, _ = build_catalog_trie([dict(it, sid=sids[i]) for i, it in items.items()], sizes)

    if args.model:
        model_dir = Path(args.model)
    else:
        from onerec_prod.model.base import catalog_texts_from_dataset, init_base_model

        model_dir = work / f"base-{cfg.digest()}"
        if not any(model_dir.glob("*.safetensors")):
            init_base_model(cfg, catalog_texts_from_dataset(cfg), model_dir)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tok, model = load_tokenizer(model_dir), load_model(model_dir, device=dev)
    vocab = SidVocab.from_tokenizer(tok, sizes)
    if not args.model:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            emb = model.get_input_embeddings().weight
            for ids in vocab.level_ids:
                emb[list(ids)] = (torch.randn(len(ids), emb.shape[1], generator=g) * 0.5).to(emb)

    users = split.test[: args.users]
    prompts = [inference_prompt_ids(tok, rec_messages([dict(items[i], sid=sids[i]) for i in u["history"]],
                                                      think=False, max_items=cfg.samples.max_history), think=False)
               for u in users]
    n = len(users)
    avg_len = sum(len(p) for p in prompts) / n
    sys.stdout.write(f"\nconstrained beam search, {n} Beauty users (mean prompt {avg_len:.0f} tokens), "
                     f"batch {args.batch_size} users per forward, {dev}, {torch.get_num_threads()} thread(s), "
                     f"trie {trie.num_items} items, {trie.num_levels} levels\n")
    for beam in [int(b) for b in args.beams.split(",")]:
        beam_search_sids(model, prompts[:2], trie, vocab, beam, batch_size=2)  # warm-up
        hf_beam(model, prompts[:1], trie, vocab, beam, 1, tok.pad_token_id)
        t_ours = t_hf = (float("inf"), float("inf"))  # (wall, cpu): fastest of the runs
        for _ in range(max(1, args.repeats)):
            ours, t = _timed(lambda b=beam: beam_search_sids(model, prompts, trie, vocab, b, batch_size=args.batch_size))
            t_ours = (min(t_ours[0], t[0]), min(t_ours[1], t[1]))
            hf, t = _timed(lambda b=beam: hf_beam(model, prompts, trie, vocab, b, args.batch_size, tok.pad_token_id))
            t_hf = (min(t_hf[0], t[0]), min(t_hf[1], t[1]))
        sys.stdout.write(_report(beam, n, ours, hf, trie, t_ours, t_hf))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
