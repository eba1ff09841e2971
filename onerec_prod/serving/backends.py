"""Generation backends of the service: complete SIDs under prefixes, or generate them in full.

A backend owns one model and the trie of the catalog it serves; prompts come from
:func:`onerec_prod.serving.precompute.rec_prompt_ids` (ending right before ``<|sid_begin|>``).

* ``complete(prompts, prefixes, beam_size=n)``: the Think-Ahead path. ``prefixes[i]`` are the
  precomputed ``(first k codes, log-prob)`` pairs of prompt ``i``; the remaining levels are filled
  under each prefix and scores add up, so results rank like a full search would.
* ``full(prompts, beam_size=n)``: full trie-constrained generation (the fallback).
* ``prefixes(prompts, levels=k, beam_size=n)``: the best prefixes of ``k`` levels (precompute).
* ``generate(prompts, max_tokens=m, stop_token_ids=s)``: greedy free generation, cut after the
  first stop id (rationales: the think precompute and the service's online reasoning mode).

All return, per prompt, up to ``n`` distinct SIDs (or prefixes) with summed full-vocabulary
log-probabilities, best first. ``serving.backend`` picks the engine:

* ``hf`` (:class:`HFBackend`, the CPU default): the model in this process, under
  :func:`onerec_prod.eval.beam.beam_search_sids` (the eval decoder);
* ``vllm`` (:class:`onerec_prod.serving.vllm_backend.VLLMBackend`): a vLLM engine server in its own
  process and environment (``.venv-vllm``), started by :func:`build_backend` for the model and
  stopped with the backend (``close()``); same scores, same results up to float noise.

Both take an optional ``deadline`` (``time.monotonic()`` value): it is checked once the call
holds the model, so a request that waited in the queue past its deadline is dropped
(:class:`DeadlineExceeded`) instead of computed for nobody.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from onerec_prod.serving.deadline import DeadlineExceeded, check_deadline  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

# transformers' from_pretrained is not safe to run in two threads at once (meta-device init is
# process-global): every model load of this process goes through this lock
LOAD_LOCK = threading.Lock()

Sid = tuple[int, ...]
Scored = tuple[Sid, float]
Ranked = list[Scored]


@runtime_checkable
class Backend(Protocol):
    """What the service needs from a generation engine."""

    name: str

    def complete(
        self, prompts: Sequence[Sequence[int]], prefixes: Sequence[Sequence[Scored]], *, beam_size: int,
        deadline: float | None = None,
    ) -> list[Ranked]:
        """Complete every prefix of prompt ``i`` to full catalog SIDs; best ``beam_size`` per prompt."""
        ...

    def full(self, prompts: Sequence[Sequence[int]], *, beam_size: int,
             deadline: float | None = None) -> list[Ranked]:
        """Full constrained generation; best ``beam_size`` catalog SIDs per prompt."""
        ...

    def prefixes(self, prompts: Sequence[Sequence[int]], *, levels: int, beam_size: int) -> list[Ranked]:
        """Best ``beam_size`` prefixes of ``levels`` SID levels per prompt."""
        ...

    def generate(self, prompts: Sequence[Sequence[int]], *, max_tokens: int, stop_token_ids: Sequence[int],
                 deadline: float | None = None) -> list[list[int]]:
        """Greedy generation per prompt: the new ids, up to and including the first stop id."""
        ...

    def close(self) -> None:
        """Release the engine (a no-op for in-process models)."""
        ...


class HFBackend:
    """Hugging Face model on CPU (or one GPU); calls are serialised by a lock (one model, one stream)."""

    name = "hf"

    def __init__(self, model, trie, vocab, *, batch_size: int = 16) -> None:
        self.model = model
        self.trie = trie
        self.vocab = vocab
        self.batch_size = batch_size
        self._lock = threading.Lock()

    @classmethod
    def from_dir(cls, model_dir: str | Path, trie, vocab, *, device: str = "cpu", batch_size: int = 16) -> HFBackend:
        from onerec_prod.model.io import load_model

        with LOAD_LOCK:
            model = load_model(model_dir, device=device)
        return cls(model, trie, vocab, batch_size=batch_size)

    def complete(
        self, prompts: Sequence[Sequence[int]], prefixes: Sequence[Sequence[Scored]], *, beam_size: int,
        deadline: float | None = None,
    ) -> list[Ranked]:
        from onerec_prod.eval.beam import beam_search_sids

        if len(prompts) != len(prefixes):
            raise ValueError(f"complete: {len(prompts)} prompts but {len(prefixes)} prefix lists")
        with self._lock:
            check_deadline(deadline)
            return beam_search_sids(self.model, [list(p) for p in prompts], self.trie, self.vocab, beam_size,
                                    start_prefixes=[list(p) for p in prefixes], batch_size=self.batch_size)

    def full(self, prompts: Sequence[Sequence[int]], *, beam_size: int,
             deadline: float | None = None) -> list[Ranked]:
        from onerec_prod.eval.beam import beam_search_sids

        with self._lock:
            check_deadline(deadline)
            return beam_search_sids(self.model, [list(p) for p in prompts], self.trie, self.vocab, beam_size,
                                    batch_size=self.batch_size)

    def prefixes(self, prompts: Sequence[Sequence[int]], *, levels: int, beam_size: int) -> list[Ranked]:
        from onerec_prod.eval.beam import beam_search_sids

        with self._lock:
            return beam_search_sids(self.model, [list(p) for p in prompts], self.trie, self.vocab, beam_size,
                                    levels=levels, batch_size=self.batch_size)

    def generate(self, prompts: Sequence[Sequence[int]], *, max_tokens: int, stop_token_ids: Sequence[int],
                 deadline: float | None = None) -> list[list[int]]:
        from onerec_prod.eval.beam import generate_ids

        with self._lock:
            check_deadline(deadline)
            return generate_ids(self.model, [list(p) for p in prompts], max_tokens, stop_token_ids,
                                batch_size=self.batch_size)

    def close(self) -> None:
        pass


def build_backend(kind: str, model_dir: str | Path, trie, vocab, *, device: str = "cpu", vllm=None,
                  label: str = "", batch_size: int = 16) -> Backend:
    """The backend named by ``serving.backend`` (``hf`` or ``vllm``) for ``model_dir``.

    ``vllm`` is the ``serving.vllm`` config group (engine server settings; default: its defaults).
    """
    if kind == "hf":
        return HFBackend.from_dir(model_dir, trie, vocab, device=device, batch_size=batch_size)
    if kind == "vllm":
        from onerec_prod.config import VllmCfg
        from onerec_prod.serving.vllm_backend import VLLMBackend

        return VLLMBackend.start(model_dir, trie, vocab, vllm or VllmCfg(), label=label)
    raise ValueError(f"serving.backend={kind!r}: valid backends are 'hf', 'vllm'")
