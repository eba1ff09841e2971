"""vLLM backend (GPU extra): trie-constrained SID beam search as its own step loop on vLLM.

vLLM's built-in beam search knows nothing of a trie, so this module runs the beam itself, one SID
level per step: every live beam becomes one vLLM request ``prompt + <|sid_begin|> + codes so far``
that generates ONE token with ``allowed_token_ids`` = the trie children of the beam's prefix and
asks for the log-probs of all of them (``logprobs = len(allowed)``). vLLM's prefix cache makes the
shared prompt cost one prefill; each later step is a one-token decode per beam. The loop
(:func:`constrained_beam_search`) is pure: it takes a ``step`` function, so it is tested on CPU
with a fake engine, and only :meth:`VLLMBackend._step` touches vLLM.

Scores. The engine is started with ``logprobs_mode="processed_logprobs"``: log-probs are taken
after the ``allowed_token_ids`` mask, i.e. renormalised over the trie children of each prefix.
The Hugging Face decoder (:mod:`onerec_prod.eval.beam`) reads full-vocabulary log-probs instead,
so the two backends rank the same within a parent but may order beams of different parents
differently; both give catalog SIDs only. (vLLM only reports the top-N raw log-probs over the
whole vocabulary, so exact full-vocabulary scores for every child are not available cheaply.)

Status: written against vLLM's offline ``LLM.generate`` API; it was NOT run on a GPU here (vLLM is
not installed in the CPU venv and cannot be carried to the lent GPU machine). The pure parts
(trie mask, request building, beam expansion, output parsing) are unit-tested on CPU.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Sid = tuple[int, ...]
Scored = tuple[Sid, float]
Ranked = list[Scored]


@dataclass(frozen=True)
class StepRequest:
    """One beam of one prompt, asking for the scores of its allowed next tokens."""

    prompt_index: int
    codes: Sid  # codes chosen so far (the beam's prefix)
    score: float  # the beam's summed log-prob so far
    token_ids: tuple[int, ...]  # prompt + <|sid_begin|> + tokens of ``codes``
    allowed: tuple[int, ...]  # token ids of the trie children at level len(codes)


Step = Callable[[Sequence[StepRequest]], list[Mapping[int, float]]]


def allowed_token_ids(trie, vocab, prefix: Sequence[int]) -> list[int]:
    """Token ids that may follow ``prefix``: the level-``len(prefix)`` tokens of its trie children."""
    level = len(prefix)
    if level >= vocab.num_levels:
        return []
    return [vocab.level_ids[level][c] for c in trie.allowed(prefix)]


def build_step_requests(
    prompts: Sequence[Sequence[int]], beams: Sequence[Sequence[Scored]], trie, vocab
) -> list[StepRequest]:
    """One request per live beam (beams with no allowed child are dropped)."""
    out = []
    for i, (prompt, per_prompt) in enumerate(zip(prompts, beams, strict=True)):
        for codes, score in per_prompt:
            allowed = allowed_token_ids(trie, vocab, codes)
            if not allowed or not math.isfinite(score):
                continue
            toks = tuple(prompt) + (vocab.begin_id,) + tuple(vocab.level_ids[l][c] for l, c in enumerate(codes))
            out.append(StepRequest(i, tuple(codes), float(score), toks, tuple(allowed)))
    return out


def expand_beams(
    requests: Sequence[StepRequest], logprobs: Sequence[Mapping[int, float]], n_prompts: int, vocab,
    beam_size: int,
) -> list[list[Scored]]:
    """Best ``beam_size`` one-level extensions per prompt (ties: lower codes first)."""
    if len(logprobs) != len(requests):
        raise ValueError(f"step returned {len(logprobs)} results for {len(requests)} requests")
    cands: list[list[Scored]] = [[] for _ in range(n_prompts)]
    for req, lp in zip(requests, logprobs, strict=True):
        level = len(req.codes)
        for tok in req.allowed:
            v = lp.get(tok)
            if v is None or not math.isfinite(v):
                continue
            code = vocab.code_of(level, tok)
            cands[req.prompt_index].append((req.codes + (code,), req.score + float(v)))
    return [sorted(c, key=lambda cs: (-cs[1], cs[0]))[:beam_size] for c in cands]


def start_beams(trie, prefixes: Sequence[Scored]) -> list[Scored]:
    """Distinct start prefixes present in the trie (max score kept), as initial beams."""
    best: dict[Sid, float] = {}
    for codes, score in prefixes:
        codes = tuple(int(c) for c in codes)
        if trie.node_of(codes) < 0:
            log.warning("vllm beam: dropping start prefix %s (not in the trie)", codes)
            continue
        best[codes] = max(float(score), best.get(codes, float("-inf")))
    return list(best.items())


def constrained_beam_search(
    prompts: Sequence[Sequence[int]],
    trie,
    vocab,
    beam_size: int,
    step: Step,
    *,
    levels: int | None = None,
    start_prefixes: Sequence[Sequence[Scored]] | None = None,
) -> list[Ranked]:
    """Level-by-level constrained beam search driven by ``step`` (same contract as ``beam_search_sids``)."""
    stop = trie.num_levels if levels is None else int(levels)
    if not 1 <= stop <= trie.num_levels:
        raise ValueError(f"levels={levels} must be in 1..{trie.num_levels}")
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if start_prefixes is None:
        beams: list[list[Scored]] = [[((), 0.0)] for _ in prompts]
    else:
        if len(start_prefixes) != len(prompts):
            raise ValueError(f"start_prefixes: {len(start_prefixes)} lists for {len(prompts)} prompts")
        beams = [start_beams(trie, p) for p in start_prefixes]
    depth = {len(c) for per in beams for c, _ in per}
    if len(depth) > 1:
        raise ValueError(f"start_prefixes: every prefix must have the same length, got {sorted(depth)}")
    for _ in range(depth.pop() if depth else 0, stop):
        reqs = build_step_requests(prompts, beams, trie, vocab)
        if not reqs:
            break
        beams = expand_beams(reqs, step(reqs), len(prompts), vocab, beam_size)
    return [sorted(b, key=lambda cs: (-cs[1], cs[0]))[:beam_size] for b in beams]


def sampling_kwargs(req: StepRequest) -> dict[str, Any]:
    """``SamplingParams`` arguments of one step request: one token, restricted, all children scored."""
    return {"max_tokens": 1, "temperature": 1.0, "seed": 0, "logprobs": len(req.allowed),
            "allowed_token_ids": list(req.allowed), "detokenize": False}


def logprobs_of(output: Any, allowed: Sequence[int]) -> dict[int, float]:
    """Log-probs of the ``allowed`` tokens in a vLLM ``RequestOutput`` of one generated token."""
    per_token = output.outputs[0].logprobs or []
    if not per_token:
        return {}
    first = per_token[0]
    keep = set(allowed)
    return {int(t): float(getattr(lp, "logprob", lp)) for t, lp in first.items() if int(t) in keep}


class VLLMBackend:
    """:class:`onerec_prod.serving.backends.Backend` on a vLLM engine (GPU)."""

    name = "vllm"

    def __init__(self, model_dir: str | Path, trie, vocab, *, llm: Any = None,
                 gpu_memory_utilization: float = 0.5, dtype: str = "auto") -> None:
        self.trie = trie
        self.vocab = vocab
        if llm is None:
            from vllm import LLM  # GPU extra: imported only when this backend is chosen

            llm = LLM(model=str(model_dir), skip_tokenizer_init=True, enable_prefix_caching=True,
                      max_logprobs=max(trie.sizes), logprobs_mode="processed_logprobs",
                      gpu_memory_utilization=gpu_memory_utilization, dtype=dtype)
        self._llm = llm
        self._lock = threading.Lock()

    def _step(self, reqs: Sequence[StepRequest]) -> list[dict[int, float]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=list(r.token_ids)) for r in reqs]
        params = [SamplingParams(**sampling_kwargs(r)) for r in reqs]
        outs = self._llm.generate(prompts, params, use_tqdm=False)
        return [logprobs_of(o, r.allowed) for o, r in zip(outs, reqs, strict=True)]

    def complete(
        self, prompts: Sequence[Sequence[int]], prefixes: Sequence[Sequence[Scored]], *, beam_size: int,
        deadline: float | None = None,
    ) -> list[Ranked]:
        from onerec_prod.serving.backends import check_deadline

        with self._lock:
            check_deadline(deadline)
            return constrained_beam_search(prompts, self.trie, self.vocab, beam_size, self._step,
                                           start_prefixes=prefixes)

    def full(self, prompts: Sequence[Sequence[int]], *, beam_size: int,
             deadline: float | None = None) -> list[Ranked]:
        from onerec_prod.serving.backends import check_deadline

        with self._lock:
            check_deadline(deadline)
            return constrained_beam_search(prompts, self.trie, self.vocab, beam_size, self._step)
