"""Seeded synthetic landing days for scale tests of the data plane (``bench/dataplane_scale.py``).

Beauty's days hold a few hundred events; the service this pipeline stands for sees millions a
day. This writes days of any size in the landing format (``raw/events/dt=D/part-*.jsonl``), so
the Spark jobs can be measured at 100k, 1M and 10M events without a real log:

* users and items are drawn from truncated Zipf laws (a few heavy users and head items, a long
  tail), ranks scattered over the id space so the heavy ones are not the smallest ids;
* lines look like real ones (20-hex event ids, ``U``/``I`` ids, ~125-byte lines, event types
  purchase/click/review, timestamps over the day, each file in time order);
* a configurable share of bad lines, spread over the quarantine reasons of ``ingest_events``
  (:data:`BAD_KINDS`), counted in ``_synth.json`` beside the data (not a ``*.jsonl``, so the jobs
  never read it);
* the same ``(seed, dt, n_events, ...)`` writes the same bytes.

The catalog the events refer to (``I00000000`` .. ``n_items - 1``) is built by
:func:`catalog_frame` directly as Spark rows with SIDs, since embedding a million synthetic titles
would measure MiniLM, not the data plane.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import numpy as np

from onerec_prod.util import atomic_open

BAD_KINDS = ("malformed_json", "missing_field", "bad_type", "empty", "negative_timestamp",
             "future_timestamp", "unknown_item", "duplicate_event")
EVENT_TYPES = np.array(["purchase", "click", "review"])
_SCATTER = 2_654_435_761  # odd multiplier: rank -> id is a bijection mod any power-free n below it


def item_id(k: int) -> str:
    return f"I{k:08d}"


def zipf_ranks(rng: np.random.Generator, n: int, size: int, s: float) -> np.ndarray:
    """``size`` ranks in ``[0, n)`` from a truncated Zipf law of exponent ``s`` (inverse CDF of the
    continuous approximation; exact enough for load shapes)."""
    u = rng.random(size)
    if abs(s - 1.0) < 1e-9:
        x = np.exp(u * np.log(n + 1.0))
    else:
        a = 1.0 - s
        x = ((np.power(n + 1.0, a) - 1.0) * u + 1.0) ** (1.0 / a)
    return np.clip(np.floor(x).astype(np.int64) - 1, 0, n - 1)


def _scatter(ranks: np.ndarray, n: int) -> np.ndarray:
    """Rank -> id in ``[0, n)``; a bijection when ``gcd(_SCATTER, n) == 1`` (else still in range)."""
    return (ranks * _SCATTER) % n


def write_day(raw_root: str | Path, dt: str, n_events: int, *, n_items: int = 1_000_000,
              n_users: int | None = None, seed: int = 0, bad_share: float = 0.001, files: int = 4,
              item_s: float = 1.05, user_s: float = 0.6, chunk: int = 500_000) -> dict[str, Any]:
    """Write ``raw/events/dt=D/part-NNNN.jsonl`` with ``n_events`` lines; returns the manifest.

    Args:
        n_users: user population (default ``max(n_events // 4, 100)``: ~4 events per drawn user,
            most users a few times, the heaviest thousands of times: with ``user_s`` 0.6 the top
            user holds about 0.3 % of a 1M day and 0.1 % of a 10M day. An exponent above 1 gives
            one user a tenth of every day, whatever its size: ``user_s`` was 1.1 until the scale
            bench showed that one user's events then land in one task of every per-user step).
        bad_share: share of lines that are bad, split evenly over :data:`BAD_KINDS`.
        files: number of part files (the day's events are split over them in time order).
    """
    if n_events < 1 or files < 1:
        raise ValueError(f"n_events={n_events} and files={files} must be >= 1")
    if not 0 <= bad_share < 1:
        raise ValueError(f"bad_share={bad_share} must be in [0, 1)")
    n_users = n_users or max(n_events // 4, 100)
    out = Path(raw_root) / "events" / f"dt={dt}"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("part-*.jsonl"):
        old.unlink()
    d = date.fromisoformat(dt)
    day0 = int(datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp())
    seed_key = [seed, d.toordinal(), n_events]
    bad_counts = dict.fromkeys(BAD_KINDS, 0)
    per_file = -(-n_events // files)
    written = 0
    for f in range(files):
        n_f = min(per_file, n_events - written)
        if n_f <= 0:
            break
        path = out / f"part-{f:04d}.jsonl"
        with atomic_open(path) as fh:
            for c0 in range(0, n_f, chunk):
                rng = np.random.default_rng([*seed_key, f, c0])
                m = min(chunk, n_f - c0)
                lines = _lines(rng, m, start=written + c0, day0=day0, n_items=n_items, n_users=n_users,
                               item_s=item_s, user_s=user_s, bad_share=bad_share, bad_counts=bad_counts,
                               seed=seed, dt=dt)
                fh.write("\n".join(lines))
                fh.write("\n")
        written += n_f
    manifest = {"dt": dt, "events": n_events, "files": files, "n_items": n_items, "n_users": n_users,
                "seed": seed, "bad_share": bad_share, "bad": bad_counts, "bad_total": sum(bad_counts.values()),
                "item_s": item_s, "user_s": user_s, "bytes": sum(p.stat().st_size for p in out.glob("*.jsonl"))}
    (out / "_synth.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def _lines(rng: np.random.Generator, m: int, *, start: int, day0: int, n_items: int, n_users: int,
           item_s: float, user_s: float, bad_share: float, bad_counts: dict[str, int], seed: int,
           dt: str) -> list[str]:
    users = _scatter(zipf_ranks(rng, n_users, m, user_s), n_users)
    items = _scatter(zipf_ranks(rng, n_items, m, item_s), n_items)
    # within a file, events in time order: sorted offsets over the day
    ts = day0 + np.sort(rng.integers(0, 86_400, m))
    types = EVENT_TYPES[rng.choice(3, m, p=[0.2, 0.7, 0.1])]
    # 80-bit event ids from a counter mixed with the seed: unique within and across days
    idx = np.arange(start, start + m, dtype=np.uint64)
    hi = (idx * np.uint64(0x9E3779B97F4A7C15)) ^ np.uint64((seed * 1_000_003 + date.fromisoformat(dt).toordinal())
                                                           & 0xFFFFFFFFFFFF)
    bad = (rng.random(m) < bad_share).tolist()
    kinds = rng.integers(0, len(BAD_KINDS), m).tolist()
    users, items, ts, types, hi = users.tolist(), items.tolist(), ts.tolist(), types.tolist(), hi.tolist()
    lines: list[str] = []
    last_good = None  # a duplicate repeats the id of the last good line before it
    for j in range(m):
        eid = f"{hi[j]:016x}{(start + j) & 0xFFFF:04x}"
        u, it, t, et = f"U{users[j]:09d}", item_id(items[j]), ts[j], types[j]
        if bad[j]:
            kind = BAD_KINDS[kinds[j]]
            if kind == "duplicate_event" and last_good is None:
                kind = "malformed_json"
            bad_counts[kind] += 1
            if kind == "malformed_json":
                lines.append(f'{{"event_id":"{eid}","user_id":"{u}","item_id":"{it}","ts":{t}')
                continue
            if kind == "missing_field":
                lines.append(f'{{"event_id":"{eid}","item_id":"{it}","ts":{t},"event_type":"{et}"}}')
                continue
            if kind == "bad_type":
                lines.append(f'{{"event_id":"{eid}","user_id":"{u}","item_id":"{it}","ts":"{t}",'
                             f'"event_type":"{et}"}}')
                continue
            if kind == "empty":
                it = ""
            elif kind == "negative_timestamp":
                t = -t
            elif kind == "future_timestamp":
                t = day0 + 3 * 86_400
            elif kind == "unknown_item":
                it = f"X{items[j]:08d}"
            elif kind == "duplicate_event":
                eid = last_good
        else:
            last_good = eid
        lines.append(f'{{"event_id":"{eid}","user_id":"{u}","item_id":"{it}","ts":{t},"event_type":"{et}"}}')
    return lines


def catalog_frame(spark, n_items: int, first_seen_dt: str, sid_version: str = "synth-v1",
                  codes: int = 256, levels: int = 4):
    """The synthetic catalog as a Spark frame in the ``catalog`` schema, built on the executors.

    Item ``k`` gets a distinct SID: its base-``codes`` digits (``levels`` of them, so up to
    ``codes ** levels`` items), a short title, a 3-level category path and a description.
    """
    from pyspark.sql import functions as F

    if n_items > codes ** levels:
        raise ValueError(f"{n_items} items need more than {codes}^{levels} distinct SIDs")
    k = F.col("id")
    sid = F.array(*[((k / (codes ** i)).cast("bigint") % codes).cast("int") for i in range(levels)])
    return spark.range(n_items).select(
        F.format_string("I%08d", k).alias("item_id"),
        F.format_string("Synthetic product %d, shade %d", k, k % 37).alias("title"),
        F.format_string("Beauty > Dept %d > Aisle %d", k % 12, k % 97).alias("categories"),
        F.format_string("A synthetic item (%d) for scale tests of the data plane.", k).alias("description"),
        sid.alias("sid"), F.lit(sid_version).alias("sid_version"),
        F.lit(first_seen_dt).alias("first_seen_dt"), F.lit(first_seen_dt).alias("updated_dt"),
    )
