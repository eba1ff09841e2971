"""Shared fixtures: offline environment, one Spark session, per-test config, tiny model."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "DS_BUILD_OPS": "0",
    "PYTHONHASHSEED": "0",
}.items():
    os.environ.setdefault(_k, _v)
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "onerec-prod" / "torch_extensions")
)

REPO = Path(__file__).resolve().parent.parent
BEAUTY_DIR = (REPO.parent / "shared" / "data" / "beauty").resolve()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/spark/" in str(item.fspath):
            item.add_marker(pytest.mark.spark)


@pytest.fixture(scope="session")
def beauty_dir() -> Path:
    if not BEAUTY_DIR.exists():
        pytest.fail(f"Beauty data not found at {BEAUTY_DIR} (expected ../shared beside the repo)")
    return BEAUTY_DIR


BEAUTY_SLICE_FROM_TS = 1393200000  # 2014-02-24: the slice keeps Beauty interactions from this day on


def write_beauty_slice(beauty_dir: Path, work: Path, from_ts: int = BEAUTY_SLICE_FROM_TS) -> Path:
    """Convert Beauty, keep interactions with ts >= from_ts (and their items): a real, small dataset."""
    from onerec_prod.datasets import convert_beauty, load_dataset, write_dataset

    full = work / "beauty_full"
    convert_beauty(beauty_dir, full)
    ds = load_dataset(full)
    rows = [(i.user_id, i.item_id, i.ts, i.event_type) for i in ds.interactions if i.ts >= from_ts]
    used = {r[1] for r in rows}
    out = work / "beauty_slice"
    write_dataset(out, rows, [it for it in ds.items.values() if it.item_id in used])
    return out


@pytest.fixture(scope="session")
def beauty_slice(beauty_dir, tmp_path_factory) -> Path:
    """Real Beauty from 2014-02-24 on, in the plain dataset format (~7.5k interactions)."""
    return write_beauty_slice(beauty_dir, tmp_path_factory.mktemp("datasets"))


@pytest.fixture
def make_cfg(tmp_path):
    """Build a Config whose var_root is a fresh temp dir; extra ``key=value`` overrides allowed."""
    from onerec_prod.config import load_config

    def _make(*overrides: str, root: Path | None = None):
        base = [f"paths.var_root={root or tmp_path}", f"paths.dataset_dir={BEAUTY_DIR}"]
        return load_config(REPO / "configs" / "test.yaml", base + list(overrides), environ={})

    return _make


@pytest.fixture(scope="session")
def spark():
    """One local Spark + Delta session for the whole test session."""
    from onerec_prod.config import SparkCfg
    from onerec_prod.spark import get_spark

    s = get_spark(SparkCfg(master="local[2]", shuffle_partitions=2, driver_memory="2g"))
    yield s
    s.stop()


@pytest.fixture(scope="session")
def beauty_items(beauty_dir) -> list[dict]:
    """The first 300 Beauty items as plain dicts (item_id, title, categories)."""
    out = []
    with open(beauty_dir / "p5" / "items_p5_ids.jsonl") as f:
        for line in f:
            r = json.loads(line)
            out.append({"item_id": r["p5_item_id"], "title": r["title"], "categories": r["categories"]})
            if len(out) == 300:
                break
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, beauty_items) -> Path:
    """A tiny embedded Qwen3 with catalog tokenizer and SID vocabulary (4 levels x 16 codes)."""
    from onerec_prod.config import load_config
    from onerec_prod.model.base import init_base_model

    root = tmp_path_factory.mktemp("tiny_model")
    cfg = load_config(REPO / "configs" / "test.yaml", [f"paths.var_root={root}"], environ={})
    texts = [f"{it['title']} {it['categories']}" for it in beauty_items]
    return Path(init_base_model(cfg, texts, root / "base"))


@pytest.fixture(scope="session")
def tiny_sids(beauty_items) -> dict[str, tuple[int, ...]]:
    """Distinct random SIDs (4 levels x 16 codes, matching configs/test.yaml) for beauty_items."""
    rng = random.Random(0)
    seen, out = set(), {}
    for it in beauty_items:
        while True:
            sid = tuple(rng.randrange(16) for _ in range(4))
            if sid not in seen:
                seen.add(sid)
                out[it["item_id"]] = sid
                break
    return out


def gate_record(champion: str | None, *, passed: bool = True, recall: float = 0.12, ndcg: float = 0.07,
                champion_ndcg: float = 0.07) -> dict:
    """A gate result as ``registry.record_gate`` stores it: a recall floor (passed) and an NDCG
    regression check vs ``champion`` (``passed``), for registry tests that need one."""
    return {"mode": "enabled", "passed": passed, "passed_effective": passed, "first_model": champion is None,
            "champion_version": champion, "champion_metrics_source": "report (same snapshot)",
            "checks": [{"metric": "recall_at_10", "kind": "floor", "value": recall, "threshold": 0.05,
                        "champion_value": None, "passed": True, "message": ""},
                       {"metric": "ndcg_at_10", "kind": "regression", "value": ndcg, "threshold": 0.065,
                        "champion_value": champion_ndcg, "passed": passed, "message": ""}],
            "notes": []}
