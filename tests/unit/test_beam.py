"""Constrained beam search: exact against exhaustive scoring, catalog-only, prefixes, think mode."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from onerec_prod.config import EvalCfg  # noqa: E402
from onerec_prod.eval.beam import beam_search_sids, generate_rationales, recommend  # noqa: E402
from onerec_prod.samples.prompts import inference_prompt_ids, rec_messages  # noqa: E402
from onerec_prod.sid.tokens import SidVocab, parse_sids  # noqa: E402
from onerec_prod.sid.trie import SidTrie  # noqa: E402

SIZES = [16, 16, 16, 16]


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    """The tiny model with its SID rows re-drawn large (seeded), so SID scores are well apart."""
    from onerec_prod.model.io import load_model, load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir)
    vocab = SidVocab.from_tokenizer(tok, SIZES)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        for ids in vocab.level_ids:
            emb[list(ids)] = torch.randn(len(ids), emb.shape[1], generator=g) * 0.5
    return model, tok, vocab


@pytest.fixture(scope="module")
def catalog(tiny_sids):
    """40 catalog SIDs plus a few sharing long prefixes (deep branching)."""
    sids = list(tiny_sids.values())[:40] + [(1, 2, 3, c) for c in range(5)] + [(1, 2, c, 0) for c in (6, 7, 8)]
    sids = sorted(set(sids))
    return sids, SidTrie.from_sids(sids, SIZES)


def _items(sids):
    return [{"item_id": f"i{k}", "title": f"Item {k}", "categories": "Beauty > Nails", "sid": s}
            for k, s in enumerate(sids)]


@pytest.fixture(scope="module")
def prompts(lm, catalog):
    """Three users with histories of 1, 4 and 9 items (different lengths: left padding matters)."""
    _, tok, _ = lm
    items = _items(catalog[0])
    return [inference_prompt_ids(tok, rec_messages(items[:n], think=False), think=False) for n in (1, 4, 9)]


def exhaustive_scores(model, vocab, prompt, sids, levels=None):
    """Teacher-forced log-prob of every SID (first ``levels`` levels) after ``prompt``: no cache, no padding."""
    levels = levels or len(SIZES)
    ids = torch.tensor([prompt + vocab.encode(s)[: 1 + levels] for s in sids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.float(), -1)
    t = len(prompt)
    return {s[:levels]: sum(float(logp[i, t + lvl, vocab.level_ids[lvl][s[lvl]]]) for lvl in range(levels))
            for i, s in enumerate(sids)}


def test_beam_equals_exhaustive_scoring(lm, catalog, prompts):
    """With beam >= #items nothing is pruned: the result is every item, ranked by exact log-prob."""
    model, _, vocab = lm
    sids, trie = catalog
    results = beam_search_sids(model, prompts, trie, vocab, beam_size=len(sids), batch_size=2)
    for prompt, got in zip(prompts, results, strict=True):
        want = exhaustive_scores(model, vocab, prompt, sids)
        assert sorted(s for s, _ in got) == sorted(want)                 # every item, once
        assert max(abs(want[s] - sc) for s, sc in got) < 1e-4            # same scores
        assert [sc for _, sc in got] == sorted((sc for _, sc in got), reverse=True)
        ranked_want = sorted(want, key=want.get, reverse=True)
        assert [s for s, _ in got][:10] == ranked_want[:10]              # same top-10 order


def test_small_beam_returns_distinct_catalog_items(lm, catalog, prompts):
    model, _, vocab = lm
    sids, trie = catalog
    for got in beam_search_sids(model, prompts, trie, vocab, beam_size=5):
        assert len(got) == 5 and len({s for s, _ in got}) == 5
        assert all(trie.contains(s) for s, _ in got)
        assert [sc for _, sc in got] == sorted((sc for _, sc in got), reverse=True)


def test_batch_size_does_not_change_results(lm, catalog, prompts):
    model, _, vocab = lm
    _, trie = catalog
    one = beam_search_sids(model, prompts, trie, vocab, beam_size=6, batch_size=1)
    three = beam_search_sids(model, prompts, trie, vocab, beam_size=6, batch_size=3)
    for a, b in zip(one, three, strict=True):
        assert [s for s, _ in a] == [s for s, _ in b]
        assert all(abs(x - y) < 1e-4 for (_, x), (_, y) in zip(a, b, strict=True))


def test_fewer_valid_items_than_beams(lm, prompts):
    model, _, vocab = lm
    trie = SidTrie.from_sids([(1, 2, 3, 4), (1, 2, 3, 5), (9, 0, 0, 0)], SIZES)
    for got in beam_search_sids(model, prompts, trie, vocab, beam_size=10):
        assert sorted(s for s, _ in got) == [(1, 2, 3, 4), (1, 2, 3, 5), (9, 0, 0, 0)]  # no padding/repeats


def test_levels_returns_exact_prefixes(lm, catalog, prompts):
    model, _, vocab = lm
    sids, trie = catalog
    n_prefixes = trie.nodes_per_level()[2]
    got = beam_search_sids(model, prompts[:1], trie, vocab, beam_size=n_prefixes, levels=2)[0]
    want = exhaustive_scores(model, vocab, prompts[0], sids, levels=2)
    assert sorted(p for p, _ in got) == sorted(want) and len(got) == n_prefixes
    assert max(abs(want[p] - sc) for p, sc in got) < 1e-4


