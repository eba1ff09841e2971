"""Residual k-means codebooks, the collision level, and their versioned artefact.

A SID is ``levels`` residual k-means codes followed by one collision code. Level ``l`` is fitted
with ``faiss.Kmeans`` (seed ``sid.seed + l``, ``sid.kmeans_iters`` iterations) on the residuals
left by levels ``< l``. Every item, at fit time and later, is encoded by the same nearest-centroid
rule (:func:`encode_prefixes`), so a new item gets exactly the prefix the frozen codebooks give it.
Items sharing a prefix get distinct collision codes ``0..collision_size-1``: the item closest to the
prefix's reconstruction gets the lowest free code; when a prefix runs out of codes,
:class:`SidOverflowError` names the groups and items, never a silent duplicate.

**Versioning.** ``sid_version = "v1-" + sha256(format, sizes, encoder id, centroids)[:12]``: a pure
function of the codebook content, so refitting the same items with the same seed reproduces the
same version (idempotent), while any change of data, seed, sizes or encoder gives a new one.

**Artefact.** ``<root>/<sid_version>/``: ``centroids.safetensors`` (``level_0..level_{L-1}``,
float32 ``(codebook_size, dim)``) and ``manifest.json`` (sizes, k-means settings, seed, encoder,
n_items, created_from, created_at, fit report). No pickle. Written to a temp dir, then renamed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from onerec_prod.config import SidCfg

log = logging.getLogger(__name__)

FORMAT = 1
CENTROIDS_FILE = "centroids.safetensors"
MANIFEST_FILE = "manifest.json"
_CHUNK = 32_768


class SidOverflowError(ValueError):
    """More items share a prefix than the collision level has codes."""

    def __init__(self, overflow: Mapping[tuple[int, ...], int], group_sizes: Mapping[tuple[int, ...], int],
                 collision_size: int):
        self.overflow = dict(overflow)
        self.n_groups = len(overflow)
        self.n_items = int(sum(overflow.values()))
        worst = max(group_sizes, key=lambda p: (group_sizes[p], p))
        super().__init__(
            f"SID collision level overflow: {self.n_groups} prefix group(s) need more than "
            f"sid.collision_size={collision_size} codes, leaving {self.n_items} item(s) without a "
            f"distinct SID (largest: prefix {worst} with {group_sizes[worst]} items). Raise "
            "sid.collision_size or sid.codebook_size/levels and refit (`onerec-prod sid-fit`)."
        )


@dataclass(frozen=True)
class Codebook:
    """Frozen residual codebooks of one ``sid_version``."""

    centroids: tuple[np.ndarray, ...]
    collision_size: int
    manifest: dict = field(default_factory=dict)

    @property
    def version(self) -> str:
        return self.manifest["sid_version"]

    @property
    def levels(self) -> int:
        return len(self.centroids)

    @property
    def codebook_size(self) -> int:
        return int(self.centroids[0].shape[0])

    @property
    def dim(self) -> int:
        return int(self.centroids[0].shape[1])

    @property
    def sizes(self) -> list[int]:
        """Codes per level, collision level last (as ``tokens.level_sizes``)."""
        return [self.codebook_size] * self.levels + [self.collision_size]


def compute_version(centroids: Sequence[np.ndarray], collision_size: int, embed_model: Mapping | None) -> str:
    """Content hash of a codebook: ``v1-<12 hex>``."""
    h = hashlib.sha256()
    head = {"format": FORMAT, "shapes": [list(c.shape) for c in centroids],
            "collision_size": collision_size, "embed_model": dict(embed_model or {})}
    h.update(json.dumps(head, sort_keys=True).encode())
    for c in centroids:
        h.update(np.ascontiguousarray(c, dtype="<f4").tobytes())
    return f"v{FORMAT}-{h.hexdigest()[:12]}"


def _nearest(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Index of the nearest row of ``c`` for every row of ``x`` (float64 distances, first on ties)."""
    c64 = c.astype(np.float64)
    cn = (c64 * c64).sum(1)
    out = np.empty(len(x), dtype=np.int64)
    for s in range(0, len(x), _CHUNK):
        xb = x[s : s + _CHUNK].astype(np.float64)
        d = cn[None, :] - 2.0 * (xb @ c64.T)
        out[s : s + _CHUNK] = d.argmin(1)
    return out


def _check_embeddings(emb: np.ndarray, dim: int | None = None) -> np.ndarray:
    x = np.ascontiguousarray(emb, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (n, dim), got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"embeddings have dim {x.shape[1]}, the codebook expects {dim}")
    if not np.isfinite(x).all():
        raise ValueError("embeddings contain NaN or inf")
    return x


