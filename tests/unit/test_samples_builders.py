"""Sample builders on tiny fixtures: every task, the leak rule, stable ids, item sampling."""

from __future__ import annotations

import json

import pytest

from onerec_prod.config import SamplesCfg
from onerec_prod.samples import builders
from onerec_prod.samples.prompts import messages_from_json
from onerec_prod.samples.rationale import CategoryRationale
from onerec_prod.samples.stream import parse_stream
from onerec_prod.schemas import load_schema
from onerec_prod.sid.tokens import parse_sids, sid_to_text

DT = "2014-01-02"
V = "v1"


def _item(i, sid, cat, title=None, desc=None):
    return {"item_id": i, "title": title or f"Item {i}", "categories": f"Beauty > {cat}",
            "description": desc, "sid": sid}


@pytest.fixture
def items():
    return {it["item_id"]: it for it in [
        _item("a", (1, 1, 1, 0), "Nails", "Red Nail Polish"),
        _item("b", (1, 1, 2, 0), "Nails", "Top Coat"),
        _item("c", (2, 3, 1, 0), "Eyes", "Mascara Black"),
        _item("d", (1, 2, 1, 0), "Nails", "Nail File"),
        _item("e", (3, 1, 1, 0), "Hair", "Shampoo Mild", desc="A  mild\nshampoo."),
        _item("f", (2, 3, 2, 0), "Eyes", "Eyeliner Brown"),
    ]}


@pytest.fixture
def examples():
    # u1 buys c, a, b, d in that order; u2's first purchase has no history; u3 re-buys e.
    return [
        {"event_id": "e11", "user_id": "u1", "history": ["c"], "target_item_id": "a", "ts": 10, "dt": DT},
        {"event_id": "e12", "user_id": "u1", "history": ["c", "a"], "target_item_id": "b", "ts": 11, "dt": DT},
        {"event_id": "e13", "user_id": "u1", "history": ["c", "a", "b"], "target_item_id": "d", "ts": 12, "dt": DT},
        {"event_id": "e21", "user_id": "u2", "history": [], "target_item_id": "f", "ts": 10, "dt": DT},
        {"event_id": "e31", "user_id": "u3", "history": ["e", "f"], "target_item_id": "e", "ts": 5, "dt": DT},
    ]


def _cfg(**kw):
    return SamplesCfg(max_history=10, caption_items_per_day=3, general_lm_per_day=2, **kw)


def _day(examples, items, **kw):
    return builders.build_day_samples(examples, items, dt=DT, sid_version=V, samples_cfg=_cfg(), **kw)


def _prompt_text(s):
    return " ".join(m["content"] for m in messages_from_json(s["messages"]))


def test_every_task_is_built_with_the_schema_columns(examples, items):
    samples = _day(examples, items, new_item_ids=["f"])
    counts = {t: sum(s["task"] == t for s in samples) for t in builders.TASKS}
    # 4 examples with history (e21 skipped); persona: u1 and u3; 3 caption items; 2 general items;
    # sid_stream: u1 and u3 (u2's stream is a single first-ever item: no target with context)
    assert counts == {"persona": 2, "seqrec": 4, "caption": 3, "text2sid": 3, "general_lm": 2,
                      "sid_rec": 4, "sid_stream": 2, "reasoning": 4, "rl_prompt": 4}
    schema = load_schema("samples")
    for s in samples:
        assert list(s) == schema.column_names
        for col in schema.columns:
            assert col.nullable or s[col.name] is not None, (s["task"], col.name)
        assert s["dt"] == DT and s["sid_version"] == V
        messages_from_json(s["messages"])  # valid JSON messages
    assert len({s["sample_id"] for s in samples}) == len(samples)


def test_sid_rec_and_seqrec_show_sids_only_and_answer_the_target(examples, items):
    for build, task in ((builders.build_sid_rec_samples, "sid_rec"),
                        (builders.build_seqrec_samples, "seqrec")):
        rows = build(examples, items, dt=DT, sid_version=V, max_history=10)
        s = next(r for r in rows if r["source_event_id"] == "e13")
        assert s["task"] == task
        assert parse_sids(_prompt_text(s)) == [items["c"]["sid"], items["a"]["sid"], items["b"]["sid"]]
        assert "Red Nail Polish" not in _prompt_text(s)  # SIDs only
        assert s["response"].endswith(sid_to_text(items["d"]["sid"]))
        assert s["target_sid"] == [1, 2, 1, 0] and s["target_item_id"] == "d"


