"""Rationales of Reasoning Activation (RA) samples, from a pluggable source.

The paper (OneRec-Think, 4.2 "bootstrapping with pruned contexts") keeps, for a pair
(history, target), only the history items most related to the target, asks a model to explain
the interaction from that short context, and then trains the model to produce that explanation
from the *full, noisy* history. Here:

- :func:`prune_context` is the similarity ``g``: a history item is related to the target by its
  shared SID prefix (residual levels) plus one point for the same leaf category; items with no
  relation are dropped, the rest ranked by relatedness, then recency. It reads the history only;
  the target is used as the query, never as evidence.
- ``category`` (:class:`CategoryRationale`): deterministic phrasing of the pruned context with
  ``templates.RATIONALE_CATEGORY``; it may name the target's leaf category (the rationale explains
  the label, as in the paper's RA data construction). No randomness.
- ``evidence`` (:class:`EvidenceRationale`): a data-derived teacher that needs no LLM. It writes
  short, item-specific rationales from three signals of the pruned context: the deepest category
  path the target shares with the history (and how many history items sit under it), recency
  (the most recent related item and how many purchases ago it was), and co-occurrence (how often,
  in this batch of samples, users whose history holds the related item's leaf category went on
  to the target's leaf category; the request's own pair is not counted). Every clause names
  concrete items, paths and counts, so two users rarely get the same text.
- ``teacher`` (:class:`TeacherRationale`): a larger local causal LM prompted with the pruned
  context through ``templates.TEACHER_PROMPT``, greedy batched generation; falls back to the
  category phrasing when the context is empty or the teacher says nothing usable.

Sources are looked up by name with :func:`make_rationale_source`; an unknown name raises an error
that lists the valid ones.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from onerec_prod.samples.prompts import leaf_category, short_title
from onerec_prod.samples.templates import (
    RATIONALE_CATEGORY,
    RATIONALE_EVIDENCE_ITEM,
    RATIONALE_FALLBACK,
    TEACHER_PROMPT,
)

log = logging.getLogger(__name__)

DEFAULT_CONTEXT_ITEMS = 3


@dataclass(frozen=True)
class RationaleRequest:
    """One RA sample to explain: the history shown in the prompt (oldest first) and its target."""

    history: tuple[dict[str, Any], ...]
    target: dict[str, Any]


class RationaleSource(Protocol):
    """Turns RA requests into rationale texts (one per request, same order).

    ``executors``: the samples job may rebuild the source from the config on each Spark worker and
    call it per batch (False: it runs once, on the driver, over the whole day).
    """

    name: str
    executors: bool

    def rationales(self, requests: Sequence[RationaleRequest]) -> list[str]: ...


def shared_prefix_len(a: Sequence[int], b: Sequence[int], levels: int | None = None) -> int:
    """Number of leading SID codes ``a`` and ``b`` share, counting at most ``levels`` levels.

    >>> shared_prefix_len((1, 2, 3, 0), (1, 2, 9, 0))
    2
    """
    n = 0
    for x, y in zip(a[:levels], b[:levels]):
        if int(x) != int(y):
            break
        n += 1
    return n


def relatedness(item: dict[str, Any], target: dict[str, Any]) -> int:
    """Shared SID prefix over the residual levels (not the collision level) + 1 if same leaf.

    >>> relatedness({"sid": (1, 2, 3, 0), "categories": "A > B"}, {"sid": (1, 5, 3, 1), "categories": "A > B"})
    2
    """
    residual = max(len(target["sid"]) - 1, 1)
    same_leaf = leaf_category(item.get("categories")) == leaf_category(target.get("categories"))
    return shared_prefix_len(item["sid"], target["sid"], residual) + int(same_leaf)


def prune_context(
    history: Sequence[dict[str, Any]], target: dict[str, Any], k: int = DEFAULT_CONTEXT_ITEMS
) -> list[dict[str, Any]]:
    """The ``k`` history items most related to ``target``: relatedness desc, then most recent.

    Unrelated items (relatedness 0) are dropped, so the result may be shorter than ``k`` or
    empty. Only ``history`` items are returned; ``target`` is the query.
    """
    scored = [(relatedness(it, target), pos, it) for pos, it in enumerate(history)]
    scored = [s for s in scored if s[0] > 0]
    scored.sort(key=lambda s: (-s[0], -s[1]))
    return [it for _, _, it in scored[:k]]


def _join_words(parts: Sequence[str]) -> str:
    """``a``; ``a and b``; ``a, b and c``."""
    parts = list(parts)
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def format_evidence(items: Sequence[dict[str, Any]]) -> str:
    """Pruned context as text: short titles with leaf categories, joined for a sentence."""
    return _join_words(
        [
            RATIONALE_EVIDENCE_ITEM.format(
                title=short_title(it.get("title")), category=leaf_category(it.get("categories"))
            )
            for it in items
        ]
    )


class CategoryRationale:
    """Deterministic rationale from the pruned context and the target's leaf category."""

    name = "category"
    executors = True  # stateless: any batch of requests gives the same rationales

    def __init__(self, context_items: int = DEFAULT_CONTEXT_ITEMS) -> None:
        self.context_items = context_items

    def rationale(self, request: RationaleRequest) -> str:
        category = leaf_category(request.target.get("categories"))
        evidence = prune_context(request.history, request.target, self.context_items)
        if not evidence:
            return RATIONALE_FALLBACK.format(category=category)
        return RATIONALE_CATEGORY.format(evidence=format_evidence(evidence), category=category)

    def rationales(self, requests: Sequence[RationaleRequest]) -> list[str]:
        return [self.rationale(r) for r in requests]


