"""Per-event recommendations of a model, cached across days (``<var>/cache/eval/``).

Why: the daily eval pools the trailing ``eval.window_days`` of eval events, so on day D the
champion (and yesterday's candidate, which is today's champion when it was promoted) is scored
again on every event it was already scored on yesterday. Those results cannot change when
nothing that decides them changed:

* the model's weights (``weights_sha256``) and the SID version of its catalog;
* the event's prompt: its event id and its history (item ids, in order);
* the trie the event is decoded under. The eval decodes an event of day d under the catalog as of
  d (every item first seen on or before d, :func:`trie_rows`), the items a recommender could have
  shown then; so an event's trie is fixed once its day is past, and the digest of its rows is
  part of the key;
* the decoding settings (beam size, batch-independent; the history length of the prompt).

So :func:`lookup` returns the cached top-B item lists for the events whose key is unchanged and
the eval decodes only the rest (on a small day: the day's new events). Think mode is never cached
(its rationales are reported). One JSON file per model (by weights hash), rewritten atomically;
files of models not used for ``keep_days`` days are removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

VERSION = 1  # bump when the meaning of a cached entry changes


def trie_rows(catalog: Sequence[Mapping[str, Any]], day: str) -> list[Mapping[str, Any]]:
    """The catalog rows an event of ``day`` is decoded under: every item with a SID first seen on or
    before ``day`` (an item without ``first_seen_dt`` counts as always known)."""
    return [r for r in catalog if r.get("sid") is not None
            and (r.get("first_seen_dt") is None or str(r["first_seen_dt"])[:10] <= day)]


def rows_digest(rows: Iterable[Mapping[str, Any]]) -> str:
    h = hashlib.sha256()
    for r in sorted(rows, key=lambda r: r["item_id"]):
        h.update(f"{r['item_id']}={','.join(map(str, r['sid']))};".encode())
    return h.hexdigest()[:24]


def event_key(event_id: str, history: Sequence[str], trie_digest: str, settings: str) -> str:
    raw = json.dumps([VERSION, event_id, list(history), trie_digest, settings], separators=(",", ":"))
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


class ScoreCache:
    """The cached ranked item lists of one model (``weights_sha256``) under ``root``."""

    def __init__(self, root: Path, weights_sha256: str, keep_days: float = 7.0) -> None:
        self.path = Path(root) / f"{weights_sha256[:32]}.json"
        self.keep_s = keep_days * 86400
        self.root = Path(root)
        try:
            self.entries: dict[str, list[str]] = json.loads(self.path.read_text())["ranked"]
        except (OSError, ValueError, KeyError, TypeError):
            self.entries = {}
        self.hits = 0

    def lookup(self, keys: Sequence[str]) -> list[list[str] | None]:
        out = [self.entries.get(k) for k in keys]
        self.hits = sum(1 for r in out if r is not None)
        return out

    def save(self, keys: Sequence[str], ranked: Sequence[Sequence[str]]) -> None:
        """Keep exactly the entries of these events (old events leave the window, and the file with
        them), write atomically, and prune other models' files unused for ``keep_days``."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": VERSION, "ranked": dict(zip(keys, map(list, ranked), strict=True))}))
        os.replace(tmp, self.path)
        now = time.time()
        for p in self.root.glob("*.json"):
            try:
                if p != self.path and now - p.stat().st_mtime > self.keep_s:
                    p.unlink()
            except OSError:
                pass
