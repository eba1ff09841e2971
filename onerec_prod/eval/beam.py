"""Trie-constrained beam search over SIDs, rationale generation, and a ``recommend`` helper.

:func:`beam_search_sids` is the decoder of eval, RL rollouts and Think-Ahead serving:

* batched over users: prompts are left padded, with an attention mask and explicit position ids;
* the prompt (plus ``<|sid_begin|>``) runs once per user, and its KV cache is never copied to
  the beams (start prefixes are fed as one block of their tokens): the beams of a user are decoded as a token tree over that one cache
  row. Each level appends one block of ``beams`` tokens to the user's row, with a 4D attention
  mask that lets every new token see the prompt and its own beam's earlier tokens only
  (:class:`_TreeBeams`). A level then costs one forward of ``users x beams`` tokens and no cache
  traffic, whatever the prompt length. Attention kernels without custom masks (flash, flex) fall
  back to one cache row per beam, re-indexed per level (:class:`_ExpandedBeams`);
* constraints are tensors, not callbacks: at level ``l`` the scores of the ``sizes[l]`` level
  tokens are read from the log-softmax over the full vocabulary (``logits - logsumexp``), ``-inf``
  is put where the trie's ``next_node[l]`` row is ``-1``, and one ``topk`` over
  ``beams x codes`` picks the beams;
* scores are sums of log-probabilities (no length normalisation: every SID has the same length).

Results hold distinct SIDs (or prefixes, with ``levels``), best first; when fewer valid
continuations than ``beam_size`` exist, fewer are returned (no padding, no repeats).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

from onerec_prod.sid.tokens import SidVocab
from onerec_prod.sid.trie import SidTrie

log = logging.getLogger(__name__)

Sid = tuple[int, ...]
Scored = tuple[Sid, float]

THINK_END = "</think>"


def _device(model):
    return next(model.parameters()).device


def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device):
    """``(input_ids, attention_mask, position_ids)`` of left-padded ``seqs``."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[i, width - len(s):] = 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


def _check_prefixes(start_prefixes, n_prompts: int, stop: int) -> int:
    """Common prefix length of every start prefix (all must share it)."""
    if len(start_prefixes) != n_prompts:
        raise ValueError(
            f"start_prefixes: one list per prompt expected, got {len(start_prefixes)} for {n_prompts} prompts"
        )
    lengths = {len(codes) for per_user in start_prefixes for codes, _ in per_user}
    if len(lengths) > 1:
        raise ValueError(f"start_prefixes: every prefix must have the same length, got lengths {sorted(lengths)}")
    k = lengths.pop() if lengths else 0
    if k > stop:
        raise ValueError(f"start_prefixes: prefixes of length {k} are longer than levels={stop}")
    return k


