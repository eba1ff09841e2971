"""Loss masks through a real tokenizer with a chat template: labels only on the response."""

from __future__ import annotations

import pytest

from onerec_prod.config import SamplesCfg
from onerec_prod.samples import builders
from onerec_prod.samples.prompts import IGNORE_INDEX, messages_from_json, render_training_ids

DT = "2014-01-02"


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="module")
def day_samples(beauty_items, tiny_sids):
    items = {it["item_id"]: dict(it, description=None, sid=tiny_sids[it["item_id"]])
             for it in beauty_items[:40]}
    ids = sorted(items, key=int)
    examples = [{"event_id": f"e{k}", "user_id": f"u{k % 4}", "history": ids[k:k + 3],
                 "target_item_id": ids[k + 3], "ts": k, "dt": DT} for k in range(8)]
    cfg = SamplesCfg(max_history=10, caption_items_per_day=2, general_lm_per_day=2)
    return builders.build_day_samples(examples, items, dt=DT, sid_version="v1", samples_cfg=cfg)


def test_labels_cover_exactly_the_response_and_end_of_turn(tok, day_samples):
    seen = set()
    for s in day_samples:
        msgs = messages_from_json(s["messages"])
        ids, labels = render_training_ids(tok, msgs, s["response"], max_length=4096)
        assert len(ids) == len(labels)
        first = next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
        # one contiguous labelled tail, equal to the input ids there
        assert all(lab == IGNORE_INDEX for lab in labels[:first])
        assert labels[first:] == ids[first:]
        tail = tok.decode(ids[first:], skip_special_tokens=False)
        end = "<|im_end|>\n" if msgs else tok.eos_token
        assert tail == s["response"] + end, s["task"]
        if msgs:
            prompt = tok.decode(ids[:first], skip_special_tokens=False)
            assert prompt.endswith("<|im_start|>assistant\n")
            assert s["response"] not in prompt
        else:  # general_lm: loss on all of it
            assert first == 0
        seen.add(s["task"])
    assert seen == set(builders.TASKS)


def test_sid_tokens_are_single_tokens_in_the_response(tok, day_samples):
    s = next(x for x in day_samples if x["task"] == "sid_rec")
    ids, labels = render_training_ids(tok, messages_from_json(s["messages"]), s["response"], 4096)
    sid_ids = [tok.convert_tokens_to_ids(t) for t in ("<|sid_begin|>", "<|sid_end|>")]
    labelled = [i for i in labels if i != IGNORE_INDEX]
    assert labelled.count(sid_ids[0]) == 1 and labelled.count(sid_ids[1]) == 1