def test_start_prefixes_complete_to_the_same_items(lm, catalog, prompts):
    """Think-Ahead: prefixes (level 2) then completion == one full search, when beams are wide."""
    model, _, vocab = lm
    sids, trie = catalog
    full = beam_search_sids(model, prompts, trie, vocab, beam_size=len(sids))
    pre = beam_search_sids(model, prompts, trie, vocab, beam_size=len(sids), levels=2)
    done = beam_search_sids(model, prompts, trie, vocab, beam_size=len(sids), start_prefixes=pre)
    for a, b in zip(full, done, strict=True):
        assert [s for s, _ in a][:10] == [s for s, _ in b][:10]
        assert max(abs(x - dict(b)[s]) for s, x in a) < 1e-4


def test_start_prefixes_keep_prefix_and_score(lm, catalog, prompts):
    model, _, vocab = lm
    _, trie = catalog
    absent = next((a, b) for a in range(16) for b in range(16) if trie.node_of((a, b)) < 0)
    starts = [[((1, 2), -1.5), (absent, 0.0)]] * len(prompts)  # absent prefix: dropped, logged
    got = beam_search_sids(model, prompts, trie, vocab, beam_size=20, start_prefixes=starts)
    base = beam_search_sids(model, prompts, trie, vocab, beam_size=20, start_prefixes=[[((1, 2), 0.0)]] * 3)
    for g, b in zip(got, base, strict=True):
        assert sorted(s for s, _ in g) == sorted([(1, 2, 3, c) for c in range(5)] + [(1, 2, c, 0) for c in (6, 7, 8)])
        assert all(abs(x - (dict(b)[s] - 1.5)) < 1e-5 for s, x in g)


def test_rejects_mismatched_levels(lm, catalog, prompts):
    model, _, vocab = lm
    trie3 = SidTrie.from_sids([(1, 2, 3)], SIZES[:3])
    with pytest.raises(ValueError, match="SID levels"):
        beam_search_sids(model, prompts, trie3, vocab, beam_size=2)
    with pytest.raises(ValueError, match="levels=5"):
        beam_search_sids(model, prompts, catalog[1], vocab, beam_size=2, levels=5)
    with pytest.raises(ValueError, match="same length"):
        beam_search_sids(model, prompts[:1], catalog[1], vocab, 2, start_prefixes=[[((1,), 0.0), ((1, 2), 0.0)]])


def test_think_mode_output_parses(lm, catalog):
    """Think mode: a rationale is generated, the think block closes, then a constrained SID follows."""
    model, tok, vocab = lm
    sids, trie = catalog
    items = _items(sids)
    hists = [items[:2], items[3:8]]
    cfg = EvalCfg(beam_size=3, batch_size=2, max_think_tokens=6)
    out = recommend(model, tok, trie, vocab, hists, cfg, think=True, max_items=10)
    assert len(out.rationales) == 2 and all(isinstance(r, str) and "</think>" not in r for r in out.rationales)
    for hist, rationale, ranked in zip(hists, out.rationales, out.sids, strict=True):
        assert len(ranked) == 3 and all(trie.contains(s) for s, _ in ranked)
        ids = inference_prompt_ids(tok, rec_messages(hist, think=True, max_items=10), think=True, rationale=rationale)
        text = tok.decode(ids + vocab.encode(ranked[0][0]))
        answer = text.rsplit("</think>", 1)[1]
        assert parse_sids(answer) == [ranked[0][0]]
    again = recommend(model, tok, trie, vocab, hists, cfg, think=True, max_items=10)
    assert again.rationales == out.rationales  # greedy rationale: deterministic


def test_generate_rationales_stops_and_is_seeded(lm, catalog):
    model, tok, _ = lm
    items = _items(catalog[0])
    ids = [inference_prompt_ids(tok, rec_messages(items[:3], think=True), think=True)]
    a = generate_rationales(model, tok, ids * 2, max_new_tokens=5, temperature=1.0, do_sample=True, seed=3)
    b = generate_rationales(model, tok, ids * 2, max_new_tokens=5, temperature=1.0, do_sample=True, seed=3)
    assert a == b and len(a) == 2
    state = torch.random.get_rng_state()
    generate_rationales(model, tok, ids, max_new_tokens=3, do_sample=True, seed=1)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched


@pytest.mark.parametrize("path", ["eager", "expanded"])
def test_token_tree_equals_other_decoding_paths(lm, catalog, prompts, monkeypatch, path):
    """The token-tree decoder (one prompt cache per user, a 4D mask per beam) gives the results of
    eager attention (additive float mask) and of the fallback with one cache row per beam."""
    import onerec_prod.eval.beam as beam_mod

    model, _, vocab = lm
    _, trie = catalog

    def run():
        full = beam_search_sids(model, prompts, trie, vocab, beam_size=12, batch_size=3)
        pre = beam_search_sids(model, prompts, trie, vocab, beam_size=6, levels=2, batch_size=2)
        return full, pre, beam_search_sids(model, prompts, trie, vocab, beam_size=12, start_prefixes=pre)

    ref = run()
    if path == "expanded":
        monkeypatch.setattr(beam_mod, "_beams_for", lambda m, c, a: beam_mod._ExpandedBeams(m, c, a))
        got = run()
    else:
        model.set_attn_implementation("eager")
        try:
            assert not beam_mod._beams_for(model, None, torch.ones(1, 1)).bool_mask  # additive float mask
            got = run()
        finally:
            model.set_attn_implementation("sdpa")
    for want_runs, got_runs in zip(ref, got, strict=True):
        for a, b in zip(want_runs, got_runs, strict=True):
            assert [s for s, _ in a] == [s for s, _ in b]
            assert max(abs(x - y) for (_, x), (_, y) in zip(a, b, strict=True)) < 1e-4
