"""Model directories: safetensors only, atomic replace, weights hash."""

from __future__ import annotations

import pytest
import torch

from onerec_prod.model.io import load_model, load_tokenizer, read_meta, save_model, weights_hash


def test_save_roundtrip_replace_and_hash(tiny_model_dir, tmp_path):
    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    out = save_model(model, tok, tmp_path / "m", {"stage": "x", "parent": "base"})
    assert weights_hash(out) == weights_hash(tiny_model_dir) == read_meta(out)["weights_sha256"]
    assert read_meta(out)["parent"] == "base"
    with torch.no_grad():
        model.get_input_embeddings().weight[0, 0] += 1.0
    save_model(model, tok, out, {"stage": "y"})
    assert read_meta(out)["stage"] == "y"
    assert weights_hash(out) != weights_hash(tiny_model_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp dirs left
    assert not [p for p in out.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    again = load_model(out)
    assert again.get_input_embeddings().weight.data_ptr() == again.get_output_embeddings().weight.data_ptr()


def test_refuses_dirs_without_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(tmp_path)
