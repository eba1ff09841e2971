"""Think-Ahead service end to end on the tiny model: precompute -> export -> HTTP.

* real HTTP on 127.0.0.1 (uvicorn in a thread, stopped by the test): catalog-only items, the
  prefix path and every fallback, /healthz, /metrics, an oversized chunked body;
* the champion alias of a real MLflow registry (tmp sqlite store) moved while requests run:
  the service swaps models without a failed request, then picks up the new version's export;
* bad requests through TestClient: clear 4xx messages.
"""

from __future__ import annotations

import datetime
import json
import logging
import random
import shutil
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DT = "2014-01-05"
SID_VERSION = "sid-test"


# --------------------------------------------------------------------------------------
# fixtures and helpers


def make_model_dir(src: Path, dst: Path) -> Path:
    """A copy of the tiny model whose meta names the catalog's sid_version and its training day."""
    shutil.copytree(src, dst)
    meta = json.loads((dst / "onerec_meta.json").read_text())
    meta["sid_version"] = SID_VERSION
    meta["dt"] = DT
    (dst / "onerec_meta.json").write_text(json.dumps(meta))
    return dst


@pytest.fixture(scope="module")
def catalog(beauty_items, tiny_sids) -> list[dict]:
    return [{**it, "description": None, "sid": tiny_sids[it["item_id"]], "sid_version": SID_VERSION}
            for it in beauty_items]


@pytest.fixture(scope="module")
def histories(catalog) -> dict[str, list[str]]:
    ids = [it["item_id"] for it in catalog]
    rng = random.Random(1)
    return {f"u{i}": rng.sample(ids, 2 + i % 4) for i in range(8)}


def load_cfg(root: Path, *overrides: str):
    from onerec_prod.config import load_config

    return load_config(REPO / "configs" / "test.yaml", [f"paths.var_root={root}", *overrides], environ={})


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir, catalog, histories):
    """(cfg, model dir) with the export of version '1' written."""
    from onerec_prod.serving.precompute import precompute

    root = tmp_path_factory.mktemp("serving")
    cfg = load_cfg(root, "serving.reload_interval_s=0.2")
    model_dir = make_model_dir(tiny_model_dir, root / "m1")
    res = precompute(cfg, DT, model_dir, "1", histories=histories, catalog=catalog, write_table=False)
    assert res["users"] == len(histories)
    return cfg, model_dir


def http_server(app):
    """uvicorn on 127.0.0.1:<free port> in a thread, stopped when the block ends."""
    from onerec_prod.serving.service import background_server

    return background_server(app)


def wait_for(client, pred, timeout: float = 60.0) -> dict:
    """Poll /healthz until ``pred(json)`` holds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        r = client.get("/healthz")
        last = r.json()
        if r.status_code == 200 and pred(last):
            return last
        time.sleep(0.05)
    raise AssertionError(f"/healthz never satisfied the condition; last: {last}")


def scrape(client, **kw) -> list:
    """GET /metrics, parsed by prometheus_client's own text parser: the samples."""
    from prometheus_client.parser import text_string_to_metric_families

    r = client.get("/metrics", **kw)
    assert r.status_code == 200, r.text
    return [s for fam in text_string_to_metric_families(r.text) for s in fam.samples]


def value(samples: list, name: str, **labels: str) -> float | None:
    """The value of the one sample ``name`` whose labels include ``labels`` (None: no such sample)."""
    hits = [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]
    assert len(hits) <= 1, f"{name}{labels}: {len(hits)} samples"
    return hits[0] if hits else None


def assert_catalog_items(body: dict, catalog: list[dict], k: int) -> None:
    by_id = {it["item_id"]: tuple(it["sid"]) for it in catalog}
    items = body["items"]
    assert 1 <= len(items) <= k
    assert len({it["item_id"] for it in items}) == len(items)
    for it in items:
        assert it["item_id"] in by_id, f"{it['item_id']} is not a catalog item"
        assert tuple(it["sid"]) == by_id[it["item_id"]]
    scores = [it["score"] for it in items]
    assert scores == sorted(scores, reverse=True)


