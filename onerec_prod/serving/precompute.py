"""Think-Ahead precompute: per active user, the rationale and the top-B prefixes of k SID levels.

Run after a promotion (and daily): for every *active* user the model reads the user's history,
optionally writes a rationale (``serving.think``), and keeps the best ``serving.prefix_beam``
prefixes of the first ``serving.prefix_levels`` SID levels with their log-probabilities
(:func:`onerec_prod.eval.beam.beam_search_sids` with ``levels=k``). Online, the service only
completes the remaining levels under each prefix.

Active users: rows of ``user_history`` whose ``updated_dt`` and newest event (``last_ts``) lie
in the ``serving.active_days`` days ending at ``dt`` (``0`` = every user; on a bootstrap day only
the users with an event in the window count, not every user of the backlog). ``user_history`` is a current-state table, so the
histories are the ones it holds when the job runs; its Delta version is returned for lineage.
History items without a SID of the model's ``sid_version`` are dropped from the prompt; users
left with no item are skipped (the service serves them through the fallback).

Outputs, both idempotent for ``(dt, model_version)``:

* Delta ``think_ahead``, partition ``dt=D AND model_version=V`` replaced (``replaceWhere``);
* the export the service loads without Spark, under
  ``<paths.artifacts>/think_ahead/<model_version>/dt=<D>/``: ``users-<sha>.jsonl`` (one user per
  line: ``user_id, history, rationale, prefixes, scores``), ``catalog-<sha>.jsonl`` (every item
  with a SID of the model's ``sid_version``: the SID -> item map of the service) and
  ``manifest.json``. Data files are content-addressed and written first; the manifest, written
  last by an atomic rename, is the commit point, so a reader never sees a half-written export.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onerec_prod import storage
from onerec_prod.config import Config

log = logging.getLogger(__name__)

EXPORT_FORMAT = 1
MANIFEST = "manifest.json"
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_DT_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")

Sid = tuple[int, ...]
Scored = tuple[Sid, float]


@dataclass(frozen=True)
class UserPrefixes:
    """One user's precomputed Think-Ahead row."""

    user_id: str
    history: tuple[str, ...]  # item ids the prefixes were computed from, oldest first
    rationale: str | None
    prefixes: tuple[Scored, ...]  # best first


@dataclass(frozen=True)
class Export:
    """A loaded export: the manifest, users by id and the catalog items (with SIDs)."""

    path: str | Path
    manifest: dict[str, Any]
    users: dict[str, UserPrefixes]
    items: list[dict[str, Any]]

    @property
    def model_version(self) -> str:
        return str(self.manifest["model_version"])

    @property
    def sid_version(self) -> str | None:
        return self.manifest.get("sid_version")


# --------------------------------------------------------------------------------------
# pure helpers


def check_model_version(version: str) -> str:
    """``version`` if it is safe as a directory name (registry versions are numbers)."""
    if not isinstance(version, str) or not _VERSION_RE.match(version):
        raise ValueError(
            f"model_version {version!r} must match {_VERSION_RE.pattern} (e.g. a registry version '3')"
        )
    return version


def check_dt(dt: str) -> str:
    if not isinstance(dt, str) or not _DT_RE.match(dt):
        raise ValueError(f"dt {dt!r} must be a YYYY-MM-DD date")
    _dt.date.fromisoformat(dt)
    return dt


def active_since(dt: str, active_days: int) -> str | None:
    """First ``updated_dt`` counted as active for ``dt`` (None = every user).

    >>> active_since("2014-03-10", 7)
    '2014-03-04'
    >>> active_since("2014-03-10", 0) is None
    True
    """
    if active_days <= 0:
        return None
    return (_dt.date.fromisoformat(dt) - _dt.timedelta(days=active_days - 1)).isoformat()


def rec_prompt_ids(
    tokenizer, history: Sequence[dict[str, Any]], *, think: bool, rationale: str | None, max_items: int
) -> list[int]:
    """Prompt ids ending right before ``<|sid_begin|>`` (the one builder of precompute and service).

    ``think`` with a ``rationale`` renders the reasoning chat prompt and the closed think block;
    ``think=False`` the SID stream of the history (:mod:`onerec_prod.samples.stream`), as eval and
    training do.
    """
    from onerec_prod.samples.prompts import inference_prompt_ids, rec_messages
    from onerec_prod.samples.stream import stream_text

    if think:
        msgs = rec_messages(history, think=True, max_items=max_items)
        return inference_prompt_ids(tokenizer, msgs, think=True, rationale=rationale or "")
    tail = list(history)[-max_items:] if max_items > 0 else []
    text = stream_text([it["sid"] for it in tail])
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def think_open_ids(tokenizer, history: Sequence[dict[str, Any]], *, max_items: int) -> list[int]:
    """The reasoning chat prompt of ``history`` ending in an open ``<think>``: where a rationale starts."""
    from onerec_prod.samples.prompts import inference_prompt_ids, rec_messages

    return inference_prompt_ids(tokenizer, rec_messages(history, think=True, max_items=max_items), think=True)


