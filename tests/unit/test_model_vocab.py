"""Vocabulary expansion: idempotent, mean init, padding, tied and untied heads."""

from __future__ import annotations

import pytest
import torch

from onerec_prod.model.base import build_model, train_tokenizer
from onerec_prod.model.vocab import PAD_MULTIPLE, expand_vocab, sid_token_ids
from onerec_prod.sid.tokens import vocab_tokens

SIZES = [4, 4, 3]


@pytest.fixture(scope="module")
def texts(beauty_items):
    return [f"{it['title']} {it['categories']}" for it in beauty_items[:100]]


def _fresh(make_cfg, texts, tie: bool):
    cfg = make_cfg(f"model.tie_embeddings={str(tie).lower()}", "model.text_vocab_size=400")
    tok = train_tokenizer(texts, cfg.model.text_vocab_size)
    return build_model(cfg.model, tok), tok


@pytest.mark.parametrize("tie", [True, False])
def test_expand_adds_rows_and_is_idempotent(make_cfg, texts, tie):
    model, tok = _fresh(make_cfg, texts, tie)
    n_old = len(tok)
    old_emb = model.get_input_embeddings().weight[:n_old].detach().clone()
    old_head = model.get_output_embeddings().weight[:n_old].detach().clone()
    new_ids = expand_vocab(model, tok, SIZES)
    assert new_ids == list(range(n_old, n_old + len(vocab_tokens(SIZES))))
    assert sid_token_ids(tok, SIZES) == new_ids
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    assert emb.shape[0] % PAD_MULTIPLE == 0 and emb.shape[0] >= len(tok)
    assert model.config.vocab_size == emb.shape[0]
    assert torch.equal(emb[:n_old], old_emb) and torch.equal(head[:n_old], old_head)
    assert (head.data_ptr() == emb.data_ptr()) == tie
    # mean init + small noise: close to the mean of the old rows, not identical to each other
    mu = old_emb.mean(0)
    new = emb[new_ids].detach()
    assert (new - mu).norm(dim=1).max() < 0.5 * old_emb.std(0).norm()
    assert not torch.equal(new[0], new[1])
    if not tie:
        assert torch.allclose(head[new_ids].detach().mean(0), old_head.mean(0), atol=0.05)
    # SID tokens are never split
    s = "<|sid_begin|><s_a_3><s_b_0><s_c_2><|sid_end|>"
    assert len(tok(s, add_special_tokens=False)["input_ids"]) == 5
    # idempotent
    shape = emb.shape
    assert expand_vocab(model, tok, SIZES) == []
    assert model.get_input_embeddings().weight.shape == shape


def test_expand_text_init_and_growth(make_cfg, texts):
    model, tok = _fresh(make_cfg, texts, True)
    first = expand_vocab(model, tok, [2, 2], init="text")
    assert len(first) == 2 + 4
    more = expand_vocab(model, tok, [3, 2, 2])  # only the missing tokens are added
    assert tok.convert_ids_to_tokens(more) == ["<s_a_2>", "<s_c_0>", "<s_c_1>"]
    with pytest.raises(ValueError, match="init"):
        expand_vocab(model, tok, [2], init="random")
