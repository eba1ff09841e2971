"""``onerec-prod sid-report [--letter] [--json]``: SID quality report.

Without ``--letter``: the SIDs of the current codebook version in the catalog table (falls back to
the fit-time report stored in the codebook manifest when there is no catalog table yet).
With ``--letter``: the same report, by the same code, on the LETTER SIDs shipped with the Beauty
dataset (``<paths.dataset>/letter_sid/Beauty.index.json``, 4 levels x 256 codes).
"""

from __future__ import annotations

import json


def add_arguments(parser) -> None:
    parser.add_argument("--letter", action="store_true",
                        help="Report on the LETTER SIDs of <paths.dataset>/letter_sid/Beauty.index.json.")
    parser.add_argument("--json", action="store_true", help="Print the report as JSON.")


def main(args, cfg) -> int:
    from onerec_prod.sid.catalog import catalog_report
    from onerec_prod.sid.report import format_reports, letter_report

    if args.letter:
        rep, name, source = letter_report(cfg.paths.dataset), "LETTER", str(cfg.paths.dataset)
    else:
        try:
            rep, name, source = catalog_report(cfg)
        except FileNotFoundError as e:
            print(f"onerec-prod sid-report: {e}")
            return 2
    if args.json:
        print(json.dumps({"name": name, "source": source, "report": rep}, indent=2))
    else:
        print(f"SID report: {name} ({source})")
        print(format_reports({name: rep}, int(rep.get("levels", 0))))
    return 0
