"""Training samples of every OneRec-Think stage, as pure functions over plain inputs.

Inputs:
- ``items``: mapping ``item_id -> {item_id, title, categories, description, sid}`` (``sid`` a
  tuple of ints, every item of one ``sid_version``);
- ``examples``: day D's rows of the ``examples`` table, dicts ``{event_id, user_id, history,
  target_item_id, ts, dt}`` where ``history`` holds the item ids of the user's events strictly
  before the target event, oldest first (built upstream by ``build_sequences``).

Every builder returns rows of the ``samples`` table (``schemas/samples.yaml``) as dicts.

Leak rule. A prompt only ever shows ``history`` items: the target *event* never appears in its
own prompt. Repeat purchases are kept: if the user bought the target item before, that earlier
event is legitimately in the history (re-buying is real behaviour the model should learn, and
dropping them would bias the training set against it). Their number is reported
(``repeat_targets``). Examples with an empty history are skipped (nothing to condition on).

Tasks: ``REGISTRY`` (at the end of this module) maps each task name to a :class:`SampleTask`,
its builder and its source (``examples``, ``users`` or ``items``); ``TASKS`` is its key order.
Adding a task is one builder function plus one registry entry (docs/SAMPLES.md); both build
paths (the driver's :func:`build_day_samples` and the executor path of ``jobs/build_samples``)
run every registered task through :func:`build_source_samples`.

Tasks (``TASKS``):
- ``persona``: interleaved user persona grounding, one per user and day from the user's last
  example; the answer (top leaf categories) is computed only from the history shown.
- ``seqrec`` / ``sid_rec``: history SIDs -> target SID (alignment phrasing / recommendation).
- ``caption`` / ``text2sid``: SID -> item text and text -> SID over a seeded daily item sample
  that always contains the day's new items.
- ``general_lm``: plain catalog text (loss on all of it).
- ``sid_stream``: the recommendation task's main format (:mod:`onerec_prod.samples.stream`):
  one row per user and day holding the SID stream of the user's items through the day's last
  event, loss on the codes of the items new on the day (every item after the first on a
  bootstrap day).
- ``reasoning``: history with text -> rationale in think tags, then target SID.
- ``rl_prompt``: the reasoning prompt; the response is the reference SID (``target_sid`` codes).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from onerec_prod.samples.prompts import (
    leaf_category,
    messages_to_json,
    render_history,
    task_messages,
    task_response,
)
from onerec_prod.samples.rationale import CategoryRationale, RationaleRequest, RationaleSource
from onerec_prod.samples.templates import GENERAL_LM_ITEM
from onerec_prod.sid.tokens import sid_to_text

log = logging.getLogger(__name__)

ALIGNMENT_TASKS = ("persona", "seqrec", "caption", "text2sid", "general_lm")
PERSONA_TOP_CATEGORIES = 3
CAPTION_DESCRIPTION_CHARS = 400
MIN_HISTORY = 1

Item = dict[str, Any]
Sample = dict[str, Any]


# --------------------------------------------------------------------------------------
# keys and ranks


def sample_id(task: str, *keys: object) -> str:
    """Stable id of a sample: hash of the task and its source keys.

    >>> sample_id("sid_rec", "e1") == sample_id("sid_rec", "e1") != sample_id("seqrec", "e1")
    True
    """
    blob = "\x1f".join([task, *(str(k) for k in keys)])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def rank_key(seed: int, dt: str, purpose: str, key: str) -> str:
    """Seeded, per-day sort key; Spark computes the same with ``sha2(concat_ws('|', ...), 256)``."""
    return hashlib.sha256(f"{seed}|{dt}|{purpose}|{key}".encode()).hexdigest()


def _row(
    task: str, sid: str, messages: list[dict[str, str]], response: str, *, sid_version: str,
    dt: str, user_id: str | None = None, target: Item | None = None, event_id: str | None = None,
    loss_from: int | None = None,
) -> Sample:
    return {
        "sample_id": sid,
        "task": task,
        "messages": messages_to_json(messages),
        "response": response,
        "user_id": user_id,
        "target_item_id": target["item_id"] if target else None,
        "target_sid": [int(c) for c in target["sid"]] if target else None,
        "source_event_id": event_id,
        "sid_version": sid_version,
        "dt": dt,
        "loss_from": loss_from,
    }


# --------------------------------------------------------------------------------------
# per-example tasks


def resolve_example(
    example: Mapping[str, Any], items: Mapping[str, Item], max_history: int
) -> tuple[list[Item], Item]:
    """History items (the last ``max_history``, oldest first) and the target item.

    Raises:
        KeyError: an item of the example is not in ``items`` (names the event and the item).
    """
    def get(item_id: str) -> Item:
        try:
            return items[item_id]
        except KeyError:
            raise KeyError(
                f"event {example['event_id']}: item {item_id!r} not in the catalog (with a SID)"
            ) from None

    ids = list(example["history"] or [])
    tail = ids[-max_history:] if max_history > 0 else []
    return [get(i) for i in tail], get(example["target_item_id"])


def _usable(examples: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Examples with enough history, in a stable order (ts, event_id)."""
    out = [e for e in examples if len(e["history"] or []) >= MIN_HISTORY]
    return sorted(out, key=lambda e: (e["ts"], e["event_id"]))


