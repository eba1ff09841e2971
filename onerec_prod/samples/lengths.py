"""Token lengths of sample rows: an estimate without a tokenizer, percentiles per task.

The ``build_samples`` job reports p50/p90/p99/max per task with :func:`estimate_tokens` (no
tokenizer is loaded inside a Spark job just for a statistic). A caller that has the model's
tokenizer anyway (the trainer, a notebook) passes it to :func:`token_length_stats` for exact
lengths of the rendered training ids and the share over ``max_length``.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from onerec_prod.samples.builders import rank_key
from onerec_prod.samples.prompts import messages_from_json, render_training_ids

ESTIMATE_METHOD = "estimate: 1 per SID/special token + chars/4, chat framing excluded"
_SPECIAL_RE = re.compile(r"<\|[^|<>]+\|>|<s_[a-h]_\d+>|</?think>")


def estimate_tokens(text: str) -> int:
    """Token estimate without a tokenizer: 1 per special/SID/think token + 1 per 4 other chars.

    >>> estimate_tokens("<|sid_begin|><s_a_1><s_b_2><|sid_end|> abcdefgh")
    7
    """
    specials = len(_SPECIAL_RE.findall(text))
    rest = _SPECIAL_RE.sub("", text)
    return specials + math.ceil(len(rest) / 4)


def percentile(values: Sequence[int], p: float) -> int:
    """Nearest-rank percentile (``p`` in 0..100) of a non-empty list.

    >>> percentile([1, 2, 3, 4], 50), percentile([1, 2, 3, 4], 90), percentile([5], 99)
    (2, 4, 5)
    """
    vals = sorted(values)
    k = max(math.ceil(p / 100 * len(vals)), 1)
    return int(vals[k - 1])


def row_length(row: Mapping[str, Any], tokenizer=None) -> int:
    """Prompt + response length of one row: exact ids with ``tokenizer``, else the estimate."""
    msgs = messages_from_json(row["messages"])
    if tokenizer is not None:
        ids, _ = render_training_ids(tokenizer, msgs, row["response"], max_length=10**9)
        return len(ids)
    return sum(estimate_tokens(m["content"]) for m in msgs) + estimate_tokens(row["response"])


def token_length_stats(
    samples: Sequence[Mapping[str, Any]], *, dt: str, seed: int, per_task: int,
    tokenizer=None, max_length: int | None = None,
) -> dict[str, dict[str, int | float]]:
    """Per task: p50/p90/p99/max of prompt + response length over a seeded sample of rows.

    With ``tokenizer``: exact ids of :func:`render_training_ids` (chat template included) and
    the share over ``max_length``. Without: :func:`estimate_tokens` of the message contents +
    response (chat-template framing not counted).
    """
    by_task: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for s in samples:
        by_task[s["task"]].append(s)
    out: dict[str, dict[str, int | float]] = {}
    for task in sorted(by_task):
        rows = sorted(by_task[task], key=lambda s: rank_key(seed, dt, "length", s["sample_id"]))
        lengths = [row_length(s, tokenizer) for s in rows[:per_task]]
        stats: dict[str, int | float] = {
            "n_measured": len(lengths), "p50": percentile(lengths, 50),
            "p90": percentile(lengths, 90), "p99": percentile(lengths, 99), "max": max(lengths),
        }
        if tokenizer is not None and max_length:
            stats["over_max_length"] = round(sum(n > max_length for n in lengths) / len(lengths), 4)
        out[task] = stats
    return out
