"""The online Think-Ahead service (FastAPI): complete precomputed SID prefixes into items.

``POST /recommend`` ``{"user_id": str, "events": [item_id, ...] (optional), "k": int (optional)}``
returns ``{user_id, items: [{item_id, sid, score}], rationale, model_version, path, latency_ms}``:

* ``path="prefix"``: the user has a row in the export of the serving model version and sent no
  fresh events; the remaining SID levels are completed under each of the user's precomputed
  prefixes (scores = prefix log-prob + completion log-prob), and the stored rationale is returned;
* ``path="fallback"``: unknown user, fresh events (appended to the stored history), or a stale
  row (the export belongs to another model version): full constrained generation from the
  history, no rationale. Users with a row but no result under their prefixes also fall back.

Only catalog items are returned: the trie and the SID -> item map come from the catalog
snapshot of the export. Status codes: 422 for a malformed body, wrong types, ``k`` outside
``1..serving.top_n``, too many events or unknown item ids (the message names the field); 413
for a body over ``serving.max_body_bytes``; 503 until a model is loaded. Nothing in a request
selects a file, a model or a version.

Model following: a background thread resolves the champion every ``serving.reload_interval_s``
(``registry.champion``, or an injected resolver) and also watches the newest export of the
serving version. On a change it loads the new model, export and catalog into a new immutable
:class:`ServingState` and swaps one reference; a request reads the reference once, so in-flight
requests finish on the state they started with, and there is no downtime. A failed load is
logged and counted; the old state keeps serving and the next poll retries.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from onerec_prod.config import Config
from onerec_prod.serving.precompute import (
    UserPrefixes,
    export_id,
    export_root,
    history_items,
    latest_export,
    read_export,
    rec_prompt_ids,
)

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
Resolver = Callable[[], "tuple[str, Path | str] | None"]
Sid = tuple[int, ...]


class NotReady(RuntimeError):
    """The service cannot load a model (no champion, no export); it keeps polling."""


class UnknownItems(ValueError):
    """A request names item ids that are not in the serving catalog."""


# --------------------------------------------------------------------------------------
# state: one immutable snapshot of everything a request needs


@dataclass(frozen=True)
class ServingState:
    model_version: str
    model_dir: Path
    sid_version: str | None
    backend: Any  # onerec_prod.serving.backends.Backend
    tokenizer: Any
    items: dict[str, dict[str, Any]]  # item_id -> {item_id, title, categories, sid}
    sid_to_item: dict[Sid, str]
    users: dict[str, UserPrefixes]
    prefixes_current: bool  # export rows were computed by this model version
    think: bool
    max_items: int
    export_id: str
    loaded_at: float = field(default_factory=time.time)
    # fast tokenizers must not encode from two threads at once; prompt building is ~1 ms
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)


def find_export(cfg: Config, version: str, model_dir: Path) -> tuple[Path, dict, bool] | None:
    """``(dir, manifest, current)``: the version's newest export, else the newest one of its sid_version."""
    from onerec_prod.serving.precompute import model_sid_version

    root = export_root(cfg)
    found = latest_export(root, model_version=version)
    if found is not None:
        return found[0], found[1], True
    sid_version = model_sid_version(model_dir)
    found = latest_export(root, sid_version=sid_version) if sid_version else latest_export(root)
    return (found[0], found[1], False) if found is not None else None