def build_sid_rec_samples(
    examples: Iterable[Mapping[str, Any]], items: Mapping[str, Item], *, dt: str, sid_version: str,
    max_history: int, task: str = "sid_rec",
) -> list[Sample]:
    """History SIDs -> target SID (``task`` is ``sid_rec`` or the alignment ``seqrec``)."""
    if task not in ("sid_rec", "seqrec"):
        raise ValueError(f"task must be sid_rec or seqrec, got {task!r}")
    out = []
    for ex in _usable(examples):
        hist, target = resolve_example(ex, items, max_history)
        msgs = task_messages(task, history=render_history(hist, False, max_history))
        resp = task_response(task, sid=sid_to_text(target["sid"]))
        out.append(_row(task, sample_id(task, ex["event_id"]), msgs, resp, sid_version=sid_version,
                        dt=dt, user_id=ex["user_id"], target=target, event_id=ex["event_id"]))
    return out


def build_seqrec_samples(
    examples: Iterable[Mapping[str, Any]], items: Mapping[str, Item], *, dt: str, sid_version: str,
    max_history: int,
) -> list[Sample]:
    """Sequential preference modelling (itemic alignment): history SIDs -> next SID."""
    return build_sid_rec_samples(examples, items, dt=dt, sid_version=sid_version,
                                 max_history=max_history, task="seqrec")


def reasoning_requests(
    examples: Iterable[Mapping[str, Any]], items: Mapping[str, Item], max_history: int
) -> list[RationaleRequest]:
    """What the rationale source is asked for a batch of examples: one request per usable example
    (enough history), in :func:`build_reasoning_samples`' order."""
    return [RationaleRequest(tuple(h), t)
            for h, t in (resolve_example(ex, items, max_history) for ex in _usable(examples))]


def build_reasoning_samples(
    examples: Iterable[Mapping[str, Any]], items: Mapping[str, Item], *, dt: str, sid_version: str,
    max_history: int, rationale_source: RationaleSource | None = None,
) -> list[Sample]:
    """RA samples: history with text -> ``<think>rationale</think>`` then the target SID.

    The rationale source sees the same history as the prompt (pruned inside the source); all
    requests go to it in one call so a teacher model can batch.
    """
    source = rationale_source or CategoryRationale()
    usable = _usable(examples)
    requests = reasoning_requests(usable, items, max_history)
    rationales = source.rationales(requests)
    out = []
    for ex, req, rationale in zip(usable, requests, rationales, strict=True):
        hist, target = list(req.history), req.target
        msgs = task_messages("reasoning", history=render_history(hist, True, max_history))
        resp = task_response("reasoning", rationale=rationale, sid=sid_to_text(target["sid"]))
        out.append(_row("reasoning", sample_id("reasoning", ex["event_id"]), msgs, resp,
                        sid_version=sid_version, dt=dt, user_id=ex["user_id"], target=target,
                        event_id=ex["event_id"]))
    return out


def build_rl_prompt_samples(
    examples: Iterable[Mapping[str, Any]], items: Mapping[str, Item], *, dt: str, sid_version: str,
    max_history: int,
) -> list[Sample]:
    """RL prompts: the reasoning prompt; response = reference SID text, ``target_sid`` = codes."""
    out = []
    for ex in _usable(examples):
        hist, target = resolve_example(ex, items, max_history)
        msgs = task_messages("rl_prompt", history=render_history(hist, True, max_history))
        resp = task_response("rl_prompt", sid=sid_to_text(target["sid"]))
        out.append(_row("rl_prompt", sample_id("rl_prompt", ex["event_id"]), msgs, resp,
                        sid_version=sid_version, dt=dt, user_id=ex["user_id"], target=target,
                        event_id=ex["event_id"]))
    return out


