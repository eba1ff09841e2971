"""Data-plane fixtures: how the tests replay ``beauty_slice`` (tests/conftest.py), with faults."""

from __future__ import annotations

import pytest

BOOT_BEFORE = "2014-03-01"  # 2014-02-24..28 land as one bootstrap partition dated 2014-02-28
DAYS = ["2014-02-28", "2014-03-01", "2014-03-02"]  # bootstrap, then two real days
FAULTS = "all=1,duplicate_event=2,unknown_item=2,seed=11"


@pytest.fixture(scope="session")
def slice_plan() -> dict:
    """How the data-plane tests replay ``beauty_slice``: bootstrap date, days, fault spec."""
    return {"bootstrap_before": BOOT_BEFORE, "days": list(DAYS), "faults": FAULTS}
