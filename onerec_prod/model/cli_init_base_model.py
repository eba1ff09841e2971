"""``onerec-prod init-base-model``: build the base model directory with the SID vocabulary.

Embedded default: a small Qwen3 and a BPE tokenizer trained on the catalog text. With
``model.base_dir`` set (e.g. a real Qwen3 dir), that model is expanded with the SID tokens.

    onerec-prod init-base-model [--texts catalog|dataset] [--out DIR] [--force]
"""

from __future__ import annotations

import argparse

from onerec_prod.config import Config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--texts", choices=["auto", "catalog", "dataset"], default="auto",
        help="Tokenizer corpus: the Delta catalog table, the replay dataset's items, or auto "
        "(catalog if it exists, else dataset).",
    )
    parser.add_argument("--out", default=None, help="Output dir (default <paths.models>/base).")
    parser.add_argument("--force", action="store_true", help="Rebuild even if the dir exists.")


def main(args: argparse.Namespace, cfg: Config) -> int:
    from onerec_prod.model.base import ensure_base_model

    out = ensure_base_model(cfg, args.texts, args.out, args.force)
    print(out)
    return 0
