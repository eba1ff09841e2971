"""Pure parts of Think-Ahead serving: export files, catalog selection, the request core, metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from onerec_prod.serving.precompute import (
    UserPrefixes,
    active_since,
    check_model_version,
    latest_export,
    list_exports,
    read_export,
    select_catalog,
    write_export,
)
from onerec_prod.serving.service import Metrics, ServingState, UnknownItems, recommend

ITEMS = [
    {"item_id": "a", "title": "A", "categories": "Beauty > Nails", "sid": (0, 1, 2)},
    {"item_id": "b", "title": "B", "categories": "Beauty", "sid": (0, 1, 3)},
    {"item_id": "c", "title": "C", "categories": None, "sid": (2, 0, 0)},
]
ROWS = [UserPrefixes("u1", ("a", "b"), None, (((0, 1), -0.5), ((2, 0), -1.5))),
        UserPrefixes("u2", ("c",), "likes nails", (((2, 0), -0.1),))]


def export(root: Path, version="3", dt="2014-01-02", rows=ROWS, sid_version="s1") -> Path:
    return write_export(root, model_version=version, dt=dt, sid_version=sid_version, rows=rows, items=ITEMS,
                        settings={"prefix_levels": 2, "think": False, "max_history": 10})


def test_active_window_and_version_names():
    assert active_since("2014-03-01", 1) == "2014-03-01"
    assert active_since("2014-03-01", 2) == "2014-02-28"
    assert active_since("2014-03-01", 0) is None
    assert check_model_version("12") == "12"
    for bad in ("../x", "", "a/b", "models:/onerec@champion"):
        with pytest.raises(ValueError, match="model_version"):
            check_model_version(bad)


def test_export_roundtrip_and_rerun_replaces(tmp_path):
    d = export(tmp_path)
    exp = read_export(d)
    assert exp.model_version == "3" and exp.sid_version == "s1"
    assert exp.users == {r.user_id: r for r in ROWS}
    assert [it["sid"] for it in exp.items] == [(0, 1, 2), (0, 1, 3), (2, 0, 0)]
    first = sorted(p.name for p in d.iterdir())
    assert export(tmp_path) == d and sorted(p.name for p in d.iterdir()) == first  # same content: same files
    export(tmp_path, rows=ROWS[:1])  # a rerun with other rows: new users file, old one removed
    assert set(read_export(d).users) == {"u1"}
    assert len([p for p in d.iterdir() if p.name.startswith("users-")]) == 1


def test_tampered_export_is_refused(tmp_path):
    d = export(tmp_path)
    users = next(d.glob("users-*.jsonl"))
    users.write_text(users.read_text().replace("u1", "u9"))
    with pytest.raises(ValueError, match="sha256"):
        read_export(d)
    (d / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="manifest"):
        read_export(d)


def test_latest_export_by_version_date_and_sid_version(tmp_path):
    assert latest_export(tmp_path / "missing") is None
    export(tmp_path, "3", "2014-01-02")
    export(tmp_path, "3", "2014-01-05")
    export(tmp_path, "4", "2014-01-04", sid_version="s2")
    (tmp_path / "5" / "dt=2014-01-09").mkdir(parents=True)  # no manifest: not committed
    assert latest_export(tmp_path, model_version="3")[1]["dt"] == "2014-01-05"
    assert latest_export(tmp_path, model_version="5") is None
    assert latest_export(tmp_path)[1]["dt"] == "2014-01-05"
    assert latest_export(tmp_path, sid_version="s2")[1]["model_version"] == "4"
    assert [m["dt"] for _, m in list_exports(tmp_path)] == ["2014-01-02", "2014-01-04", "2014-01-05"]


def test_select_catalog_keeps_the_models_sid_version():
    rows = [{"item_id": "x", "title": "X", "categories": None, "sid": [1, 2], "sid_version": "s1"},
            {"item_id": "y", "title": "Y", "categories": None, "sid": [1, 3], "sid_version": "s2"},
            {"item_id": "z", "title": "Z", "categories": None, "sid": None, "sid_version": None}]
    items, v = select_catalog(rows, "s2")
    assert v == "s2" and [(i["item_id"], i["sid"]) for i in items] == [("y", (1, 3))]
    assert select_catalog(rows[:1], None)[1] == "s1"  # a base model takes the only version
    with pytest.raises(ValueError, match="sid_version"):
        select_catalog(rows, None)


# --------------------------------------------------------------------------------------
# the request core with a fake backend and tokenizer


class FakeTok:
    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        return "|".join(m["content"] for m in messages)

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [len(text)]}

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(f"w{t}" for t in ids)


class FakeBackend:
    name = "fake"

    def __init__(self, complete_result, full_result):
        self.calls = []
        self.complete_result, self.full_result = complete_result, full_result

    def complete(self, prompts, prefixes, *, beam_size, deadline=None):
        self.calls.append(("complete", prefixes[0], beam_size))
        return [list(self.complete_result)]

    def full(self, prompts, *, beam_size, deadline=None):
        self.calls.append(("full", prompts[0], beam_size))
        return [list(self.full_result)]

    def generate(self, prompts, *, max_tokens, stop_token_ids, deadline=None):
        self.calls.append(("generate", prompts[0], max_tokens))
        return [[3, 4, *stop_token_ids[:1], 5][:max_tokens]]


def state(backend, current=True, popular=(), think_stops=()) -> ServingState:
    return ServingState(popular=popular, think_stops=think_stops, max_think_tokens=8,
        model_version="3", model_dir=Path("/m"), sid_version="s1", backend=backend, tokenizer=FakeTok(),
        items={it["item_id"]: it for it in ITEMS}, sid_to_item={it["sid"]: it["item_id"] for it in ITEMS},
        users={r.user_id: r for r in ROWS}, prefixes_current=current, think=False, max_items=10, export_id="e")


def test_request_paths_and_catalog_only():
    be = FakeBackend([((0, 1, 3), -1.0), ((9, 9, 9), -1.2), ((0, 1, 2), -2.0)], [((2, 0, 0), -0.7)])
    out = recommend(state(be), "u1", [], 5, 5)
    assert out["path"] == "prefix" and out["fallback_reason"] is None
    assert [i["item_id"] for i in out["items"]] == ["b", "a"]  # (9, 9, 9) is not a catalog SID: dropped
    assert be.calls[-1] == ("complete", list(ROWS[0].prefixes), 5)
    assert recommend(state(be), "u1", [], 1, 5)["items"] == [{"item_id": "b", "sid": [0, 1, 3], "score": -1.0}]
    u2 = recommend(state(be), "u2", [], 5, 5)
    assert u2["rationale"] == "likes nails"
    for user, events, st, reason in [("nobody", [], state(be), "unknown_user"), ("u1", ["c"], state(be), "fresh_events"),
                                     ("u1", [], state(be, current=False), "stale")]:
        out = recommend(st, user, events, 5, 5)
        assert (out["path"], out["fallback_reason"], out["rationale"]) == ("fallback", reason, None)
        assert [i["item_id"] for i in out["items"]] == ["c"] and be.calls[-1][0] == "full"
    with pytest.raises(UnknownItems, match="'zz'"):
        recommend(state(be), "u1", ["a", "zz"], 5, 5)


def test_think_mode_rationale_then_full_beam():
    """mode=think: one generate call (the rationale, cut at the stop id), then the full beam on a
    prompt holding it; the history is the stored one plus the events; unknown users without events
    get the popular items; the mode needs the stop ids (serving.online_reasoning)."""
    from onerec_prod.serving.precompute import rec_prompt_ids, think_open_ids
    from onerec_prod.serving.service import popular_items

    be = FakeBackend([((0, 1, 3), -1.0)], [((2, 0, 0), -0.7), ((0, 1, 2), -0.9)])
    st = state(be, think_stops=(99, 98))
    out = recommend(st, "u1", [], 5, 5, mode="think")
    assert (out["path"], out["fallback_reason"], out["rationale"]) == ("think", None, "w3 w4")
    assert [i["item_id"] for i in out["items"]] == ["c", "a"]
    assert [c[0] for c in be.calls] == ["generate", "full"] and be.calls[0][2] == 8
    hist = [it for it in ITEMS if it["item_id"] in ("a", "b")]  # u1's history
    assert be.calls[0][1] == think_open_ids(FakeTok(), hist, max_items=10)
    assert be.calls[1][1] == rec_prompt_ids(FakeTok(), hist, think=True, rationale="w3 w4", max_items=10)
    be.calls.clear()
    assert recommend(st, "nobody", ["c"], 1, 5, mode="think")["path"] == "think"  # events only: a history
    assert [c[0] for c in be.calls] == ["generate", "full"]
    pop = popular_items({r.user_id: r for r in ROWS}, {it["item_id"]: it for it in ITEMS}, 3)
    be.calls.clear()
    out = recommend(state(be, popular=pop, think_stops=(99,)), "nobody", [], 5, 5, mode="think")
    assert (out["path"], out["fallback_reason"]) == ("fallback", "unknown_user") and be.calls == []
    with pytest.raises(ValueError, match="online_reasoning"):
        recommend(state(be), "u1", [], 5, 5, mode="think")
    with pytest.raises(ValueError, match="valid modes"):
        recommend(st, "u1", [], 5, 5, mode="fast")
    assert recommend(st, "u1", [], 5, 5)["path"] == "prefix"  # auto: unchanged


def test_unknown_users_get_popular_items_without_generation():
    from onerec_prod.serving.service import popular_items

    items = {it["item_id"]: it for it in ITEMS}
    rows = {"x": UserPrefixes("x", ("c", "a", "c", "gone"), None, ()), "y": UserPrefixes("y", ("c", "b", "a"), None, ())}
    pop = popular_items(rows, items, 2)
    assert [sid for sid, _ in pop] == [(2, 0, 0), (0, 1, 2)]  # c: 3, a: 2, b: 1; 'gone' is not in the catalog
    assert pop[0][1] > pop[1][1] and all(score < 0 for _, score in pop)
    assert [sid for sid, _ in popular_items({}, items, 5)] == [(0, 1, 2), (0, 1, 3), (2, 0, 0)]  # id order

    be = FakeBackend([], [])
    out = recommend(state(be, popular=pop), "stranger", [], 5, 5)
    assert (out["path"], out["fallback_reason"]) == ("fallback", "unknown_user")
    assert [i["item_id"] for i in out["items"]] == ["c", "a"] and be.calls == []
    assert len(recommend(state(be, popular=pop), "stranger", [], 1, 5)["items"]) == 1


def test_deadline_drops_work_before_generation():
    import time

    from onerec_prod.serving.backends import DeadlineExceeded, check_deadline

    be = FakeBackend([((0, 1, 3), -1.0)], [((2, 0, 0), -0.7)])
    past = time.monotonic() - 1
    for user, events in (("u1", []), ("u1", ["c"]), ("nobody", [])):
        with pytest.raises(DeadlineExceeded):
            recommend(state(be), user, events, 5, 5, deadline=past)
    assert be.calls == []
    check_deadline(None)
    check_deadline(time.monotonic() + 60)
    assert recommend(state(be), "u1", [], 5, 5, deadline=time.monotonic() + 60)["path"] == "prefix"


def test_empty_completion_falls_back():
    be = FakeBackend([], [((0, 1, 2), -0.3)])
    out = recommend(state(be), "u1", [], 5, 5)
    assert out["path"] == "fallback" and out["fallback_reason"] == "no_prefix"
    assert [c[0] for c in be.calls] == ["complete", "full"]


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {(smp.name, tuple(sorted(smp.labels.items()))): smp.value
            for fam in text_string_to_metric_families(text) for smp in fam.samples}


def test_metrics_histogram_is_cumulative():
    m = Metrics()
    for s in (0.003, 0.02, 0.7):
        m.observe("prefix", None, s)
    m.observe("fallback", "stale", 20.0)
    m.status(200)
    got = _samples(m.render(None))

    def bucket(path, le):
        return got[("onerec_recommend_latency_seconds_bucket", (("le", le), ("path", path)))]

    assert [bucket("prefix", le) for le in ("0.005", "0.025", "0.5", "1.0", "+Inf")] == [1, 2, 2, 3, 3]
    assert (bucket("fallback", "10.0"), bucket("fallback", "+Inf")) == (0, 1)
    assert got[("onerec_recommend_latency_seconds_sum", (("path", "prefix"),))] == pytest.approx(0.723)
    assert got[("onerec_recommend_latency_seconds_count", (("path", "prefix"),))] == 3
    assert got[("onerec_fallback_total", (("reason", "stale"),))] == 1
    assert got[("onerec_http_responses_total", (("code", "200"),))] == 1
    assert got[("onerec_ready", ())] == 0 and ("onerec_model_age_seconds", ()) not in got


def test_metrics_model_gauges_and_separate_registries():
    """Model age and training day come from the state of the scrape; two services never share counts."""
    import dataclasses
    import time

    be = FakeBackend([], [])
    be.name = "fake"
    trained = time.time() - 3600.0
    st = dataclasses.replace(state(be), trained_at=trained, data_date="2014-03-07")
    a, b = Metrics(clock=lambda: trained + 3600.0), Metrics()
    a.count("shed")
    a.count("failed")
    got = _samples(a.render(st))
    assert got[("onerec_ready", ())] == 1
    # age = the scrape's clock - training time (a fixed clock: no wall time in the assertion)
    assert got[("onerec_model_age_seconds", ())] == pytest.approx(3600.0)
    assert got[("onerec_model_trained_timestamp_seconds", ())] == pytest.approx(trained)
    assert got[("onerec_model_data_date_seconds", ())] == 1394150400.0  # 2014-03-07T00:00:00Z
    info = [k for k in got if k[0] == "onerec_model_info"]
    assert info == [("onerec_model_info", (("backend", "fake"), ("data_date", "2014-03-07"), ("model_version", "3"),
                                           ("prefixes_current", "true"), ("sid_version", "s1")))]
    assert got[("onerec_shed_total", ())] == 1 and got[("onerec_request_failures_total", ())] == 1
    other = _samples(b.render(None))
    assert other[("onerec_shed_total", ())] == 0 and other[("onerec_request_failures_total", ())] == 0


def test_resolvers_pinned_following_and_once(monkeypatch, tmp_path):
    from onerec_prod.config import load_config
    from onerec_prod.registry import registry
    from onerec_prod.serving.service import default_resolver

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "test.yaml",
                      [f"paths.var_root={tmp_path}"], environ={})
    answers = iter(["1", "1", "2"])
    fetched = []
    monkeypatch.setattr(registry, "aliases", lambda c: {"champion": next(answers)})
    monkeypatch.setattr(registry, "version_dir", lambda c, v: fetched.append(v) or tmp_path / f"v{v}")
    follow = default_resolver(cfg, model_dir=None, model_version=None, follow_champion=True)
    assert [follow(), follow(), follow()] == [("1", tmp_path / "v1"), ("1", tmp_path / "v1"), ("2", tmp_path / "v2")]
    assert fetched == ["1", "2"]  # files fetched and hash-checked once per version change
    answers = iter(["5", "6"])
    once = default_resolver(cfg, model_dir=None, model_version=None, follow_champion=False)
    assert [once()[0], once()[0]] == ["5", "5"]
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "onerec_meta.json").write_text(json.dumps({"weights_sha256": "abc"}))
    pinned = default_resolver(cfg, model_dir=tmp_path / "m", model_version=None, follow_champion=True)
    version, path = pinned()
    assert version.startswith("local-") and path == tmp_path / "m" and pinned() == (version, path)
    assert default_resolver(cfg, model_dir=tmp_path / "m", model_version="9", follow_champion=True)()[0] == "9"
