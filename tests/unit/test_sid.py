"""SID codebooks, incremental assignment, versioning and the quality report."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from onerec_prod.config import SidCfg
from onerec_prod.sid import embed as sid_embed
from onerec_prod.sid.codebook import (
    SidOverflowError,
    assign_collision_codes,
    assign_sids,
    encode_prefixes,
    fit_codebook,
    load_codebook_dir,
    save_codebook,
)
from onerec_prod.sid.report import sid_report
from onerec_prod.sid.service import (
    SidVersionError,
    check_versions,
    current_version,
    ensure_sids,
    load_codebook,
    refit,
    sid_root,
)

SMALL = SidCfg(levels=3, codebook_size=16, collision_size=16, kmeans_iters=10, embed_batch_size=64)


@pytest.fixture(scope="session")
def text_vectors(beauty_items) -> dict[str, np.ndarray]:
    """Real MiniLM embeddings of the 300 Beauty fixture items, keyed by embedded text (once per session)."""
    texts = [sid_embed.item_text(r) for r in beauty_items]
    emb = sid_embed.embed_texts(texts, SMALL)
    return dict(zip(texts, emb))


@pytest.fixture(scope="session")
def beauty_emb(beauty_items, text_vectors) -> np.ndarray:
    return np.stack([text_vectors[sid_embed.item_text(r)] for r in beauty_items])


@pytest.fixture
def cached_embed(monkeypatch, text_vectors):
    """Service embeddings come from the session cache (the real encoder, computed once)."""
    calls = []

    def fake(rows, sid_cfg):
        calls.append(len(rows))
        return np.stack([text_vectors[sid_embed.item_text(r)] for r in rows])

    monkeypatch.setattr(sid_embed, "embed_items", fake)
    return calls


def _rows(items, mapping=None, version=None):
    return [{**it, "description": None, "sid": list(mapping[it["item_id"]]) if mapping else None,
             "sid_version": version if mapping else None} for it in items]


# ---------------------------------------------------------------------------- embedding


def test_embedding_cache_embeds_each_text_once(tmp_path, beauty_items):
    """A text is embedded once per encoder; cached vectors are the encoder's; a torn shard is a miss."""
    cache = sid_embed.EmbeddingCache(tmp_path, "enc-a")
    a = sid_embed.embed_items_cached(beauty_items[:6], SMALL, cache)
    assert (cache.hits, cache.misses) == (0, 6)
    (cache.dir / "shard-0-torn.npz").write_bytes(b"not a zip")  # e.g. a foreign partial file
    b = sid_embed.embed_items_cached(beauty_items[2:7], SMALL, cache)
    assert (cache.hits, cache.misses) == (4, 7)  # only item 6 was computed
    np.testing.assert_array_equal(b[:4], a[2:6])
    np.testing.assert_allclose(b[4], sid_embed.embed_items(beauty_items[6:7], SMALL)[0], atol=1e-5)
    other = sid_embed.EmbeddingCache(tmp_path, "enc-b")  # another encoder shares nothing
    assert other.get([sid_embed.item_text(beauty_items[0])])[1] == [0]


def test_embedding_is_deterministic_and_normalised(beauty_items, text_vectors):
    texts = [sid_embed.item_text(r) for r in beauty_items[:12]]
    a = sid_embed.embed_texts(texts, SMALL)
    b = sid_embed.embed_texts(texts, SMALL)
    assert a.shape == (12, 384) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    # batch composition does not matter beyond float noise
    np.testing.assert_allclose(a, np.stack([text_vectors[t] for t in texts]), atol=1e-5)
    # similar items are closer than unrelated ones (two OPI nail polishes vs a paraffin bath)
    assert a[0] @ a[1] > a[0] @ a[4]


def test_item_text_uses_description_when_present():
    row = {"title": "Balm", "categories": "Beauty > Skin", "description": "Soft."}
    assert sid_embed.item_text(row) == "Balm. Categories: Beauty > Skin. Soft."
    assert sid_embed.item_text({"title": "Balm.", "categories": None}) == "Balm."


# ---------------------------------------------------------------------------- codebooks


def test_same_inputs_and_seed_give_same_codebooks(beauty_emb):
    a = fit_codebook(beauty_emb, SMALL)
    b = fit_codebook(beauty_emb.copy(), SMALL)
    assert a.version == b.version and a.version.startswith("v1-")
    for ca, cb in zip(a.centroids, b.centroids):
        np.testing.assert_array_equal(ca, cb)
    assert assign_sids(a, beauty_emb) == assign_sids(b, beauty_emb)
    other = fit_codebook(beauty_emb, SMALL.model_copy(update={"seed": SMALL.seed + 1}))
    assert other.version != a.version


