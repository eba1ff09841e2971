"""Data-plane fixtures: a small slice of real Beauty in the plain format, replayed with faults."""

from __future__ import annotations

from pathlib import Path

import pytest

MINI_FROM_TS = 1393200000  # 2014-02-24: the slice keeps Beauty interactions from this day on
BOOT_BEFORE = "2014-03-01"  # 2014-02-24..28 land as one bootstrap partition dated 2014-02-28
DAYS = ["2014-02-28", "2014-03-01", "2014-03-02"]  # bootstrap, then two real days
FAULTS = "all=1,duplicate_event=2,unknown_item=2,seed=11"


def write_beauty_slice(beauty_dir: Path, work: Path, from_ts: int = MINI_FROM_TS) -> Path:
    """Convert Beauty, keep interactions with ts >= from_ts (and their items): a real, small dataset."""
    from onerec_prod.datasets import convert_beauty, load_dataset, write_dataset

    full = work / "beauty_full"
    convert_beauty(beauty_dir, full)
    ds = load_dataset(full)
    rows = [(i.user_id, i.item_id, i.ts, i.event_type) for i in ds.interactions if i.ts >= from_ts]
    used = {r[1] for r in rows}
    out = work / "beauty_slice"
    write_dataset(out, rows, [it for it in ds.items.values() if it.item_id in used])
    return out


@pytest.fixture(scope="session")
def beauty_slice(beauty_dir, tmp_path_factory) -> Path:
    """Beauty from 2014-02-24 on, in the plain dataset format (~7.5k interactions)."""
    return write_beauty_slice(beauty_dir, tmp_path_factory.mktemp("datasets"))


@pytest.fixture(scope="session")
def slice_plan() -> dict:
    """How the data-plane tests replay ``beauty_slice``: bootstrap date, days, fault spec."""
    return {"bootstrap_before": BOOT_BEFORE, "days": list(DAYS), "faults": FAULTS}