def rationale_text(tokenizer, ids: Sequence[int], stops: Sequence[int]) -> str:
    """The rationale of generated ``ids``: everything before the first stop id, decoded and stripped."""
    cut = next((j for j, t in enumerate(ids) if t in stops), len(ids))
    return tokenizer.decode(list(ids[:cut]), skip_special_tokens=True).strip()


def history_items(item_ids: Iterable[str], items: Mapping[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Catalog items of ``item_ids`` in order; ids without a catalog SID are dropped."""
    return [items[i] for i in item_ids if i in items]


def model_sid_version(model_dir: str | Path) -> str | None:
    """``sid_version`` recorded in the model's ``onerec_meta.json`` (None for a base model)."""
    from onerec_prod.model.io import read_meta

    return read_meta(model_dir).get("sid_version")


def select_catalog(rows: Iterable[Mapping[str, Any]], sid_version: str | None) -> tuple[list[dict], str | None]:
    """Items with a SID of ``sid_version`` as ``{item_id, title, categories, sid}``.

    A model without a ``sid_version`` (a base model) takes the catalog's only version; rows of
    several versions then raise, since the SIDs would be ambiguous.
    """
    rows = [r for r in rows if r.get("sid") is not None]
    if sid_version is None:
        versions = sorted({str(r.get("sid_version")) for r in rows})
        if len(versions) > 1:
            raise ValueError(
                f"model has no sid_version but the catalog holds SIDs of {versions}: "
                "record sid_version in the model's onerec_meta.json"
            )
        sid_version = versions[0] if versions else None
    out = [
        {"item_id": str(r["item_id"]), "title": r.get("title") or "", "categories": r.get("categories"),
         "sid": tuple(int(c) for c in r["sid"])}
        for r in rows if str(r.get("sid_version")) == str(sid_version)
    ]
    out.sort(key=lambda r: r["item_id"])
    return out, sid_version


# --------------------------------------------------------------------------------------
# the computation


def compute_prefixes(
    model,
    tokenizer,
    trie,
    vocab,
    histories: Mapping[str, Sequence[str]],
    items: Mapping[str, dict[str, Any]],
    *,
    levels: int,
    beam: int,
    think: bool,
    max_items: int,
    max_think_tokens: int = 32,
    batch_size: int = 16,
    seed: int = 0,
    backend=None,
) -> tuple[list[UserPrefixes], int]:
    """Top-``beam`` prefixes of ``levels`` levels per user (sorted by user id).

    The SID search (and, in think mode, the greedy rationale) runs on ``backend``
    (:mod:`onerec_prod.serving.backends`; default: an :class:`HFBackend` on ``model``).
    Returns the rows and the number of users skipped (no history item with a SID).
    """
    from onerec_prod.eval.beam import generate_rationales
    from onerec_prod.serving.backends import HFBackend

    if backend is None:
        backend = HFBackend(model, trie, vocab, batch_size=batch_size)

    users, hists = [], []
    for uid in sorted(histories):
        h = history_items(histories[uid], items)
        if h:
            users.append(uid)
            hists.append(h)
    skipped = len(histories) - len(users)
    out: list[UserPrefixes] = []
    chunk = max(batch_size, 1) * 8
    for lo in range(0, len(users), chunk):
        uids, hs = users[lo: lo + chunk], hists[lo: lo + chunk]
        rationales: list[str | None] = [None] * len(uids)
        if think:
            open_ids = [think_open_ids(tokenizer, h, max_items=max_items) for h in hs]
            if backend.name == "hf":
                rationales = list(generate_rationales(backend.model, tokenizer, open_ids, max_think_tokens,
                                                      do_sample=False, seed=seed, batch_size=batch_size))
            else:
                rationales = engine_rationales(backend, tokenizer, open_ids, max_think_tokens)
        prompts = [rec_prompt_ids(tokenizer, h, think=think, rationale=r, max_items=max_items)
                   for h, r in zip(hs, rationales, strict=True)]
        ranked = backend.prefixes(prompts, levels=levels, beam_size=beam)
        for uid, h, r, pref in zip(uids, hs, rationales, ranked, strict=True):
            out.append(UserPrefixes(uid, tuple(it["item_id"] for it in h), r,
                                    tuple((tuple(c), float(s)) for c, s in pref)))
        log.info("precompute: %d/%d users", min(lo + chunk, len(users)), len(users))
    return out, skipped


def engine_rationales(backend, tokenizer, open_ids: Sequence[Sequence[int]], max_tokens: int) -> list[str]:
    """Greedy rationales on an engine backend (``generate``), cut and decoded as the HF path does."""
    from onerec_prod.eval.beam import think_stop_ids

    stops = think_stop_ids(tokenizer)
    return [rationale_text(tokenizer, row, stops)
            for row in backend.generate(open_ids, max_tokens=max_tokens, stop_token_ids=stops)]


# --------------------------------------------------------------------------------------
# the export


def export_root(cfg: Config) -> str | Path:
    """``<paths.artifacts>/think_ahead``: a local path or an object-store URI (onerec_prod.storage)."""
    storage.storage(cfg)  # the service and list/read helpers reach the same endpoint
    return storage.child(cfg.paths.artifacts, "think_ahead")


def _jsonl(rows: Iterable[dict]) -> bytes:
    return "".join(json.dumps(r, sort_keys=True, separators=(",", ":")) + "\n" for r in rows).encode()


def write_export(
    root: str | Path,
    *,
    model_version: str,
    dt: str,
    sid_version: str | None,
    rows: Sequence[UserPrefixes],
    items: Sequence[dict[str, Any]],
    settings: dict[str, Any],
) -> str | Path:
    """Write the export of ``(model_version, dt)`` under ``root``; returns its directory.

    Data files are content-addressed and written first; the manifest (atomic, written last) is
    what commits the export, on a local disk and on an object store alike.
    """
    st = storage.for_location(root)
    out = storage.child(root, check_model_version(model_version), f"dt={check_dt(dt)}")
    st.makedirs(out)
    users_blob = _jsonl({"user_id": r.user_id, "history": list(r.history), "rationale": r.rationale,
                         "prefixes": [list(c) for c, _ in r.prefixes], "scores": [s for _, s in r.prefixes]}
                        for r in rows)
    catalog_blob = _jsonl({"item_id": it["item_id"], "title": it.get("title"),
                           "categories": it.get("categories"), "sid": list(it["sid"])} for it in items)
    files = {}
    for kind, blob in (("users", users_blob), ("catalog", catalog_blob)):
        sha = hashlib.sha256(blob).hexdigest()
        name = f"{kind}-{sha[:16]}.jsonl"
        if not st.exists(storage.child(out, name)):
            st.write_bytes(storage.child(out, name), blob)
        files[kind] = {"file": name, "sha256": sha}
    manifest = {
        "format": EXPORT_FORMAT, "model_version": model_version, "dt": dt, "sid_version": sid_version,
        "files": files, "counts": {"users": len(rows), "items": len(items)},
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), **settings,
    }
    st.write_bytes(storage.child(out, MANIFEST), (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    keep = {f["file"] for f in files.values()} | {MANIFEST}
    for name in st.listdir(out):  # data files of an earlier run of the same (version, dt)
        if name not in keep and not name.startswith(".") and not st.isdir(storage.child(out, name)):
            st.rm(storage.child(out, name))
    log.info("think_ahead export: %s (%d users, %d items)", out, len(rows), len(items))
    return out


def _manifest(d: str | Path) -> dict[str, Any] | None:
    try:
        m = json.loads(storage.for_location(d).read_text(storage.child(d, MANIFEST)))
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, json.JSONDecodeError):
        return None
    return m if m.get("format") == EXPORT_FORMAT else None


def list_exports(root: str | Path, model_version: str | None = None) -> list[tuple[str | Path, dict[str, Any]]]:
    """Committed exports (dir, manifest), oldest first by ``(dt, created_at)``."""
    st = storage.for_location(root)
    if not st.isdir(root):
        return []
    versions = [model_version] if model_version is not None else st.listdir(root)
    found = []
    for v in versions:
        vdir = storage.child(root, v)
        for name in st.listdir(vdir):
            if name.startswith("dt="):
                d = storage.child(vdir, name)
                m = _manifest(d)
                if m is not None:
                    found.append((d, m))
    found.sort(key=lambda dm: (dm[1]["dt"], dm[1].get("created_at", ""), str(dm[0])))
    return found


def latest_export(
    root: str | Path, *, model_version: str | None = None, sid_version: str | None = None
) -> tuple[str | Path, dict[str, Any]] | None:
    """The newest export of ``model_version`` (or of any version with ``sid_version``)."""
    cands = list_exports(root, model_version)
    if sid_version is not None:
        cands = [dm for dm in cands if dm[1].get("sid_version") == sid_version]
    return cands[-1] if cands else None


def export_id(path: str | Path, manifest: dict[str, Any]) -> str:
    """Identity of a committed export (changes whenever a rerun changes its content)."""
    return f"{path}|{manifest['files']['users']['sha256']}|{manifest['files']['catalog']['sha256']}"


def read_export(path: str | Path) -> Export:
    """Load an export directory (verifies the files against the manifest hashes)."""
    m = _manifest(path)
    if m is None:
        raise FileNotFoundError(f"no committed think_ahead export in {path} (missing or bad {MANIFEST})")
    st = storage.for_location(path)
    blobs = {}
    for kind in ("users", "catalog"):
        blob = st.read_bytes(storage.child(path, m["files"][kind]["file"]))
        if hashlib.sha256(blob).hexdigest() != m["files"][kind]["sha256"]:
            raise ValueError(f"{path}: {kind} file does not match its manifest sha256 (rewritten meanwhile?)")
        blobs[kind] = blob
    users = {}
    for line in blobs["users"].splitlines():
        r = json.loads(line)
        users[r["user_id"]] = UserPrefixes(
            r["user_id"], tuple(r["history"]), r.get("rationale"),
            tuple((tuple(c), float(s)) for c, s in zip(r["prefixes"], r["scores"], strict=True)))
    items = []
    for line in blobs["catalog"].splitlines():
        r = json.loads(line)
        r["sid"] = tuple(r["sid"])
        items.append(r)
    return Export(path, m, users, items)


# --------------------------------------------------------------------------------------
# the job


def _read_inputs(spark, cfg: Config, dt: str) -> tuple[dict[str, list[str]], list[dict], dict[str, int | None]]:
    from pyspark.sql import functions as F

    from onerec_prod.lake import read_table, table_path, table_version

    hist_path, cat_path = table_path(cfg, "user_history"), table_path(cfg, "catalog")
    versions = {"user_history": table_version(spark, hist_path), "catalog": table_version(spark, cat_path)}
    for name, v in versions.items():
        if v is None:
            raise FileNotFoundError(f"Delta table {name!r} not found under {cfg.paths.lake}: run the data plane first")
    hist = read_table(spark, hist_path, versions["user_history"])
    since = active_since(dt, cfg.serving.active_days)
    if since is not None:
        # active by event time: a bootstrap partition updates every user's row on one dt, but
        # only the users with an event in the window are active
        since_ts = int(_dt.datetime.combine(_dt.date.fromisoformat(since), _dt.time(), _dt.UTC).timestamp())
        hist = hist.where((F.col("updated_dt") >= F.lit(since)) & (F.col("last_ts") >= F.lit(since_ts)))
    histories = {r["user_id"]: list(r["items"] or []) for r in hist.select("user_id", "items").collect()}
    cat = read_table(spark, cat_path, versions["catalog"]).where(F.col("sid").isNotNull())
    rows = [r.asDict() for r in cat.select("item_id", "title", "categories", "sid", "sid_version").collect()]
    return histories, rows, versions


def precompute_inputs_on(spark, cfg: Config, dt: str) -> dict[str, Any]:
    """:func:`_read_inputs` as JSON types (a ``spark_server.SPARK_CALLS`` entry)."""
    histories, rows, versions = _read_inputs(spark, cfg, dt)
    return {"histories": histories, "catalog": rows, "versions": versions}


def write_think_ahead_on(spark, cfg: Config, dt: str, *, model_version: str, data: list[list[Any]]) -> int | None:
    """Overwrite the ``think_ahead`` partition ``(dt, model_version)`` with ``data`` (rows in the
    table's column order) in ``spark``'s process (a ``spark_server.SPARK_CALLS`` entry)."""
    from onerec_prod.lake import overwrite_partition, table_path
    from onerec_prod.schemas import load_schema

    df = spark.createDataFrame([tuple(r) for r in data], load_schema("think_ahead").spark_schema())
    return overwrite_partition(df, spark, table_path(cfg, "think_ahead"), "think_ahead",
                               {"dt": dt, "model_version": model_version})


def _table_rows(dt: str, model_version: str, sid_version: str | None, rows: Sequence[UserPrefixes]) -> list[list]:
    return [[r.user_id, r.rationale, [list(c) for c, _ in r.prefixes], [s for _, s in r.prefixes],
             len(r.history), model_version, sid_version or "", dt] for r in rows]


def precompute(
    cfg: Config,
    dt: str,
    model_dir: str | Path,
    model_version: str,
    *,
    spark=None,
    histories: Mapping[str, Sequence[str]] | None = None,
    catalog: Sequence[Mapping[str, Any]] | None = None,
    write_table: bool = True,
    backend=None,
) -> dict[str, Any]:
    """Think-Ahead prefixes of day ``dt`` for ``model_version`` (see the module docstring).

    Args:
        cfg: the whole config (``serving``, ``sid``, ``samples``, ``paths``, ``spark``).
        dt: the day (``YYYY-MM-DD``); partition of ``think_ahead`` and of the export.
        model_dir: local model directory of ``model_version``.
        model_version: registered version (resolve ``@champion`` once, before calling).
        spark: a session (default ``get_spark(cfg.spark)``); unused when ``histories`` and
            ``catalog`` are given and ``write_table`` is False.
        histories: ``user_id -> item ids`` (oldest first) instead of reading ``user_history``
            (already the active users; ``serving.active_days`` is not applied).
        catalog: catalog rows (``item_id, title, categories, sid, sid_version``) instead of
            reading ``catalog``.
        write_table: write Delta ``think_ahead`` (the export is always written).
        backend: a running backend for ``model_dir`` to use (left open); default: the one of
            ``serving.backend``, built here and closed at the end (``vllm`` starts an engine
            server for the run).

    Returns:
        ``users`` (rows written), ``skipped_users``, ``items``, ``export`` (dir),
        ``table_version`` and the Delta versions read.
    """
    from onerec_prod.model.io import load_tokenizer
    from onerec_prod.sid.tokens import SidVocab, level_sizes
    from onerec_prod.sid.trie import SidTrie

    check_dt(dt)
    check_model_version(model_version)
    scfg = cfg.serving
    from onerec_prod.spark_server import run_on_spark

    read_versions: dict[str, int | None] = {}
    if histories is None or catalog is None:
        # with a session: read here; without: on the shared local Spark server when there is one
        got = precompute_inputs_on(spark, cfg, dt) if spark is not None else run_on_spark(cfg, "precompute_inputs", dt)
        h, c, read_versions = got["histories"], got["catalog"], got["versions"]
        histories = h if histories is None else histories
        catalog = c if catalog is None else catalog
    items, sid_version = select_catalog(catalog, model_sid_version(model_dir))
    if not items:
        raise ValueError(f"no catalog item has a SID of sid_version={sid_version!r}: assign SIDs first")
    sizes = level_sizes(cfg.sid)
    trie = SidTrie.from_sids([it["sid"] for it in items], sizes)
    tok = load_tokenizer(model_dir)
    vocab = SidVocab.from_tokenizer(tok, sizes)
    own = backend is None
    if own:
        from onerec_prod.serving.backends import build_backend

        backend = build_backend(scfg.backend, model_dir, trie, vocab, device=scfg.device, vllm=scfg.vllm,
                                label=model_version, batch_size=scfg.batch_size)
    else:
        backend.trie = trie  # this run's catalog
    log.info("precompute dt=%s model_version=%s backend=%s: %d candidate users, %d items, k=%d, B=%d, think=%s",
             dt, model_version, backend.name, len(histories), len(items), scfg.prefix_levels, scfg.prefix_beam,
             scfg.think)
    try:
        rows, skipped = compute_prefixes(
            getattr(backend, "model", None), tok, trie, vocab, histories, {it["item_id"]: it for it in items},
            levels=scfg.prefix_levels, beam=scfg.prefix_beam, think=scfg.think,
            max_items=cfg.samples.max_history, max_think_tokens=scfg.max_think_tokens,
            batch_size=scfg.batch_size, seed=cfg.eval.seed, backend=backend)
    finally:
        if own:
            backend.close()
    table_v = None
    if write_table:
        kw = {"model_version": model_version, "data": _table_rows(dt, model_version, sid_version, rows)}
        table_v = (write_think_ahead_on(spark, cfg, dt, **kw) if spark is not None
                   else run_on_spark(cfg, "write_think_ahead", dt, **kw))
    settings = {"prefix_levels": scfg.prefix_levels, "prefix_beam": scfg.prefix_beam, "think": scfg.think,
                "max_history": cfg.samples.max_history, "read_versions": read_versions}
    out = write_export(export_root(cfg), model_version=model_version, dt=dt, sid_version=sid_version,
                       rows=rows, items=items, settings=settings)
    return {"users": len(rows), "skipped_users": skipped, "items": len(items), "export": str(out),
            "table_version": table_v, "read_versions": read_versions}
