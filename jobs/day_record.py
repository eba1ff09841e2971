"""Day-level commit records: a day of a multi-commit stage is complete only when its record exists.

Why: ``ingest_events`` writes a day as two Delta commits (``events``, then ``events_quarantine``)
and ``update_catalog`` as up to three (``items_quarantine``, the catalog MERGE, the SID MERGE).
Delta makes each commit atomic, not the day: a crash between two commits leaves a day in which a
landing line is in neither table (or in the new version of one and the old version of the other),
and nothing in the tables says so. The record makes the day's state decidable:

* the stage deletes the day's record BEFORE its first data commit (a rerun that dies half-way
  leaves no stale record vouching for the old state), and writes it LAST, after every commit
  and the stage's own row-count check;
* the record names the Delta version each table was left at and, for tables partitioned by day,
  the day's row count in that version;
* readers call :func:`require_day` before using the day: it refuses (:class:`DayIncomplete`,
  naming the record and the rerun) when the record is absent, when a table is older than the
  recorded version (recreated / restored), or when the day's rows no longer number what the
  record says (the day was rewritten by something that did not write a record);
* a rerun repairs: every write is ``replaceWhere dt = D`` or an idempotent MERGE, then the record
  is rewritten.

Where: one small JSON object per (stage, day) at ``<paths.lake>/_day_commits/<stage>/dt=D.json``,
written through :mod:`onerec_prod.storage` (temp + rename locally, one PUT on an object store,
so a reader sees no record or a whole one). Not a Delta table: one object per day means two
days never contend for one transaction log, and the record is readable without Spark.

Chaos hook (tests and drills): ``ONEREC_CHAOS_CRASH_AT=<job>:<point>[:raise]`` makes
:func:`chaos_point` SIGKILL the process (default) or raise :class:`ChaosCrash` when the job
reaches that point, e.g. ``ingest_events:events`` = right after the ``events`` commit.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from datetime import UTC, datetime
from typing import Any

from jobs.common import DayIncomplete, delta_version
from onerec_prod import storage
from onerec_prod.config import Config

log = logging.getLogger(__name__)

RECORD_DIR = "_day_commits"
CHAOS_ENV = "ONEREC_CHAOS_CRASH_AT"
# the stages that commit a day in several Delta commits, and so write a record
STAGES = ("update_catalog", "ingest_events")
__all__ = ["DayIncomplete", "ChaosCrash", "require_day", "require_days", "read", "write", "invalidate",
           "chaos_point"]


class ChaosCrash(RuntimeError):
    """Raised by :func:`chaos_point` in ``raise`` mode (an injected crash, not a real error)."""


def record_path(cfg: Config, stage: str, dt: str) -> str:
    """``<paths.lake>/_day_commits/<stage>/dt=D.json`` (a path or a URI)."""
    if stage not in STAGES:
        raise ValueError(f"no day record for stage {stage!r} (stages with records: {', '.join(STAGES)})")
    return storage.join(cfg.paths.lake, RECORD_DIR, stage, f"dt={dt}.json")


def read(cfg: Config, stage: str, dt: str) -> dict[str, Any] | None:
    """The day's record, or None when absent."""
    try:
        return json.loads(storage.storage(cfg).read_text(record_path(cfg, stage, dt)))
    except FileNotFoundError:
        return None


def invalidate(cfg: Config, stage: str, dt: str) -> None:
    """Delete the day's record: called before the stage's first data commit."""
    storage.storage(cfg).rm(record_path(cfg, stage, dt))


