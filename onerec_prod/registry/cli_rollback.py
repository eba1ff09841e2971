"""``onerec-prod rollback``: champion -> previous, atomically; ``previous`` is then cleared.

A second rollback without a promote in between is refused (it would otherwise flip back to
the version just rolled back). Serving follows the ``champion`` alias. Exit 1 when there is
no previous version.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from onerec_prod.config import Config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--actor", default=None, help="Who (default $USER; recorded).")
    parser.add_argument("--reason", default=None, help="Why (recorded).")
    parser.add_argument("--json", action="store_true", help="Print the result as JSON.")


def main(args: argparse.Namespace, cfg: Config) -> int:
    from onerec_prod.registry.registry import RegistryError, rollback

    actor = args.actor or os.environ.get("USER") or "unknown"
    try:
        out = rollback(cfg, actor=actor, reason=args.reason)
    except RegistryError as e:
        print(f"rollback refused: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(out, indent=2, sort_keys=True))
    elif out["changed"]:
        print(f"champion -> version {out['champion']} (rolled back version {out['rolled_back']}; previous cleared)")
    else:
        print(f"champion already is version {out['champion']}; cleared a stale previous alias")
    return 0