def test_max_history_keeps_the_most_recent_items(examples, items):
    rows = builders.build_sid_rec_samples(examples, items, dt=DT, sid_version=V, max_history=2)
    s = next(r for r in rows if r["source_event_id"] == "e13")
    assert parse_sids(_prompt_text(s)) == [items["a"]["sid"], items["b"]["sid"]]


def _assert_no_leak(samples, examples, items, max_history):
    by_event = {e["event_id"]: e for e in examples}
    for s in samples:
        if s["source_event_id"] is None:
            continue
        ex = by_event[s["source_event_id"]]
        shown = ex["history"][-max_history:]
        if s["task"] == "sid_stream":
            # the stream ends at its source event (the user's last of the day): nothing after it
            stream = (ex["history"] + [ex["target_item_id"]])[-(max_history + 1):]
            assert parse_stream(s["response"]) == [items[i]["sid"] for i in stream]
            assert s["messages"] == "[]"
            continue
        prompt = _prompt_text(s)
        # the prompt shows exactly the history before the event, in order: nothing else
        assert parse_sids(prompt) == [items[i]["sid"] for i in shown], s["task"]
        if ex["target_item_id"] not in shown:
            assert sid_to_text(items[ex["target_item_id"]]["sid"]) not in prompt, s["task"]
            assert items[ex["target_item_id"]]["title"] not in prompt, s["task"]


def test_no_target_leak_into_its_own_prompt(examples, items):
    samples = _day(examples, items)
    _assert_no_leak(samples, examples, items, 10)
    # rationales explain the label with history evidence, never the target's title
    # (unless the user bought the target before: then it is history evidence)
    repeats = {e["event_id"] for e in examples if e["target_item_id"] in e["history"]}
    for s in samples:
        if s["task"] == "reasoning" and s["source_event_id"] not in repeats:
            target = items[s["target_item_id"]]
            rationale = s["response"].split("</think>")[0]
            assert target["title"] not in rationale


def test_no_leak_on_beauty_sequences(beauty_items, tiny_sids):
    """Examples built from chronological sequences: history strictly before each event."""
    items = {it["item_id"]: dict(it, description=None, sid=tiny_sids[it["item_id"]]) for it in beauty_items}
    ids = sorted(items, key=int)
    examples = []
    for u in range(30):
        seq = [ids[(u * 7 + k * 13) % len(ids)] for k in range(2 + u % 6)]
        for k, target in enumerate(seq):
            examples.append({"event_id": f"u{u}-{k}", "user_id": f"u{u}", "history": seq[:k],
                             "target_item_id": target, "ts": k, "dt": DT})
    samples = _day(examples, items)
    _assert_no_leak(samples, examples, items, 10)
    assert sum(s["task"] == "persona" for s in samples) == 30


def test_repeat_purchase_is_kept_and_shown_only_from_history(examples, items):
    rows = builders.build_sid_rec_samples(examples, items, dt=DT, sid_version=V, max_history=10)
    s = next(r for r in rows if r["source_event_id"] == "e31")
    sid_e = items["e"]["sid"]
    assert parse_sids(_prompt_text(s)).count(sid_e) == 1  # the earlier purchase, not the target event
    assert builders.example_stats(examples) == {"examples": 5, "skipped_short_history": 1,
                                                "repeat_targets": 1}


def test_persona_uses_the_users_last_example_and_only_shown_items(examples, items):
    rows = builders.build_persona_samples(examples, items, dt=DT, sid_version=V, max_history=2)
    u1 = next(r for r in rows if r["user_id"] == "u1")
    assert u1["source_event_id"] == "e13" and u1["target_item_id"] is None
    # shown history: a, b (c = Eyes is older than max_history, so it is not an interest)
    assert u1["response"] == "The user is interested in Nails."
    assert 'Red Nail Polish' in _prompt_text(u1) and "<|sid_begin|>" in _prompt_text(u1)
    # tie on counts (2 Nails, 2 Eyes): the most recent category first
    assert builders.persona_interests([items[i] for i in ["c", "a", "b", "f"]]) == "Eyes and Nails"
    assert builders.persona_interests([items[i] for i in ["c", "a", "b", "d"]]) == "Nails and Eyes"


def test_reasoning_has_rationale_in_think_then_sid(examples, items):
    rows = builders.build_reasoning_samples(examples, items, dt=DT, sid_version=V, max_history=10,
                                            rationale_source=CategoryRationale())
    s = next(r for r in rows if r["source_event_id"] == "e13")
    # a and b are equally related to d (1 shared SID level + same leaf): the more recent b first
    assert s["response"] == (
        '<think>\nThe user recently bought "Top Coat" (Nails) and "Red Nail Polish" (Nails). '
        "These point to Nails, so the next item is likely in Nails.\n</think>\n\n"
        + sid_to_text((1, 2, 1, 0)))
    assert '"Mascara Black" (Eyes)' in _prompt_text(s)  # the full noisy history stays in the prompt