def beam_search_sids(
    model,
    prompts: list[list[int]],
    trie: SidTrie,
    vocab: SidVocab,
    beam_size: int,
    *,
    levels: int | None = None,
    start_prefixes: list[list[tuple[Sequence[int], float]]] | None = None,
    batch_size: int = 16,
) -> list[list[Scored]]:
    """Constrained beam search of SIDs (or SID prefixes) for every prompt.

    Args:
        model: a causal LM (HF) whose vocabulary holds ``vocab``'s tokens; used as is (eval mode
            expected), under ``torch.inference_mode``.
        prompts: token ids per user, ending right before ``<|sid_begin|>`` (which is appended
            here), e.g. from :func:`onerec_prod.samples.prompts.inference_prompt_ids`.
        trie: every valid SID (the whole catalog of the model's sid_version).
        vocab: token ids of the SID vocabulary.
        beam_size: beams kept per level, and the most results per user.
        levels: stop after this many levels (Think-Ahead prefixes); default all levels.
        start_prefixes: per prompt, ``(prefix codes, prefix score)`` pairs to continue from; every
            prefix has the same length ``k``; the search fills levels ``k+1..levels`` and adds the
            prefix score. Prefixes absent from the trie are dropped (logged).
        batch_size: users per forward pass.

    Returns:
        Per prompt, up to ``beam_size`` distinct ``(codes, score)`` pairs, best first; ``codes``
        has ``levels`` entries (the prefix included); ``score`` is the summed log-probability.
    """
    import torch

    n_levels = trie.num_levels
    if vocab.num_levels != n_levels:
        raise ValueError(f"vocab has {vocab.num_levels} SID levels but the trie has {n_levels}")
    stop = n_levels if levels is None else int(levels)
    if not 1 <= stop <= n_levels:
        raise ValueError(f"levels={levels} must be in 1..{n_levels}")
    if beam_size < 1 or batch_size < 1:
        raise ValueError(f"beam_size ({beam_size}) and batch_size ({batch_size}) must be >= 1")
    if start_prefixes is not None:
        _check_prefixes(start_prefixes, len(prompts), stop)
    # batches of similar prompt length (less padding); results go back to the input order
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    out: list[list[Scored]] = [[] for _ in prompts]
    with torch.inference_mode():
        for lo in range(0, len(order), batch_size):
            idx = order[lo: lo + batch_size]
            pre = None if start_prefixes is None else [start_prefixes[i] for i in idx]
            got = _search_batch(model, [prompts[i] for i in idx], trie, vocab, beam_size, stop, pre)
            for i, res in zip(idx, got, strict=True):
                out[i] = res
    return out


def _valid_prefixes(trie: SidTrie, per_user) -> list[tuple[Sid, float, int]]:
    """Distinct prefixes of one user that exist in the trie (max score kept), with their nodes."""
    best: dict[Sid, float] = {}
    for codes, score in per_user:
        codes, score = tuple(int(c) for c in codes), float(score)
        if math.isnan(score):
            raise ValueError(f"start_prefixes: prefix {codes} has a NaN score")
        if trie.node_of(codes) < 0:
            log.warning("beam_search_sids: dropping start prefix %s (not in the catalog trie)", codes)
            continue
        best[codes] = max(score, best.get(codes, float("-inf")))
    return [(c, s, trie.node_of(c)) for c, s in best.items()]


class _TreeBeams:
    """Beams of a batch of users decoded as a token tree over ONE prompt cache per user.

    The KV cache keeps one row per user: the prompt, then every token fed for any of the user's
    beams, appended block after block (never copied, never re-indexed). A 4D attention mask tells
    each new token which cache columns it sees: its user's prompt (not the left padding) and its
    own beam's earlier tokens. ``seen`` (users, beams, columns) holds that row per live beam.
    """

    def __init__(self, model, cache, attn):
        import torch

        self.model, self.cache = model, cache
        self.seen = attn.bool()[:, None, :]  # (b, 1, L): the prompt before any beam split
        self.bool_mask = getattr(model.config, "_attn_implementation", "sdpa") == "sdpa"
        self.dtype = next(model.parameters()).dtype
        self._torch = torch

    def select(self, src):
        """Keep, for new beam ``j`` of user ``i``, the history of old beam ``src[i, j]``."""
        self.seen = self.seen.gather(1, src[..., None].expand(-1, -1, self.seen.shape[2]))

    def feed(self, toks, start):
        """Feed ``toks`` (b, w, d): ``d`` tokens per beam at positions ``start + 0..d-1``; logits of each beam's last token."""
        torch = self._torch
        b, w, d = toks.shape
        dev = toks.device
        cols = self.seen.shape[2]
        # token r of beam i sees token c of beam j iff i == j and c <= r
        own = (torch.eye(w, dtype=torch.bool, device=dev)[:, None, :, None]
               & torch.ones(d, d, dtype=torch.bool, device=dev).tril()[None, :, None, :]).reshape(w * d, w * d)
        q_seen = self.seen[:, :, None, :].expand(b, w, d, cols).reshape(b, w * d, cols)
        mask = torch.cat([q_seen, own[None].expand(b, -1, -1)], 2)[:, None]  # (b, 1, w*d, cols + w*d)
        if not self.bool_mask:  # eager attention adds the mask to the scores
            mask = torch.zeros(mask.shape, dtype=self.dtype, device=dev).masked_fill(
                ~mask, torch.finfo(self.dtype).min)
        pos = start[:, None] + torch.arange(d, device=dev).repeat(w)[None, :]
        last = torch.arange(w, device=dev) * d + (d - 1)
        res = self.model(input_ids=toks.reshape(b, w * d), attention_mask=mask, position_ids=pos,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=last)
        self.cache = res.past_key_values
        self.seen = torch.cat([self.seen, own[last][None].expand(b, -1, -1)], 2)  # each beam: + its own tokens
        return res.logits  # (b, w, vocab)


