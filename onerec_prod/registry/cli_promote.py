"""``onerec-prod promote [--version N] [--force --reason TEXT] [--actor NAME]``.

Moves ``champion`` to version N (default: the challenger) and ``previous`` to the old
champion, atomically. The version's gate must have passed unless ``--force``, which needs
``--reason``; actor (``--actor`` or ``$USER``), reason and time are recorded on the version.
Exit 0 on success (also when N already serves), 1 when refused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from onerec_prod.config import Config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", default=None, help="Version to promote (default: the challenger).")
    parser.add_argument("--force", action="store_true", help="Promote even if the gate did not pass.")
    parser.add_argument("--reason", default=None, help="Why (required with --force; recorded).")
    parser.add_argument("--actor", default=None, help="Who (default $USER; recorded).")
    parser.add_argument("--json", action="store_true", help="Print the result as JSON.")


def main(args: argparse.Namespace, cfg: Config) -> int:
    from onerec_prod.registry.registry import RegistryError, promote

    actor = args.actor or os.environ.get("USER") or "unknown"
    try:
        out = promote(cfg, args.version, force=args.force, reason=args.reason, actor=actor)
    except (RegistryError, ValueError) as e:
        print(f"promote refused: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(out, indent=2, sort_keys=True))
    elif out["changed"]:
        print(f"champion -> version {out['champion']} (previous: {out['previous'] or 'none'})"
              + (f"; FORCED by {out['actor']}: {out['reason']}" if out["forced"] else ""))
    else:
        print(f"version {out['champion']} is already champion; nothing changed")
    return 0
