"""Rationale sources: pruned context, deterministic phrasing, registry, teacher plumbing."""

from __future__ import annotations

import pytest

from onerec_prod.config import SamplesCfg
from onerec_prod.samples.rationale import (
    CategoryRationale,
    EvidenceRationale,
    RationaleRequest,
    TeacherRationale,
    clean_generated,
    make_rationale_source,
    prune_context,
    relatedness,
)


def _it(i, sid, cat, title=None):
    return {"item_id": i, "title": title or f"T{i}", "categories": f"Beauty > {cat}", "sid": sid}


TARGET = _it("t", (1, 2, 3, 9), "Nails", "Target Polish")
HISTORY = (
    _it("h0", (1, 2, 3, 0), "Nails"),  # 3 levels + leaf = 4
    _it("h1", (7, 7, 7, 0), "Hair"),   # unrelated: 0
    _it("h2", (1, 5, 5, 0), "Nails"),  # 1 level + leaf = 2
    _it("h3", (1, 2, 8, 0), "Eyes"),   # 2 levels = 2
    _it("h4", (9, 9, 9, 0), "Nails"),  # leaf only = 1
)


def test_relatedness_counts_residual_levels_and_leaf():
    assert [relatedness(h, TARGET) for h in HISTORY] == [4, 0, 2, 2, 1]
    # the collision level never counts: same residual codes, different collision code
    assert relatedness(_it("x", (1, 2, 3, 5), "Hair"), TARGET) == 3


def test_prune_context_ranks_by_relatedness_then_recency_and_drops_unrelated():
    assert [h["item_id"] for h in prune_context(HISTORY, TARGET, k=3)] == ["h0", "h3", "h2"]
    assert [h["item_id"] for h in prune_context(HISTORY, TARGET, k=10)] == ["h0", "h3", "h2", "h4"]
    assert prune_context([HISTORY[1]], TARGET) == []  # nothing related
    assert all(h is not TARGET for h in prune_context(HISTORY, TARGET, k=10))


def test_category_rationale_is_deterministic_text():
    src = CategoryRationale(context_items=2)
    out = src.rationales([RationaleRequest(HISTORY, TARGET), RationaleRequest((HISTORY[1],), TARGET)])
    assert out == [
        'The user recently bought "Th0" (Nails) and "Th3" (Eyes). These point to Nails, '
        "so the next item is likely in Nails.",
        "The user's history is broad; the next item is likely in Nails.",
    ]
    assert out == src.rationales([RationaleRequest(HISTORY, TARGET), RationaleRequest((HISTORY[1],), TARGET)])


@pytest.mark.parametrize("raw, expected", [
    ("plain text", "plain text"),                                      # unchanged
    ("<think>\nhidden\n</think>\n\nThey want polish.", "They want polish."),  # closed think block
    ("a </think> b", "a b"),                                           # stray closing tag
    ("buy <|sid_begin|><s_a_1><s_b_2><|sid_end|> now", "buy now"),       # SIDs removed
    ("  \n ", ""),                                                     # empty -> fallback
])
def test_clean_generated(raw, expected):
    assert clean_generated(raw) == expected


def test_clean_generated_bounds_length_at_a_sentence():
    assert clean_generated("One. " + "x" * 50, max_chars=20) == "One."


def test_registry_lists_valid_names_and_checks_teacher_dir():
    assert make_rationale_source("category", SamplesCfg()).name == "category"
    assert make_rationale_source("evidence", SamplesCfg()).name == "evidence"
    with pytest.raises(ValueError, match="valid: category, evidence, teacher"):
        make_rationale_source("llm", SamplesCfg())
    with pytest.raises(ValueError, match="samples.teacher_model_dir"):
        make_rationale_source("teacher", SamplesCfg(rationale_source="teacher"))


