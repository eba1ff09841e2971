"""Embedded base model: tokenizer with ChatML + SID vocabulary, deterministic files."""

from __future__ import annotations

import json

from onerec_prod.model.io import load_model, load_tokenizer, read_meta, weights_hash
from onerec_prod.samples.prompts import inference_prompt_ids, render_training_ids, task_messages
from onerec_prod.samples.templates import EMPTY_THINK
from onerec_prod.sid.tokens import SidVocab, sid_to_text


def test_tiny_model_has_sid_vocab_and_chatml(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir)
    vocab = SidVocab.from_tokenizer(tok, [16, 16, 16, 16])
    assert vocab.encode((1, 2, 3, 4)) == tok(sid_to_text((1, 2, 3, 4)), add_special_tokens=False)["input_ids"]
    assert model.get_input_embeddings().weight.shape[0] % 64 == 0
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)
    assert model.config.tie_word_embeddings
    msgs = task_messages("text2sid", title="Nail polish", categories="Beauty > Nails")
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    ids, labels = render_training_ids(tok, msgs, EMPTY_THINK + sid_to_text((1, 2, 3, 4)), 256)
    trained = [i for i, l in zip(ids, labels) if l != -100]
    assert tok.decode(trained) == EMPTY_THINK + sid_to_text((1, 2, 3, 4)) + "<|im_end|>\n"
    prompt = inference_prompt_ids(tok, msgs, think=False)
    assert ids[: len(prompt)] == prompt  # next token after the prompt is <|sid_begin|>
    assert ids[len(prompt)] == vocab.begin_id
    # <think> is one token and survives skip_special_tokens; SID tokens are special
    assert len(tok("<think>", add_special_tokens=False)["input_ids"]) == 1
    assert "<think>" in tok.decode(tok("<think>\nx</think>")["input_ids"], skip_special_tokens=True)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id is not None


def test_meta_and_hash(tiny_model_dir):
    meta = read_meta(tiny_model_dir)
    assert meta["stage"] == "base" and meta["sid_sizes"] == [16, 16, 16, 16]
    assert meta["weights_sha256"] == weights_hash(tiny_model_dir)
    assert not [p for p in tiny_model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth")]


def test_init_is_deterministic(tiny_model_dir, make_cfg, beauty_items, tmp_path):
    from onerec_prod.model.base import init_base_model

    texts = [f"{it['title']} {it['categories']}" for it in beauty_items]
    again = init_base_model(make_cfg(), texts, tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
    assert json.loads((again / "onerec_meta.json").read_text()) == read_meta(tiny_model_dir)
