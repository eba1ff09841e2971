"""Each candidate as a real MLflow model: a pyfunc recommender anyone can load by alias.

Why: a registered version used to be a plain folder that only this project's code could read.
Now ``mlflow.pyfunc.load_model("models:/onerec@champion").predict(df)`` answers a history with
ranked item ids, in any Python process with this package installed:

    input   a DataFrame with column ``history``: item ids, oldest first (list of str per row)
    params  ``k`` (default ``serving.top_n``): items per row
    output  a DataFrame with ``items`` (ranked item ids) and ``scores`` (summed log-probs)

The MLflow model holds the weights and tokenizer (artifact ``model``, the same files the trainer
wrote, so the weights hash is unchanged), the catalog snapshot of the model's ``sid_version``
(artifact ``catalog``: ``item_id, title, categories, sid``), and the settings the prompts were
trained with (``settings``). Recommendation is the service's fallback path: the same prompt
builder (``serving.precompute.rec_prompt_ids``) and the trie-constrained beam over every catalog
SID (``eval.beam.beam_search_sids``), so the answer is what serving gives a user without
precomputed prefixes.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from onerec_prod.config import Config

log = logging.getLogger(__name__)

MODEL_ARTIFACT, CATALOG_ARTIFACT, SETTINGS_ARTIFACT = "model", "catalog", "settings"
_REQUIREMENTS = ("torch", "transformers", "tokenizers", "safetensors", "pandas", "mlflow", "pydantic", "PyYAML")


class OnerecRecommender(mlflow.pyfunc.PythonModel):
    """Trie-constrained generative recommender over the catalog snapshot it was logged with."""

    def load_context(self, context) -> None:
        from onerec_prod.model.io import load_model, load_tokenizer
        from onerec_prod.sid.tokens import SidVocab
        from onerec_prod.sid.trie import SidTrie

        self.settings = json.loads(Path(context.artifacts[SETTINGS_ARTIFACT]).read_text())
        sizes = list(self.settings["sid_sizes"])
        rows = [json.loads(x) for x in Path(context.artifacts[CATALOG_ARTIFACT]).read_text().splitlines() if x]
        self.items = {r["item_id"]: {**r, "sid": tuple(r["sid"])} for r in rows}
        self.sid_to_item = {it["sid"]: iid for iid, it in self.items.items()}
        model_dir = context.artifacts[MODEL_ARTIFACT]
        self.tokenizer = load_tokenizer(model_dir)
        self.vocab = SidVocab.from_tokenizer(self.tokenizer, sizes)
        self.trie = SidTrie.from_sids(list(self.sid_to_item), sizes)
        self.model = load_model(model_dir, device="cpu")

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import pandas as pd

        from onerec_prod.eval.beam import beam_search_sids
        from onerec_prod.serving.precompute import history_items, rec_prompt_ids

        k = int((params or {}).get("k") or self.settings["top_n"])
        histories = _histories(model_input)
        prompts = [rec_prompt_ids(self.tokenizer, history_items(h, self.items), think=False, rationale=None,
                                  max_items=self.settings["max_items"]) for h in histories]
        beam = max(k, int(self.settings["beam_size"]))
        ranked = beam_search_sids(self.model, prompts, self.trie, self.vocab, beam,
                                  batch_size=int(self.settings["batch_size"])) if prompts else []
        rows = []
        for per_user in ranked:  # (codes, summed log-prob) pairs, best first
            hits = [(self.sid_to_item[tuple(s)], float(sc)) for s, sc in per_user
                    if tuple(s) in self.sid_to_item][:k]
            rows.append({"items": [i for i, _ in hits], "scores": [round(s, 6) for _, s in hits]})
        return pd.DataFrame(rows, columns=["items", "scores"])


def _histories(model_input) -> list[list[str]]:
    """Histories from a DataFrame (column ``history``), a dict, or a list of lists."""
    if hasattr(model_input, "columns"):
        if "history" not in model_input.columns:
            raise ValueError(f"input needs a 'history' column (item ids), got columns {list(model_input.columns)}")
        col = model_input["history"].tolist()
    elif isinstance(model_input, Mapping):
        col = model_input["history"]
        col = [col] if col and isinstance(col[0], str) else col
    else:
        col = list(model_input)
    return [[str(i) for i in (h if h is not None else [])] for h in col]


def signature(top_n: int):
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec(Array(DataType.string), "history")]),
        outputs=Schema([ColSpec(Array(DataType.string), "items"), ColSpec(Array(DataType.double), "scores")]),
        params=ParamSchema([ParamSpec("k", DataType.long, top_n)]),
    )


def requirements() -> list[str]:
    """Pinned requirements of the loading environment (this package's own pins; no inference,
    which would load the model in a subprocess just to list imports)."""
    out = []
    for name in _REQUIREMENTS:
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            out.append(name)
    try:
        out.append(f"onerec-prod=={metadata.version('onerec-prod')}")
    except metadata.PackageNotFoundError:
        pass
    return out


def save_pyfunc(cfg: Config, model_dir: str | Path, catalog: Sequence[Mapping[str, Any]], dest: str | Path,
                *, metadata_: Mapping[str, Any] | None = None) -> Path:
    """Write ``model_dir`` + ``catalog`` as an MLflow pyfunc model at ``dest`` (MLmodel, signature,
    input example); returns ``dest``.

    Raises:
        ValueError: the catalog has no item with a SID.
    """
    import pandas as pd

    from onerec_prod.serving.precompute import model_sid_version, select_catalog
    from onerec_prod.sid.tokens import level_sizes

    chosen, _ = select_catalog(catalog, model_sid_version(model_dir))  # the model's sid_version only
    items = [{**it, "sid": list(it["sid"])} for it in chosen]
    if not items:
        raise ValueError("the catalog has no item with a SID: the pyfunc model could not rank anything")
    dest = Path(dest)
    with tempfile.TemporaryDirectory(prefix="onerec-pyfunc-") as tmp:
        cat = Path(tmp) / "catalog.jsonl"
        cat.write_text("".join(json.dumps(it, sort_keys=True) + "\n" for it in items))
        settings = Path(tmp) / "settings.json"
        settings.write_text(json.dumps({
            "sid_sizes": list(level_sizes(cfg.sid)), "max_items": cfg.samples.max_history,
            "beam_size": cfg.eval.beam_size, "batch_size": cfg.eval.batch_size, "top_n": cfg.serving.top_n,
        }, indent=2))
        example = pd.DataFrame({"history": [[it["item_id"] for it in items[:3]]]})
        mlflow.pyfunc.save_model(
            path=str(dest),
            python_model=OnerecRecommender(),
            artifacts={MODEL_ARTIFACT: str(model_dir), CATALOG_ARTIFACT: str(cat), SETTINGS_ARTIFACT: str(settings)},
            signature=signature(cfg.serving.top_n),
            input_example=example,
            pip_requirements=requirements(),
            metadata=dict(metadata_ or {}),
        )
    return dest


def weights_dir(mlflow_model_dir: str | Path) -> Path:
    """The project model dir (weights + tokenizer) inside a downloaded pyfunc model; the dir
    itself for a plain model folder (versions registered before the pyfunc)."""
    root = Path(mlflow_model_dir)
    if not (root / "MLmodel").is_file():
        return root
    import yaml

    spec = yaml.safe_load((root / "MLmodel").read_text())
    arts = spec.get("flavors", {}).get("python_function", {}).get("artifacts", {})
    rel = (arts.get(MODEL_ARTIFACT) or {}).get("path")
    if not rel:
        raise FileNotFoundError(f"{root}/MLmodel names no '{MODEL_ARTIFACT}' artifact")
    return root / rel


def read_catalog(cfg: Config, version: int | None = None, spark=None) -> list[dict[str, Any]]:
    """Catalog rows with a SID (``item_id, title, categories, sid, sid_version``) of the Delta table
    ``catalog`` at ``version`` (default: the newest), for :func:`save_pyfunc`. Without ``spark``:
    on the shared local Spark server when there is one, else in this process's own session."""
    if spark is not None:
        return catalog_rows_on(spark, cfg, None, version=version)
    from onerec_prod.spark_server import run_on_spark

    return run_on_spark(cfg, "catalog_rows", None, version=version)


def catalog_rows_on(spark, cfg: Config, dt: str | None = None, *, version: int | None = None,
                    columns: Sequence[str] = ("item_id", "title", "categories", "sid", "sid_version"),
                    ) -> list[dict[str, Any]]:
    """:func:`read_catalog` in ``spark``'s process (a ``spark_server.SPARK_CALLS`` entry)."""
    from onerec_prod.lake import read_table, table_path, table_version

    path = table_path(cfg, "catalog")
    v = version if version is not None else table_version(spark, path)
    if v is None:
        raise FileNotFoundError(f"catalog table not found at {path}: run update_catalog first")
    cols = list(columns)
    return [r.asDict() for r in read_table(spark, path, v).where("sid IS NOT NULL").select(*cols).collect()]