"""``onerec-prod init-base-model``: build the base model directory with the SID vocabulary.

Embedded default: a small Qwen3 and a BPE tokenizer trained on the catalog text. With
``model.base_dir`` set (e.g. a real Qwen3 dir), that model is expanded with the SID tokens.

    onerec-prod init-base-model [--texts catalog|dataset] [--out DIR] [--force]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from onerec_prod.config import Config

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--texts", choices=["auto", "catalog", "dataset"], default="auto",
        help="Tokenizer corpus: the Delta catalog table, the replay dataset's items, or auto "
        "(catalog if it exists, else dataset).",
    )
    parser.add_argument("--out", default=None, help="Output dir (default <paths.models>/base).")
    parser.add_argument("--force", action="store_true", help="Rebuild even if the dir exists.")


def item_text(title: str | None, categories: str | None, description: str | None = None) -> str:
    """One catalog text line for the tokenizer corpus."""
    return " ".join(p for p in (title, categories, description) if p)


def catalog_texts_from_dataset(cfg: Config) -> list[str]:
    """Item texts of the replay dataset (``p5/items_p5_ids.jsonl``), in file order."""
    path = cfg.paths.dataset / "p5" / "items_p5_ids.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"dataset items not found: {path} (set paths.dataset_dir)")
    out = []
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            out.append(item_text(r.get("title"), r.get("categories"), r.get("description")))
    return out


def catalog_texts_from_table(cfg: Config) -> list[str] | None:
    """Item texts of the Delta ``catalog`` table ordered by item_id (None if it does not exist)."""
    from onerec_prod.lake import read_table, table_exists, table_path
    from onerec_prod.spark import get_spark

    spark = get_spark(cfg.spark)
    path = table_path(cfg, "catalog")
    if not table_exists(spark, path):
        return None
    rows = read_table(spark, path).select("item_id", "title", "categories", "description").collect()
    rows.sort(key=lambda r: r["item_id"])
    return [item_text(r["title"], r["categories"], r["description"]) for r in rows]


def ensure_base_model(cfg: Config, texts: str = "auto", out: str | Path | None = None,
                      force: bool = False) -> Path:
    """The base model dir, built first if it does not exist (or ``force``).

    With ``model.base_dir`` set and no ``out``, that dir is returned as is (the trainer expands
    its vocabulary when the SID tokens are missing); with ``out``, an expanded copy is written.
    """
    from onerec_prod.model.base import base_model_dir, init_base_model

    if cfg.model.base_dir and not out:
        # A real checkpoint is used in place; training adds missing SID tokens when it loads it.
        return base_model_dir(cfg)
    out_dir = Path(out) if out else base_model_dir(cfg)
    if out_dir.exists() and any(out_dir.glob("*.safetensors")) and not force:
        log.info("base model exists: %s (use --force to rebuild)", out_dir)
        return out_dir
    corpus: list[str] = []
    if not cfg.model.base_dir:
        got = catalog_texts_from_table(cfg) if texts in ("auto", "catalog") else None
        if got is None and texts == "catalog":
            raise FileNotFoundError("--texts catalog: the Delta catalog table does not exist yet")
        corpus = got if got is not None else catalog_texts_from_dataset(cfg)
        log.info("tokenizer corpus: %d item texts", len(corpus))
    return init_base_model(cfg, corpus, out_dir)


def main(args: argparse.Namespace, cfg: Config) -> int:
    out = ensure_base_model(cfg, args.texts, args.out, args.force)
    print(out)
    return 0