def category_path(categories: str | None) -> tuple[str, ...]:
    """``'A > B > C'`` -> ``('A', 'B', 'C')`` (empty parts dropped)."""
    return tuple(p.strip() for p in (categories or "").split(">") if p.strip())


def shared_path(a: Sequence[str], b: Sequence[str]) -> tuple[str, ...]:
    """Longest common leading part of two category paths.

    >>> shared_path(("Beauty", "Skin", "Face"), ("Beauty", "Skin", "Body"))
    ('Beauty', 'Skin')
    """
    out = []
    for x, y in zip(a, b):
        if x != y:
            break
        out.append(x)
    return tuple(out)


class EvidenceRationale:
    """Data-derived rationale (no LLM): shared category path, recency, co-occurrence.

    ``rationales(requests)`` first counts, over the batch, which leaf categories of a history
    lead to which target leaf categories (each history leaf counted once per request); a request's
    co-occurrence share excludes its own pair. Sentences (each only when its evidence exists):

    1. path: ``N of the last M items are in <shared path>`` (the deepest path the target shares
       with any history item, and how many history items are under it);
    2. recency: ``the most recent related one, "<title>" (<leaf>), was K purchases ago``
       (related = :func:`prune_context`'s ranking, the most recent of its top items);
    3. co-occurrence: ``buyers of <leaf> go on to <target leaf> in P% of cases`` (the history
       leaf with the highest share, with at least ``min_support`` pairs);
    4. the conclusion: ``next: <target path tail>``.

    ``counts``: co-occurrence counts of the whole day (:meth:`cooccurrence` over every request of
    the day, summed with :meth:`merge_counts`), given when the requests arrive in several batches
    (the Spark executors' Arrow batches): every batch then writes what one call over the whole day
    writes. Without it, the counts come from the call's own requests.
    """

    name = "evidence"
    executors = True  # with the day's ``counts``

    def __init__(self, context_items: int = DEFAULT_CONTEXT_ITEMS, min_support: int = 3,
                 counts: tuple[Counter, Counter] | None = None) -> None:
        self.context_items = context_items
        self.min_support = min_support
        self.counts = counts

    @staticmethod
    def _leaves(history: Sequence[dict[str, Any]]) -> set[str]:
        return {leaf_category(h.get("categories")) for h in history}

    @classmethod
    def cooccurrence(cls, requests: Iterable[RationaleRequest]) -> tuple[Counter, Counter]:
        """``(pair, src)``: requests per (history leaf, target leaf), and per history leaf (each
        leaf of a history counted once per request). Bounded by the number of leaf categories."""
        pair: Counter = Counter()
        src: Counter = Counter()
        for r in requests:
            t = leaf_category(r.target.get("categories"))
            for leaf in cls._leaves(r.history):
                src[leaf] += 1
                pair[(leaf, t)] += 1
        return pair, src

    @staticmethod
    def merge_counts(a: tuple[Counter, Counter], b: tuple[Counter, Counter]) -> tuple[Counter, Counter]:
        return a[0] + b[0], a[1] + b[1]

    def rationale(self, request: RationaleRequest, pair=None, src=None) -> str:
        hist = list(request.history)
        tpath = category_path(request.target.get("categories"))
        tleaf = leaf_category(request.target.get("categories"))
        parts = []
        best: tuple[str, ...] = ()
        for h in hist:
            sp = shared_path(category_path(h.get("categories")), tpath)
            if len(sp) > len(best):
                best = sp
        if best:
            under = sum(category_path(h.get("categories"))[: len(best)] == best for h in hist)
            parts.append(f"{under} of the last {len(hist)} items are in {' > '.join(best[-2:])}")
        related = prune_context(hist, request.target, self.context_items)
        if related:
            pos = {id(h): i for i, h in enumerate(hist)}
            recent = max(related, key=lambda h: pos.get(id(h), -1))
            ago = len(hist) - pos.get(id(recent), len(hist) - 1)
            parts.append(f'the most recent related one, "{short_title(recent.get("title"), 6)}" '
                         f"({leaf_category(recent.get('categories'))}), was {ago} purchase{'s' if ago > 1 else ''} ago")
        if pair is not None and src is not None:
            shares = []
            for leaf in self._leaves(hist):
                n_src = src[leaf] - 1                      # leave this request out
                n_pair = pair[(leaf, tleaf)] - 1
                if n_src >= self.min_support and n_pair > 0:
                    shares.append((n_pair / n_src, leaf))
            if shares:
                p, leaf = max(shares)
                parts.append(f"buyers of {leaf} go on to {tleaf} in {round(100 * p)}% of cases")
        if not parts:
            return RATIONALE_FALLBACK.format(category=tleaf)
        tail = " > ".join(tpath[-2:]) if tpath else tleaf
        text = "; ".join(parts)
        return text[0].upper() + text[1:] + f". Next: {tail}."

    def rationales(self, requests: Sequence[RationaleRequest]) -> list[str]:
        pair, src = self.counts if self.counts is not None else self.cooccurrence(requests)
        return [self.rationale(r, pair, src) for r in requests]


