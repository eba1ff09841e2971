"""``onerec-prod job NAME --date D``: run one data-plane Spark job (or all four) for a day.

Order of a day (what ``all`` runs): update_catalog, ingest_events, build_sequences,
build_eval_snapshot. ingest_events does not need update_catalog to have run first (it also reads
the day's item feed), but the catalog should be current before samples are built.
"""

from __future__ import annotations

import importlib
import json
import logging

log = logging.getLogger(__name__)

JOBS = ("update_catalog", "ingest_events", "build_sequences", "build_eval_snapshot")


def run_job(spark, name: str, dt: str, cfg, **kwargs):
    """Import ``jobs.<name>`` and call its ``run``; unknown names list the valid ones."""
    if name not in JOBS:
        raise ValueError(f"unknown job {name!r} (valid: {', '.join(JOBS)})")
    return importlib.import_module(f"jobs.{name}").run(spark, dt, cfg, **kwargs)


def add_arguments(parser) -> None:
    parser.add_argument("name", choices=(*JOBS, "all"), help="Job to run ('all' = the four in order).")
    parser.add_argument("--date", required=True, action="append",
                        help="Day YYYY-MM-DD (repeat for several days, run in the given order).")
    parser.add_argument("--no-sids", action="store_true", help="update_catalog: leave new SIDs null.")
    parser.add_argument("--force", action="store_true",
                        help="ingest_events / build_sequences: replace a day even with fewer lines / no events.")


def main(args, cfg) -> int:
    from jobs.common import DayIncomplete, ShrinkRefused
    from onerec_prod.spark import get_spark
    from onerec_prod.util import check_date

    try:
        dates = [check_date(d) for d in args.date]
    except ValueError as e:
        print(f"job: {e}")
        return 2
    spark = get_spark(cfg.spark)
    names = JOBS if args.name == "all" else (args.name,)
    for dt in dates:
        for name in names:
            kwargs = {"assign_sids": False} if name == "update_catalog" and args.no_sids else {}
            if name in ("ingest_events", "build_sequences") and getattr(args, "force", False):
                kwargs["force"] = True
            try:
                result = run_job(spark, name, dt, cfg, **kwargs)
            except ShrinkRefused as e:
                print(f"job {name} dt={dt}: {e}")
                return 3
            except DayIncomplete as e:
                print(f"job {name} dt={dt}: {e}")
                return 4
            except FileNotFoundError as e:
                print(f"job {name} dt={dt}: {e}")
                return 1
            print(json.dumps(result.to_dict(), sort_keys=True))
    return 0