class _ExpandedBeams:
    """Fallback for attention kernels without custom masks: one cache row per beam (re-indexed per level)."""

    def __init__(self, model, cache, attn):
        import torch

        self.model, self.cache, self.attn, self.width = model, cache, attn, 1
        self._torch = torch

    def select(self, src):
        torch = self._torch
        b, w = src.shape
        flat = (torch.arange(b, device=src.device)[:, None] * self.width + src).view(-1)
        self.cache.reorder_cache(flat)
        self.attn, self.width = self.attn[flat], w

    def feed(self, toks, start):
        torch = self._torch
        b, w, d = toks.shape
        self.attn = torch.cat([self.attn, torch.ones((b * w, d), dtype=self.attn.dtype, device=toks.device)], 1)
        pos = start.repeat_interleave(w)[:, None] + torch.arange(d, device=toks.device)[None, :]
        res = self.model(input_ids=toks.reshape(b * w, d), attention_mask=self.attn, position_ids=pos,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.cache = res.past_key_values
        return res.logits[:, -1, :].view(b, w, -1)


def _beams_for(model, cache, attn):
    """Token-tree decoding where the attention takes a custom 4D mask (sdpa, eager); expanded rows otherwise."""
    impl = getattr(model.config, "_attn_implementation", "sdpa")
    return (_TreeBeams if impl in (None, "sdpa", "eager") else _ExpandedBeams)(model, cache, attn)


def _search_batch(model, prompts, trie: SidTrie, vocab: SidVocab, beam_size: int, stop: int, prefixes):
    import torch

    dev = _device(model)
    tables = trie.tables(dev)
    level_ids = [torch.tensor(ids, dtype=torch.long, device=dev) for ids in vocab.level_ids]
    b = len(prompts)
    ids, attn, pos = _left_pad([list(p) + [vocab.begin_id] for p in prompts], vocab.begin_id, dev)
    res = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
    beams = _beams_for(model, res.past_key_values, attn)
    logits = res.logits[:, -1:, :]  # (b, width, vocab)
    next_pos = attn.sum(1)
    depth = 0
    scores = torch.zeros((b, 1), device=dev)
    node = torch.zeros((b, 1), dtype=torch.long, device=dev)
    codes = torch.zeros((b, 1, 0), dtype=torch.long, device=dev)

    if prefixes is not None:
        kept = [_valid_prefixes(trie, per_user) for per_user in prefixes]
        depth = len(next((p[0] for user in kept for p in user), ()))
        width = max(1, max(len(u) for u in kept))
        scores = torch.full((b, width), float("-inf"), device=dev)
        node = torch.zeros((b, width), dtype=torch.long, device=dev)
        codes = torch.zeros((b, width, depth), dtype=torch.long, device=dev)
        for i, user in enumerate(kept):
            for j, (c, s, nd) in enumerate(user):
                scores[i, j], node[i, j] = s, nd
                codes[i, j] = torch.tensor(c, dtype=torch.long)
        if depth and depth < stop:
            beams.select(torch.zeros((b, width), dtype=torch.long, device=dev))
            toks = torch.stack([level_ids[lvl][codes[..., lvl]] for lvl in range(depth)], 2)  # (b, width, depth)
            logits, next_pos = beams.feed(toks, next_pos), next_pos + depth

    for lvl in range(depth, stop):
        width = scores.shape[1]
        size = trie.sizes[lvl]
        flat = logits.reshape(b * width, -1).float()
        logp = flat.index_select(1, level_ids[lvl]) - flat.logsumexp(1, keepdim=True)  # (b*w, size), full softmax
        child = tables[lvl].index_select(0, node.view(-1))  # (b*w, size), -1 = not in catalog
        cand = (scores.view(-1, 1) + logp).masked_fill(child < 0, float("-inf")).view(b, width * size)
        top_s, top_i = cand.topk(min(beam_size, width * size), dim=1)
        src = torch.div(top_i, size, rounding_mode="floor")
        code = top_i % size
        node = child.view(b, width * size).gather(1, top_i).long().clamp(min=0)  # dead beams: any node
        codes = torch.cat([codes.gather(1, src[..., None].expand(-1, -1, codes.shape[2])), code[..., None]], 2)
        scores = top_s
        if lvl < stop - 1:
            beams.select(src)
            logits, next_pos = beams.feed(level_ids[lvl][code][..., None], next_pos), next_pos + 1

    out = []
    s_cpu, c_cpu = scores.cpu(), codes.cpu()
    for i in range(b):
        order = torch.argsort(s_cpu[i], descending=True, stable=True)[:beam_size]
        out.append([(tuple(c_cpu[i, j].tolist()), float(s_cpu[i, j])) for j in order.tolist()
                    if math.isfinite(float(s_cpu[i, j]))])
    return out


# --------------------------------------------------------------------------------------
# think mode: free rationale first


def think_stop_ids(tokenizer) -> list[int]:
    """Ids that end a rationale: ``</think>``, then EOS when the tokenizer has one."""
    think_end = tokenizer.convert_tokens_to_ids(THINK_END)
    if think_end is None or think_end == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer has no {THINK_END!r} token: think mode needs a reasoning tokenizer")
    return [int(think_end)] + ([int(tokenizer.eos_token_id)] if tokenizer.eos_token_id is not None else [])


def generate_ids(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_ids: Sequence[int],
    *,
    pad_id: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    min_new_tokens: int = 0,
) -> list[list[int]]:
    """Generated ids after each prompt, cut after the first of ``stop_ids`` (kept when written).

    Greedy unless ``do_sample`` (then seeded with ``seed``; the global RNG state is restored
    afterwards). ``min_new_tokens`` suppresses the stop ids before that many tokens. ``pad_id``
    (default: the last stop id) fills the left padding, which the attention mask hides.
    """
    import torch

    stops = [int(t) for t in stop_ids]
    if not stops:
        raise ValueError("generate_ids: at least one stop id is needed")
    pad = stops[-1] if pad_id is None else int(pad_id)
    dev = _device(model)
    gen: dict[str, Any] = {"max_new_tokens": int(max_new_tokens), "eos_token_id": stops, "pad_token_id": pad,
                           "do_sample": bool(do_sample)}
    if min_new_tokens > 0:
        gen["min_new_tokens"] = min(int(min_new_tokens), int(max_new_tokens))
    if do_sample:
        gen.update(temperature=float(temperature), top_p=1.0, top_k=0)
    else:
        gen.update(temperature=None, top_p=None, top_k=None)
    out: list[list[int]] = []
    devices = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.inference_mode():
        torch.manual_seed(seed)
        for lo in range(0, len(prompts), batch_size):
            ids, attn, _ = _left_pad(prompts[lo: lo + batch_size], pad, dev)
            seq = model.generate(input_ids=ids, attention_mask=attn, **gen)
            for row in seq[:, ids.shape[1]:].tolist():
                cut = next((j + 1 for j, t in enumerate(row) if t in stops), len(row))
                out.append([int(t) for t in row[:cut]])
    return out


def sample_rationale_ids(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    do_sample: bool = False,
    seed: int = 0,
    *,
    batch_size: int = 16,
    min_new_tokens: int = 0,
) -> list[list[int]]:
    """Generated ids after each open ``<think>`` prompt, cut after the first stop token.

    The ids include the stop token when the model wrote one (RL rewards read it: a closed think
    block). ``min_new_tokens`` suppresses the stop tokens before that many tokens (exploration for
    a policy that closes its think block at once). Sampling is seeded with ``seed``; the global
    RNG state is restored afterwards.
    """
    stops = think_stop_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[-1]
    return generate_ids(model, prompts, max_new_tokens, stops, pad_id=pad_id, do_sample=do_sample,
                        temperature=temperature, seed=seed, batch_size=batch_size, min_new_tokens=min_new_tokens)


def generate_rationales(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    do_sample: bool = False,
    seed: int = 0,
    *,
    batch_size: int = 16,
) -> list[str]:
    """Free generation after an open ``<think>`` until ``</think>`` (or end of turn / the cap).

    ``prompts`` come from ``inference_prompt_ids(tok, messages, think=True)``. Returns the
    rationale text of each prompt (without the ``</think>`` marker, stripped); the caller builds
    ``inference_prompt_ids(tok, messages, think=True, rationale=text)`` for the SID search.
    Sampling is seeded with ``seed`` (the global RNG state is restored afterwards).
    """
    stops = set(think_stop_ids(tokenizer))
    ids = sample_rationale_ids(model, tokenizer, prompts, max_new_tokens, temperature, do_sample, seed,
                               batch_size=batch_size)
    return [tokenizer.decode([t for t in row if t not in stops], skip_special_tokens=True).strip() for row in ids]


class Recommendations(NamedTuple):
    """Output of :func:`recommend`: ranked SIDs per user, and the rationales in think mode."""

    sids: list[list[Scored]]
    rationales: list[str] | None


def build_rec_prompts(tokenizer, histories, *, think: bool, max_items: int) -> list[list[dict[str, str]]]:
    """Recommendation messages per history (items: ``{item_id, title, categories, sid}``)."""
    from onerec_prod.samples.prompts import rec_messages

    return [rec_messages(h, think=think, max_items=max_items) for h in histories]


def recommend(
    model,
    tokenizer,
    trie: SidTrie,
    vocab: SidVocab,
    histories: Sequence[Sequence[dict]],
    eval_cfg,
    think: bool = False,
    *,
    max_items: int = 50,
) -> Recommendations:
    """Top ``eval_cfg.beam_size`` catalog SIDs per history (think mode: greedy rationale first).

    Direct mode (``think=False``) decodes from the SID stream of the history
    (:func:`onerec_prod.samples.stream.stream_prompt_ids`), the format the recommendation task
    is trained in; think mode uses the reasoning chat prompt, a greedy rationale, then the SID.
    ``eval_cfg`` is an :class:`onerec_prod.config.EvalCfg` (beam_size, batch_size,
    max_think_tokens, seed); ``max_items`` should be the training prompts' ``samples.max_history``.
    """
    from onerec_prod.samples.prompts import inference_prompt_ids
    from onerec_prod.samples.stream import stream_prompt_ids

    rationales = None
    if not think:
        prompts = [stream_prompt_ids(vocab, [it["sid"] for it in h], max_items) for h in histories]
        sids = beam_search_sids(model, prompts, trie, vocab, eval_cfg.beam_size, batch_size=eval_cfg.batch_size)
        return Recommendations(sids, None)
    messages = build_rec_prompts(tokenizer, histories, think=think, max_items=max_items)
    if think:
        open_ids = [inference_prompt_ids(tokenizer, m, think=True) for m in messages]
        rationales = generate_rationales(model, tokenizer, open_ids, eval_cfg.max_think_tokens,
                                         do_sample=False, seed=eval_cfg.seed, batch_size=eval_cfg.batch_size)
        prompts = [inference_prompt_ids(tokenizer, m, think=True, rationale=r)
                   for m, r in zip(messages, rationales, strict=True)]
    else:
        prompts = [inference_prompt_ids(tokenizer, m, think=False) for m in messages]
    sids = beam_search_sids(model, prompts, trie, vocab, eval_cfg.beam_size, batch_size=eval_cfg.batch_size)
    return Recommendations(sids, rationales)
