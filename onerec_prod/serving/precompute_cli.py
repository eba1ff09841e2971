"""``onerec-prod precompute --date D [--model DIR|models:/name@alias] [--model-version V]``.

Resolves the model once (default ``models:/<registry.model_name>@champion``) to a version number
and a local directory, then writes Think-Ahead prefixes of day ``D`` for that version
(:func:`onerec_prod.serving.precompute.precompute`). Prints one JSON summary line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from pathlib import Path

from onerec_prod.config import Config

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--date", required=True, help="Day of the precompute (YYYY-MM-DD).")
    parser.add_argument(
        "--model", default=None,
        help="Model dir or models:/name@alias | models:/name/N (default: models:/<name>@champion).",
    )
    parser.add_argument(
        "--model-version", default=None,
        help="Version label of a --model DIR (default: 'local-' + a hash of its weights record).",
    )
    parser.add_argument("--no-table", action="store_true", help="Write the export only, not Delta think_ahead.")


def local_version(model_dir: str | Path) -> str:
    """Stable label of an unregistered model dir: ``local-`` + hash of its recorded weights hash.

    Falls back to the dir's resolved path when ``onerec_meta.json`` has no ``weights_sha256``.
    """
    from onerec_prod.model.io import read_meta

    key = read_meta(model_dir).get("weights_sha256") or str(Path(model_dir).resolve())
    return "local-" + hashlib.sha256(str(key).encode()).hexdigest()[:12]


def resolve_model(cfg: Config, spec: str | None, version: str | None = None) -> tuple[str, Path]:
    """``(model_version, local dir)`` of a model spec (dir, ``models:/`` URI, or None = champion)."""
    from onerec_prod.registry import registry

    spec = spec or f"models:/{cfg.registry.model_name}@champion"
    if spec.startswith("models:/"):
        _, resolved = registry.resolve_version(cfg, spec)
        if version is not None and version != resolved:
            raise ValueError(f"--model-version {version} contradicts {spec} (version {resolved})")
        return resolved, registry.version_dir(cfg, resolved, spec[len("models:/"):].split("@")[0].split("/")[0])
    path = Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(f"--model {spec}: not a directory (or pass models:/name@alias)")
    return version or local_version(path), path


def main(args: argparse.Namespace, cfg: Config) -> int:
    from onerec_prod.serving.precompute import precompute

    version, model_dir = resolve_model(cfg, args.model, args.model_version)
    log.info("precompute: model %s (version %s) for %s", model_dir, version, args.date)
    res = precompute(cfg, args.date, model_dir, version, write_table=not args.no_table)
    print(json.dumps({"model_version": version, **res}, sort_keys=True, default=str))
    return 0