def load_state(cfg: Config, version: str, model_dir: str | Path, *, previous: ServingState | None = None) -> ServingState:
    """Load model ``version`` from ``model_dir`` with its export and catalog (reuses ``previous``'s model)."""
    from onerec_prod.serving.backends import build_backend
    from onerec_prod.serving.precompute import model_sid_version
    from onerec_prod.sid.tokens import SidVocab, level_sizes
    from onerec_prod.sid.trie import SidTrie

    model_dir = Path(model_dir)
    found = find_export(cfg, version, model_dir)
    if found is None:
        raise NotReady(f"no think_ahead export under {export_root(cfg)} for model version {version}: "
                       "run `onerec-prod precompute --date D`")
    path, manifest, current = found
    exp = read_export(path)
    sid_version = model_sid_version(model_dir) or exp.sid_version
    if exp.sid_version != sid_version:
        raise ValueError(f"export {path} has sid_version {exp.sid_version} but model {version} uses "
                         f"{sid_version}: rerun `onerec-prod precompute` for this model")
    items = {it["item_id"]: it for it in exp.items}
    sid_to_item = {it["sid"]: it["item_id"] for it in exp.items}
    sizes = level_sizes(cfg.sid)
    trie = SidTrie.from_sids(list(sid_to_item), sizes)
    same_model = previous is not None and previous.model_version == version and previous.model_dir == model_dir
    if same_model and previous.items.keys() == items.keys() and previous.sid_to_item == sid_to_item:
        # only the prefixes changed: keep the model, the tokenizer and the tokenizer's lock
        tokenizer, backend, tok_lock = previous.tokenizer, previous.backend, previous.tokenizer_lock
    else:
        from onerec_prod.model.io import load_tokenizer
        from onerec_prod.serving.backends import LOAD_LOCK

        tok_lock = threading.Lock()
        with LOAD_LOCK:
            tokenizer = load_tokenizer(model_dir)
        vocab = SidVocab.from_tokenizer(tokenizer, sizes)
        backend = build_backend(cfg.serving.backend, model_dir, trie, vocab, device=cfg.serving.device,
                                vllm=cfg.serving.vllm, label=version)
    if not current:
        log.warning("no export for model version %s yet: serving every user through the fallback "
                    "(histories from %s, version %s)", version, path, exp.model_version)
    state = ServingState(
        model_version=version, model_dir=model_dir, sid_version=sid_version, backend=backend,
        tokenizer=tokenizer, items=items, sid_to_item=sid_to_item, users=exp.users,
        prefixes_current=current, think=bool(manifest.get("think", False)) and current,
        max_items=int(manifest.get("max_history", cfg.samples.max_history)),
        export_id=export_id(path, manifest), tokenizer_lock=tok_lock)
    log.info("loaded model version %s (%s): %d items, %d users, prefixes %s",
             version, model_dir, len(items), len(exp.users), "current" if current else "stale")
    return state


# --------------------------------------------------------------------------------------
# the request core (no HTTP)


