"""``onerec-prod sid-fit``: refit SID codebooks on the whole catalog (a new sid_version).

:func:`onerec_prod.sid.catalog.refit_catalog` does the work; every model and sample set of the old
version becomes incompatible: retrain from the base model afterwards. Idempotent on an unchanged
catalog (the version is a content hash).
"""

from __future__ import annotations

import json


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="Print the result as JSON.")


def main(args, cfg) -> int:
    from onerec_prod.sid.catalog import refit_catalog
    from onerec_prod.sid.report import format_reports

    try:
        out = refit_catalog(cfg)
    except FileNotFoundError as e:
        print(f"onerec-prod sid-fit: {e}")
        return 2
    version, old, rep = out["sid_version"], out["previous"], out["report"]
    if args.json:
        print(json.dumps({"sid_version": version, "previous": old, "report": rep}, indent=2))
    else:
        print(f"sid_version {version} (previous {old}); {out['items']} catalog items rewritten")
        if version != old:
            print("models and samples of the previous version are incompatible: retrain from the base model")
        print(format_reports({version: rep}, cfg.sid.levels))
    return 0
