"""The SID stream: one row per user that holds the SIDs of their items, oldest first.

The recommendation task's one format, shared by training, eval beam search, RL rollouts and the
serving prefixes (so nothing is trained in one format and scored in another)::

    <|sid_begin|><s_a_3><s_b_17><s_c_0><s_d_0><|sid_begin|><s_a_9><s_b_2>...

Each item is ``<|sid_begin|>`` followed by its codes (``levels + 1`` tokens; no end marker: the
level-specific code tokens already delimit items, and a separator per item is enough for the
model to know where an item starts). There is no chat prompt: the stream is the whole row.

Training (dense next-item objective, as SASRec): the loss sits on the code tokens of every item
at index ``>= loss_from`` (``loss_from >= 1``: the first item has nothing to condition on), never
on the ``<|sid_begin|>`` markers (they are fixed). One row therefore trains every target of the
stream, instead of one chat row per target (~19x fewer tokens per epoch on Beauty).

Inference: the prompt is the stream of the last ``max_items`` history items; the constrained
beam search (:func:`onerec_prod.eval.beam.beam_search_sids`) appends ``<|sid_begin|>`` and decodes
the next item's codes over the catalog trie. :func:`stream_prompt_ids` (from a
:class:`~onerec_prod.sid.tokens.SidVocab`) and :func:`stream_training_ids` (from the stored text,
through the tokenizer) give the same ids for the same history; a test holds them to it.

Long streams are cut into windows of at most ``max_items + 1`` items (:func:`stream_windows`) in
which every target is trained exactly once, with at least half a window of context.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from onerec_prod.sid.tokens import SID_BEGIN, SidVocab, sid_token

STREAM_TASK = "sid_stream"
IGNORE_INDEX = -100
_ITEM_RE = re.compile(re.escape(SID_BEGIN) + r"((?:<s_[a-h]_\d+>)+)")
_CODE_RE = re.compile(r"<s_([a-h])_(\d+)>")

Sid = Sequence[int]


def stream_text(sids: Sequence[Sid]) -> str:
    """Text of a stream (what the ``samples`` table stores in ``response``).

    >>> stream_text([(1, 2), (3, 0)])
    '<|sid_begin|><s_a_1><s_b_2><|sid_begin|><s_a_3><s_b_0>'
    """
    return "".join(SID_BEGIN + "".join(sid_token(l, int(c)) for l, c in enumerate(s)) for s in sids)


def parse_stream(text: str) -> list[tuple[int, ...]]:
    """SIDs of a stream text, oldest first (raises on a malformed stream).

    >>> parse_stream('<|sid_begin|><s_a_1><s_b_2><|sid_begin|><s_a_3><s_b_0>')
    [(1, 2), (3, 0)]
    """
    out: list[tuple[int, ...]] = []
    pos = 0
    for m in _ITEM_RE.finditer(text):
        if m.start() != pos:
            raise ValueError(f"malformed SID stream at char {pos}: {text[pos:pos + 40]!r}")
        codes = _CODE_RE.findall(m.group(1))
        if [c[0] for c in codes] != list("abcdefgh"[: len(codes)]):
            raise ValueError(f"malformed SID in stream: {m.group(0)!r} (levels must run a, b, c, ...)")
        out.append(tuple(int(c) for _, c in codes))
        pos = m.end()
    if pos != len(text):
        raise ValueError(f"malformed SID stream at char {pos}: {text[pos:pos + 40]!r}")
    return out


def stream_ids(vocab: SidVocab, sids: Sequence[Sid]) -> list[int]:
    """Token ids of a stream, from the SID vocabulary (no tokenizer call: fast for inference)."""
    out: list[int] = []
    for s in sids:
        if len(s) != vocab.num_levels:
            raise ValueError(f"SID {tuple(s)} has {len(s)} levels, expected {vocab.num_levels}")
        out.append(vocab.begin_id)
        out.extend(vocab.level_ids[l][int(c)] for l, c in enumerate(s))
    return out


def stream_prompt_ids(vocab: SidVocab, history: Sequence[Sid], max_items: int) -> list[int]:
    """Inference prompt: the stream of the last ``max_items`` history SIDs (the beam search adds
    the next ``<|sid_begin|>``). An empty history gives ``[]``."""
    tail = list(history)[-max_items:] if max_items > 0 else []
    return stream_ids(vocab, tail)


def stream_labels(ids: Sequence[int], begin_id: int, loss_from: int) -> list[int]:
    """Labels of stream ``ids``: the code tokens of items ``>= loss_from``; -100 elsewhere."""
    if loss_from < 1:
        raise ValueError(f"loss_from must be >= 1 (the first item has no context), got {loss_from}")
    labels, item = [], -1
    for t in ids:
        if t == begin_id:
            item += 1
            labels.append(IGNORE_INDEX)
        else:
            if item < 0:
                raise ValueError("a SID stream must start with <|sid_begin|>")
            labels.append(int(t) if item >= loss_from else IGNORE_INDEX)
    return labels


def stream_training_ids(tokenizer, text: str, loss_from: int = 1) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of a stored stream row, through the tokenizer (the SID tokens are
    single added tokens, so this equals :func:`stream_ids` of the parsed SIDs)."""
    parse_stream(text)  # validates
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    begin = tokenizer.convert_tokens_to_ids(SID_BEGIN)
    return list(ids), stream_labels(ids, int(begin), loss_from)


def stream_windows(n_items: int, max_items: int) -> list[tuple[int, int, int]]:
    """Windows ``(start, end, loss_from)`` over a stream of ``n_items`` items.

    Each window holds at most ``max_items + 1`` items (a history of ``max_items`` plus the
    target); ``loss_from`` is relative to ``start``. Every target ``1..n_items-1`` is trained in
    exactly one window, with at least ``max_items // 2`` items of context after the first window.

    >>> stream_windows(5, 10)
    [(0, 5, 1)]
    >>> stream_windows(9, 4)
    [(0, 5, 1), (2, 7, 3), (4, 9, 3)]
    """
    if max_items < 1:
        raise ValueError(f"max_items must be >= 1, got {max_items}")
    width = max_items + 1
    if n_items <= width:
        return [(0, n_items, 1)] if n_items >= 2 else []
    stride = max(1, width // 2)
    out, trained_to = [], 1  # next absolute target index to train
    start = 0
    while True:
        end = min(start + width, n_items)
        out.append((start, end, trained_to - start))
        trained_to = end
        if end == n_items:
            return out
        start = min(start + stride, n_items - width)
