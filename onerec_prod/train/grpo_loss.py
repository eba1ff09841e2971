"""GRPO loss terms as pure functions: token log-probs, group advantages, the clipped policy loss.

Nothing here knows about rollouts, configs or checkpoints; :mod:`onerec_prod.train.grpo` composes
them. Shapes: ``B`` sequences, ``C`` completion tokens (right-padded), masks of 0/1 floats.

Two ways to get the log-probs of completions:

- :func:`token_logps`: one forward over ``prompt + completion`` per sequence (think mode: every
  rollout has its own prompt, since the rationale differs).
- :func:`shared_prompt_logps`: direct mode, where the G candidates of a group share one prompt
  (the user's SID stream): the prompt runs once, its KV cache is repeated to the G candidates
  (``index_select``, differentiable), and only the ``L + 1`` candidate tokens run per candidate.
  On Beauty (prompts of ~250 tokens, G = 16, 5 candidate tokens) that is ~10x fewer tokens than
  one forward per candidate, with the same log-probs (a test holds the two to it).
"""

from __future__ import annotations

from collections.abc import Sequence

ADV_EPS = 1e-4


def _device(model):
    return next(model.parameters()).device


def token_logps(model, prompt_ids: Sequence[Sequence[int]], completion: Sequence[Sequence[int]], pad_id: int):
    """Per-token log-probs ``(B, C)`` of each completion after its prompt (right-padded with 0)."""
    import torch

    dev = _device(model)
    seqs = [list(p) + list(c) for p, c in zip(prompt_ids, completion, strict=True)]
    width = max(len(s) for s in seqs)
    cw = max(len(c) for c in completion)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
    ids, attn = ids.to(dev), attn.to(dev)
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
    rows = []
    for i, (p, c) in enumerate(zip(prompt_ids, completion, strict=True)):
        lo, n = len(p), len(c)
        lg = logits[i, lo - 1: lo - 1 + n].float()
        rows.append((n, torch.log_softmax(lg, -1).gather(1, ids[i, lo: lo + n, None]).squeeze(1)))
    return torch.stack([torch.nn.functional.pad(r, (0, cw - n)) for n, r in rows])


def shared_prompt_logps(model, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                        owner: Sequence[int], pad_id: int):
    """Per-token log-probs ``(N, C)`` of ``completions`` (all of length ``C``), completion ``i``
    following ``prompts[owner[i]]``; each prompt runs once (left padded, explicit positions)."""
    import torch

    dev = _device(model)
    if len({len(c) for c in completions}) != 1:
        raise ValueError("shared_prompt_logps: every completion must have the same length")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        attn[i, width - len(p):] = 1
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    ids, attn, pos = ids.to(dev), attn.to(dev), pos.to(dev)
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True)
    idx = torch.tensor(list(owner), dtype=torch.long, device=dev)
    cache = out.past_key_values
    cache.reorder_cache(idx)
    first = out.logits[:, -1, :].index_select(0, idx)           # predicts completion token 0
    comp = torch.tensor([list(c) for c in completions], dtype=torch.long, device=dev)
    c = comp.shape[1]
    attn2 = torch.cat([attn.index_select(0, idx), torch.ones_like(comp)], 1)
    pos2 = attn.sum(1).index_select(0, idx)[:, None] + torch.arange(c, device=dev)[None, :]
    if c > 1:
        rest = model(input_ids=comp[:, :-1], attention_mask=attn2[:, :-1], position_ids=pos2[:, :-1],
                     past_key_values=cache, use_cache=True).logits
        logits = torch.cat([first[:, None, :], rest], 1)
    else:
        logits = first[:, None, :]
    return torch.log_softmax(logits.float(), -1).gather(2, comp[..., None]).squeeze(2)


def mask_tensor(masks: Sequence[Sequence[int]], device):
    """``(B, C)`` float mask from per-sequence 0/1 lists (right-padded with 0)."""
    import torch

    cw = max(len(m) for m in masks)
    t = torch.zeros((len(masks), cw), device=device)
    for i, m in enumerate(masks):
        t[i, : len(m)] = torch.tensor(m, dtype=torch.float32)
    return t


def group_advantages(rewards, groups: Sequence[int] | int, scale: bool = True):
    """``(r - mean_g) / (std_g + eps)`` per group (``scale=False``: ``r - mean_g``); ``groups``: a
    group id per rollout, or a size ``G`` of consecutive groups. A group whose rewards are all
    equal gets 0 (no signal)."""
    import torch

    if isinstance(groups, int):
        r = rewards.view(-1, groups)
        a = r - r.mean(1, keepdim=True)
        return (a / (r.std(1, keepdim=True) + ADV_EPS) if scale else a).view(-1)
    g = torch.as_tensor(list(groups), dtype=torch.long)
    out = torch.zeros_like(rewards)
    for k in torch.unique(g).tolist():
        sel = g == k
        r = rewards[sel]
        if r.numel() > 1:
            out[sel] = (r - r.mean()) / (r.std() + ADV_EPS) if scale else r - r.mean()
    return out


def signal_groups(rewards, groups: Sequence[int]) -> tuple[int, int]:
    """``(groups with reward variance, groups)``: only the former carry a gradient."""
    by: dict[int, set[float]] = {}
    for r, g in zip(rewards.tolist(), groups, strict=True):
        by.setdefault(int(g), set()).add(round(float(r), 9))
    return sum(len(v) > 1 for v in by.values()), len(by)


def policy_loss(logp, old_logp, ref_logp, adv, mask, clip_eps: float, kl_coef: float):
    """GRPO loss per sequence ``(B,)`` and token stats.

    Per token: ``-min(ratio A, clip(ratio, 1-eps, 1+eps) A) + kl_coef * k3`` with
    ``ratio = exp(logp - old)`` and ``k3 = exp(ref - logp) - (ref - logp) - 1``; mean over a
    sequence's masked tokens. ``ref_logp`` None: no KL term.
    """
    import torch

    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    surr = torch.minimum(ratio * a, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * a)
    per_tok = -surr
    if ref_logp is not None:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        per_tok = per_tok + kl_coef * kl
    else:
        kl = torch.zeros_like(logp)
    n = mask.sum(1).clamp(min=1)
    seq_loss = (per_tok * mask).sum(1) / n
    clipped = ((ratio - 1).abs() > clip_eps).float()
    denom = mask.sum().clamp(min=1)
    stats = {"kl": float(((kl * mask).sum() / denom).detach()),
             "clip_frac": float(((clipped * mask).sum() / denom).detach())}
    return seq_loss, stats