def write(cfg: Config, stage: str, dt: str, tables: dict[str, dict[str, int | None]],
          counts: dict[str, int] | None = None) -> dict[str, Any]:
    """Write the day's record (last step of the stage).

    Args:
        tables: ``{table: {"version": v, "rows": n}}``; ``rows`` (the day's rows in version ``v``)
            only for tables partitioned by ``dt``.
        counts: the stage's counts (kept for the operator; not checked).
    """
    rec = {"stage": stage, "dt": dt, "tables": tables, "counts": dict(counts or {}),
           "written_at": datetime.now(UTC).isoformat(timespec="seconds")}
    storage.storage(cfg).write_text(record_path(cfg, stage, dt), json.dumps(rec, indent=2, sort_keys=True))
    return rec


def days_with_records(cfg: Config, stage: str) -> set[str]:
    """Days that have a record for ``stage`` (one listing, no content check)."""
    names = storage.storage(cfg).listdir(storage.join(cfg.paths.lake, RECORD_DIR, stage))
    return {n[3:-5] for n in names if n.startswith("dt=") and n.endswith(".json")}


def _rerun_hint(stage: str, dt: str) -> str:
    return f"rerun `onerec-prod job {stage} --date {dt}` (it replaces the day and rewrites the record)"


def require_day(spark, cfg: Config, stage: str, dt: str, reader: str) -> dict[str, Any]:
    """The day's record after checking it against the tables; :class:`DayIncomplete` otherwise.

    Checks: the record exists; each recorded table exists at a version >= the recorded one; for
    day-partitioned tables, the day's rows in the latest version equal the recorded count.
    """
    from pyspark.sql import functions as F

    from onerec_prod.lake import read_table, table_path

    rec = read(cfg, stage, dt)
    where = record_path(cfg, stage, dt)
    if rec is None:
        raise DayIncomplete(
            f"{reader} dt={dt}: {stage} has no day commit record for dt={dt} ({where}): the day is "
            f"not complete ({stage} did not run, or died between its Delta commits); {_rerun_hint(stage, dt)}")
    for table, want in (rec.get("tables") or {}).items():
        path = table_path(cfg, table)
        version = delta_version(spark, path)
        if want.get("version") is not None and (version is None or version < want["version"]):
            raise DayIncomplete(
                f"{reader} dt={dt}: the {stage} record ({where}) names {table} version {want['version']} "
                f"but the table is at version {version}: it was recreated or restored; {_rerun_hint(stage, dt)}")
        if "rows" in want:
            n = 0 if version is None else read_table(spark, path, version).where(F.col("dt") == dt).count()
            if n != want["rows"]:
                raise DayIncomplete(
                    f"{reader} dt={dt}: the {stage} record ({where}) says {table} holds {want['rows']} "
                    f"rows for the day but it holds {n}: the day changed after its record; "
                    f"{_rerun_hint(stage, dt)}")
    return rec


def require_days(cfg: Config, stage: str, days: set[str] | list[str], reader: str) -> None:
    """Every day of ``days`` has a record for ``stage`` (presence only: earlier days a job reads)."""
    missing = sorted(set(days) - days_with_records(cfg, stage))
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise DayIncomplete(
            f"{reader}: {stage} has no day commit record for {len(missing)} earlier day(s) it reads "
            f"({shown}; under {storage.join(cfg.paths.lake, RECORD_DIR, stage)}): those days are not "
            f"complete; {_rerun_hint(stage, missing[0])} for each, in date order")


def chaos_point(job: str, point: str) -> None:
    """Injected crash for drills and tests (see the module docstring); a no-op unless
    ``$ONEREC_CHAOS_CRASH_AT`` names ``<job>:<point>``."""
    spec = os.environ.get(CHAOS_ENV, "")
    if not spec:
        return
    parts = spec.split(":")
    if parts[:2] != [job, point]:
        return
    if len(parts) > 2 and parts[2] == "raise":
        raise ChaosCrash(f"{CHAOS_ENV}={spec}: injected crash in {job} after {point}")
    log.warning("%s=%s: SIGKILL of this process (pid %d) in %s after %s", CHAOS_ENV, spec, os.getpid(), job, point)
    logging.shutdown()
    os.kill(os.getpid(), signal.SIGKILL)
