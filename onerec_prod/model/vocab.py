"""Vocabulary expansion with the SID tokens (markers + one token per level and code).

New tokens are registered as *extra special tokens*: the tokenizer never splits them and a
SID always costs ``levels + 2`` tokens. Embedding rows of new tokens are initialised as:

- ``"mean"`` (default): the mean ``mu`` of the existing token rows, plus Gaussian noise with a
  per-dimension std of ``0.1 * sigma`` (``sigma`` = per-dimension std of the existing rows),
  drawn from a generator seeded by the token index. The mean keeps the new logits at the scale
  of ordinary tokens (no token dominates the softmax at step 0); the small noise breaks the
  symmetry between codes so that beam search over untrained codes is not a tie everywhere.
- ``"text"``: the mean of the rows of the token's text pieces under the *old* tokenizer (e.g.
  ``<s_b_7>`` -> ``<``, ``s``, ``_b``, ``_7``, ``>``), so codes start distinguishable by level.

Padding rows (the matrix is padded to a multiple of :data:`PAD_MULTIPLE`) get ``mu``. Tied heads
share the rows; an untied ``lm_head`` is initialised the same way from its own rows.

    >>> new_ids = expand_vocab(model, tok, [16, 16, 16, 16])   # doctest: +SKIP
    >>> expand_vocab(model, tok, [16, 16, 16, 16])              # doctest: +SKIP
    []
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from onerec_prod.sid.tokens import vocab_tokens

log = logging.getLogger(__name__)

PAD_MULTIPLE = 64
NOISE_SCALE = 0.1


def sid_token_ids(tokenizer, sizes: Sequence[int]) -> list[int]:
    """Ids of every SID token (markers + codes) in ``tokenizer``; raises if one is missing."""
    toks = vocab_tokens(sizes)
    ids = tokenizer.convert_tokens_to_ids(toks)
    missing = [t for t, i in zip(toks, ids) if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise ValueError(
            f"tokenizer lacks {len(missing)} SID tokens (e.g. {missing[:3]}): "
            "run onerec_prod.model.vocab.expand_vocab first"
        )
    return [int(i) for i in ids]


def missing_tokens(tokenizer, sizes: Sequence[int]) -> list[str]:
    """SID tokens of ``sizes`` that ``tokenizer`` does not have yet."""
    vocab = tokenizer.get_vocab()
    return [t for t in vocab_tokens(sizes) if t not in vocab]


def _new_rows(weight, n_old: int, new_ids: list[int], piece_ids: list[list[int]] | None):
    """Init values of rows ``new_ids`` of ``weight`` (float32 math, cast back)."""
    import torch

    old = weight[:n_old].detach().float()
    mu = old.mean(0)
    out = torch.empty((len(new_ids), weight.shape[1]), dtype=torch.float32)
    if piece_ids is not None:
        for k, pieces in enumerate(piece_ids):
            out[k] = old[pieces].mean(0) if pieces else mu
        return out.to(weight.dtype), mu
    sigma = old.std(0)
    for k, tid in enumerate(new_ids):
        g = torch.Generator().manual_seed(int(tid))
        out[k] = mu + NOISE_SCALE * sigma * torch.randn(weight.shape[1], generator=g)
    return out.to(weight.dtype), mu


def expand_vocab(model, tokenizer, sizes: Sequence[int], init: str = "mean") -> list[int]:
    """Add the SID tokens of ``sizes`` to ``tokenizer`` and ``model``; return the new ids.

    Idempotent: tokens already present are skipped (``[]`` when nothing was missing). The
    embedding matrix is resized to ``len(tokenizer)`` rounded up to :data:`PAD_MULTIPLE`
    (never shrunk). ``init`` is ``"mean"`` or ``"text"`` (see the module doc).
    """
    import torch

    if init not in ("mean", "text"):
        raise ValueError(f"expand_vocab: init={init!r} is not one of 'mean', 'text'")
    todo = missing_tokens(tokenizer, sizes)
    emb = model.get_input_embeddings()
    if not todo:
        if emb.weight.shape[0] < len(tokenizer):
            raise ValueError(
                f"model has {emb.weight.shape[0]} embedding rows but tokenizer has {len(tokenizer)} "
                "tokens: the model and tokenizer directories do not belong together"
            )
        return []
    n_old = len(tokenizer)
    piece_ids = None
    if init == "text":
        piece_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in todo]
    tokenizer.add_special_tokens({"extra_special_tokens": todo}, replace_extra_special_tokens=False)
    new_ids = [int(i) for i in tokenizer.convert_tokens_to_ids(todo)]
    if sorted(new_ids) != list(range(n_old, n_old + len(todo))):
        raise RuntimeError("expand_vocab: new token ids are not appended contiguously")
    target = -(-len(tokenizer) // PAD_MULTIPLE) * PAD_MULTIPLE
    target = max(target, emb.weight.shape[0])
    tied = _is_tied(model)
    model.resize_token_embeddings(target, mean_resizing=False)
    with torch.no_grad():
        mats = [model.get_input_embeddings().weight]
        head = model.get_output_embeddings()
        if head is not None and not tied:
            mats.append(head.weight)
        for w in mats:
            rows, mu = _new_rows(w, n_old, new_ids, piece_ids)
            w[new_ids] = rows
            if w.shape[0] > n_old + len(todo):
                w[n_old + len(todo) :] = mu.to(w.dtype)
    model.config.vocab_size = target
    log.info(
        "expanded vocab: +%d SID tokens (ids %d..%d), embeddings %d rows, init=%s, tied=%s",
        len(todo), new_ids[0], new_ids[-1], target, init, tied,
    )
    return new_ids


def _is_tied(model) -> bool:
    head = model.get_output_embeddings()
    if head is None:
        return True
    return head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