def fit_codebook(emb: np.ndarray, sid_cfg: SidCfg, *, embed_model: Mapping | None = None,
                 created_from: Mapping | None = None) -> Codebook:
    """Fit ``sid_cfg.levels`` residual k-means codebooks of ``sid_cfg.codebook_size`` codes.

    Deterministic for the same ``emb`` (row order included) and ``sid_cfg.seed``.
    """
    import faiss

    x = _check_embeddings(emb)
    n, d = x.shape
    k = sid_cfg.codebook_size
    if n < k:
        raise ValueError(f"cannot fit sid.codebook_size={k} codes on {n} items: need at least {k} items")
    residual = x.copy()
    cents = []
    for level in range(sid_cfg.levels):
        km = faiss.Kmeans(d, k, niter=sid_cfg.kmeans_iters, seed=sid_cfg.seed + level, verbose=False,
                          min_points_per_centroid=1, max_points_per_centroid=max(256, -(-n // k)))
        km.train(residual)
        c = np.ascontiguousarray(km.centroids, dtype=np.float32).reshape(k, d)
        codes = _nearest(residual, c)
        residual = residual - c[codes]
        cents.append(c)
        log.info("sid level %d: %d/%d codes used, residual norm %.4f", level,
                 len(np.unique(codes)), k, float(np.linalg.norm(residual, axis=1).mean()))
    version = compute_version(cents, sid_cfg.collision_size, embed_model)
    manifest = {
        "format": FORMAT, "sid_version": version, "levels": sid_cfg.levels, "codebook_size": k,
        "collision_size": sid_cfg.collision_size, "dim": d,
        "kmeans": {"impl": f"faiss.Kmeans {faiss.__version__}", "niter": sid_cfg.kmeans_iters,
                   "seed": sid_cfg.seed, "seed_rule": "seed + level"},
        "embed_model": dict(embed_model or {}), "n_items": n,
        "created_from": dict(created_from or {}),
        "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    return Codebook(tuple(cents), sid_cfg.collision_size, manifest)


def encode_prefixes(cb: Codebook, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest code per level -> ``(codes (n, levels) int64, final residual norm (n,))``."""
    residual = _check_embeddings(emb, cb.dim).copy()
    codes = np.empty((len(residual), cb.levels), dtype=np.int64)
    for level, c in enumerate(cb.centroids):
        codes[:, level] = _nearest(residual, c)
        residual = residual - c[codes[:, level]]
    return codes, np.linalg.norm(residual.astype(np.float64), axis=1)


def assign_collision_codes(prefixes: Sequence[tuple[int, ...]], collision_size: int, *,
                           occupied: Mapping[tuple[int, ...], Iterable[int]] | None = None,
                           order: Sequence[float] | None = None) -> list[int]:
    """Lowest free collision code per item, in ``order`` (ties: input position).

    ``occupied`` holds the codes already taken under each prefix (existing SIDs).
    Raises :class:`SidOverflowError` if any prefix runs out of codes.

    >>> assign_collision_codes([(1,), (1,), (2,)], 4, occupied={(1,): [0]})
    [1, 2, 0]
    """
    taken = {p: set(v) for p, v in (occupied or {}).items()}
    keys = list(order) if order is not None else [0.0] * len(prefixes)
    out = [-1] * len(prefixes)
    overflow: Counter = Counter()
    cursor: dict[tuple[int, ...], int] = {}
    for i in sorted(range(len(prefixes)), key=lambda i: (keys[i], i)):
        p = tuple(prefixes[i])
        used = taken.setdefault(p, set())
        c = cursor.get(p, 0)
        while c in used:
            c += 1
        cursor[p] = c
        if c >= collision_size:
            overflow[p] += 1
            continue
        used.add(c)
        out[i] = c
    if overflow:
        sizes = {p: len(taken[p]) + overflow[p] for p in overflow}
        raise SidOverflowError(overflow, sizes, collision_size)
    return out


def assign_sids(cb: Codebook, emb: np.ndarray, *,
                existing: Iterable[Sequence[int]] = ()) -> list[tuple[int, ...]]:
    """Full SIDs for the rows of ``emb``; collision codes avoid those used by ``existing`` SIDs."""
    occupied: dict[tuple[int, ...], set[int]] = {}
    for sid in existing:
        occupied.setdefault(tuple(int(c) for c in sid[: cb.levels]), set()).add(int(sid[cb.levels]))
    codes, dist = encode_prefixes(cb, emb)
    prefixes = [tuple(int(c) for c in row) for row in codes]
    last = assign_collision_codes(prefixes, cb.collision_size, occupied=occupied, order=dist.tolist())
    return [p + (c,) for p, c in zip(prefixes, last)]


def save_codebook(cb: Codebook, root: str | Path) -> Path:
    """Write ``<root>/<version>/`` atomically; an existing identical version is kept as is."""
    from safetensors.numpy import save_file

    root = Path(root)
    final = root / cb.version
    if (final / MANIFEST_FILE).exists():
        log.info("sid codebook %s already stored at %s", cb.version, final)
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{cb.version}-", dir=root))
    try:
        save_file({f"level_{i}": c for i, c in enumerate(cb.centroids)}, str(tmp / CENTROIDS_FILE))
        digest = hashlib.sha256((tmp / CENTROIDS_FILE).read_bytes()).hexdigest()
        manifest = {**cb.manifest, "centroids_file": CENTROIDS_FILE, "centroids_sha256": digest}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / MANIFEST_FILE).exists():
                raise
            log.info("sid codebook %s was stored concurrently; keeping that copy", cb.version)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("saved sid codebook %s to %s", cb.version, final)
    return final


def load_codebook_dir(path: str | Path) -> Codebook:
    """Load and verify a codebook directory (the content hash must match its version)."""
    from safetensors.numpy import load_file

    path = Path(path)
    mpath = path / MANIFEST_FILE
    if not mpath.exists():
        raise FileNotFoundError(f"no SID codebook at {path} ({MANIFEST_FILE} missing)")
    manifest = json.loads(mpath.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{mpath}: unsupported codebook format {manifest.get('format')!r} (expected {FORMAT})")
    tensors = load_file(str(path / manifest.get("centroids_file", CENTROIDS_FILE)))
    cents = tuple(np.ascontiguousarray(tensors[f"level_{i}"], dtype=np.float32)
                  for i in range(int(manifest["levels"])))
    version = compute_version(cents, int(manifest["collision_size"]), manifest.get("embed_model"))
    if version != manifest["sid_version"] or (path.name != version and not path.name.startswith(".tmp")):
        raise ValueError(
            f"SID codebook at {path} is corrupt: content hash {version} does not match "
            f"manifest version {manifest['sid_version']!r} / directory name {path.name!r}"
        )
    return Codebook(cents, int(manifest["collision_size"]), manifest)