_TAG_RE = re.compile(r"<think>.*?</think>|</?think>|<\|[^|>]*\|>|<s_[a-h]_\d+>", re.S)


def clean_generated(text: str, max_chars: int = 400) -> str:
    """Teacher output made safe inside a think block: no tags or SIDs, one line, bounded.

    >>> clean_generated("<think>\\nhm\\n</think>\\n\\nThey want  nail polish.\\n")
    'They want nail polish.'
    """
    text = " ".join(_TAG_RE.sub(" ", text).split())
    if len(text) > max_chars:
        cut = text[:max_chars]
        end = cut.rfind(". ")
        text = cut[: end + 1] if end > 0 else cut.rstrip()
    return text


class TeacherRationale:
    """Rationales written by a local Hugging Face causal LM from the pruned context.

    The model and tokenizer load lazily on the first call, offline and from ``*.safetensors``
    only (a directory holding only pickled weights is refused with ``FileNotFoundError``). Prompts go through the tokenizer's
    chat template when it has one (Qwen3: thinking disabled), generation is greedy and batched
    with left padding. Requests with an empty pruned context, and outputs that are empty after
    :func:`clean_generated`, get the ``category`` rationale instead (counted in ``fallbacks``).
    """

    name = "teacher"
    executors = False  # one LLM on the driver's accelerator, batched over the whole day

    def __init__(
        self,
        model_dir: str,
        *,
        context_items: int = DEFAULT_CONTEXT_ITEMS,
        max_new_tokens: int = 64,
        batch_size: int = 8,
        device: str | None = None,
    ) -> None:
        self.model_dir = str(model_dir)
        self.context_items = context_items
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.device = device
        self.fallback = CategoryRationale(context_items)
        self.fallbacks = 0
        self._tok = None
        self._model = None

    def _load(self) -> None:
        if self._model is not None:
            return
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        from onerec_prod.model.io import require_safetensors

        require_safetensors(self.model_dir)  # a pickled checkpoint is refused, never loaded
        tok = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        model = AutoModelForCausalLM.from_pretrained(
            self.model_dir, dtype=dtype, use_safetensors=True, local_files_only=True
        ).to(device)
        model.eval()
        self._tok, self._model, self.device = tok, model, device
        log.info("teacher rationale model loaded from %s on %s", self.model_dir, device)

    def prompt_text(self, evidence: str) -> str:
        """The teacher's full input text for one pruned context."""
        content = TEACHER_PROMPT.format(evidence=evidence)
        tok = self._tok
        if getattr(tok, "chat_template", None):
            msgs = [{"role": "user", "content": content}]
            try:
                return tok.apply_chat_template(
                    msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False
                )
            except TypeError:
                return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return content + "\n"

    def _generate(self, texts: list[str]) -> list[str]:
        import torch

        out: list[str] = []
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start : start + self.batch_size]
            enc = self._tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(self.device) for k, v in enc.items()}
            with torch.no_grad():
                gen = self._model.generate(
                    **enc,
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    pad_token_id=self._tok.pad_token_id,
                )
            new = gen[:, enc["input_ids"].shape[1] :]
            out.extend(self._tok.batch_decode(new, skip_special_tokens=True))
        return out

    def rationales(self, requests: Sequence[RationaleRequest]) -> list[str]:
        contexts = [prune_context(r.history, r.target, self.context_items) for r in requests]
        ask = [i for i, c in enumerate(contexts) if c]
        result = [""] * len(requests)
        if ask:
            self._load()
            texts = [self.prompt_text(format_evidence(contexts[i])) for i in ask]
            for i, gen in zip(ask, self._generate(texts)):
                result[i] = clean_generated(gen)
        for i, text in enumerate(result):
            if not text:
                result[i] = self.fallback.rationale(requests[i])
                self.fallbacks += 1
        log.info(
            "teacher rationales: %d requests, %d generated, %d fallbacks",
            len(requests), len(ask), self.fallbacks,
        )
        return result