def persona_interests(history: Sequence[Item], top: int = PERSONA_TOP_CATEGORIES) -> str:
    """Top leaf categories of ``history``: most frequent first, ties by most recent.

    >>> persona_interests([{"categories": "A > X"}, {"categories": "A > Y"}, {"categories": "A > X"}])
    'X and Y'
    """
    leaves = [leaf_category(it.get("categories")) for it in history]
    counts = Counter(leaves)
    last_pos = {leaf: pos for pos, leaf in enumerate(leaves)}
    ranked = sorted(counts, key=lambda c: (-counts[c], -last_pos[c]))[:top]
    if len(ranked) <= 1:
        return "".join(ranked)
    return ", ".join(ranked[:-1]) + " and " + ranked[-1]


def build_persona_samples(
    examples: Iterable[Mapping[str, Any]], items: Mapping[str, Item], *, dt: str, sid_version: str,
    max_history: int,
) -> list[Sample]:
    """Interleaved persona grounding: one per user and day, from the user's last example.

    The prompt interleaves SIDs and text of the history before that event; the answer is
    derived from exactly those items, so nothing after the event (and not the event) is used.
    """
    last: dict[str, Mapping[str, Any]] = {}
    for ex in _usable(examples):  # sorted by (ts, event_id): the last one wins
        last[ex["user_id"]] = ex
    out = []
    for user_id in sorted(last):
        ex = last[user_id]
        hist, _ = resolve_example(ex, items, max_history)
        msgs = task_messages("persona", history=render_history(hist, True, max_history))
        resp = task_response("persona", interests=persona_interests(hist))
        out.append(_row("persona", sample_id("persona", user_id, dt), msgs, resp,
                        sid_version=sid_version, dt=dt, user_id=user_id, event_id=ex["event_id"]))
    return out


def last_examples_per_user(examples: Iterable[Mapping[str, Any]]) -> list[tuple[Mapping[str, Any], int]]:
    """``(last example, n_day)`` per user (sorted by user): the user's last example of the day by
    ``(ts, event_id)`` and how many examples the user has that day (its items new on the day).
    An example may carry ``n_day`` itself (the Spark path computes it with a window)."""
    last: dict[str, Mapping[str, Any]] = {}
    count: Counter = Counter()
    for ex in sorted(examples, key=lambda e: (e["ts"], e["event_id"])):
        last[ex["user_id"]] = ex
        count[ex["user_id"]] += 1
    return [(last[u], int(last[u].get("n_day") or count[u])) for u in sorted(last)]


def build_stream_samples(
    examples: Iterable[Mapping[str, Any]], items: Mapping[str, Item], *, dt: str, sid_version: str,
    max_history: int,
) -> list[Sample]:
    """One ``sid_stream`` row per user of the day: the SIDs of the last ``max_history + 1`` items
    through the user's last event of the day; the loss starts at the first item new on ``dt``
    (never before item 1: the first item has no context). Users whose stream has a single item
    (their first event ever) are skipped."""
    from onerec_prod.samples.stream import STREAM_TASK, stream_text

    out = []
    for ex, n_day in last_examples_per_user(examples):
        hist, target = resolve_example(ex, items, max_history)
        stream = (hist + [target])[-(max_history + 1):]
        if len(stream) < 2:
            continue
        loss_from = max(1, len(stream) - n_day)
        out.append(_row(STREAM_TASK, sample_id(STREAM_TASK, ex["user_id"], dt), [], stream_text(
            [it["sid"] for it in stream]), sid_version=sid_version, dt=dt, user_id=ex["user_id"],
            target=target, event_id=ex["event_id"], loss_from=loss_from))
    return out


# --------------------------------------------------------------------------------------
# item tasks


def select_items(
    items: Mapping[str, Item], *, dt: str, n: int, seed: int, purpose: str,
    always: Iterable[str] = (),
) -> list[Item]:
    """The ``always`` items (all of them, even beyond ``n``), then a seeded per-day sample
    of the others up to ``n`` in total, ordered by :func:`rank_key`."""
    must = sorted({i for i in always if i in items})
    must_set = set(must)
    rest = sorted((rank_key(seed, dt, purpose, i), i) for i in items if i not in must_set)
    picked = must + [i for _, i in rest[: max(n - len(must), 0)]]
    return [items[i] for i in picked]