def test_rl_prompt_keeps_the_reference_sid(examples, items):
    rows = builders.build_rl_prompt_samples(examples, items, dt=DT, sid_version=V, max_history=10)
    s = next(r for r in rows if r["source_event_id"] == "e12")
    assert s["response"] == sid_to_text(items["b"]["sid"]) and s["target_sid"] == [1, 1, 2, 0]
    reasoning = builders.build_reasoning_samples(examples, items, dt=DT, sid_version=V, max_history=10)
    assert s["messages"] == next(r for r in reasoning if r["source_event_id"] == "e12")["messages"]


def test_caption_text2sid_general_lm(items):
    cap = builders.build_caption_samples([items["e"]], dt=DT, sid_version=V)[0]
    assert json.loads(cap["messages"])[-1]["content"] == f"Describe the item {sid_to_text(items['e']['sid'])}."
    assert cap["response"] == 'Title: "Shampoo Mild". Categories: Beauty > Hair. A mild shampoo.'
    t2s = builders.build_text2sid_samples([items["a"]], dt=DT, sid_version=V)[0]
    assert t2s["response"] == sid_to_text(items["a"]["sid"]) and "Red Nail Polish" in _prompt_text(t2s)
    glm = builders.build_general_lm_samples([items["a"]], dt=DT, sid_version=V)[0]
    assert glm["messages"] == "[]" and glm["response"] == "Red Nail Polish. Category: Beauty > Nails."


def test_caption_items_always_include_new_items_and_are_seeded_per_day(items):
    pick = builders.select_items(items, dt=DT, n=3, seed=13, purpose="caption", always=["f", "zz"])
    assert pick[0]["item_id"] == "f" and len(pick) == 3  # unknown "zz" ignored
    again = builders.select_items(dict(reversed(list(items.items()))), dt=DT, n=3, seed=13,
                                  purpose="caption", always=["f"])
    assert [i["item_id"] for i in again] == [i["item_id"] for i in pick]  # input order irrelevant
    many_new = builders.select_items(items, dt=DT, n=1, seed=13, purpose="caption", always=list(items))
    assert len(many_new) == len(items)  # every new item is captioned, even beyond n
    days = {tuple(i["item_id"] for i in builders.select_items(items, dt=f"2014-01-{d:02d}", n=2,
                                                              seed=13, purpose="caption"))
            for d in range(1, 8)}
    assert len(days) > 1  # a different sample each day


def test_sample_ids_are_stable_and_independent_of_the_rationale(examples, items):
    class Constant:
        name = "constant"

        def rationales(self, requests):
            return ["x"] * len(requests)

    a = _day(examples, items)
    b = _day(list(reversed(examples)), items, rationale_source=Constant())
    assert sorted(s["sample_id"] for s in a) == sorted(s["sample_id"] for s in b)
    assert a == _day(examples, items)  # same inputs, same rows, same order
    assert builders.sample_id("sid_rec", "e11") != builders.sample_id("reasoning", "e11")


def test_unknown_item_names_the_event(examples, items):
    del items["c"]
    with pytest.raises(KeyError, match="event e11: item 'c'"):
        builders.build_sid_rec_samples(examples, items, dt=DT, sid_version=V, max_history=10)


def test_the_task_registry_drives_the_day(examples, items, monkeypatch):
    assert builders.TASKS == tuple(builders.REGISTRY) and "rl_prompt" not in builders.SFT_TASKS
    assert {t.source for t in builders.REGISTRY.values()} == set(builders.SOURCES)

    def build_brand_samples(exs, its, *, dt, sid_version, max_history):  # a new per-example task
        return [builders._row("brand", builders.sample_id("brand", e["event_id"]), [], its[e["target_item_id"]]
                              ["title"], sid_version=sid_version, dt=dt) for e in exs]

    monkeypatch.setitem(builders.REGISTRY, "brand", builders.SampleTask("brand", "examples", build_brand_samples))
    day = _day(examples, items)
    assert sorted(s["response"] for s in day if s["task"] == "brand") == sorted(
        items[e["target_item_id"]]["title"] for e in examples)
    # the executor path's entry point builds it too, per batch of examples
    part = builders.build_source_samples("examples", examples[:2], items, dt=DT, sid_version=V, max_history=10)
    assert {s["task"] for s in part} == {"seqrec", "sid_rec", "reasoning", "rl_prompt", "brand"}
    with pytest.raises(ValueError, match="item selection"):
        builders.SampleTask("bad", "items", build_brand_samples)