def _category_from_cfg(samples_cfg) -> RationaleSource:
    return CategoryRationale(getattr(samples_cfg, "rationale_context_items", DEFAULT_CONTEXT_ITEMS))


def _teacher_from_cfg(samples_cfg) -> RationaleSource:
    if not samples_cfg.teacher_model_dir:
        raise ValueError(
            "samples.rationale_source=teacher needs samples.teacher_model_dir "
            "(a local Hugging Face causal LM directory)"
        )
    return TeacherRationale(
        samples_cfg.teacher_model_dir,
        context_items=getattr(samples_cfg, "rationale_context_items", DEFAULT_CONTEXT_ITEMS),
        max_new_tokens=getattr(samples_cfg, "teacher_max_new_tokens", 64),
        batch_size=getattr(samples_cfg, "teacher_batch_size", 8),
    )


def _evidence_from_cfg(samples_cfg) -> RationaleSource:
    return EvidenceRationale(getattr(samples_cfg, "rationale_context_items", DEFAULT_CONTEXT_ITEMS),
                             min_support=getattr(samples_cfg, "rationale_min_support", 3))


RATIONALE_SOURCES: dict[str, Callable[[Any], RationaleSource]] = {
    "category": _category_from_cfg,
    "evidence": _evidence_from_cfg,
    "teacher": _teacher_from_cfg,
}


def make_rationale_source(name: str, samples_cfg) -> RationaleSource:
    """The rationale source registered as ``name``, configured from ``SamplesCfg``.

    Raises:
        ValueError: unknown name (the message lists the valid names), or a missing setting.
    """
    try:
        factory = RATIONALE_SOURCES[name]
    except KeyError:
        raise ValueError(
            f"unknown rationale source {name!r} (valid: {', '.join(sorted(RATIONALE_SOURCES))})"
        ) from None
    return factory(samples_cfg)
