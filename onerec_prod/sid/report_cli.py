"""``onerec-prod sid-report [--letter] [--json]``: SID quality report.

Without ``--letter``: the SIDs of the current codebook version in the catalog table (falls back to
the fit-time report stored in the codebook manifest when there is no catalog table yet).
With ``--letter``: the same report, by the same code, on the LETTER SIDs shipped with the Beauty
dataset (``<paths.dataset>/letter_sid/Beauty.index.json``, 4 levels x 256 codes).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

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
    from onerec_prod.sid.report import sid_report

    sids = load_letter_sids(Path(dataset_dir) / "letter_sid" / "Beauty.index.json")
    n_levels = len(next(iter(sids.values())))
    return sid_report(list(sids.values()), [LETTER_CODES_PER_LEVEL] * n_levels)


def catalog_report(cfg) -> tuple[dict, str, str]:
    """(report, sid_version, source) for the current codebook's SIDs in the catalog."""
    from onerec_prod.lake import read_table, table_exists, table_path
    from onerec_prod.sid.report import sid_report
    from onerec_prod.sid.service import load_codebook
    from onerec_prod.spark import get_spark

    cb = load_codebook(cfg)
    spark = get_spark(cfg.spark)
    path = table_path(cfg, "catalog")
    if not table_exists(spark, path):
        return dict(cb.manifest.get("fit_report", {})), cb.version, "codebook manifest (fit time)"
    rows = read_table(spark, path).where(f"sid_version = '{cb.version}'").select("sid").collect()
    return sid_report([tuple(r["sid"]) for r in rows], cb.sizes), cb.version, f"catalog table {path}"


def add_arguments(parser) -> None:
    parser.add_argument("--letter", action="store_true",
                        help="Report on the LETTER SIDs of <paths.dataset>/letter_sid/Beauty.index.json.")
    parser.add_argument("--json", action="store_true", help="Print the report as JSON.")


def main(args, cfg) -> int:
    from onerec_prod.sid.report import format_reports

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
