"""Every prompt template of every task, as data (one place; no strings scattered in code).

Placeholders use ``str.format`` names. ``{history}`` is the rendered history, ``{sid}`` a SID
string, ``{title}``/``{categories}``/``{description}`` item text, ``{rationale}`` a rationale.
The think block format follows Qwen3: ``<think>\\n...\\n</think>\\n\\n`` then the answer;
an empty rationale gives ``<think>\\n\\n</think>\\n\\n`` (non-think mode).
"""

from __future__ import annotations

THINK_OPEN = "<think>\n"
THINK_CLOSE = "\n</think>\n\n"
EMPTY_THINK = "<think>\n\n</think>\n\n"

SYSTEM_REC = (
    "You are a recommendation assistant. Items are written as semantic IDs between "
    "<|sid_begin|> and <|sid_end|>. Read the user's purchase history and recommend the next item."
)
SYSTEM_ITEM = "You are a recommendation assistant that knows every item by its semantic ID."

# Item renderings inside a history.
ITEM_SID_ONLY = "{sid}"
ITEM_WITH_TEXT = '{sid} "{title}" ({categories})'
HISTORY_SEPARATOR = "; "

TEMPLATES: dict[str, dict[str, str]] = {
    # --- itemic alignment ---
    "persona": {  # interleaved user persona grounding: SIDs interleaved with text
        "system": SYSTEM_ITEM,
        "user": "The user has purchased these items: {history}\nDescribe the user's interests.",
        "response": "The user is interested in {interests}.",
    },
    "seqrec": {  # sequential preference modelling: history SIDs -> next SID (no reasoning)
        "system": SYSTEM_REC,
        "user": "Purchase history: {history}\nPredict the next item.",
        "response": EMPTY_THINK + "{sid}",
    },
    "caption": {  # itemic dense captioning: SID -> text
        "system": SYSTEM_ITEM,
        "user": "Describe the item {sid}.",
        "response": 'Title: "{title}". Categories: {categories}.{description}',
    },
    "text2sid": {  # text -> SID
        "system": SYSTEM_ITEM,
        "user": 'Which item is "{title}" ({categories})?',
        "response": "{sid}",
    },
    "general_lm": {  # plain catalog text; loss on everything
        "system": "",
        "user": "",
        "response": "{text}",
    },
    # --- recommendation / reasoning ---
    "sid_rec": {
        "system": SYSTEM_REC,
        "user": "Purchase history: {history}\nRecommend the next item.",
        "response": EMPTY_THINK + "{sid}",
    },
    "reasoning": {
        "system": SYSTEM_REC,
        "user": "Purchase history: {history}\nThink about the user's preference, then recommend the next item.",
        "response": THINK_OPEN + "{rationale}" + THINK_CLOSE + "{sid}",
    },
    "rl_prompt": {  # same prompt as reasoning; the response is the reference SID for the reward
        "system": SYSTEM_REC,
        "user": "Purchase history: {history}\nThink about the user's preference, then recommend the next item.",
        "response": "{sid}",
    },
}

# Rationale phrasing of the deterministic `category` source.
RATIONALE_CATEGORY = (
    "The user recently bought {evidence}. These point to {category}, "
    "so the next item is likely in {category}."
)
RATIONALE_FALLBACK = "The user's history is broad; the next item is likely in {category}."
TEACHER_PROMPT = (
    "A shopper bought these related items: {evidence}. In one or two sentences, explain what "
    "they are likely to want next, in terms of category and product type. Do not name a product."
)

# --- added by the samples builders (issue 6) ---
# One evidence item inside a rationale or teacher prompt (short title, leaf category).
RATIONALE_EVIDENCE_ITEM = '"{title}" ({category})'
# Plain catalog text of the general_lm task (``{description}`` is "" or " " + text).
GENERAL_LM_ITEM = "{title}. Category: {categories}.{description}"
