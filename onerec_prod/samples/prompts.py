"""Rendering samples and prompts through the tokenizer's chat template.

The same functions build training rows (prompt + response, loss on the response only) and
inference prompts (eval, RL, serving), so training and serving can never drift apart.

Contract used across the project:
- a sample is ``(messages, response)``: ``messages`` a list of ``{"role", "content"}`` (system,
  user; empty for plain-text LM) and ``response`` the assistant text (think block + answer);
- :func:`render_training_ids` gives ``input_ids`` and ``labels`` (-100 on the prompt);
- :func:`inference_prompt_ids` gives the ids a model continues from: the chat prompt with the
  assistant header, then either an empty think block (``think=False``: the next token is
  ``<|sid_begin|>``) or an open ``<think>\\n`` (``think=True``: free rationale first).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from onerec_prod.samples.templates import (
    EMPTY_THINK,
    HISTORY_SEPARATOR,
    ITEM_SID_ONLY,
    ITEM_WITH_TEXT,
    TEMPLATES,
    THINK_CLOSE,
    THINK_OPEN,
)
from onerec_prod.sid.tokens import sid_to_text

IGNORE_INDEX = -100


def short_title(title: str | None, max_words: int = 8) -> str:
    """Title cut to ``max_words`` words (keeps prompts short on small models)."""
    words = (title or "").replace('"', "'").split()
    return " ".join(words[:max_words])


def leaf_category(categories: str | None) -> str:
    """Most specific category of a ``' > '`` path (``'Beauty > Makeup > Nails'`` -> ``'Nails'``)."""
    parts = [p.strip() for p in (categories or "").split(">") if p.strip()]
    return parts[-1] if parts else "Beauty"


def render_item(item: dict[str, Any], with_text: bool) -> str:
    """One history item: its SID, optionally followed by short title and leaf category."""
    sid = sid_to_text(item["sid"])
    if not with_text:
        return ITEM_SID_ONLY.format(sid=sid)
    return ITEM_WITH_TEXT.format(
        sid=sid, title=short_title(item.get("title")), categories=leaf_category(item.get("categories"))
    )


def render_history(items: Sequence[dict[str, Any]], with_text: bool, max_items: int) -> str:
    """The last ``max_items`` items, oldest first, joined by the history separator."""
    tail = list(items)[-max_items:] if max_items > 0 else []
    return HISTORY_SEPARATOR.join(render_item(it, with_text) for it in tail)


def task_messages(task: str, **fields: Any) -> list[dict[str, str]]:
    """Prompt messages of ``task`` filled with ``fields`` (system omitted when empty)."""
    try:
        tpl = TEMPLATES[task]
    except KeyError:
        raise KeyError(f"unknown task {task!r} (valid: {', '.join(TEMPLATES)})") from None
    msgs = []
    if tpl["system"]:
        msgs.append({"role": "system", "content": tpl["system"].format(**fields)})
    if tpl["user"]:
        msgs.append({"role": "user", "content": tpl["user"].format(**fields)})
    return msgs


def task_response(task: str, **fields: Any) -> str:
    return TEMPLATES[task]["response"].format(**fields)


def rec_messages(
    history: Sequence[dict[str, Any]], *, think: bool, with_text: bool = False, max_items: int = 50
) -> list[dict[str, str]]:
    """Prompt of next-item recommendation (``reasoning`` if think else ``sid_rec``)."""
    task = "reasoning" if think else "sid_rec"
    return task_messages(task, history=render_history(history, with_text or think, max_items))


def _chat_prompt_text(tokenizer, messages: list[dict[str, str]]) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _end_of_turn(tokenizer, messages: list[dict[str, str]]) -> str:
    """Text the chat template puts after an assistant message (e.g. ``<|im_end|>\\n``)."""
    probe = "\x00PROBE\x00"
    full = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": EMPTY_THINK + probe}], tokenize=False
    )
    idx = full.rfind(probe)
    return full[idx + len(probe) :] if idx >= 0 else (tokenizer.eos_token or "")


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def render_training_ids(
    tokenizer, messages: list[dict[str, str]], response: str, max_length: int
) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one sample; labels are -100 on every prompt token.

    The prompt is the chat template with the generation prompt; the response is followed by the
    template's end-of-turn text (or EOS for plain text) so the model learns to stop. When too
    long, the prompt is cut from the left (oldest history first); the response is never cut
    unless it alone exceeds ``max_length``.
    """
    prompt_ids = _encode(tokenizer, _chat_prompt_text(tokenizer, messages))
    tail = _end_of_turn(tokenizer, messages) if messages else (tokenizer.eos_token or "")
    resp_ids = _encode(tokenizer, response + tail)
    if len(resp_ids) >= max_length:
        resp_ids = resp_ids[:max_length]
        prompt_ids = []
    keep = max_length - len(resp_ids)
    if len(prompt_ids) > keep:
        prompt_ids = prompt_ids[len(prompt_ids) - keep :]
    return prompt_ids + resp_ids, [IGNORE_INDEX] * len(prompt_ids) + resp_ids


def inference_prompt_ids(
    tokenizer, messages: list[dict[str, str]], *, think: bool, rationale: str | None = None
) -> list[int]:
    """Ids a model continues from at inference.

    ``think=False``: prompt + empty think block (next: ``<|sid_begin|>``).
    ``think=True`` and no rationale: prompt + ``<think>\\n`` (the model writes the rationale).
    ``rationale`` given: prompt + the closed think block with it (next: ``<|sid_begin|>``).
    """
    text = _chat_prompt_text(tokenizer, messages)
    if rationale is not None:
        text += THINK_OPEN + rationale.strip() + THINK_CLOSE
    elif think:
        text += THINK_OPEN
    else:
        text += EMPTY_THINK
    return _encode(tokenizer, text)


def messages_to_json(messages: list[dict[str, str]]) -> str:
    return json.dumps(messages, ensure_ascii=False, separators=(",", ":"))


def messages_from_json(blob: str) -> list[dict[str, str]]:
    msgs = json.loads(blob) if blob else []
    if not isinstance(msgs, list) or any(
        not isinstance(m, dict) or set(m) != {"role", "content"} for m in msgs
    ):
        raise ValueError(f"messages must be a JSON list of {{role, content}} objects, got {blob[:80]!r}")
    return msgs