def _title(item: Item) -> str:
    return " ".join((item.get("title") or "").replace('"', "'").split())


def _categories(item: Item) -> str:
    return item.get("categories") or "Uncategorized"


def _description(item: Item) -> str:
    desc = " ".join((item.get("description") or "").split())
    return " " + desc[:CAPTION_DESCRIPTION_CHARS] if desc else ""


def build_caption_samples(selected: Sequence[Item], *, dt: str, sid_version: str) -> list[Sample]:
    """Itemic dense captioning: SID -> title, categories and description."""
    out = []
    for it in selected:
        msgs = task_messages("caption", sid=sid_to_text(it["sid"]))
        resp = task_response("caption", title=_title(it), categories=_categories(it),
                             description=_description(it))
        out.append(_row("caption", sample_id("caption", it["item_id"], dt), msgs, resp,
                        sid_version=sid_version, dt=dt, target=it))
    return out


def build_text2sid_samples(selected: Sequence[Item], *, dt: str, sid_version: str) -> list[Sample]:
    """Text -> SID over the same items as captioning (both directions of the grounding)."""
    out = []
    for it in selected:
        msgs = task_messages("text2sid", title=_title(it), categories=_categories(it))
        resp = task_response("text2sid", sid=sid_to_text(it["sid"]))
        out.append(_row("text2sid", sample_id("text2sid", it["item_id"], dt), msgs, resp,
                        sid_version=sid_version, dt=dt, target=it))
    return out


def build_general_lm_samples(selected: Sequence[Item], *, dt: str, sid_version: str) -> list[Sample]:
    """Plain catalog text (no prompt; the loss covers all of it)."""
    out = []
    for it in selected:
        text = GENERAL_LM_ITEM.format(title=_title(it), categories=_categories(it),
                                      description=_description(it))
        out.append(_row("general_lm", sample_id("general_lm", it["item_id"], dt), [],
                        task_response("general_lm", text=text), sid_version=sid_version, dt=dt))
    return out


# --------------------------------------------------------------------------------------
# the task registry

Source = Literal["users", "examples", "items"]
SOURCES: tuple[Source, ...] = ("users", "examples", "items")  # build order of a day


@dataclass(frozen=True)
class SampleTask:
    """One sample task: its builder and what it is built from.

    ``source`` fixes the builder's signature and how the executor path splits the work:

    - ``examples``: ``build(examples, items, *, dt, sid_version, max_history)``, one row per
      usable example; any split of the examples gives the same rows (built per Arrow batch);
    - ``users``: same signature, rows per user of the day; needs all of a user's examples of the
      day together (the executor path hash-partitions the examples by ``user_id``);
    - ``items``: ``build(selected, *, dt, sid_version)`` over the day's item selection named by
      ``items`` (``caption``: the new items plus a seeded sample, ``samples.caption_items_per_day``;
      ``general_lm``: a seeded sample, ``samples.general_lm_per_day``).

    ``rationale``: the builder also takes ``rationale_source`` (it writes rationales).
    ``sft``: part of the SFT training mix (``rl_prompt`` is not: its response is a bare reference
    SID for the RL reward, not an SFT target).
    """

    name: str
    source: Source
    build: Callable[..., list[Sample]]
    items: Literal["caption", "general_lm"] | None = None
    rationale: bool = False
    sft: bool = True

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"task {self.name}: source must be one of {SOURCES}, got {self.source!r}")
        if (self.source == "items") != (self.items is not None):
            raise ValueError(f"task {self.name}: item tasks (and only they) name an item selection")


REGISTRY: dict[str, SampleTask] = {t.name: t for t in (
    SampleTask("persona", "users", build_persona_samples),
    SampleTask("seqrec", "examples", build_seqrec_samples),
    SampleTask("caption", "items", build_caption_samples, items="caption"),
    SampleTask("text2sid", "items", build_text2sid_samples, items="caption"),
    SampleTask("general_lm", "items", build_general_lm_samples, items="general_lm"),
    SampleTask("sid_rec", "examples", build_sid_rec_samples),
    SampleTask("sid_stream", "users", build_stream_samples),
    SampleTask("reasoning", "examples", build_reasoning_samples, rationale=True),
    SampleTask("rl_prompt", "examples", build_rl_prompt_samples, sft=False),
)}
TASKS = tuple(REGISTRY)
SFT_TASKS = tuple(n for n, t in REGISTRY.items() if t.sft)
EXAMPLE_TASKS = tuple(n for n, t in REGISTRY.items() if t.source == "examples")
USER_TASKS = tuple(n for n, t in REGISTRY.items() if t.source == "users")
ITEM_TASKS = tuple(n for n, t in REGISTRY.items() if t.source == "items")


