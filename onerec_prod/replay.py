"""``onerec-prod replay``: a dataset in the plain format becomes daily landing partitions.

For each calendar day D of ``[--start, --start + --days)`` it writes

* ``<raw>/events/dt=D/part-0000.jsonl``: the day's interactions (schema ``raw_events``), ordered by
  ts, then the user's first appearance in the dataset, then the user's position (for Beauty, whose
  timestamps are day-level, that is P5 order within the day). ``event_id`` is a stable hash of
  ``(user_id, position in the user's sequence)``.
* ``<raw>/items/dt=D/part-0000.jsonl``: the items whose *first* interaction in the whole dataset
  falls on D (schema ``raw_items``), so new items arrive every day.

Everything before ``--bootstrap-before B`` (default ``data.bootstrap_before``, which equals the
default ``--start``) lands as ONE bootstrap partition dated ``B - 1 day`` (the day before --start
when B = --start), holding the events and first-seen items of all earlier days. B must not be after
--start; ``--bootstrap-before none`` writes no bootstrap partition. Days between B and --start are
left to the run that replays them.

Files are byte-identical on rerun (sorted keys, fixed order, no clocks); each file is written to a
temp file then renamed, and files of an earlier run that this run does not write are removed, so a
rerun replaces the partition. Datasets without timestamps get synthetic days (see
:func:`synthetic_days`), and the command says so.

``--faults SPEC`` injects bad lines into the daily partitions (never the bootstrap one) for tests,
deterministically from a seed, and writes ``_faults.json`` beside each file listing every injected
line (1-based), its kind and the quarantine reason the ingest job must give it. Good lines are
never altered, only added to. SPEC: ``all`` (one of each kind), ``all=N``, or
``kind=N,kind=N,...``, each optionally with ``seed=S``; kinds are :data:`EVENT_FAULTS` and
:data:`ITEM_FAULTS`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from onerec_prod import storage
from onerec_prod.datasets import Dataset, load_dataset, resolve_dataset

log = logging.getLogger(__name__)

DAY_S = 86_400
EPOCH = date(1970, 1, 1)
PART_FILE = "part-0000.jsonl"
MARKER_FILE = "_SUCCESS"  # completeness marker, written last (JSON: files with line counts and sizes)
FAULTS_FILE = "_faults.json"

# kind -> quarantine reason ("{col}" is filled per injected line)
EVENT_FAULTS: dict[str, str] = {
    "malformed_json": "malformed_json",
    "missing_field": "missing_field:{col}",
    "bad_type": "bad_type:{col}",
    "negative_timestamp": "negative_timestamp",
    "future_timestamp": "future_timestamp",
    "unknown_item": "unknown_item",
    "duplicate_event": "duplicate_event",
    "duplicate_event_prev_day": "duplicate_event",
}
ITEM_FAULTS: dict[str, str] = {
    "item_malformed_json": "malformed_json",
    "item_missing_field": "missing_field:title",
    "item_bad_type": "bad_type:title",
}
_MISSING_COLS = ("user_id", "item_id", "ts", "event_id")
_BAD_TYPE_COLS = ("ts", "item_id", "event_type")


class ReplayError(ValueError):
    """Bad replay arguments (the message names the option and the fix)."""


@dataclass(frozen=True)
class FaultSpec:
    """How many lines of each fault kind to inject per daily partition, and the seed."""

    counts: dict[str, int] = field(default_factory=dict)
    seed: int = 0

    @classmethod
    def parse(cls, spec: str) -> FaultSpec:
        """Parse ``all``, ``all=N`` or ``kind=N,...`` (plus optional ``seed=S``).

        >>> FaultSpec.parse("unknown_item=2,seed=3")
        FaultSpec(counts={'unknown_item': 2}, seed=3)
        """
        counts: dict[str, int] = {}
        seed = 0
        valid = list(EVENT_FAULTS) + list(ITEM_FAULTS)
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, _, val = part.partition("=")
            try:
                n = int(val) if val else 1
            except ValueError:
                raise ReplayError(f"--faults: {part!r}: count must be an integer") from None
            if key == "seed":
                seed = n
            elif key == "all":
                counts.update({k: n for k in valid})
            elif key in valid:
                counts[key] = n
            else:
                raise ReplayError(f"--faults: unknown kind {key!r} (valid: all, seed, {', '.join(valid)})")
        return cls({k: v for k, v in counts.items() if v > 0}, seed)


# --------------------------------------------------------------------------------------
# pure helpers


def parse_date(text: str, option: str = "date") -> date:
    try:
        return date.fromisoformat(text)
    except (TypeError, ValueError):
        raise ReplayError(f"{option}: {text!r} is not a YYYY-MM-DD date") from None


def epoch_day(d: date) -> int:
    return (d - EPOCH).days


def day_str(day: int) -> str:
    return (EPOCH + timedelta(days=day)).isoformat()


def event_id(user_id: str, position: int) -> str:
    """Stable event id: 20 hex chars of sha1(user_id, position in the user's sequence)."""
    return hashlib.sha1(f"{user_id}\x1f{position}".encode()).hexdigest()[:20]


def synthetic_days(ds: Dataset, origin: date, spread_days: int) -> list[int]:
    """Epoch days for a dataset without timestamps, one per interaction, keeping each user's order.

    A user's last interaction lands on ``origin + h(user) % spread_days`` (h = sha1 of the id),
    each earlier one a day before the next: the k-th last is ``k - 1`` days earlier. So a user
    has at most one interaction a day, every user's order is kept, and the result does not
    depend on the replay window.
    """
    n_of: dict[str, int] = defaultdict(int)
    for it in ds.interactions:
        n_of[it.user_id] += 1
    base = epoch_day(origin)
    out = []
    for it in ds.interactions:
        h = int(hashlib.sha1(it.user_id.encode()).hexdigest()[:8], 16) % spread_days
        out.append(base + h - (n_of[it.user_id] - 1 - it.position))
    return out


def _dump(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


@dataclass
class _Plan:
    """Every interaction's day and ts, grouped by day, and each item's first day."""

    days: dict[int, list[int]]  # epoch day -> interaction indices, in landing order
    ts: list[int]
    first_day: dict[str, int]


def _plan(ds: Dataset, synthetic: list[int] | None) -> _Plan:
    inter = ds.interactions
    ts = [i.ts for i in inter] if synthetic is None else [d * DAY_S for d in synthetic]
    user_rank: dict[str, int] = {}
    for it in inter:
        user_rank.setdefault(it.user_id, len(user_rank))
    order = sorted(range(len(inter)), key=lambda k: (ts[k], user_rank[inter[k].user_id], inter[k].position))
    days: dict[int, list[int]] = defaultdict(list)
    first_day: dict[str, int] = {}
    for k in order:
        d = ts[k] // DAY_S
        days[d].append(k)
        if inter[k].item_id not in first_day:
            first_day[inter[k].item_id] = d
    return _Plan(dict(days), ts, first_day)


def _event_record(ds: Dataset, plan: _Plan, k: int) -> dict[str, Any]:
    it = ds.interactions[k]
    rec: dict[str, Any] = {"event_id": event_id(it.user_id, it.position), "user_id": it.user_id,
                           "item_id": it.item_id, "ts": plan.ts[k]}
    if it.event_type:
        rec["event_type"] = it.event_type
    return rec


# --------------------------------------------------------------------------------------
# fault injection


def inject_event_faults(records: list[dict], dt: str, spec: FaultSpec, max_future_skew_s: int,
                        prev_lines: list[str]) -> tuple[list[str], list[dict]]:
    """Good event records of day ``dt`` -> landing lines with faults added, and the fault manifest.

    Each injected line carries exactly one defect; good lines are kept unchanged and in order.
    ``prev_lines`` are good lines of the previous partition of the same replay (the day before,
    or the bootstrap partition for the first day) for cross-day duplicates; empty = none injected.
    """
    entries: list[tuple[str, dict | None]] = [(_dump(r), None) for r in records]
    if not records or not spec.counts:
        return [e[0] for e in entries], []
    rng = random.Random(f"{spec.seed}:events:{dt}")
    next_midnight = (epoch_day(date.fromisoformat(dt)) + 1) * DAY_S
    for kind in EVENT_FAULTS:
        for i in range(spec.counts.get(kind, 0)):
            t_idx = rng.randrange(len(records))
            tmpl = records[t_idx]
            fresh = dict(tmpl, event_id=f"fault-{dt}-{kind}-{i}")
            reason = EVENT_FAULTS[kind]
            lo = 0
            if kind == "malformed_json":
                text = _dump(fresh)
                line = text[: len(text) // 2] if i % 2 == 0 else _dump(list(fresh.values()))
            elif kind == "missing_field":
                col = _MISSING_COLS[i % len(_MISSING_COLS)]
                fresh.pop(col, None)
                line, reason = _dump(fresh), reason.format(col=col)
            elif kind == "bad_type":
                col = _BAD_TYPE_COLS[i % len(_BAD_TYPE_COLS)]
                fresh[col] = {"ts": str(tmpl["ts"]), "item_id": 12345, "event_type": 7}[col]
                line, reason = _dump(fresh), reason.format(col=col)
            elif kind == "negative_timestamp":
                line = _dump(dict(fresh, ts=-1 - i))
            elif kind == "future_timestamp":
                line = _dump(dict(fresh, ts=next_midnight + max_future_skew_s + 3600 * (i + 1)))
            elif kind == "unknown_item":
                line = _dump(dict(fresh, item_id=f"unknown-{dt}-{i}"))
            elif kind == "duplicate_event":
                line = _dump(tmpl)
                lo = next(j for j, e in enumerate(entries) if e[0] == line and e[1] is None) + 1
            else:  # duplicate_event_prev_day
                if not prev_lines:
                    log.warning("replay %s: no previous partition, %s skipped", dt, kind)
                    continue
                line = prev_lines[rng.randrange(len(prev_lines))]
            pos = rng.randint(lo, len(entries))
            entries.insert(pos, (line, {"kind": kind, "reason": reason}))
    lines = [e[0] for e in entries]
    manifest = [dict(e[1], line=no) for no, e in enumerate(entries, 1) if e[1] is not None]
    return lines, manifest


def inject_item_faults(lines: list[str], dt: str, spec: FaultSpec) -> tuple[list[str], list[dict]]:
    """Item-feed lines with bad item lines added (fresh ``fault-item-*`` ids), and the manifest."""
    entries: list[tuple[str, dict | None]] = [(line, None) for line in lines]
    rng = random.Random(f"{spec.seed}:items:{dt}")
    for kind in ITEM_FAULTS:
        for i in range(spec.counts.get(kind, 0)):
            iid = f"fault-item-{dt}-{kind}-{i}"
            if kind == "item_malformed_json":
                text = _dump({"item_id": iid, "title": "Broken line", "categories": "Beauty"})
                line = text[: len(text) // 2]
            elif kind == "item_missing_field":
                line = _dump({"item_id": iid, "categories": "Beauty"})
            else:
                line = _dump({"item_id": iid, "title": 42, "categories": "Beauty"})
            entries.insert(rng.randint(0, len(entries)), (line, {"kind": kind, "reason": ITEM_FAULTS[kind]}))
    manifest = [dict(e[1], line=no) for no, e in enumerate(entries, 1) if e[1] is not None]
    return [e[0] for e in entries], manifest


# --------------------------------------------------------------------------------------
# writing


def write_partition(part_dir: str | Path, lines: list[str], manifest: dict | None, store=None) -> None:
    """(Re)write ``part-0000.jsonl`` (+ ``_faults.json``), remove stale files of a rerun, and write
    the completeness marker ``_SUCCESS`` LAST.

    The marker goes first on a rerun (removed) and last on the way out (written), so a reader that
    sees it sees the whole partition: it lists every data file with its line count and size, which
    the landing sensor checks (:func:`landing_missing`). Any filesystem (``onerec_prod.storage``).
    """
    st = store or storage.for_location(part_dir)
    st.rm(storage.child(part_dir, MARKER_FILE))
    data = "".join(line + "\n" for line in lines).encode()
    st.write_bytes(storage.child(part_dir, PART_FILE), data)
    keep = {PART_FILE}
    if manifest is not None:
        st.write_text(storage.child(part_dir, FAULTS_FILE), json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        keep.add(FAULTS_FILE)
    for name in st.listdir(part_dir):
        if name not in keep and not name.startswith(f".{PART_FILE}.") and not st.isdir(storage.child(part_dir, name)):
            st.rm(storage.child(part_dir, name))
    marker = {"files": {PART_FILE: {"lines": len(lines), "bytes": len(data),
                                    "sha256": hashlib.sha256(data).hexdigest()}},
              "lines": len(lines), "producer": "onerec-prod replay"}
    st.write_text(storage.child(part_dir, MARKER_FILE), json.dumps(marker, indent=1, sort_keys=True) + "\n")


def partition_incomplete(part_dir: str | Path, store=None) -> str | None:
    """Why landing partition ``part_dir`` is not complete yet (None: it is).

    Complete = a ``_SUCCESS`` marker whose listed files all exist with the listed sizes (the
    producer writes the marker last, after every data file).
    """
    st = store or storage.for_location(part_dir)
    mpath = storage.child(part_dir, MARKER_FILE)
    try:
        marker = json.loads(st.read_text(mpath))
    except FileNotFoundError:
        return f"no {MARKER_FILE} marker yet in {part_dir}"
    except json.JSONDecodeError as e:
        return f"{mpath} is not a valid marker ({e})"
    for name, meta in (marker.get("files") or {}).items():
        fpath = storage.child(part_dir, name)
        fs, p = st.fs(fpath)
        try:
            size = int(fs.size(p))
        except FileNotFoundError:
            return f"{fpath} listed in {MARKER_FILE} is absent"
        if "bytes" in meta and size != int(meta["bytes"]):
            return f"{fpath} has {size} bytes, {MARKER_FILE} says {meta['bytes']}"
    return None


def landing_missing(cfg, dt: str) -> list[str]:
    """Day D's landing partitions (events, items) that are not complete yet, each with the reason."""
    st = storage.storage(cfg)
    out = []
    for kind in ("events", "items"):
        why = partition_incomplete(storage.join(cfg.paths.raw, kind, f"dt={dt}"), st)
        if why is not None:
            out.append(why)
    return out


_DEFAULT = object()


def replay(cfg, start: str | None = None, days: int | None = None, *, dataset: str | Path | None = None,
           out: str | Path | None = None, faults: FaultSpec | None = None,
           bootstrap_before: Any = _DEFAULT) -> dict[str, Any]:
    """Write the landing partitions of ``[start, start + days)`` (and the bootstrap one).

    Args:
        cfg: the Config (``data.*`` defaults, ``paths.raw``, ``paths.dataset``).
        start, days: the window; default ``data.replay_start`` / ``data.replay_days``.
        dataset: a plain-format dir or the raw Beauty dir (converted once, cached under
            ``<var>/datasets/beauty``); default ``paths.dataset_dir``.
        out: raw root; default ``paths.raw``.
        faults: inject faults into the daily partitions.
        bootstrap_before: date string, or None for no bootstrap; default ``data.bootstrap_before``.

    Returns:
        A summary: raw root, dataset, ``timed``, and per partition its counts.

    Raises:
        ReplayError: bad dates or window; DatasetError: bad dataset input.
    """
    start_d = parse_date(start or cfg.data.replay_start, "--start")
    n_days = cfg.data.replay_days if days is None else days
    if n_days < 1:
        raise ReplayError(f"--days: {n_days} must be >= 1")
    boot = cfg.data.bootstrap_before if bootstrap_before is _DEFAULT else bootstrap_before
    boot_d = parse_date(boot, "--bootstrap-before") if boot else None
    if boot_d is not None and boot_d > start_d:
        raise ReplayError(f"--bootstrap-before {boot_d} is after --start {start_d}: the bootstrap "
                          "partition would overlap replayed days (use a date <= --start, or none)")
    st = storage.storage(cfg)
    raw_root = str(out or cfg.paths.raw)
    ds_dir = resolve_dataset(dataset or cfg.paths.dataset, cfg.paths.var)
    ds = load_dataset(ds_dir)
    note = None
    synthetic = None
    if not ds.timed:
        origin = parse_date(cfg.data.untimed_origin, "data.untimed_origin")
        synthetic = synthetic_days(ds, origin, cfg.data.untimed_spread_days)
        note = (f"dataset {ds_dir} has no timestamps: days were ASSIGNED (each user's last interaction "
                f"on {origin} + hash(user) % {cfg.data.untimed_spread_days} days, one interaction a "
                "day before it, user order kept); they are not real dates")
        log.warning(note)
    plan = _plan(ds, synthetic)
    items_by_day: dict[int, list[str]] = defaultdict(list)
    for item_id in ds.items:  # file order within a day
        if item_id in plan.first_day:
            items_by_day[plan.first_day[item_id]].append(item_id)

    s0 = epoch_day(start_d)
    b0 = epoch_day(boot_d) if boot_d else None
    partitions: list[tuple[str, str, list[int], list[int]]] = []  # (dt, kind, event days, item days)
    if b0 is not None:
        old = sorted(d for d in plan.days if d < b0)
        partitions.append((day_str(b0 - 1), "bootstrap", old, sorted(d for d in items_by_day if d < b0)))
    partitions += [(day_str(d), "day", [d], [d]) for d in range(s0, s0 + n_days)]

    def good_lines(event_days: list[int]) -> list[str]:
        return [_dump(_event_record(ds, plan, k)) for d in event_days for k in plan.days.get(d, [])]

    summary: dict[str, Any] = {"raw_root": str(raw_root), "dataset": str(ds_dir), "timed": ds.timed,
                               "note": note, "partitions": []}
    skew = cfg.data.max_future_skew_s
    for dt, kind, ev_days, it_days in partitions:
        records = [_event_record(ds, plan, k) for d in ev_days for k in plan.days.get(d, [])]
        item_lines = [_dump(ds.items[i].to_json()) for d in it_days for i in items_by_day.get(d, [])]
        ev_manifest = it_manifest = None
        if kind == "day" and faults is not None and faults.counts:
            d = ev_days[0]
            # previous partition of THIS replay: day d-1, or the bootstrap one for the first day
            prev_days = [d - 1] if d > s0 else ([] if b0 is None else partitions[0][2])
            ev_lines, ev_faults = inject_event_faults(records, dt, faults, skew, good_lines(prev_days)
                                                      if faults.counts.get("duplicate_event_prev_day") else [])
            item_lines, it_faults = inject_item_faults(item_lines, dt, faults)
            ev_manifest = {"dt": dt, "file": PART_FILE, "seed": faults.seed, "lines": len(ev_lines),
                           "good_lines": len(records), "faults": ev_faults}
            it_manifest = {"dt": dt, "file": PART_FILE, "seed": faults.seed, "lines": len(item_lines),
                           "good_lines": len(item_lines) - len(it_faults), "faults": it_faults}
        else:
            ev_lines = [_dump(r) for r in records]
        write_partition(storage.child(raw_root, "events", f"dt={dt}"), ev_lines, ev_manifest, st)
        write_partition(storage.child(raw_root, "items", f"dt={dt}"), item_lines, it_manifest, st)
        n_ev_faults = len(ev_manifest["faults"]) if ev_manifest else 0
        n_it_faults = len(it_manifest["faults"]) if it_manifest else 0
        row = {"dt": dt, "kind": kind, "events": len(records), "items": len(item_lines) - n_it_faults,
               "faults": n_ev_faults + n_it_faults, "event_faults": n_ev_faults, "item_faults": n_it_faults}
        summary["partitions"].append(row)
        log.info("replay %s (%s): %d events, %d item lines, %d faults", dt, kind, row["events"],
                 row["items"], row["faults"])
    return summary


# --------------------------------------------------------------------------------------
# CLI


def add_arguments(parser) -> None:
    parser.add_argument("--start", default=None, help="First day YYYY-MM-DD (default data.replay_start).")
    parser.add_argument("--days", type=int, default=None, help="Number of days (default data.replay_days).")
    parser.add_argument("--dataset", default=None,
                        help="Dataset dir in the plain format, or the Beauty dir (default paths.dataset_dir).")
    parser.add_argument("--out", default=None, help="Raw landing root (default paths.raw_root).")
    parser.add_argument("--faults", default=None, metavar="SPEC",
                        help="Inject faults (default data.replay_faults; '' = none): 'all', 'all=N' or "
                        "'kind=N,...' plus 'seed=S' "
                        f"(kinds: {', '.join(list(EVENT_FAULTS) + list(ITEM_FAULTS))}).")
    parser.add_argument("--bootstrap-before", default=None, metavar="DATE|none",
                        help="Days before DATE land as one partition dated DATE-1 "
                        "(default data.bootstrap_before; 'none' = no bootstrap).")


def main(args, cfg) -> int:
    from onerec_prod.datasets import DatasetError

    boot: Any = _DEFAULT
    if args.bootstrap_before is not None:
        boot = None if args.bootstrap_before.lower() in ("none", "") else args.bootstrap_before
    try:
        spec = cfg.data.replay_faults if args.faults is None else args.faults
        faults = FaultSpec.parse(spec) if spec else None
        summary = replay(cfg, args.start, args.days, dataset=args.dataset, out=args.out, faults=faults,
                         bootstrap_before=boot)
    except (ReplayError, DatasetError) as e:
        print(f"replay: {e}")
        return 2
    if summary["note"]:
        print(f"NOTE: {summary['note']}")
    print(f"landing zone {summary['raw_root']} from {summary['dataset']}")
    print(f"{'dt':<12}{'kind':<11}{'events':>8}{'items':>8}{'faults':>8}")
    for p in summary["partitions"]:
        print(f"{p['dt']:<12}{p['kind']:<11}{p['events']:>8}{p['items']:>8}{p['faults']:>8}")
    return 0
