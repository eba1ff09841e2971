"""SID service: the one place that decides which item gets which semantic ID.

* :func:`ensure_sids` (daily, from ``jobs/update_catalog``): the first call fits codebooks on the
  whole (bootstrap) catalog; later calls assign only items without a SID, from the frozen
  codebooks of the current version. Existing SIDs never change.
* :func:`refit` (rare, explicit: ``onerec-prod sid-fit``): a new ``sid_version`` for every item,
  which forces a full retrain.
* :func:`check_versions`: the pipeline refuses to mix catalog, samples and model versions.

Codebooks live under ``<paths.artifacts>/sid/<sid_version>/`` (see :mod:`.codebook`); the file
``<paths.artifacts>/sid/CURRENT`` holds the version in force.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from onerec_prod import storage
from onerec_prod.config import Config, SidCfg
from onerec_prod.sid import embed as _embed
from onerec_prod.sid.codebook import (
    MANIFEST_FILE,
    Codebook,
    assign_sids,
    fit_codebook,
    load_codebook_dir,
    save_codebook,
)
from onerec_prod.sid.report import sid_report

log = logging.getLogger(__name__)

CURRENT_FILE = "CURRENT"
REFIT_HINT = ("a refit is a new sid_version and needs a full retrain: run `onerec-prod sid-fit`, then "
              "rebuild samples and retrain from the base model")

Sid = tuple[int, ...]


class SidVersionError(RuntimeError):
    """SIDs of different codebook versions would be mixed (or the codebook does not fit the config)."""


def sid_root(cfg: Config) -> str:
    """``<paths.artifacts>/sid``: every codebook version plus the CURRENT pointer (path or URI)."""
    return storage.join(cfg.paths.artifacts, "sid")


def current_version(cfg: Config) -> str | None:
    """The sid_version in force (content of ``<artifacts>/sid/CURRENT``), or None before the first fit."""
    st = storage.storage(cfg)
    p = storage.join(sid_root(cfg), CURRENT_FILE)
    if not st.exists(p):
        return None
    v = st.read_text(p).strip()
    return v or None


def set_current(cfg: Config, version: str) -> None:
    """Point CURRENT at ``version`` (atomic replace; the version's directory must exist)."""
    root = sid_root(cfg)
    _load_dir(cfg, storage.join(root, version))  # refuse to point at a missing or corrupt codebook
    storage.storage(cfg).write_text(storage.join(root, CURRENT_FILE), version + "\n")
    log.info("sid CURRENT -> %s", version)


def _load_dir(cfg: Config, location: str) -> Codebook:
    """Load the codebook directory at ``location`` (an object-store one through a local temp copy)."""
    if not storage.is_remote(location):
        return load_codebook_dir(location)
    st = storage.storage(cfg)
    if not st.exists(storage.join(location, MANIFEST_FILE)):
        raise FileNotFoundError(f"{location}: no codebook manifest ({MANIFEST_FILE}) there")
    with tempfile.TemporaryDirectory(prefix="onerec-sid-") as tmp:
        # the loader checks that the directory is named after the version it holds
        return load_codebook_dir(st.get_dir(location, Path(tmp) / location.rstrip("/").rsplit("/", 1)[-1]))


def _save(cfg: Config, cb: Codebook) -> str:
    """Write codebook ``cb`` under the SID root; on an object store the manifest goes last, so a
    version directory with a manifest is complete (the local writer renames a finished temp dir)."""
    root = sid_root(cfg)
    if not storage.is_remote(root):
        return str(save_codebook(cb, root))
    st = storage.storage(cfg)
    final = storage.join(root, cb.version)
    if st.exists(storage.join(final, MANIFEST_FILE)):
        return final  # versions are content-addressed: an existing one is the same codebook
    with tempfile.TemporaryDirectory(prefix="onerec-sid-") as tmp:
        local = Path(save_codebook(cb, tmp))
        files = sorted(f for f in local.rglob("*") if f.is_file())
        for f in sorted(files, key=lambda f: f.name == MANIFEST_FILE):
            st.write_bytes(storage.join(final, *f.relative_to(local).parts), f.read_bytes())
    return final


def load_codebook(cfg: Config, version: str | None = None) -> Codebook:
    """Codebook of ``version`` (default: the current one)."""
    version = version or current_version(cfg)
    if version is None:
        raise FileNotFoundError(
            f"no SID codebook yet ({storage.join(sid_root(cfg), CURRENT_FILE)} is absent): the first "
            "ensure_sids call on the bootstrap catalog fits one, or run `onerec-prod sid-fit`"
        )
    return _load_dir(cfg, storage.join(sid_root(cfg), version))


def check_versions(catalog_version: str | None, samples_version: str | None,
                   model_version: str | None) -> str | None:
    """The common sid_version of catalog, samples and model; None values (not built yet) are skipped.

    >>> check_versions("v1-a", "v1-a", None)
    'v1-a'

    Raises:
        SidVersionError: two of them differ.
    """
    named = {"catalog": catalog_version, "samples": samples_version, "model": model_version}
    present = {k: v for k, v in named.items() if v is not None}
    if len(set(present.values())) > 1:
        got = ", ".join(f"{k}={v}" for k, v in present.items())
        raise SidVersionError(f"sid_version mismatch ({got}): the pipeline never mixes SID versions; "
                              + REFIT_HINT)
    return next(iter(present.values()), None)


def _normalise(rows: Iterable) -> list[dict]:
    out, seen = [], set()
    for r in rows:
        d = r.asDict() if hasattr(r, "asDict") else dict(r)
        iid = str(d["item_id"])
        if iid in seen:
            raise ValueError(f"duplicate item_id {iid!r} in catalog rows")
        seen.add(iid)
        sid = d.get("sid")
        d["item_id"] = iid
        d["sid"] = None if sid is None else tuple(int(c) for c in sid)
        d["sid_version"] = d.get("sid_version") or None
        if d["sid"] is not None and d["sid_version"] is None:
            raise ValueError(f"item {iid!r} has sid {d['sid']} but no sid_version")
        out.append(d)
    out.sort(key=lambda d: d["item_id"])
    return out


def _check_compatible(sid_cfg: SidCfg, cb: Codebook, model_id: Mapping) -> None:
    problems = [f"sid.{k}={getattr(sid_cfg, k)} but codebook has {v}"
                for k, v in (("levels", cb.levels), ("codebook_size", cb.codebook_size),
                             ("collision_size", cb.collision_size)) if getattr(sid_cfg, k) != v]
    want = cb.manifest.get("embed_model", {}).get("weights_sha256")
    if want and want != model_id.get("weights_sha256"):
        problems.append(f"embedding model weights {model_id.get('weights_sha256')} differ from the "
                        f"codebook's {want} (sid.embed_model_dir)")
    if problems:
        raise SidVersionError(f"current SID codebook {cb.version} does not match the config: "
                              + "; ".join(problems) + f"; restore the config or {REFIT_HINT}")


def _check_existing(existing: Mapping[str, Sid], cb: Codebook) -> None:
    owner: dict[Sid, str] = {}
    for iid, sid in existing.items():
        if len(sid) != len(cb.sizes) or any(not 0 <= c < s for c, s in zip(sid, cb.sizes)):
            raise ValueError(f"item {iid!r}: sid {sid} is invalid for codebook {cb.version} (sizes {cb.sizes})")
        if sid in owner:
            raise ValueError(f"items {owner[sid]!r} and {iid!r} share sid {sid} in the catalog")
        owner[sid] = iid


def _count_versions(rows: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rows:
        if r["sid_version"] is not None:
            counts[r["sid_version"]] = counts.get(r["sid_version"], 0) + 1
    return counts


def _model_id(sid_cfg: SidCfg) -> dict:
    return _embed.embed_model_id(str(_embed.embed_model_dir(sid_cfg)))


def _embed_cache(cfg: Config) -> _embed.EmbeddingCache | None:
    """The on-disk embedding cache of the configured encoder (None: ``sid.embed_cache`` is off)."""
    if not cfg.sid.embed_cache or storage.is_remote(sid_root(cfg)):
        # the cache is a node-local speed-up; with the artefacts on an object store it is off
        # (no silent writes to local disk), and vectors are recomputed
        return None
    return _embed.EmbeddingCache(Path(sid_root(cfg)) / "embed_cache", _model_id(cfg.sid)["weights_sha256"])


def _fit(cfg: Config, rows: list[dict], source: str) -> tuple[dict[str, Sid], Codebook]:
    texts = [_embed.item_text(r) for r in rows]
    h = hashlib.sha256()
    for r, t in zip(rows, texts):
        h.update(f"{r['item_id']}\t{t}\n".encode())
    log.info("fitting SID codebooks on %d items (%d levels x %d + collision %d)", len(rows),
             cfg.sid.levels, cfg.sid.codebook_size, cfg.sid.collision_size)
    emb = _embed.embed_items_cached(rows, cfg.sid, _embed_cache(cfg))
    cb = fit_codebook(emb, cfg.sid, embed_model=_model_id(cfg.sid),
                      created_from={"source": source, "n_items": len(rows), "items_sha256": h.hexdigest()[:16]})
    sids = assign_sids(cb, emb)
    cb.manifest["fit_report"] = sid_report(sids, cb.sizes)
    _save(cfg, cb)
    return {r["item_id"]: s for r, s in zip(rows, sids)}, cb


def ensure_sids(cfg: Config, rows: Iterable[Mapping]) -> tuple[dict[str, Sid], str]:
    """SIDs for every catalog row and the sid_version they belong to.

    ``rows``: every catalog item as a mapping with ``item_id, title, categories, description,
    sid`` (None or list of ints) and ``sid_version`` (None or str). Without a codebook, fits one on
    all rows (the bootstrap catalog) and makes it current. Otherwise assigns only rows whose sid
    is None (nearest code per level, next free collision code); rows that have a SID keep it.
    Returns the SID of **every** row (existing ones unchanged), keyed by item_id.

    Raises:
        SidVersionError: a row carries a sid_version other than the current one, or the config /
            encoder no longer matches the current codebook.
        SidOverflowError: a prefix has no free collision code left.
    """
    rows = _normalise(rows)
    cur = current_version(cfg)
    carried = _count_versions(rows)
    foreign = {v: n for v, n in carried.items() if v != cur}
    if foreign:
        got = ", ".join(f"{v} ({n} items)" for v, n in sorted(foreign.items()))
        raise SidVersionError(f"catalog rows carry sid_version {got} but the current codebook is {cur}; "
                              + REFIT_HINT)
    if cur is None:
        mapping, cb = _fit(cfg, rows, source="bootstrap catalog (ensure_sids)")
        set_current(cfg, cb.version)
        return mapping, cb.version
    cb = load_codebook(cfg, cur)
    existing = {r["item_id"]: r["sid"] for r in rows if r["sid"] is not None}
    _check_existing(existing, cb)
    new = [r for r in rows if r["sid"] is None]
    out = dict(existing)
    if new:
        _check_compatible(cfg.sid, cb, _model_id(cfg.sid))
        emb = _embed.embed_items_cached(new, cfg.sid, _embed_cache(cfg))
        sids = assign_sids(cb, emb, existing=existing.values())
        out.update({r["item_id"]: s for r, s in zip(new, sids)})
        log.info("assigned SIDs of %s to %d new items (%d existing kept)", cur, len(new), len(existing))
    return out, cur


def refit(cfg: Config, rows: Iterable[Mapping], *, activate: bool = True) -> tuple[dict[str, Sid], str]:
    """Fit new codebooks on all ``rows`` (their current SIDs ignored) -> new SIDs for every row.

    The version is a content hash, so refitting the same items with the same seed gives back the
    same version. ``activate=False`` stores the codebook without moving CURRENT (call
    :func:`set_current` once the catalog holds the new SIDs).
    """
    rows = _normalise(rows)
    old = current_version(cfg)
    mapping, cb = _fit(cfg, rows, source=f"refit of catalog (previous {old})")
    if cb.version == old:
        log.info("refit reproduced the current sid_version %s; SIDs are unchanged", old)
    else:
        log.warning("refit: new sid_version %s (was %s): models and samples of %s are incompatible; "
                    "retrain from the base model", cb.version, old, old)
    if activate:
        set_current(cfg, cb.version)
    return mapping, cb.version
