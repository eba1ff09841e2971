"""The SID stream: label mask, train/inference prefix parity, windows, builders, and the LOO split."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from onerec_prod.config import SamplesCfg
from onerec_prod.samples import builders
from onerec_prod.samples.stream import (
    IGNORE_INDEX,
    STREAM_TASK,
    parse_stream,
    stream_ids,
    stream_labels,
    stream_prompt_ids,
    stream_text,
    stream_training_ids,
    stream_windows,
)
from onerec_prod.sid.tokens import SidVocab

DT = "2014-01-02"
SIZES = [16, 16, 16, 16]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="module")
def vocab(tok):
    return SidVocab.from_tokenizer(tok, SIZES)


def test_labels_only_on_codes_of_items_from_loss_from(vocab):
    sids = [(1, 2, 3, 4), (5, 6, 7, 8), (9, 10, 11, 12), (0, 1, 2, 3)]
    ids = stream_ids(vocab, sids)
    assert len(ids) == 4 * 5
    for loss_from in (1, 2, 3):
        labels = stream_labels(ids, vocab.begin_id, loss_from)
        labelled = [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX]
        # exactly the 4 code tokens of each item >= loss_from, never a <|sid_begin|>
        expected = [item * 5 + 1 + lvl for item in range(loss_from, 4) for lvl in range(4)]
        assert labelled == expected
        assert all(labels[i] == ids[i] and ids[i] != vocab.begin_id for i in labelled)
    with pytest.raises(ValueError, match="loss_from"):
        stream_labels(ids, vocab.begin_id, 0)


def test_training_and_inference_render_the_same_prefix(tok, vocab, tiny_sids):
    hist = [tiny_sids[i] for i in sorted(tiny_sids)[:7]]
    target = tiny_sids[sorted(tiny_sids)[7]]
    train_ids, labels = stream_training_ids(tok, stream_text(hist + [target]), loss_from=1)
    prompt = stream_prompt_ids(vocab, hist, max_items=50)
    # the training row is the inference prompt, then <|sid_begin|> and the target's codes
    assert train_ids[: len(prompt)] == prompt
    assert train_ids[len(prompt):] == vocab.encode(target)[:-1]
    assert labels[-4:] == vocab.encode(target)[1:-1]
    # the prompt keeps the last max_items items only
    assert stream_prompt_ids(vocab, hist, max_items=3) == stream_ids(vocab, hist[-3:])
    assert stream_prompt_ids(vocab, [], max_items=3) == []


def test_parse_round_trip_and_malformed():
    sids = [(3, 1, 4, 1), (5, 9, 2, 6)]
    assert parse_stream(stream_text(sids)) == sids
    for bad in ("<|sid_begin|><s_b_1>", "x<|sid_begin|><s_a_1>", "<|sid_begin|><s_a_1>junk"):
        with pytest.raises(ValueError):
            parse_stream(bad)


@pytest.mark.parametrize("n,max_items", [(1, 4), (2, 4), (5, 4), (6, 4), (9, 4), (50, 7), (120, 49)])
def test_windows_train_every_target_once_within_width(n, max_items):
    wins = stream_windows(n, max_items)
    trained = []
    for a, b, lf in wins:
        assert 0 <= a < b <= n and b - a <= max_items + 1 and lf >= 1
        trained += list(range(a + lf, b))
    assert trained == list(range(1, n))


def test_stream_builder_loss_starts_at_the_day_items(beauty_items, tiny_sids):
    items = {it["item_id"]: dict(it, description=None, sid=tiny_sids[it["item_id"]]) for it in beauty_items[:30]}
    ids = sorted(items, key=int)
    # user a: 3 events today after 4 older items; user b: first event ever (no context: no row)
    examples = [
        {"event_id": "a1", "user_id": "a", "history": ids[:4], "target_item_id": ids[4], "ts": 1},
        {"event_id": "a2", "user_id": "a", "history": ids[:5], "target_item_id": ids[5], "ts": 2},
        {"event_id": "a3", "user_id": "a", "history": ids[:6], "target_item_id": ids[6], "ts": 3},
        {"event_id": "b1", "user_id": "b", "history": [], "target_item_id": ids[9], "ts": 1},
    ]
    rows = builders.build_stream_samples(examples, items, dt=DT, sid_version="v1", max_history=10)
    assert [r["user_id"] for r in rows] == ["a"]
    (row,) = rows
    assert row["task"] == STREAM_TASK and row["messages"] == "[]"
    assert parse_stream(row["response"]) == [items[i]["sid"] for i in ids[:7]]
    assert row["loss_from"] == 4  # items 4, 5, 6 are new on the day
    # history cap: the stream holds max_history + 1 items, the loss still on the day's 3
    (capped,) = builders.build_stream_samples(examples, items, dt=DT, sid_version="v1", max_history=4)
    assert parse_stream(capped["response"]) == [items[i]["sid"] for i in ids[2:7]]
    assert capped["loss_from"] == 2
    # the day builder includes it
    day = builders.build_day_samples(examples, items, dt=DT, sid_version="v1",
                                     samples_cfg=SamplesCfg(max_history=10, caption_items_per_day=1,
                                                            general_lm_per_day=1))
    assert sum(r["task"] == STREAM_TASK for r in day) == 1
    assert all("loss_from" in r for r in day)


def test_tokenize_rows_renders_stream_rows(tok, vocab, tiny_sids):
    from onerec_prod.train.data import tokenize_rows

    sids = [tiny_sids[i] for i in sorted(tiny_sids)[:12]]
    row = {"task": STREAM_TASK, "messages": "[]", "response": stream_text(sids), "loss_from": 9}
    (out,) = tokenize_rows([row], tok, max_length=4096)
    assert out["input_ids"] == stream_ids(vocab, sids)
    assert sum(lab != IGNORE_INDEX for lab in out["labels"]) == 3 * 4
    (cut,) = tokenize_rows([row], tok, max_length=22)  # 4 whole items of 5 tokens fit
    assert cut["input_ids"] == stream_ids(vocab, sids[-4:])
    assert sum(lab != IGNORE_INDEX for lab in cut["labels"]) == 3 * 4


def test_bench_split_keeps_the_validation_item_out_of_training():
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import quality  # noqa: PLC0415

    seqs = [("u1", ["a", "b", "c", "d", "e"]), ("u2", ["x", "y", "z"]), ("u3", ["p", "q"])]
    train, val, test = quality.split(seqs)
    assert train == [["a", "b", "c"], ["x"]]
    assert [(v["history"], v["target"]) for v in val] == [(["a", "b", "c"], "d"), (["x"], "y")]
    assert [(t["history"], t["target"]) for t in test] == [(["a", "b", "c", "d"], "e"), (["x", "y"], "z")]

    class _V:  # minimal SID vocab stand-in for row rendering (ids = codes + 10, begin = 0)
        begin_id, num_levels = 0, 1
        level_ids = (tuple(range(10, 40)),)

    sids = {k: (i,) for i, k in enumerate("abcdexyz")}
    rows = quality.stream_rows(train, sids, _V, max_items=50)
    trained_items = {tok - 10 for ids, _ in rows for tok in ids if tok != 0}
    # u1's training items only (u2's single training item has no next-item target: no row)
    assert trained_items == {sids[i][0] for i in "abc"}
    assert sids["d"][0] not in trained_items and sids["y"][0] not in trained_items
