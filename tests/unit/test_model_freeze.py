"""Token warm-up: only the new rows change; everything else stays bit-identical."""

from __future__ import annotations

import pytest
import torch

from onerec_prod.model.base import build_model, train_tokenizer
from onerec_prod.model.freeze import freeze_except_rows, param_groups
from onerec_prod.model.vocab import expand_vocab


def _steps(model, opt, vocab_size, n=4):
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(n):
        ids = torch.randint(0, vocab_size, (2, 12), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("tie", [True, False])
def test_warmup_changes_only_new_rows(make_cfg, beauty_items, tie):
    cfg = make_cfg(f"model.tie_embeddings={str(tie).lower()}", "model.text_vocab_size=400")
    tok = train_tokenizer([it["title"] for it in beauty_items[:100]], 400)
    model = build_model(cfg.model, tok)
    new_ids = expand_vocab(model, tok, [4, 4])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mask = freeze_except_rows(model, new_ids)
    opt = torch.optim.AdamW(param_groups(model, 0.1, mask.param_names), lr=1e-2, weight_decay=0.1)
    _steps(model, opt, len(tok))
    old = [i for i in range(model.get_input_embeddings().weight.shape[0]) if i not in set(new_ids)]
    for n, p in model.named_parameters():
        if n in mask.param_names:
            assert torch.equal(p.detach()[old], before[n][old]), n
            assert not torch.equal(p.detach()[new_ids], before[n][new_ids]), n
        else:
            assert torch.equal(p.detach(), before[n]), n


def test_plain_decay_would_move_frozen_rows(make_cfg, beauty_items):
    """The test above can fail: decaying the masked matrix moves old rows."""
    cfg = make_cfg("model.text_vocab_size=400")
    tok = train_tokenizer([it["title"] for it in beauty_items[:100]], 400)
    model = build_model(cfg.model, tok)
    new_ids = expand_vocab(model, tok, [4, 4])
    emb = model.get_input_embeddings().weight
    before = emb.detach().clone()
    freeze_except_rows(model, new_ids)
    opt = torch.optim.AdamW([emb], lr=1e-2, weight_decay=0.1)
    _steps(model, opt, len(tok), n=1)
    assert not torch.equal(emb.detach()[:10], before[:10])