def build_source_samples(
    source: Source, inputs, items: Mapping[str, Item] | None = None, *, dt: str, sid_version: str,
    max_history: int = 0, rationale_source: RationaleSource | None = None,
) -> list[Sample]:
    """Every registered task of ``source``, in registry order.

    ``inputs``: the examples (``users`` / ``examples``) or a mapping selection name -> selected
    items (``items``). Both build paths call this, so a registered task is built by both.
    """
    out: list[Sample] = []
    for task in REGISTRY.values():
        if task.source != source:
            continue
        if source == "items":
            out += task.build(inputs[task.items], dt=dt, sid_version=sid_version)
            continue
        kw = {"rationale_source": rationale_source} if task.rationale else {}
        out += task.build(inputs, items, dt=dt, sid_version=sid_version, max_history=max_history, **kw)
    return out


# --------------------------------------------------------------------------------------
# one day


def build_example_samples(
    examples: Sequence[Mapping[str, Any]], items: Mapping[str, Item], *, dt: str, sid_version: str,
    max_history: int, rationale_source: RationaleSource | None = None,
) -> list[Sample]:
    """The per-example tasks (``EXAMPLE_TASKS``); any split of the examples gives the same rows."""
    return build_source_samples("examples", examples, items, dt=dt, sid_version=sid_version,
                                max_history=max_history, rationale_source=rationale_source)


def build_user_samples(
    examples: Sequence[Mapping[str, Any]], items: Mapping[str, Item], *, dt: str, sid_version: str,
    max_history: int,
) -> list[Sample]:
    """The per-user tasks (``USER_TASKS``); needs every example of each user it sees."""
    return build_source_samples("users", examples, items, dt=dt, sid_version=sid_version,
                                max_history=max_history)


def build_item_samples(
    caption_items: Sequence[Item], general_items: Sequence[Item], *, dt: str, sid_version: str
) -> list[Sample]:
    """The item tasks (``ITEM_TASKS``) over the day's selected items."""
    return build_source_samples("items", {"caption": caption_items, "general_lm": general_items},
                                dt=dt, sid_version=sid_version)


def example_stats(examples: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Counts worth reporting: examples, those skipped for short history, repeat purchases."""
    short = sum(1 for e in examples if len(e["history"] or []) < MIN_HISTORY)
    repeats = sum(1 for e in examples if e["target_item_id"] in (e["history"] or []))
    return {"examples": len(examples), "skipped_short_history": short, "repeat_targets": repeats}


def build_day_samples(
    examples: Sequence[Mapping[str, Any]], items: Mapping[str, Item], *, dt: str,
    sid_version: str, samples_cfg, caption_items: Sequence[Item] | None = None,
    general_items: Sequence[Item] | None = None, new_item_ids: Iterable[str] = (),
    rationale_source: RationaleSource | None = None,
) -> list[Sample]:
    """All tasks of day ``dt``.

    ``caption_items`` / ``general_items`` are the pre-selected item samples (the Spark job
    selects them at scale); when None they are selected here from ``items`` with
    :func:`select_items` (``new_item_ids`` always captioned).
    """
    c = samples_cfg
    if caption_items is None:
        caption_items = select_items(items, dt=dt, n=c.caption_items_per_day, seed=c.seed,
                                     purpose="caption", always=new_item_ids)
    if general_items is None:
        general_items = select_items(items, dt=dt, n=c.general_lm_per_day, seed=c.seed,
                                     purpose="general_lm")
    hk = {"dt": dt, "sid_version": sid_version, "max_history": c.max_history}
    out: list[Sample] = build_user_samples(examples, items, **hk)
    out += build_example_samples(examples, items, rationale_source=rationale_source, **hk)
    out += build_item_samples(caption_items, general_items, dt=dt, sid_version=sid_version)
    ids = [s["sample_id"] for s in out]
    if len(set(ids)) != len(ids):
        dup = next(i for i, n in Counter(ids).items() if n > 1)
        raise ValueError(f"duplicate sample_id {dup} for dt={dt}: are event_ids unique?")
    log.info("built %d samples for dt=%s: %s", len(out), dt, dict(Counter(s["task"] for s in out)))
    return out