# --------------------------------------------------------------------------------------
# tests


def test_export_holds_top_prefixes(served, histories, tiny_sids):
    from onerec_prod.serving.precompute import export_root, latest_export, read_export

    cfg, _ = served
    path, manifest = latest_export(export_root(cfg), model_version="1")
    exp = read_export(path)
    assert manifest["dt"] == DT and manifest["sid_version"] == SID_VERSION
    assert set(exp.users) == set(histories)
    catalog_prefixes = {s[: cfg.serving.prefix_levels] for s in tiny_sids.values()}
    for row in exp.users.values():
        assert 1 <= len(row.prefixes) <= cfg.serving.prefix_beam
        assert all(len(c) == cfg.serving.prefix_levels and c in catalog_prefixes for c, _ in row.prefixes)
        scores = [s for _, s in row.prefixes]
        assert scores == sorted(scores, reverse=True) and all(s < 0 for s in scores)


def test_http_prefix_path_and_fallbacks(served, catalog, histories):
    import httpx

    from onerec_prod.serving.service import create_app

    cfg, model_dir = served
    app = create_app(cfg, champion_resolver=lambda: ("1", model_dir))
    top_n = cfg.serving.top_n
    with http_server(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        assert wait_for(c, lambda h: h["model_version"] == "1")["prefixes_current"] is True

        r = c.post("/recommend", json={"user_id": "u3"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["path"] == "prefix" and body["model_version"] == "1" and body["latency_ms"] > 0
        assert_catalog_items(body, catalog, top_n)
        from onerec_prod.serving.precompute import export_root, latest_export, read_export

        row = read_export(latest_export(export_root(cfg), model_version="1")[0]).users["u3"]
        k = cfg.serving.prefix_levels
        assert {tuple(it["sid"][:k]) for it in body["items"]} <= {c for c, _ in row.prefixes}

        r = c.post("/recommend", json={"user_id": "u3", "k": 2})
        assert r.json()["path"] == "prefix" and len(r.json()["items"]) <= 2

        r = c.post("/recommend", json={"user_id": "stranger"})
        assert r.status_code == 200 and r.json()["path"] == "fallback"
        assert_catalog_items(r.json(), catalog, top_n)

        fresh = [catalog[7]["item_id"], catalog[9]["item_id"]]
        r = c.post("/recommend", json={"user_id": "u3", "events": fresh, "k": 3})
        assert r.status_code == 200 and r.json()["path"] == "fallback"
        assert r.json()["rationale"] is None
        assert_catalog_items(r.json(), catalog, 3)

        big = json.dumps({"user_id": "u3", "events": ["x" * 100] * 1000}).encode()

        def chunks():
            for i in range(0, len(big), 4096):
                yield big[i: i + 4096]

        r = c.post("/recommend", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]

        m = scrape(c)
        assert value(m, "onerec_recommend_requests_total", path="prefix") == 2
        assert value(m, "onerec_recommend_requests_total", path="fallback") == 2
        assert value(m, "onerec_fallback_total", reason="unknown_user") == 1
        assert value(m, "onerec_fallback_total", reason="fresh_events") == 1
        # the latency histogram counted the 4 answered requests, each in some bucket
        for path in ("prefix", "fallback"):
            assert value(m, "onerec_recommend_latency_seconds_count", path=path) == 2
            assert value(m, "onerec_recommend_latency_seconds_bucket", path=path, le="+Inf") == 2
            assert value(m, "onerec_recommend_latency_seconds_sum", path=path) is not None  # the series exists
        assert value(m, "onerec_http_responses_total", code="200") >= 4  # and the /healthz polls
        assert value(m, "onerec_http_responses_total", code="413") == 1
        assert value(m, "onerec_model_info", model_version="1", sid_version=SID_VERSION, data_date=DT) == 1
        midnight = datetime.datetime.fromisoformat(DT).replace(tzinfo=datetime.UTC).timestamp()
        assert value(m, "onerec_model_data_date_seconds") == midnight
        # champion age: from the time training wrote the model dir
        trained = (model_dir / "onerec_meta.json").stat().st_mtime
        assert value(m, "onerec_model_trained_timestamp_seconds") == pytest.approx(trained)
        age = value(m, "onerec_model_age_seconds")
        assert age is not None and 0 <= age <= time.time() - trained + 1
        assert value(m, "onerec_ready") == 1
        assert value(m, "process_resident_memory_bytes") > 0  # process collector
        assert value(m, "onerec_shed_total") == 0 and value(m, "onerec_request_failures_total") == 0


def test_request_ids_and_access_log(served, caplog):
    """A sane X-Request-ID is echoed, anything else replaced by a new id; with
    serving.access_log_sample_rate=1 every request leaves an access-log line with its id."""
    import re

    from fastapi.testclient import TestClient

    from onerec_prod.log import JsonFormatter
    from onerec_prod.serving.service import create_app

    cfg, model_dir = served
    cfg = load_cfg(Path(cfg.paths.var_root), "serving.reload_interval_s=0.2", "serving.access_log_sample_rate=1.0")
    app = create_app(cfg, champion_resolver=lambda: ("1", model_dir))
    with TestClient(app) as c, caplog.at_level(logging.INFO, logger="onerec_prod.serving.access"):
        wait_for(c, lambda h: h["model_version"] == "1")
        r = c.post("/recommend", json={"user_id": "u3"}, headers={"X-Request-ID": "gw-7f3a.0001"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "gw-7f3a.0001"
        r = c.post("/recommend", json={"user_id": "nobody-known"}, headers={"X-Request-ID": 'bad id "quoted"'})
        generated = r.headers["x-request-id"]
        assert r.status_code == 200 and re.fullmatch("[0-9a-f]{32}", generated)
        r = c.post("/recommend", json={"user_id": "u3", "k": 0})
        assert r.status_code == 422 and re.fullmatch("[0-9a-f]{32}", r.headers["x-request-id"])
        invalid_id = r.headers["x-request-id"]
    lines = {rec.request_id: rec for rec in caplog.records if rec.name == "onerec_prod.serving.access"}
    given = lines["gw-7f3a.0001"]
    assert (given.status, given.method, given.http_path) == (200, "POST", "/recommend")
    assert (given.model_version, given.serve_path) == ("1", "prefix")
    assert given.getMessage().startswith("gw-7f3a.0001 POST /recommend 200 ")
    assert (lines[generated].serve_path, lines[generated].fallback_reason) == ("fallback", "unknown_user")
    assert lines[invalid_id].status == 422
    as_json = json.loads(JsonFormatter().format(given))
    assert as_json["request_id"] == "gw-7f3a.0001" and as_json["status"] == 200
    assert as_json["logger"] == "onerec_prod.serving.access" and isinstance(as_json["duration_ms"], int | float)


def test_stale_rows_fall_back(served, catalog):
    """A model version without its own export serves every user through full generation."""
    from fastapi.testclient import TestClient

    from onerec_prod.serving.service import create_app

    cfg, model_dir = served
    app = create_app(cfg, champion_resolver=lambda: ("7", model_dir))
    with TestClient(app) as c:
        h = wait_for(c, lambda h: h["model_version"] == "7")
        assert h["prefixes_current"] is False
        body = c.post("/recommend", json={"user_id": "u3"}).json()
        assert body["path"] == "fallback" and body["model_version"] == "7"
        assert_catalog_items(body, catalog, cfg.serving.top_n)
        assert value(scrape(c), "onerec_fallback_total", reason="stale") == 1


def test_think_mode_serves_the_stored_rationale(tmp_path, tiny_model_dir, catalog, histories):
    """serving.think: precompute writes a rationale and conditions the prefixes on it; the prefix
    path rebuilds the same prompt and returns the rationale."""
    from fastapi.testclient import TestClient

    from onerec_prod.serving.precompute import export_root, latest_export, precompute, read_export
    from onerec_prod.serving.service import create_app

    cfg = load_cfg(tmp_path, "serving.think=true", "serving.max_think_tokens=6")
    model_dir = make_model_dir(tiny_model_dir, tmp_path / "m")
    few = {u: histories[u] for u in ("u1", "u2")}
    precompute(cfg, DT, model_dir, "1", histories=few, catalog=catalog, write_table=False)
    path, manifest = latest_export(export_root(cfg), model_version="1")
    rows = read_export(path).users
    assert manifest["think"] is True and all(isinstance(r.rationale, str) for r in rows.values())
    with TestClient(create_app(cfg, champion_resolver=lambda: ("1", model_dir))) as c:
        wait_for(c, lambda h: True)
        body = c.post("/recommend", json={"user_id": "u1"}).json()
        assert body["path"] == "prefix" and body["rationale"] == rows["u1"].rationale
        assert_catalog_items(body, catalog, cfg.serving.top_n)
        assert c.post("/recommend", json={"user_id": "u9"}).json()["rationale"] is None


def test_online_reasoning_mode_writes_a_rationale_then_beams(served, catalog, histories):
    """mode=think with serving.online_reasoning: over HTTP, the model writes a rationale online and
    the constrained SID beam runs on it; the answer is eval's think mode on the same history (the
    same greedy rationale, the same ranked SIDs). Fresh events join the history; an unknown user
    still gets the popular items. With the option off, mode=think is a 403 and auto is unchanged."""
    import httpx

    from onerec_prod.eval.beam import recommend as eval_recommend
    from onerec_prod.model.io import load_model, load_tokenizer
    from onerec_prod.serving.precompute import history_items
    from onerec_prod.serving.service import create_app
    from onerec_prod.sid.tokens import SidVocab, level_sizes
    from onerec_prod.sid.trie import SidTrie

    cfg0, model_dir = served
    root = Path(cfg0.paths.var_root)
    cfg = load_cfg(root, "serving.online_reasoning=true", "serving.max_think_tokens=6")
    top_n = cfg.serving.top_n
    items = {it["item_id"]: it for it in catalog}
    fresh = [catalog[7]["item_id"], catalog[9]["item_id"]]

    app = create_app(cfg, champion_resolver=lambda: ("1", model_dir))
    with http_server(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        wait_for(c, lambda h: h["model_version"] == "1")
        think = c.post("/recommend", json={"user_id": "u3", "mode": "think"})
        assert think.status_code == 200, think.text
        body = think.json()
        assert (body["path"], body["fallback_reason"], body["model_version"]) == ("think", None, "1")
        assert isinstance(body["rationale"], str)
        assert_catalog_items(body, catalog, top_n)
        with_events = c.post("/recommend", json={"user_id": "u3", "events": fresh, "mode": "think", "k": 3}).json()
        assert with_events["path"] == "think" and len(with_events["items"]) <= 3
        assert c.post("/recommend", json={"user_id": "u3", "mode": "auto"}).json()["path"] == "prefix"
        stranger = c.post("/recommend", json={"user_id": "stranger", "mode": "think"}).json()
        assert (stranger["path"], stranger["fallback_reason"]) == ("fallback", "unknown_user")
        m = scrape(c)
        assert value(m, "onerec_recommend_requests_total", path="think") == 2
        assert value(m, "onerec_recommend_latency_seconds_count", path="think") == 2

    # eval's think mode (greedy rationale, then the beam) on the same histories, in process
    tok, model = load_tokenizer(model_dir), load_model(model_dir)
    sizes = level_sizes(cfg.sid)
    trie, vocab = SidTrie.from_sids([it["sid"] for it in catalog], sizes), SidVocab.from_tokenizer(tok, sizes)
    hists = [history_items(histories["u3"], items), history_items(histories["u3"] + fresh, items)]
    eval_cfg = cfg.eval.model_copy(update={"beam_size": top_n, "max_think_tokens": 6})  # the service's settings
    for got, hist, k in zip((body, with_events), hists, (top_n, 3), strict=True):
        want = eval_recommend(model, tok, trie, vocab, [hist], eval_cfg, think=True, max_items=cfg.samples.max_history)
        sids, rationale = want.sids[0], want.rationales[0]
        assert got["rationale"] == rationale
        assert [tuple(it["sid"]) for it in got["items"]] == [sid for sid, _ in sids[:k]]
        assert [it["score"] for it in got["items"]] == pytest.approx([sc for _, sc in sids[:k]], abs=1e-5)

    from fastapi.testclient import TestClient

    with TestClient(create_app(cfg0, champion_resolver=lambda: ("1", model_dir))) as c:  # option off
        wait_for(c, lambda h: True)
        r = c.post("/recommend", json={"user_id": "u3", "mode": "think"})
        assert r.status_code == 403 and "serving.online_reasoning" in r.json()["error"]
        assert c.post("/recommend", json={"user_id": "u3"}).json()["path"] == "prefix"


def test_bad_requests_get_clear_4xx(served):
    from fastapi.testclient import TestClient

    from onerec_prod.serving.service import create_app

    cfg, model_dir = served
    top_n = cfg.serving.top_n
    with TestClient(create_app(cfg, champion_resolver=lambda: ("1", model_dir))) as c:
        wait_for(c, lambda h: True)
        cases = [
            ({"user_id": "u1", "k": 0}, "k:"),
            ({"user_id": "u1", "k": top_n + 1}, f"less than or equal to {top_n}"),
            ({"user_id": "u1", "k": "3"}, "k:"),
            ({"user_id": "u1", "k": True}, "k:"),
            ({"user_id": 12}, "user_id:"),
            ({"user_id": ""}, "user_id:"),
            ({}, "user_id: Field required"),
            ({"user_id": "u1", "events": "abc"}, "events:"),
            ({"user_id": "u1", "events": ["nope-1", "nope-2"]}, "unknown item id"),
            ({"user_id": "u1", "events": ["x"] * (cfg.serving.max_events + 1)}, "events:"),
            ({"user_id": "u1", "model": "/etc/passwd"}, "model: unknown field"),
            ({"user_id": "u1", "model_dir": "models:/onerec@champion"}, "unknown field"),
            ({"user_id": "u1", "mode": "fast"}, "mode:"),
            ({"user_id": "u1", "mode": 1}, "mode:"),
            ([1, 2], "JSON object"),
        ]
        for body, needle in cases:
            r = c.post("/recommend", json=body)
            assert r.status_code == 422, (body, r.status_code, r.text)
            text = json.dumps(r.json())
            assert needle in text, (body, text)
        r = c.post("/recommend", content=b'{"user_id": ', headers={"content-type": "application/json"})
        assert r.status_code == 422 and "not valid JSON" in r.text
        r = c.post("/recommend", content=b"x" * (cfg.serving.max_body_bytes + 1),
                   headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert c.get("/recommend").status_code == 405


def test_serve_cli_wires_a_pinned_model(served, monkeypatch):
    """``onerec-prod serve --model DIR --model-version 1 --port P`` builds the app uvicorn runs."""
    import uvicorn
    from fastapi.testclient import TestClient

    from onerec_prod import cli
    from onerec_prod.serving import cli_serve as serve_cli

    cfg, model_dir = served
    got = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: got.update(app=app, **kw))
    argv = ["serve", "--model", str(model_dir), "--model-version", "1", "--port", "18999"]
    assert serve_cli.main(cli.build_parser(argv).parse_args(argv), cfg) == 0
    assert (got["host"], got["port"]) == ("127.0.0.1", 18999)
    with TestClient(got["app"]) as c:
        assert wait_for(c, lambda h: h["model_version"] == "1")["prefixes_current"] is True
        assert c.post("/recommend", json={"user_id": "u0"}).json()["path"] == "prefix"


def test_not_ready_without_a_champion(served):
    from fastapi.testclient import TestClient

    from onerec_prod.serving.service import create_app

    cfg, _ = served
    with TestClient(create_app(cfg, champion_resolver=lambda: None)) as c:
        time.sleep(0.1)
        assert c.get("/healthz").status_code == 503
        r = c.post("/recommend", json={"user_id": "u1"})
        assert r.status_code == 503 and "no model" in r.json()["error"]
        m = scrape(c)
        assert value(m, "onerec_ready") == 0 and value(m, "onerec_model_age_seconds") is None


def perturbed_model_dir(src: Path, dst: Path, seed: int) -> Path:
    """A copy of the tiny model with different weights (every float tensor plus seeded noise)."""
    import torch
    from safetensors.torch import load_file, save_file

    make_model_dir(src, dst)
    gen = torch.Generator().manual_seed(seed)
    for f in dst.glob("*.safetensors"):
        tensors = load_file(str(f))
        for name, t in tensors.items():
            if t.is_floating_point():
                tensors[name] = (t.float() + 0.5 * torch.randn(t.shape, generator=gen)).to(t.dtype)
        save_file(tensors, str(f), metadata={"format": "pt"})
    return dst


def loaded_weights_hash(model) -> str:
    """sha256 over the tensors of a model in memory: what serving actually computes with."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode() + b"\0" + t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_follows_champion_without_downtime(tmp_path, tiny_model_dir, catalog, histories):
    """Real registry, two models with different weights: champion 1 -> 2 while requests run (the
    answers change), version 2's export is picked up, then a rollback 2 -> 1 in the running
    service restores version 1's exact weights (by tensor hash) and its exact answers."""
    import httpx

    from onerec_prod.model.io import load_model
    from onerec_prod.registry import registry
    from onerec_prod.serving.precompute import precompute
    from onerec_prod.serving.service import create_app

    cfg = load_cfg(tmp_path, "serving.reload_interval_s=0.2")
    m1 = make_model_dir(tiny_model_dir, tmp_path / "cand1")
    m2 = perturbed_model_dir(tiny_model_dir, tmp_path / "cand2", seed=7)
    assert registry.weights_hash(m1) != registry.weights_hash(m2)
    v1 = registry.register(cfg, m1, "2014-01-04", {"sid_version": SID_VERSION})
    v2 = registry.register(cfg, m2, DT, {"sid_version": SID_VERSION})
    assert v1 != v2
    registry.promote(cfg, v1, force=True, reason="test")
    ver, d1 = registry.champion(cfg)
    precompute(cfg, DT, d1, ver, histories=histories, catalog=catalog, write_table=False)
    fresh = {"user_id": "u1", "events": [catalog[3]["item_id"], catalog[5]["item_id"]]}

    def answer(c) -> tuple[str, list]:
        body = c.post("/recommend", json=fresh).json()
        return body["model_version"], [(it["item_id"], it["score"]) for it in body["items"]]

    app = create_app(cfg)  # the default: follow models:/onerec@champion
    with http_server(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        wait_for(c, lambda h: h["model_version"] == v1 and h["prefixes_current"])
        assert c.post("/recommend", json={"user_id": "u1"}).json()["path"] == "prefix"
        before = answer(c)
        assert before[0] == v1 and before[1]

        seen, errors, stop = [], [], threading.Event()

        def hammer():
            with httpx.Client(base_url=url, timeout=30) as hc:
                while not stop.is_set():
                    r = hc.post("/recommend", json={"user_id": "u2"})
                    (seen if r.status_code == 200 else errors).append(r.json().get("model_version", r.text))

        th = threading.Thread(target=hammer)
        th.start()
        try:
            time.sleep(0.3)
            registry.promote(cfg, v2, force=True, reason="test")
            wait_for(c, lambda h: h["model_version"] == v2)
            time.sleep(0.3)
        finally:
            stop.set()
            th.join(30)
        assert not errors, errors
        assert seen[0] == v1 and seen[-1] == v2 and set(seen) == {v1, v2}
        after = answer(c)
        assert after[0] == v2 and after[1] != before[1], "other weights, same answers: the swap is not proven"

        # no export for v2 yet: stale -> fallback; after its precompute: prefix path again
        assert c.post("/recommend", json={"user_id": "u1"}).json()["path"] == "fallback"
        precompute(cfg, DT, registry.champion(cfg)[1], v2, histories=histories, catalog=catalog,
                   write_table=False)
        wait_for(c, lambda h: h["model_version"] == v2 and h["prefixes_current"])
        body = c.post("/recommend", json={"user_id": "u1"}).json()
        assert body["path"] == "prefix" and body["model_version"] == v2
        assert value(scrape(c), "onerec_model_reloads_total") == 3

        # rollback 2 -> 1 while serving: the weights in memory are version 1's, tensor for tensor
        assert registry.rollback(cfg)["champion"] == v1
        wait_for(c, lambda h: h["model_version"] == v1 and h["prefixes_current"])
        served_model = app.state.watcher.state.backend.model
        assert loaded_weights_hash(served_model) == loaded_weights_hash(load_model(m1))
        assert loaded_weights_hash(served_model) != loaded_weights_hash(load_model(m2))
        assert answer(c) == before


# --------------------------------------------------------------------------------------
# trust no caller: auth, in-flight limit, deadline, docs off, cheap unknown-user answers


def test_bearer_token_from_a_file_and_docs_off(served, tmp_path):
    """auth=token: 401 without/with a wrong token (before the body is read), a rotated file
    takes effect without a restart, /healthz stays open, /openapi.json and /docs are off."""
    import httpx

    from onerec_prod.serving.service import create_app

    _, model_dir = served
    secret = tmp_path / "token"
    secret.write_text("first-token-0123456789\n")
    cfg = load_cfg(Path(served[0].paths.var_root), "serving.auth=token",
                   f"serving.token_file={secret}")
    app = create_app(cfg, champion_resolver=lambda: ("1", model_dir))
    with http_server(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        wait_for(c, lambda h: h["model_version"] == "1")  # /healthz: no token needed
        assert c.post("/recommend", json={"user_id": "u3"}).status_code == 401
        r = c.post("/recommend", json={"user_id": "u3"}, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        # refused before the body is read: an oversized body without a token is a 401, not a 413
        r = c.post("/recommend", content=b"x" * (cfg.serving.max_body_bytes + 10),
                   headers={"content-type": "application/json"})
        assert r.status_code == 401
        assert c.get("/metrics").status_code == 401
        good = {"Authorization": "Bearer first-token-0123456789"}
        assert c.post("/recommend", json={"user_id": "u3"}, headers=good).json()["path"] == "prefix"
        for path in ("/openapi.json", "/docs"):
            assert c.get(path, headers=good).status_code == 404
        secret.write_text("second-token-with-another-length\n")  # rotation of the mounted secret
        assert c.post("/recommend", json={"user_id": "u3"}, headers=good).status_code == 401
        new = {"Authorization": "Bearer second-token-with-another-length"}
        assert c.post("/recommend", json={"user_id": "u3"}, headers=new).status_code == 200
        assert value(scrape(c, headers=new), "onerec_unauthorized_total") == 5

    secret.write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        create_app(cfg, champion_resolver=lambda: ("1", model_dir))
    with pytest.raises(ValueError, match="token_file"):
        create_app(load_cfg(tmp_path, "serving.auth=token"), champion_resolver=lambda: ("1", model_dir))
    from fastapi.testclient import TestClient

    docs_cfg = load_cfg(tmp_path, "serving.openapi=true")
    with TestClient(create_app(docs_cfg, champion_resolver=lambda: ("1", model_dir))) as c:
        assert c.get("/openapi.json").status_code == 200


def test_auth_none_only_on_loopback_outside_the_cluster(tmp_path):
    from onerec_prod.config import ConfigError, load_config

    for bad in (["serving.host=0.0.0.0"], ["env=cluster"]):
        with pytest.raises(ConfigError, match="serving.auth"):
            load_cfg(tmp_path, *bad)
    cluster = load_config(REPO / "configs" / "cluster.yaml", environ={})
    assert cluster.serving.auth == "token" and cluster.serving.token_file
    for name in ("local.yaml", "demo.yaml", "test.yaml"):  # the local configs say so explicitly
        assert "auth: none" in (REPO / "configs" / name).read_text()


def test_in_flight_limit_deadline_and_cheap_unknown_users(tmp_path, served, catalog):
    """With the model busy (its lock held by the test, as a long generation would): unknown users
    are still answered (popular items, no generation); requests that need the model fill
    serving.max_in_flight, the next one is shed with 503 at once, the waiting ones get 504 at
    their deadline and are dropped, not computed, when the model frees up."""
    import httpx

    from onerec_prod.serving.service import create_app

    cfg0, model_dir = served
    cfg = load_cfg(Path(cfg0.paths.var_root), "serving.max_in_flight=2", "serving.request_timeout_s=1.5")
    app = create_app(cfg, champion_resolver=lambda: ("1", model_dir))
    fresh = {"user_id": "u3", "events": [catalog[7]["item_id"]]}
    with http_server(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        wait_for(c, lambda h: h["model_version"] == "1")
        state = app.state.watcher.state
        expected = [state.sid_to_item[sid] for sid, _ in state.popular]
        model_lock = state.backend._lock
        model_lock.acquire()
        try:
            r = c.post("/recommend", json={"user_id": "nobody-knows-me"})
            assert r.status_code == 200, r.text
            body = r.json()
            assert (body["path"], body["fallback_reason"]) == ("fallback", "unknown_user")
            assert [it["item_id"] for it in body["items"]] == expected[: cfg.serving.top_n]
            assert_catalog_items(body, catalog, cfg.serving.top_n)

            results: list[int] = []

            def blocked():
                with httpx.Client(base_url=url, timeout=30) as hc:
                    results.append(hc.post("/recommend", json=fresh).status_code)

            threads = [threading.Thread(target=blocked) for _ in range(2)]
            for th in threads:
                th.start()
            deadline = time.monotonic() + 30
            while app.state.in_flight.running < 2:
                assert time.monotonic() < deadline, "the two requests never became in flight"
                time.sleep(0.01)
            r = c.post("/recommend", json=fresh)
            assert r.status_code == 503 and "max_in_flight" in r.json()["error"] and r.headers["retry-after"]
            # unknown users take no slot: still answered while the model's slots are all taken
            assert c.post("/recommend", json={"user_id": "another-stranger"}).json()["path"] == "fallback"
            for th in threads:
                th.join(30)
            assert results == [504, 504]
        finally:
            model_lock.release()
        while app.state.in_flight.running:  # the dropped requests leave their slots
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = c.post("/recommend", json=fresh)
        assert r.status_code == 200 and r.json()["path"] == "fallback"
        m = scrape(c)
        assert value(m, "onerec_shed_total") == 1 and value(m, "onerec_deadline_exceeded_total") == 2
        assert value(m, "onerec_deadline_dropped_total") == 2  # never reached the model
        assert value(m, "onerec_http_responses_total", code="504") == 2