def test_teacher_plumbing_with_tiny_model(tiny_model_dir):
    """Quality needs a real model; this shows batching, cleaning and the fallback."""
    cfg = SamplesCfg(rationale_source="teacher", teacher_model_dir=str(tiny_model_dir),
                     teacher_max_new_tokens=6, teacher_batch_size=2)
    src = make_rationale_source("teacher", cfg)
    assert isinstance(src, TeacherRationale)
    reqs = [RationaleRequest(HISTORY, TARGET)] * 3 + [RationaleRequest((HISTORY[1],), TARGET)]
    out = src.rationales(reqs)
    assert len(out) == 4 and all(o.strip() for o in out)
    assert all("<think>" not in o and "</think>" not in o and "<|sid_begin|>" not in o for o in out)
    assert out[3] == CategoryRationale().rationales([reqs[3]])[0]  # empty context -> fallback
    assert out[0] == out[1] == out[2]  # greedy: same context, same text
    assert src.fallbacks >= 1
    assert "A shopper bought these related items" in src.prompt_text("x")


def test_evidence_rationale_path_recency_cooccurrence():
    """Each clause from the data: shared path + count, most recent related item, co-occurrence share."""
    other = _it("o", (5, 5, 5, 0), "Hair")
    # four other users whose history holds Nails: three went on to Nails, one to Hair
    crowd = [RationaleRequest((_it(f"c{i}", (1, 1, 1, 0), "Nails"),), TARGET if i < 3 else other) for i in range(4)]
    reqs = [RationaleRequest(HISTORY, TARGET), *crowd, RationaleRequest((HISTORY[1],), TARGET)]
    out = EvidenceRationale(context_items=3, min_support=3).rationales(reqs)
    # HISTORY: h0 Nails, h1 Hair, h2 Nails, h3 Eyes, h4 Nails; related by prune_context: h0, h3, h2.
    # Co-occurrence, own pair left out: 4 other histories hold Nails, 3 of them led to Nails.
    assert out[0] == ('3 of the last 5 items are in Beauty > Nails; the most recent related one, "Th3" (Eyes), '
                      "was 2 purchases ago; buyers of Nails go on to Nails in 75% of cases. Next: Beauty > Nails.")
    assert out[1].endswith("buyers of Nails go on to Nails in 75% of cases. Next: Beauty > Nails.")
    # the Hair target: its Nails history is unrelated (no SID prefix, other leaf) and no other
    # Nails history led to Hair: the path clause only
    assert out[4] == "1 of the last 1 items are in Beauty. Next: Beauty > Hair."
    # unrelated history (Hair only) for a Nails target: the root path only, no recency clause
    assert out[5] == "1 of the last 1 items are in Beauty. Next: Beauty > Nails."
    # a history sharing nothing but the root still gets a path clause, never the target's title
    assert all("Target Polish" not in o for o in out)
    assert out == EvidenceRationale(context_items=3, min_support=3).rationales(reqs)  # deterministic


def test_evidence_rationale_in_batches_with_the_days_counts():
    """Split into batches (as the Spark executors' Arrow batches are), each batch alone loses the
    co-occurrence clause; with the day's counts (summed per batch) every batch writes exactly what
    one call over the whole day writes."""
    other = _it("o", (5, 5, 5, 0), "Hair")
    crowd = [RationaleRequest((_it(f"c{i}", (1, 1, 1, 0), "Nails"),), TARGET if i < 3 else other) for i in range(4)]
    reqs = [RationaleRequest(HISTORY, TARGET), *crowd, RationaleRequest((HISTORY[1],), TARGET)]
    whole = EvidenceRationale(context_items=3, min_support=3).rationales(reqs)
    batches = [reqs[:2], reqs[2:5], reqs[5:]]
    alone = [o for b in batches for o in EvidenceRationale(context_items=3, min_support=3).rationales(b)]
    assert alone != whole and "buyers of" not in alone[0]
    counts = EvidenceRationale.cooccurrence([])
    for b in batches:
        counts = EvidenceRationale.merge_counts(counts, EvidenceRationale.cooccurrence(b))
    assert counts == EvidenceRationale.cooccurrence(reqs)
    src = EvidenceRationale(context_items=3, min_support=3, counts=counts)
    assert [o for b in batches for o in src.rationales(b)] == whole
    assert make_rationale_source("evidence", SamplesCfg()).executors
    assert not make_rationale_source("teacher", SamplesCfg(teacher_model_dir="/x")).executors
