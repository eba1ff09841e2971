"""save_model replaces a model dir with no moment where the dir is missing or partial."""

from __future__ import annotations

import os

from onerec_prod.model.io import load_model, load_tokenizer, read_meta, save_model


def test_replacing_a_model_leaves_no_window_without_a_model(tiny_model_dir, tmp_path, monkeypatch):
    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    out = save_model(model, tok, tmp_path / "m", {"stage": "first"})
    # every rename save_model makes is a point where a crash (kill -9) could stop it: at each
    # one, the model dir must hold a complete model
    seen = []

    def watched(fn):
        def call(src, dst, *a, **kw):
            seen.append(read_meta(out).get("stage") if (out / "onerec_meta.json").exists() else None)
            return fn(src, dst, *a, **kw)
        return call

    monkeypatch.setattr(os, "replace", watched(os.replace))
    monkeypatch.setattr(os, "rename", watched(os.rename))
    save_model(model, tok, out, {"stage": "second"})
    assert None not in seen, f"a rename left {out} without a model: {seen}"
    assert read_meta(out)["stage"] == "second"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m.")]  # no leftovers