def recommend(state: ServingState, user_id: str, events: Sequence[str], k: int, beam_size: int) -> dict[str, Any]:
    """Ranked catalog items for one request on ``state``; raises :class:`UnknownItems`."""
    unknown = [e for e in events if e not in state.items]
    if unknown:
        shown = ", ".join(repr(u) for u in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise UnknownItems(f"events: {len(unknown)} unknown item id(s): {shown} "
                           f"(not in the catalog of model version {state.model_version})")
    row = state.users.get(user_id)
    if events:
        reason = "fresh_events"
    elif row is None:
        reason = "unknown_user"
    elif not state.prefixes_current:
        reason = "stale"
    elif not row.prefixes:
        reason = "no_prefix"
    else:
        reason = None
    ranked: list[tuple[Sid, float]] = []
    rationale = None
    if reason is None:
        hist = history_items(row.history, state.items)
        with state.tokenizer_lock:
            prompt = rec_prompt_ids(state.tokenizer, hist, think=state.think, rationale=row.rationale,
                                    max_items=state.max_items)
        ranked = state.backend.complete([prompt], [list(row.prefixes)], beam_size=beam_size)[0]
        rationale = row.rationale
        if not ranked:
            reason = "no_prefix"
    if reason is not None:
        hist = history_items((row.history if row else ()) + tuple(events), state.items)
        with state.tokenizer_lock:
            prompt = rec_prompt_ids(state.tokenizer, hist, think=False, rationale=None, max_items=state.max_items)
        ranked = state.backend.full([prompt], beam_size=beam_size)[0]
        rationale = None
    items = [{"item_id": state.sid_to_item[sid], "sid": list(sid), "score": round(score, 6)}
             for sid, score in ranked if sid in state.sid_to_item][:k]
    return {"user_id": user_id, "items": items, "rationale": rationale, "model_version": state.model_version,
            "path": "prefix" if reason is None else "fallback", "fallback_reason": reason}


# --------------------------------------------------------------------------------------
# metrics (Prometheus text format, no extra dependency)


class Metrics:
    """Request counts, latency histograms per path, fallbacks by reason, reloads, HTTP codes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[str, int] = {"prefix": 0, "fallback": 0}
        self.fallbacks: dict[str, int] = {}
        self.buckets: dict[str, list[int]] = {p: [0] * len(LATENCY_BUCKETS) for p in self.requests}
        self.lat_sum: dict[str, float] = {p: 0.0 for p in self.requests}
        self.codes: dict[int, int] = {}
        self.reloads = 0
        self.reload_failures = 0

    def observe(self, path: str, reason: str | None, seconds: float) -> None:
        with self._lock:
            self.requests[path] += 1
            self.lat_sum[path] += seconds
            for i, le in enumerate(LATENCY_BUCKETS):
                if seconds <= le:
                    self.buckets[path][i] += 1
            if reason is not None:
                self.fallbacks[reason] = self.fallbacks.get(reason, 0) + 1

    def status(self, code: int) -> None:
        with self._lock:
            self.codes[code] = self.codes.get(code, 0) + 1

    def reloaded(self, ok: bool) -> None:
        with self._lock:
            if ok:
                self.reloads += 1
            else:
                self.reload_failures += 1

    def render(self, state: ServingState | None) -> str:
        with self._lock:
            L = ["# HELP onerec_recommend_requests_total Answered /recommend requests by path.",
                 "# TYPE onerec_recommend_requests_total counter"]
            L += [f'onerec_recommend_requests_total{{path="{p}"}} {n}' for p, n in self.requests.items()]
            L += ["# HELP onerec_fallback_total Requests served by full generation, by reason.",
                  "# TYPE onerec_fallback_total counter"]
            L += [f'onerec_fallback_total{{reason="{r}"}} {n}' for r, n in sorted(self.fallbacks.items())]
            L += ["# HELP onerec_recommend_latency_seconds Server-side /recommend latency.",
                  "# TYPE onerec_recommend_latency_seconds histogram"]
            for p in self.requests:
                L += [f'onerec_recommend_latency_seconds_bucket{{path="{p}",le="{le}"}} {n}'
                      for le, n in zip(LATENCY_BUCKETS, self.buckets[p], strict=True)]
                L += [f'onerec_recommend_latency_seconds_bucket{{path="{p}",le="+Inf"}} {self.requests[p]}',
                      f'onerec_recommend_latency_seconds_sum{{path="{p}"}} {self.lat_sum[p]:.6f}',
                      f'onerec_recommend_latency_seconds_count{{path="{p}"}} {self.requests[p]}']
            L += ["# HELP onerec_http_responses_total HTTP responses by status code.",
                  "# TYPE onerec_http_responses_total counter"]
            L += [f'onerec_http_responses_total{{code="{c}"}} {n}' for c, n in sorted(self.codes.items())]
            L += ["# HELP onerec_model_reloads_total Model/export swaps.", "# TYPE onerec_model_reloads_total counter",
                  f"onerec_model_reloads_total {self.reloads}",
                  "# HELP onerec_model_reload_failures_total Failed loads (the old model kept serving).",
                  "# TYPE onerec_model_reload_failures_total counter",
                  f"onerec_model_reload_failures_total {self.reload_failures}",
                  "# HELP onerec_ready 1 when a model is loaded.", "# TYPE onerec_ready gauge",
                  f"onerec_ready {int(state is not None)}"]
            if state is not None:
                L += ["# HELP onerec_model_info The serving model.", "# TYPE onerec_model_info gauge",
                      f'onerec_model_info{{model_version="{state.model_version}",sid_version="{state.sid_version}",'
                      f'backend="{state.backend.name}",prefixes_current="{str(state.prefixes_current).lower()}"}} 1']
            return "\n".join(L) + "\n"


# --------------------------------------------------------------------------------------
# model following


class ModelWatcher:
    """Polls ``resolver`` and the export; loads a changed model/export and swaps it in."""

    def __init__(self, cfg: Config, resolver: Resolver, metrics: Metrics, interval_s: float) -> None:
        self.cfg = cfg
        self.resolver = resolver
        self.metrics = metrics
        self.interval_s = interval_s
        self.state: ServingState | None = None
        self._stop = threading.Event()
        self._check_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._last_error: str | None = None

    def check(self) -> bool:
        """One poll; True when a new state was swapped in. Errors are logged once and counted."""
        with self._check_lock:
            try:
                target = self.resolver()
                if target is None:
                    raise NotReady("no champion model to serve (registry alias 'champion' is not set)")
                version, model_dir = str(target[0]), Path(target[1])
                cur = self.state
                found = find_export(self.cfg, version, model_dir)
                eid = export_id(found[0], found[1]) if found else None
                if cur is not None and (cur.model_version, cur.model_dir, cur.export_id) == (version, model_dir, eid):
                    return False
                new = load_state(self.cfg, version, model_dir, previous=cur)
            except Exception as e:  # keep serving the old state; retry at the next poll
                msg = f"{type(e).__name__}: {e}"
                if msg != self._last_error:
                    log.error("model load failed (still serving %s): %s",
                              self.state.model_version if self.state else "nothing", msg)
                    self._last_error = msg
                if not isinstance(e, NotReady):
                    self.metrics.reloaded(False)
                return False
            self._last_error = None
            old = self.state
            self.state = new  # the swap: one reference assignment
            self.metrics.reloaded(True)
            log.warning("now serving model version %s (was %s)", new.model_version,
                        old.model_version if old else None)
            return True

    def _run(self) -> None:
        while not self._stop.is_set():
            self.check()
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="onerec-model-watcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None


def default_resolver(cfg: Config, *, model_dir: str | Path | None, model_version: str | None,
                     follow_champion: bool) -> Resolver:
    """Pinned dir; or the registry champion (every poll, or once when not following)."""
    if model_dir is not None:
        from onerec_prod.serving.precompute_cli import local_version

        pinned = (model_version or local_version(model_dir), Path(model_dir))
        return lambda: pinned

    def champion() -> tuple[str, Path] | None:
        from onerec_prod.registry.registry import champion as registry_champion

        return registry_champion(cfg)

    if follow_champion:
        return champion
    first: list[tuple[str, Path]] = []

    def once() -> tuple[str, Path] | None:
        if not first:
            got = champion()
            if got is None:
                return None
            first.append(got)
        return first[0]

    return once


# --------------------------------------------------------------------------------------
# HTTP


class BodyLimit:
    """ASGI middleware: 413 for bodies over ``max_bytes`` (declared or streamed); counts status codes."""

    def __init__(self, app, max_bytes: int, metrics: Metrics) -> None:
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_counted(message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.status(int(message["status"]))
            await send(message)

        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(send_counted, int(declared))
            return
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send_counted)
            return
        # read the whole body first (bounded), then replay it: FastAPI turns errors raised while
        # it reads the body into 400s, so the limit is enforced before the app sees anything
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # client went away
                return
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_bytes:
                await self._too_large(send_counted, seen)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send_counted)

    async def _too_large(self, send, size: int) -> None:
        import json

        body = json.dumps({"error": f"request body too large: at least {size} bytes, the limit is "
                                    f"{self.max_bytes} (serving.max_body_bytes)"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def _request_model(top_n: int, max_events: int):
    from pydantic import BaseModel, ConfigDict, Field

    ItemId = Annotated[str, Field(min_length=1, max_length=128)]

    class RecommendRequest(BaseModel):
        """Body of POST /recommend."""

        model_config = ConfigDict(extra="forbid", strict=True)
        user_id: str = Field(min_length=1, max_length=128, description="User id.")
        events: list[ItemId] | None = Field(
            None, max_length=max_events, description="Fresh item ids, oldest first, appended to the history.")
        k: int | None = Field(None, ge=1, le=top_n, description=f"Items to return, 1..{top_n}.")

    return RecommendRequest


def _describe(errors: Sequence[dict]) -> list[str]:
    out = []
    for e in errors:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        if e.get("type") == "json_invalid":
            out.append("body: not valid JSON")
        elif loc == "body" and e.get("type") in ("model_attributes_type", "dict_type", "model_type"):
            out.append("body: expected a JSON object {user_id, events?, k?}")
        elif e.get("type") == "extra_forbidden":
            out.append(f"{loc}: unknown field (accepted: user_id, events, k)")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
            out.append(f"{loc}: {e.get('msg')}{shown}")
    return out


def create_app(
    cfg: Config,
    *,
    model_dir: str | Path | None = None,
    follow_champion: bool = True,
    model_version: str | None = None,
    champion_resolver: Resolver | None = None,
):
    """The FastAPI app of the service.

    Args:
        cfg: config (``serving``, ``sid``, ``paths``, ``registry``, ``samples``).
        model_dir: serve this model dir (pinned; champion not followed). Its version label is
            ``model_version`` or ``local-<hash>`` (as ``onerec-prod precompute --model DIR``).
        follow_champion: without ``model_dir``: poll the registry's ``champion`` alias every
            ``serving.reload_interval_s`` (False: resolve it once at startup).
        model_version: version label of ``model_dir``.
        champion_resolver: ``() -> (version, model_dir) | None`` replacing the registry lookup
            (tests, other registries); polled like the champion.

    The model loads in a background thread: ``/healthz`` answers 503 until it is ready.
    """
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse

    scfg = cfg.serving
    resolver = champion_resolver or default_resolver(
        cfg, model_dir=model_dir, model_version=model_version, follow_champion=follow_champion)
    metrics = Metrics()
    watcher = ModelWatcher(cfg, resolver, metrics, scfg.reload_interval_s)
    RecommendRequest = _request_model(scfg.top_n, scfg.max_events)

    @asynccontextmanager
    async def lifespan(app):
        log.info("serving: backend=%s top_n=%d reload every %.1fs", scfg.backend, scfg.top_n, scfg.reload_interval_s)
        watcher.start()
        try:
            yield
        finally:
            watcher.stop()

    app = FastAPI(title="onerec-prod Think-Ahead service", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.watcher = watcher
    app.state.metrics = metrics

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return JSONResponse(status_code=422, content={"error": "invalid request", "details": _describe(exc.errors())})

    def recommend_endpoint(body):
        t0 = time.perf_counter()
        state = watcher.state  # read once: this request finishes on this state
        if state is None:
            return JSONResponse(status_code=503, content={"error": "no model loaded yet; retry later"})
        try:
            out = recommend(state, body.user_id, body.events or [], body.k or scfg.top_n, scfg.top_n)
        except UnknownItems as e:
            return JSONResponse(status_code=422, content={"error": str(e)})
        elapsed = time.perf_counter() - t0
        metrics.observe(out["path"], out["fallback_reason"], elapsed)
        out["latency_ms"] = round(elapsed * 1000.0, 3)
        return out

    # the body model is built from the config at runtime: give FastAPI the class, not a string
    recommend_endpoint.__annotations__ = {"body": RecommendRequest}
    app.post("/recommend")(recommend_endpoint)

    @app.get("/healthz")
    def healthz():
        state = watcher.state
        if state is None:
            return JSONResponse(status_code=503, content={"status": "loading", "model_version": None})
        return {"status": "ready", "model_version": state.model_version, "sid_version": state.sid_version,
                "prefixes_current": state.prefixes_current, "users": len(state.users), "items": len(state.items)}

    @app.get("/metrics")
    def metrics_endpoint():
        return PlainTextResponse(metrics.render(watcher.state), media_type="text/plain; version=0.0.4")

    app.add_middleware(BodyLimit, max_bytes=scfg.max_body_bytes, metrics=metrics)
    return app


@contextlib.contextmanager
def background_server(app, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 30.0) -> Iterator[str]:
    """Run ``app`` with uvicorn in a thread (tests, benchmarks); yields its base URL, stops on exit.

    ``port=0`` binds a free port. The server and its lifespan (model watcher) end with the block.
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="onerec-uvicorn", daemon=True)
    th.start()
    try:
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if not th.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        th.join(timeout_s)
        sock.close()
        if th.is_alive():
            raise RuntimeError("uvicorn did not stop")
