"""The vLLM backend's pure beam loop: trie mask, request building, beam expansion.

The loop is driven here by step functions without an engine (a lookup table, and the tiny HF
model's full-vocabulary log-probs, which must reproduce ``beam_search_sids`` exactly). The real
engine server (``.venv-vllm``) is driven in ``tests/integration/test_serving_vllm.py``.
"""

from __future__ import annotations

import math

import pytest

from onerec_prod.serving.vllm_backend import (
    StepRequest,
    VLLMBackend,
    allowed_token_ids,
    build_step_requests,
    constrained_beam_search,
    expand_beams,
)
from onerec_prod.sid.tokens import SidVocab
from onerec_prod.sid.trie import SidTrie

SIZES = (4, 4, 4)
VOCAB = SidVocab(begin_id=100, end_id=101, level_ids=(
    (200, 201, 202, 203), (300, 301, 302, 303), (400, 401, 402, 403)))
SIDS = [(0, 1, 2), (0, 1, 3), (0, 2, 0), (1, 0, 0), (3, 3, 3), (3, 3, 1)]


@pytest.fixture(scope="module")
def trie():
    return SidTrie.from_sids(SIDS, SIZES)


def table_logp(prompt_index: int, codes: tuple[int, ...]) -> float:
    """A fixed, non-normalised 'log-prob' of the last code of ``codes`` for prompt ``prompt_index``."""
    return -((hash((prompt_index, codes)) % 1000) / 100.0) - 0.01


def table_step(prompts):
    def step(reqs):
        for r in reqs:  # the request carries its prompt, <|sid_begin|> and the prefix tokens
            assert list(r.token_ids) == list(prompts[r.prompt_index]) + VOCAB.encode(r.codes + (0,) * (3 - len(r.codes)))[: 1 + len(r.codes)]
        return [{tok: table_logp(r.prompt_index, r.codes + (VOCAB.code_of(len(r.codes), tok),)) for tok in r.allowed}
                for r in reqs]
    return step


def exhaustive(prompt_index: int, sids, start: dict | None = None):
    """Every catalog SID scored by summing the table (with prefix scores from ``start``)."""
    out = []
    for s in sids:
        if start is not None:
            k = len(next(iter(start)))
            if s[:k] not in start:
                continue
            score = start[s[:k]] + sum(table_logp(prompt_index, s[: i + 1]) for i in range(k, len(s)))
        else:
            score = sum(table_logp(prompt_index, s[: i + 1]) for i in range(len(s)))
        out.append((s, score))
    return sorted(out, key=lambda cs: (-cs[1], cs[0]))


def test_trie_mask_is_the_level_tokens_of_the_children(trie):
    assert allowed_token_ids(trie, VOCAB, ()) == [200, 201, 203]
    assert allowed_token_ids(trie, VOCAB, (0,)) == [301, 302]
    assert allowed_token_ids(trie, VOCAB, (0, 1)) == [402, 403]
    assert allowed_token_ids(trie, VOCAB, (2,)) == []  # no catalog SID starts with 2
    assert allowed_token_ids(trie, VOCAB, (0, 1, 2)) == []  # full SID: nothing follows


def test_requests_carry_prompt_begin_and_prefix_tokens(trie):
    reqs = build_step_requests([[7, 8], [9]], [[((0,), -1.0), ((2,), -0.5)], [((3, 3), -2.0), ((0,), -math.inf)]],
                               trie, VOCAB)
    assert reqs == [
        StepRequest(0, (0,), -1.0, (7, 8, 100, 200), (301, 302)),
        StepRequest(1, (3, 3), -2.0, (9, 100, 203, 303), (401, 403)),
    ]  # (2,) has no child and the -inf beam is dead: no request


def test_expand_keeps_the_best_per_prompt_and_ignores_missing_tokens():
    reqs = [StepRequest(0, (0,), -1.0, (), (301, 302)), StepRequest(0, (3,), -0.2, (), (303,))]
    out = expand_beams(reqs, [{301: -0.5, 302: -3.0}, {}], 1, VOCAB, beam_size=1)
    assert out == [[((0, 1), -1.5)]]
    with pytest.raises(ValueError, match="2 requests"):
        expand_beams(reqs, [{}], 1, VOCAB, beam_size=1)


