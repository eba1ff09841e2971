"""``onerec-prod status [--json]``: which version serves, its lineage and metrics, what is pending."""

from __future__ import annotations

import argparse
import json
from typing import Any

from onerec_prod.config import Config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="Print the full status as JSON.")


def _fmt_metrics(m: dict[str, Any] | None) -> str:
    if not m:
        return "-"
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, int | float) else f"{k}={v}" for k, v in sorted(m.items()))


def _fmt_version(label: str, info: dict[str, Any] | None) -> list[str]:
    if info is None:
        return [f"{label:<11} none"]
    g = info["gate"]
    verdict = {"true": "passed", "false": "FAILED"}.get(g["passed"] or "", "never run")
    gate = f"gate {verdict}" + (f" (mode {g['mode']})" if g["mode"] else "")
    if g["failed_checks"]:
        gate += f", failed: {', '.join(g['failed_checks'])}"
    lines = [
        f"{label:<11} v{info['version']}  dt={info['dt']}  parent={'v' + info['parent_version'] if info['parent_version'] else '-'}  "
        f"sid={info['sid_version'] or '-'}  git={str(info['git_sha'])[:10]}",
        f"{'':<11} metrics: {_fmt_metrics(info['metrics'])}",
        f"{'':<11} {gate}; data: {json.dumps(info['data_versions'], sort_keys=True)}",
    ]
    if info["promoted_at"]:
        forced = f" FORCED: {info['promote_reason']}" if info["promote_forced"] == "true" else ""
        lines.append(f"{'':<11} promoted {info['promoted_at']} by {info['promoted_by']}{forced}")
    return lines


def main(args: argparse.Namespace, cfg: Config) -> int:
    from onerec_prod.registry.registry import status

    st = status(cfg)
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True, default=str))
        return 0
    print(f"model {st['model']}: {st['versions']} version(s); aliases {st['aliases'] or '{}'}")
    for alias in ("champion", "challenger", "previous"):
        print("\n".join(_fmt_version(alias, st[alias])))
    pend = st["pending"]
    print(f"pending     {len(pend)} version(s) newer than the champion, never promoted"
          + (": " + ", ".join(f"v{p['version']} (dt={p['dt']}, gate {p['gate']['passed'] or '-'})" for p in pend) if pend else ""))
    return 0
