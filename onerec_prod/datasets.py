"""The plain dataset format that ``onerec-prod replay`` reads, its reader, and the Beauty converter.

A dataset is a directory with two files (full description: ``docs/DATASETS.md``):

* ``interactions.tsv``: a header line ``user_id<TAB>item_id<TAB>ts`` (optionally a 4th column
  ``event_type``), then one interaction per line. Each user's rows are in chronological order
  (users may interleave). ``ts`` is unix seconds UTC, or empty when unknown: either every row has
  one or none has (then replay assigns days, see :func:`onerec_prod.replay.synthetic_days`).
* ``items.jsonl``: one JSON object per line with ``item_id``, ``title``, ``categories`` (string or
  null) and an optional ``description``; other keys are ignored.

:func:`load_dataset` works for any dataset in this format and raises :class:`DatasetError` naming
the file, the line and the column of the first bad input. :func:`convert_beauty` writes Amazon
Beauty (``../shared/data/beauty``) in this format, with the real reviewer ids and ASINs as ids.

This module is also the ``onerec-prod convert-dataset`` command.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onerec_prod.util import atomic_write_text

_atomic_write = atomic_write_text  # old name, still imported by replay.py (its owner switches to util)

log = logging.getLogger(__name__)

INTERACTIONS_FILE = "interactions.tsv"
ITEMS_FILE = "items.jsonl"
SOURCE_STAMP = "_source.json"
HEADER = ("user_id", "item_id", "ts")
OPTIONAL_COLUMNS = ("event_type",)
BEAUTY_FILES = (
    "p5/sequential_data.txt",
    "timestamps/p5_interactions_with_time.csv",
    "p5/items_p5_ids.jsonl",
    "p5/datamaps.json",
)


class DatasetError(ValueError):
    """Bad dataset input; the message names the file, the line and the column."""


@dataclass(frozen=True, slots=True)
class Interaction:
    """One row of ``interactions.tsv``."""

    user_id: str
    item_id: str
    ts: int | None
    position: int
    """0-based index of this row among the user's rows (its place in the user's sequence)."""
    line_no: int
    """1-based line number in ``interactions.tsv`` (the header is line 1)."""
    event_type: str | None = None


@dataclass(frozen=True, slots=True)
class Item:
    """One row of ``items.jsonl``."""

    item_id: str
    title: str
    categories: str | None
    description: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"item_id": self.item_id, "title": self.title, "categories": self.categories}
        if self.description is not None:
            out["description"] = self.description
        return out


@dataclass(frozen=True)
class Dataset:
    """A loaded dataset: interactions in file order, items keyed by id (file order kept)."""

    path: Path
    interactions: list[Interaction]
    items: dict[str, Item]

    @property
    def timed(self) -> bool:
        return bool(self.interactions) and self.interactions[0].ts is not None


# --------------------------------------------------------------------------------------
# reader


def is_dataset_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / INTERACTIONS_FILE).is_file() and (p / ITEMS_FILE).is_file()


def _read_items(path: Path) -> dict[str, Item]:
    items: dict[str, Item] = {}
    with open(path, encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            where = f"{path}:{no}"
            if not line.strip():
                raise DatasetError(f"{where}: empty line (one JSON object per line expected)")
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DatasetError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            for key, required in (("item_id", True), ("title", True), ("categories", False),
                                  ("description", False)):
                val = obj.get(key)
                if val is None:
                    if required:
                        raise DatasetError(f"{where}: column {key!r} is missing or null")
                    continue
                if not isinstance(val, str):
                    raise DatasetError(f"{where}: column {key!r} must be a string, got "
                                       f"{type(val).__name__} {val!r}")
                if required and not val.strip():
                    raise DatasetError(f"{where}: column {key!r} is empty")
            item_id = obj["item_id"]
            if item_id in items:
                raise DatasetError(f"{where}: column 'item_id': duplicate item {item_id!r}")
            items[item_id] = Item(item_id, obj["title"], obj.get("categories"), obj.get("description"))
    return items


def _read_interactions(path: Path, items: dict[str, Item]) -> list[Interaction]:
    out: list[Interaction] = []
    positions: dict[str, int] = {}
    last_ts: dict[str, int] = {}
    timed: bool | None = None
    with open(path, encoding="utf-8", newline="") as f:
        header = f.readline().rstrip("\r\n").split("\t")
        if tuple(header[:3]) != HEADER or any(c not in OPTIONAL_COLUMNS for c in header[3:]):
            raise DatasetError(
                f"{path}:1: header must be {chr(9).join(HEADER)!r} (optionally + 'event_type'), "
                f"got {chr(9).join(header)!r}"
            )
        ncol = len(header)
        for no, line in enumerate(f, 2):
            line = line.rstrip("\r\n")
            fields = line.split("\t")
            where = f"{path}:{no}"
            if len(fields) != ncol:
                raise DatasetError(f"{where}: expected {ncol} tab-separated columns "
                                   f"({', '.join(header)}), got {len(fields)}: {line[:80]!r}")
            user_id, item_id, ts_text = fields[0], fields[1], fields[2].strip()
            if not user_id.strip():
                raise DatasetError(f"{where}: column 'user_id' is empty")
            if not item_id.strip():
                raise DatasetError(f"{where}: column 'item_id' is empty")
            if item_id not in items:
                raise DatasetError(f"{where}: column 'item_id': {item_id!r} is not in {ITEMS_FILE}")
            ts: int | None = None
            if ts_text:
                try:
                    ts = int(ts_text)
                except ValueError:
                    raise DatasetError(f"{where}: column 'ts': {ts_text!r} is not an integer "
                                       "(unix seconds) or empty") from None
                if ts < 0:
                    raise DatasetError(f"{where}: column 'ts': negative timestamp {ts}")
            if timed is None:
                timed = ts is not None
            elif timed != (ts is not None):
                raise DatasetError(
                    f"{where}: column 'ts': {'empty' if ts is None else 'set'} but earlier rows "
                    f"{'have' if timed else 'lack'} timestamps (all rows or none must have one)"
                )
            if ts is not None:
                prev = last_ts.get(user_id)
                if prev is not None and ts < prev:
                    raise DatasetError(
                        f"{where}: column 'ts': {ts} is earlier than the user's previous row "
                        f"({prev}); rows must be in per-user chronological order"
                    )
                last_ts[user_id] = ts
            pos = positions.get(user_id, 0)
            positions[user_id] = pos + 1
            event_type = (fields[3] or None) if ncol > 3 else None
            out.append(Interaction(user_id, item_id, ts, pos, no, event_type))
    return out


def load_dataset(path: str | Path) -> Dataset:
    """Read a dataset directory in the plain format.

    Raises:
        DatasetError: a file is missing or a line is bad (the message names file, line, column).
    """
    p = Path(path)
    for name in (INTERACTIONS_FILE, ITEMS_FILE):
        if not (p / name).is_file():
            hint = (" (this looks like the raw Beauty directory: run `onerec-prod convert-dataset`)"
                    if (p / BEAUTY_FILES[0]).exists() else "")
            raise DatasetError(f"{p / name}: missing; a dataset dir holds {INTERACTIONS_FILE} and "
                               f"{ITEMS_FILE}{hint}")
    items = _read_items(p / ITEMS_FILE)
    inter = _read_interactions(p / INTERACTIONS_FILE, items)
    log.info("dataset %s: %d interactions, %d users, %d items, timestamps=%s", p, len(inter),
             len({i.user_id for i in inter}), len(items), bool(inter) and inter[0].ts is not None)
    return Dataset(p, inter, items)


# --------------------------------------------------------------------------------------
# writer and the Beauty converter


def write_dataset(out_dir: str | Path, rows: list[tuple[str, str, int | None, str | None]],
                  items: list[Item]) -> None:
    """Write ``(user_id, item_id, ts, event_type)`` rows and items in the plain format (atomically)."""
    out = Path(out_dir)
    with_type = any(r[3] is not None for r in rows)
    cols = list(HEADER) + (["event_type"] if with_type else [])
    lines = ["\t".join(cols)]
    for user_id, item_id, ts, event_type in rows:
        for name, val in (("user_id", user_id), ("item_id", item_id), ("event_type", event_type or "")):
            if "\t" in val or "\n" in val:
                raise DatasetError(f"{name} {val!r} contains a tab or newline")
        rec = [user_id, item_id, "" if ts is None else str(ts)]
        if with_type:
            rec.append(event_type or "")
        lines.append("\t".join(rec))
    item_lines = [json.dumps(it.to_json(), sort_keys=True, ensure_ascii=False) for it in items]
    atomic_write_text(out / ITEMS_FILE, "\n".join(item_lines) + "\n")
    atomic_write_text(out / INTERACTIONS_FILE, "\n".join(lines) + "\n")


def _source_fingerprint(src: Path) -> dict[str, int]:
    return {name: (src / name).stat().st_size for name in BEAUTY_FILES}


def convert_beauty(src: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Convert Amazon Beauty (P5 split + real day-level timestamps) to the plain format.

    ``user_id`` = the reviewer id and ``item_id`` = the ASIN (from ``p5/datamaps.json``), so the
    landing logs look like real ones; ``ts`` = the review day (unix seconds, 00:00 UTC) from
    ``timestamps/p5_interactions_with_time.csv``; rows follow P5 user order then each user's P5
    sequence; ``event_type`` = ``review``. Items: title and category path, in P5 item order.

    Raises:
        DatasetError: a source file is missing or disagrees with another (names file and line).
    """
    src, out = Path(src).resolve(), Path(out_dir)
    for name in BEAUTY_FILES:
        if not (src / name).is_file():
            raise DatasetError(f"{src / name}: missing (expected the Beauty layout of PROVENANCE.md)")
    maps = json.loads((src / "p5/datamaps.json").read_text())
    id2user, id2item = maps["id2user"], maps["id2item"]

    ts_of: dict[tuple[str, int], tuple[str, int]] = {}
    ts_path = src / "timestamps/p5_interactions_with_time.csv"
    with open(ts_path, newline="") as f:
        reader = csv.DictReader(f)
        for no, r in enumerate(reader, 2):
            try:
                ts_of[(r["p5_user_id"], int(r["position"]))] = (r["p5_item_id"], int(r["unix_ts"]))
            except (KeyError, TypeError, ValueError) as e:
                raise DatasetError(f"{ts_path}:{no}: bad row {r!r} ({e})") from None

    rows: list[tuple[str, str, int | None, str | None]] = []
    seq_path = src / "p5/sequential_data.txt"
    with open(seq_path) as f:
        for no, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            p5_user, p5_items = parts[0], parts[1:]
            if p5_user not in id2user:
                raise DatasetError(f"{seq_path}:{no}: user {p5_user!r} not in datamaps id2user")
            for pos, p5_item in enumerate(p5_items):
                got = ts_of.get((p5_user, pos))
                if got is None or got[0] != p5_item:
                    raise DatasetError(f"{seq_path}:{no}: position {pos} (item {p5_item}) has no "
                                       f"matching row in {ts_path.name} (found {got})")
                if p5_item not in id2item:
                    raise DatasetError(f"{seq_path}:{no}: item {p5_item!r} not in datamaps id2item")
                rows.append((id2user[p5_user], id2item[p5_item], got[1], "review"))

    items: list[Item] = []
    items_path = src / "p5/items_p5_ids.jsonl"
    with open(items_path, encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            r = json.loads(line)
            asin = id2item.get(str(r["p5_item_id"]))
            if asin is None or asin != r.get("asin", asin):
                raise DatasetError(f"{items_path}:{no}: p5_item_id {r['p5_item_id']} does not map to "
                                   f"its asin {r.get('asin')!r} in datamaps")
            items.append(Item(asin, r["title"], r.get("categories") or None, r.get("description") or None))
    write_dataset(out, rows, items)
    summary = {"source": str(src), "interactions": len(rows), "items": len(items),
               "users": len({r[0] for r in rows}), "ids": "reviewer id / ASIN",
               "fingerprint": _source_fingerprint(src)}
    atomic_write_text(out / SOURCE_STAMP, json.dumps(summary, indent=1, sort_keys=True) + "\n")
    log.info("converted Beauty %s -> %s: %d interactions, %d users, %d items", src, out,
             summary["interactions"], summary["users"], summary["items"])
    return summary


def beauty_cache_dir(var_root: Path) -> Path:
    """Where the converted Beauty dataset is cached: ``<var>/datasets/beauty``."""
    return Path(var_root) / "datasets" / "beauty"


def resolve_dataset(source: str | Path, var_root: Path) -> Path:
    """A directory in the plain format for ``source``.

    ``source`` in the plain format is returned as is; the raw Beauty layout is converted once
    into ``<var>/datasets/beauty`` (reconverted when the source files change size).
    """
    src = Path(source).resolve()
    if is_dataset_dir(src):
        return src
    if (src / BEAUTY_FILES[0]).exists():
        cache = beauty_cache_dir(var_root)
        stamp = cache / SOURCE_STAMP
        if is_dataset_dir(cache) and stamp.exists():
            meta = json.loads(stamp.read_text())
            if meta.get("source") == str(src) and meta.get("fingerprint") == _source_fingerprint(src):
                return cache
        convert_beauty(src, cache)
        return cache
    raise DatasetError(f"{src}: neither a dataset dir ({INTERACTIONS_FILE} + {ITEMS_FILE}) nor the "
                       f"Beauty layout ({BEAUTY_FILES[0]})")


# --------------------------------------------------------------------------------------
# CLI: onerec-prod convert-dataset


def add_arguments(parser) -> None:
    parser.add_argument("--src", default=None,
                        help="Beauty source dir (default: paths.dataset_dir, ../shared/data/beauty).")
    parser.add_argument("--out", default=None,
                        help="Output dataset dir (default: <var>/datasets/beauty).")
    parser.add_argument("--check", default=None, metavar="DIR",
                        help="Only load DIR (any dataset in the format) and print its counts.")


def main(args, cfg) -> int:
    if args.check:
        try:
            ds = load_dataset(args.check)
        except DatasetError as e:
            print(f"convert-dataset: {e}")
            return 1
        print(json.dumps({"dir": str(ds.path), "interactions": len(ds.interactions),
                          "users": len({i.user_id for i in ds.interactions}), "items": len(ds.items),
                          "timestamps": ds.timed}, indent=1))
        return 0
    src = Path(args.src) if args.src else cfg.paths.dataset
    out = Path(args.out) if args.out else beauty_cache_dir(cfg.paths.var)
    try:
        summary = convert_beauty(src, out)
    except DatasetError as e:
        print(f"convert-dataset: {e}")
        return 1
    print(f"wrote {out}/{INTERACTIONS_FILE} and {ITEMS_FILE}: {summary['interactions']} interactions, "
          f"{summary['users']} users, {summary['items']} items (ids: reviewer id / ASIN)")
    return 0
