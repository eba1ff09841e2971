"""Token lengths of sample rows (onerec_prod.samples.lengths): estimate, percentiles, per-task stats."""

from __future__ import annotations

import pytest

from onerec_prod.samples.lengths import ESTIMATE_METHOD, estimate_tokens, percentile, token_length_stats
from onerec_prod.samples.prompts import messages_to_json


def test_estimate_tokens_counts_special_tokens_once():
    assert estimate_tokens("") == 0
    assert estimate_tokens("<think>\n\n</think>\n\n") == 3  # 2 tags + 4 newline chars
    assert estimate_tokens("<|sid_begin|><s_a_1><s_b_2><s_c_3><s_d_0><|sid_end|>") == 6


@pytest.mark.parametrize("values, p, expected", [
    ([7], 50, 7),                      # single value
    ([1, 2, 3, 4], 50, 2),             # nearest rank, not interpolated
    ([4, 3, 2, 1], 99, 4),             # unsorted input
    (list(range(1, 101)), 90, 90),     # 100 values
    (list(range(1, 101)), 99, 99),
])
def test_percentile(values, p, expected):
    assert percentile(values, p) == expected


def test_token_length_stats_estimate_per_task():
    rows = [{"sample_id": f"s{i}", "task": "t", "response": "abcd" * i,
             "messages": messages_to_json([{"role": "user", "content": "abcd"}])} for i in range(1, 11)]
    stats = token_length_stats(rows, dt="2014-01-01", seed=1, per_task=100)
    assert stats == {"t": {"n_measured": 10, "p50": 6, "p90": 10, "p99": 11, "max": 11}}
    assert token_length_stats(rows, dt="2014-01-01", seed=1, per_task=3)["t"]["n_measured"] == 3


def test_token_length_stats_with_the_model_tokenizer(tiny_model_dir):
    # the job reports the estimate (no tokenizer in the Spark job); a caller holding the model's
    # tokenizer (the trainer) passes it for exact lengths
    from onerec_prod.model.io import load_tokenizer

    assert ESTIMATE_METHOD.startswith("estimate")
    tok = load_tokenizer(tiny_model_dir)
    rows = [{"sample_id": "s", "task": "sid_rec", "response": "<think>\n\n</think>\n\n<|sid_begin|>"
             "<s_a_1><s_b_2><s_c_3><s_d_0><|sid_end|>",
             "messages": messages_to_json([{"role": "user", "content": "hi"}])}]
    stats = token_length_stats(rows, dt="2014-01-01", seed=1, per_task=5, tokenizer=tok, max_length=8)
    # <|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n + response + <|im_end|>\n
    assert stats["sid_rec"]["p50"] > 6 + 3 and stats["sid_rec"]["over_max_length"] == 1.0