def test_full_sids_are_distinct_and_collisions_ordered(beauty_emb):
    cb = fit_codebook(beauty_emb, SMALL)
    sids = assign_sids(cb, beauty_emb)
    assert len(set(sids)) == len(sids) == 300
    assert all(len(s) == 4 and all(0 <= c < 16 for c in s) for s in sids)
    # five identical items share a prefix and get collision codes 0..4
    dup = np.repeat(beauty_emb[:1], 5, axis=0)
    dsids = assign_sids(cb, dup)
    assert {s[:3] for s in dsids} == {sids[0][:3]}
    assert [s[3] for s in dsids] == [0, 1, 2, 3, 4]


def test_collision_overflow_raises_with_counts():
    prefixes = [(0,)] * 5 + [(1,)] * 3 + [(2,)]
    with pytest.raises(SidOverflowError) as ei:
        assign_collision_codes(prefixes, 2)
    assert ei.value.n_groups == 2 and ei.value.n_items == 4
    assert "2 prefix group(s)" in str(ei.value) and "4 item(s)" in str(ei.value)
    assert "prefix (0,) with 5 items" in str(ei.value)
    # occupied codes count too: one free code left under (7,), two new items
    with pytest.raises(SidOverflowError, match="1 item"):
        assign_collision_codes([(7,), (7,)], 3, occupied={(7,): [0, 2]})
    assert assign_collision_codes([(7,)], 3, occupied={(7,): [0, 2]}) == [1]


def test_overflow_through_assign_sids(beauty_emb):
    cb = fit_codebook(beauty_emb, SMALL.model_copy(update={"collision_size": 2}))
    dup = np.repeat(beauty_emb[:1], 3, axis=0)
    with pytest.raises(SidOverflowError, match="1 prefix group.*1 item"):
        assign_sids(cb, dup)


def test_codebook_artefact_roundtrip(beauty_emb, tmp_path):
    cb = fit_codebook(beauty_emb, SMALL, embed_model={"weights_sha256": "x"})
    d = save_codebook(cb, tmp_path)
    assert d == tmp_path / cb.version
    assert sorted(p.name for p in d.iterdir()) == ["centroids.safetensors", "manifest.json"]
    back = load_codebook_dir(d)
    assert back.version == cb.version and back.sizes == [16, 16, 16, 16]
    assert back.manifest["kmeans"]["seed"] == SMALL.seed and back.manifest["n_items"] == 300
    assert assign_sids(back, beauty_emb) == assign_sids(cb, beauty_emb)
    assert save_codebook(cb, tmp_path) == d  # idempotent
    (d / "manifest.json").write_text((d / "manifest.json").read_text().replace('"collision_size": 16',
                                                                                '"collision_size": 8'))
    with pytest.raises(ValueError, match="corrupt"):
        load_codebook_dir(d)


def test_fit_needs_enough_items(beauty_emb):
    with pytest.raises(ValueError, match="at least 16 items"):
        fit_codebook(beauty_emb[:10], SMALL)


# ---------------------------------------------------------------------------- service


def test_day2_assignment_leaves_day1_sids_unchanged(make_cfg, beauty_items, cached_embed):
    cfg = make_cfg()
    day1, day2 = beauty_items[:200], beauty_items[200:]
    assert current_version(cfg) is None
    m1, v1 = ensure_sids(cfg, _rows(day1))
    assert current_version(cfg) == v1 and len(m1) == 200 and len(set(m1.values())) == 200
    manifest = (Path(sid_root(cfg)) / v1 / "manifest.json").read_text()

    rows2 = _rows(day1, m1, v1) + _rows(day2)
    m2, v2 = ensure_sids(cfg, rows2)
    assert v2 == v1 and cached_embed[-1] == 100  # only new items were embedded
    assert {k: m2[k] for k in m1} == m1
    assert len(m2) == 300 and len(set(m2.values())) == 300
    assert (Path(sid_root(cfg)) / v1 / "manifest.json").read_text() == manifest  # codebook frozen
    # new items get the frozen codebook's nearest codes
    cb = load_codebook(cfg)
    emb2 = np.stack([sid_embed.embed_items([r], cfg.sid)[0] for r in _rows(day2)])
    codes, _ = encode_prefixes(cb, emb2)
    assert [m2[it["item_id"]][:3] for it in day2] == [tuple(map(int, c)) for c in codes]
    # a rerun in another row order gives the same answer
    m2b, _ = ensure_sids(cfg, list(reversed(rows2)))
    assert m2b == m2