@pytest.mark.parametrize("beam", [1, 2, 3, 10])
def test_beam_loop_equals_exhaustive_search_when_wide(trie, beam):
    prompts = [[1, 2, 3], [4, 5]]
    got = constrained_beam_search(prompts, trie, VOCAB, beam, table_step(prompts))
    for i in range(2):
        assert all(trie.contains(s) for s, _ in got[i])
        if beam >= len(SIDS):  # wide enough: exact
            want = exhaustive(i, SIDS)
            assert [s for s, _ in got[i]] == [s for s, _ in want]
            assert [sc for _, sc in got[i]] == pytest.approx([sc for _, sc in want])
        assert len(got[i]) == min(beam, len(SIDS))
        assert [sc for _, sc in got[i]] == sorted((sc for _, sc in got[i]), reverse=True)


def test_beam_loop_prefixes_and_completion(trie):
    prompts = [[1, 2, 3]]
    pre = constrained_beam_search(prompts, trie, VOCAB, 10, table_step(prompts), levels=2)[0]
    assert {s for s, _ in pre} == {s[:2] for s in SIDS}
    start = {(0, 1): -0.3, (3, 3): -0.1, (2, 2): -0.0}  # (2, 2) is not in the trie: dropped
    got = constrained_beam_search(prompts, trie, VOCAB, 10, table_step(prompts),
                                  start_prefixes=[list(start.items())])[0]
    want = exhaustive(0, SIDS, {k: v for k, v in start.items() if k != (2, 2)})
    assert [s for s, _ in got] == [s for s, _ in want]
    assert [sc for _, sc in got] == pytest.approx([sc for _, sc in want])
    with pytest.raises(ValueError, match="same length"):
        constrained_beam_search(prompts, trie, VOCAB, 3, table_step(prompts),
                                start_prefixes=[[((0,), 0.0), ((0, 1), 0.0)]])


# --------------------------------------------------------------------------------------
# against the HF decoder, with the tiny model as the "engine"


@pytest.fixture(scope="module")
def hf(tiny_model_dir, tiny_sids):
    from onerec_prod.model.io import load_model, load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    sizes = [16, 16, 16, 16]
    vocab = SidVocab.from_tokenizer(tok, sizes)
    sids = sorted(set(list(tiny_sids.values())[:30] + [(1, 2, 3, c) for c in range(4)]))
    return load_model(tiny_model_dir), vocab, SidTrie.from_sids(sids, sizes)


def hf_logprobs(model, token_ids, allowed):
    import torch

    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([list(token_ids)])).logits[0, -1].float()
    logp = torch.log_softmax(logits, -1)
    return {t: float(logp[t]) for t in allowed}


def test_beam_loop_reproduces_beam_search_sids(hf):
    from onerec_prod.eval.beam import beam_search_sids

    model, vocab, trie = hf
    prompts = [[5, 6, 7, 8], [9, 10]]

    def step(reqs):
        return [hf_logprobs(model, r.token_ids, r.allowed) for r in reqs]

    ref = beam_search_sids(model, prompts, trie, vocab, 4)
    got = constrained_beam_search(prompts, trie, vocab, 4, step)
    for a, b in zip(ref, got, strict=True):
        assert [s for s, _ in a] == [s for s, _ in b]
        assert [x for _, x in a] == pytest.approx([x for _, x in b], abs=1e-4)
    pre = beam_search_sids(model, prompts, trie, vocab, 3, levels=2)
    ref = beam_search_sids(model, prompts, trie, vocab, 4, start_prefixes=pre)
    got = constrained_beam_search(prompts, trie, vocab, 4, step, start_prefixes=pre)
    for a, b in zip(ref, got, strict=True):
        assert [s for s, _ in a] == [s for s, _ in b]


def test_backend_needs_exactly_one_engine(hf):
    _, vocab, trie = hf
    with pytest.raises(ValueError, match="exactly one"):
        VLLMBackend(trie, vocab)
