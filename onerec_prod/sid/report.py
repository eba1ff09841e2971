"""SID quality report: a pure function on a list of SID tuples (flat dict, MLflow-ready).

The last level is the collision level; "prefix" means the first ``len(sizes) - 1`` codes.

    >>> r = sid_report([(0, 0, 0), (0, 0, 1), (1, 2, 0)], sizes=[4, 4, 2])
    >>> r["unique_sids"], r["collision_rate"], r["max_collision_depth"]
    (3, 0.6666666666666666, 2)
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

# Keys in print order, with a short label (used by the CLIs).
SUMMARY_KEYS = [
    ("n_items", "items"),
    ("unique_sids", "unique full SIDs"),
    ("duplicate_sid_items", "items on a duplicate SID"),
    ("unique_prefixes", "unique prefixes"),
    ("collision_rate", "collision rate (items sharing a prefix / n)"),
    ("max_collision_depth", "max items per prefix (collision depth)"),
    ("mean_items_per_prefix", "mean items per used prefix"),
    ("max_items_per_first_code", "max items per first-level code"),
    ("mean_items_per_first_code", "mean items per used first-level code"),
]


def _entropy_norm(counts: Counter, size: int) -> float:
    n = sum(counts.values())
    if n == 0 or size <= 1:
        return 1.0 if n and size == 1 else 0.0
    h = -sum((c / n) * math.log(c / n) for c in counts.values() if c)
    return h / math.log(size)


def sid_report(sids: Sequence[Sequence[int]], sizes: Sequence[int]) -> dict[str, float | int]:
    """Collisions, utilisation and balance of ``sids`` (codes per level in ``sizes``).

    Keys: ``n_items``, ``levels`` (residual levels), ``unique_sids``, ``duplicate_sid_items``
    (n - unique), ``unique_prefixes``, ``collision_rate`` (items whose prefix is shared by another
    item / n), ``max_collision_depth`` and ``mean_items_per_prefix`` (items per used prefix),
    ``max_items_per_first_code``, ``mean_items_per_first_code`` (per used first-level code), and
    per level ``l``: ``used_codes_l{l}``, ``utilisation_l{l}`` (used / size), ``balance_l{l}``
    (entropy of the level's code distribution / log(size); 1 = uniform over all codes).

    Raises:
        ValueError: a SID with the wrong number of levels or a code outside its level's size.
    """
    sizes = [int(s) for s in sizes]
    if len(sizes) < 2:
        raise ValueError(f"sizes must list >= 1 residual level plus the collision level, got {sizes}")
    nl = len(sizes)
    tuples = []
    for sid in sids:
        t = tuple(int(c) for c in sid)
        if len(t) != nl:
            raise ValueError(f"SID {t} has {len(t)} levels, expected {nl} (sizes={sizes})")
        for level, (c, size) in enumerate(zip(t, sizes)):
            if not 0 <= c < size:
                raise ValueError(f"SID {t}: code {c} at level {level} outside 0..{size - 1}")
        tuples.append(t)
    n = len(tuples)
    prefixes = Counter(t[:-1] for t in tuples)
    firsts = Counter(t[0] for t in tuples)
    unique = len(set(tuples))
    rep: dict[str, float | int] = {
        "n_items": n,
        "levels": nl - 1,
        "unique_sids": unique,
        "duplicate_sid_items": n - unique,
        "unique_prefixes": len(prefixes),
        "collision_rate": (sum(c for c in prefixes.values() if c > 1) / n) if n else 0.0,
        "max_collision_depth": max(prefixes.values(), default=0),
        "mean_items_per_prefix": (n / len(prefixes)) if n else 0.0,
        "max_items_per_first_code": max(firsts.values(), default=0),
        "mean_items_per_first_code": (n / len(firsts)) if n else 0.0,
    }
    for level, size in enumerate(sizes):
        counts = Counter(t[level] for t in tuples)
        rep[f"used_codes_l{level}"] = len(counts)
        rep[f"utilisation_l{level}"] = len(counts) / size
        rep[f"balance_l{level}"] = _entropy_norm(counts, size)
    return rep


def format_reports(reports: dict[str, dict], levels: int) -> str:
    """Side-by-side text table of several reports (columns = report names)."""
    names = list(reports)
    rows = [(label, key) for key, label in SUMMARY_KEYS]
    for level in range(levels + 1):
        tag = "collision" if level == levels else f"level {level}"
        rows += [(f"{tag}: used codes", f"used_codes_l{level}"),
                 (f"{tag}: utilisation", f"utilisation_l{level}"),
                 (f"{tag}: balance (norm. entropy)", f"balance_l{level}")]
    width = max(len(r[0]) for r in rows) + 2
    col = max(14, *(len(n) + 2 for n in names))
    lines = [" " * width + "".join(n.rjust(col) for n in names)]
    for label, key in rows:
        cells = []
        for name in names:
            v = reports[name].get(key, "")
            cells.append((f"{v:.4f}" if isinstance(v, float) else str(v)).rjust(col))
        lines.append(label.ljust(width) + "".join(cells))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# the SIDs a report is made of (LETTER's shipped index, the catalog table)

LETTER_CODES_PER_LEVEL = 256
_LETTER_TOKEN = re.compile(r"<([a-z])_(\d+)>")


def load_letter_sids(path: str | Path) -> dict[str, tuple[int, ...]]:
    """LETTER index ``{lcrec_id: ["<a_183>", "<b_70>", ...]}`` -> ``{lcrec_id: (183, 70, ...)}``."""
    raw = json.loads(Path(path).read_text())
    out = {}
    for key, toks in raw.items():
        codes = []
        for level, tok in enumerate(toks):
            m = _LETTER_TOKEN.fullmatch(tok)
            if not m or m.group(1) != "abcdefgh"[level]:
                raise ValueError(f"{path}: item {key}: bad LETTER token {tok!r} at level {level}")
            codes.append(int(m.group(2)))
        out[str(key)] = tuple(codes)
    return out


def letter_report(dataset_dir: str | Path) -> dict:
    """Quality report of the LETTER Beauty SIDs (last LETTER level treated as the collision level)."""
    sids = load_letter_sids(Path(dataset_dir) / "letter_sid" / "Beauty.index.json")
    n_levels = len(next(iter(sids.values())))
    return sid_report(list(sids.values()), [LETTER_CODES_PER_LEVEL] * n_levels)