def test_refit_new_version_and_mixing_rejected(make_cfg, beauty_items, cached_embed):
    cfg = make_cfg()
    m1, v1 = ensure_sids(cfg, _rows(beauty_items[:200]))
    all_rows = _rows(beauty_items[:200], m1, v1) + _rows(beauty_items[200:])
    m2, _ = ensure_sids(cfg, all_rows)
    all_rows = _rows(beauty_items, m2, v1)

    m3, v3 = refit(cfg, all_rows)
    assert v3 != v1 and current_version(cfg) == v3
    assert len(m3) == 300 and len(set(m3.values())) == 300
    assert (Path(sid_root(cfg)) / v1).is_dir()  # the old version stays for lineage
    with pytest.raises(SidVersionError) as ei:
        ensure_sids(cfg, all_rows)  # catalog still on v1
    assert v1 in str(ei.value) and v3 in str(ei.value) and "sid-fit" in str(ei.value)
    with pytest.raises(SidVersionError, match="full retrain"):
        check_versions(v3, v1, v3)
    with pytest.raises(SidVersionError, match=f"model={v1}"):
        check_versions(v3, v3, v1)
    assert check_versions(v3, v3, v3) == v3
    assert check_versions(v3, None, None) == v3
    assert check_versions(None, None, None) is None
    m4, v4 = ensure_sids(cfg, _rows(beauty_items, m3, v3))
    assert v4 == v3 and m4 == m3
    # refitting the same items again reproduces the same version
    assert refit(cfg, _rows(beauty_items, m3, v3)) == (m3, v3)


def test_ensure_sids_rejects_config_change_and_bad_rows(make_cfg, beauty_items, cached_embed):
    cfg = make_cfg()
    m1, v1 = ensure_sids(cfg, _rows(beauty_items[:100]))
    rows = _rows(beauty_items[:100], m1, v1) + _rows(beauty_items[100:101])
    other = make_cfg("sid.codebook_size=8")
    with pytest.raises(SidVersionError, match="sid.codebook_size=8 but codebook has 16"):
        ensure_sids(other, rows)
    with pytest.raises(ValueError, match="no sid_version"):
        ensure_sids(cfg, [{**rows[0], "sid_version": None}])
    dup = [dict(rows[0]), {**rows[1], "sid": rows[0]["sid"]}]
    with pytest.raises(ValueError, match="share sid"):
        ensure_sids(cfg, dup)
    with pytest.raises(ValueError, match="duplicate item_id"):
        ensure_sids(cfg, [rows[0], rows[0]])


def test_rows_with_sids_but_no_codebook_are_rejected(make_cfg, beauty_items, cached_embed):
    cfg = make_cfg()
    rows = _rows(beauty_items[:20], {it["item_id"]: (0, 0, 0, i) for i, it in enumerate(beauty_items[:20])},
                 "v1-000000000000")
    with pytest.raises(SidVersionError, match="v1-000000000000"):
        ensure_sids(cfg, rows)


# ---------------------------------------------------------------------------- report


def test_report_on_hand_made_sids():
    sids = [(0, 0, 0, 0), (0, 0, 0, 1), (0, 1, 0, 0), (1, 0, 0, 0), (1, 0, 0, 1), (1, 0, 0, 2)]
    r = sid_report(sids, sizes=[2, 2, 2, 4])
    assert r["n_items"] == 6 and r["levels"] == 3
    assert r["unique_sids"] == 6 and r["duplicate_sid_items"] == 0
    assert r["unique_prefixes"] == 3
    assert r["collision_rate"] == pytest.approx(5 / 6)
    assert r["max_collision_depth"] == 3 and r["mean_items_per_prefix"] == pytest.approx(2.0)
    assert r["max_items_per_first_code"] == 3 and r["mean_items_per_first_code"] == pytest.approx(3.0)
    assert [r[f"used_codes_l{i}"] for i in range(4)] == [2, 2, 1, 3]
    assert [r[f"utilisation_l{i}"] for i in range(4)] == [1.0, 1.0, 0.5, 0.75]
    assert r["balance_l0"] == pytest.approx(1.0)
    assert r["balance_l1"] == pytest.approx(0.6500224216483541)  # H(5/6, 1/6) / ln 2
    assert r["balance_l2"] == 0.0
    assert r["balance_l3"] == pytest.approx(0.7295739585136225)  # H(1/2, 1/3, 1/6) / ln 4
    assert math.isclose(r["balance_l3"] * math.log(4), 2 * math.log(2) / 3 + math.log(3) / 2)


def test_report_duplicates_empty_and_invalid():
    r = sid_report([(1, 0), (1, 0), (0, 1)], sizes=[2, 2])
    assert r["unique_sids"] == 2 and r["duplicate_sid_items"] == 1
    assert r["collision_rate"] == pytest.approx(2 / 3) and r["max_collision_depth"] == 2
    e = sid_report([], sizes=[4, 4])
    assert e["n_items"] == 0 and e["collision_rate"] == 0.0 and e["utilisation_l0"] == 0.0
    with pytest.raises(ValueError, match="outside 0..3"):
        sid_report([(4, 0)], sizes=[4, 4])
    with pytest.raises(ValueError, match="expected 2"):
        sid_report([(1, 0, 0)], sizes=[4, 4])


def test_letter_sids_report(beauty_dir):
    from onerec_prod.sid.report import letter_report, load_letter_sids

    sids = load_letter_sids(beauty_dir / "letter_sid" / "Beauty.index.json")
    assert len(sids) == 12101 and sids["0"] == (183, 70, 232, 6)
    r = letter_report(beauty_dir)
    assert r["n_items"] == 12101 and r["unique_sids"] == 12088 and r["duplicate_sid_items"] == 13
