"""The online Think-Ahead service (FastAPI): complete precomputed SID prefixes into items.

``POST /recommend`` ``{"user_id": str, "events": [item_id, ...] (optional), "k": int (optional),
"mode": "auto" | "think" (optional)}`` returns ``{user_id, items: [{item_id, sid, score}], rationale,
model_version, path, latency_ms}``. ``mode="auto"`` (the default) takes the first path that applies:

* ``path="prefix"``: the user has a row in the export of the serving model version and sent no
  fresh events; the remaining SID levels are completed under each of the user's precomputed
  prefixes (scores = prefix log-prob + completion log-prob), and the stored rationale is returned;
* ``path="fallback"``: fresh events (appended to the stored history), or a stale row (the export
  belongs to another model version): full constrained generation from the history, no
  rationale. Users with a row but no result under their prefixes also fall back. An unknown
  user (no row, no events) gets the export's most popular items, ranked once per loaded state:
  no generation, so a stream of made-up user ids cannot occupy the model.

``mode="think"`` is online reasoning, only with ``serving.online_reasoning=true`` (403 otherwise):
``path="think"``: the model writes a rationale (greedy, up to ``serving.max_think_tokens``
tokens) after the reasoning chat prompt of the user's stored history plus ``events``, then the
trie-constrained SID beam runs on that prompt and rationale (as eval's think mode does), and the
rationale is returned. It costs one decode step per rationale token on every request: the price
Think-Ahead moves offline. An unknown user without events still gets the popular items.

Only catalog items are returned: the trie and the SID -> item map come from the catalog
snapshot of the export. Status codes: 422 for a malformed body, wrong types, ``k`` outside
``1..serving.top_n``, too many events or unknown item ids (the message names the field); 413
for a body over ``serving.max_body_bytes``; 403 for ``mode="think"`` while ``serving.online_reasoning``
is off (422 when the serving model's tokenizer has no ``</think>``); 503 until a model is loaded. Nothing in a request
selects a file, a model or a version.

Trust no caller (``serving.auth``, ``max_in_flight``, ``request_timeout_s``, ``openapi``):

* ``auth=token``: ``/recommend`` and ``/metrics`` need ``Authorization: Bearer <token>`` (401
  otherwise, checked before the body is read); the token is the content of
  ``serving.token_file`` (a mounted secret), re-read when the file changes so a rotation needs
  no restart. ``/healthz`` stays open for probes. ``auth=none`` must be set explicitly and the
  config allows it only on a loopback host outside the cluster.
* at most ``max_in_flight`` requests are computed at once; one more is answered 503 with
  ``Retry-After`` at once (shed), without queueing.
* each request has a deadline of ``request_timeout_s``: past it the client gets 504. Work that
  has not reached the model yet is dropped; a generation already running finishes and keeps its
  in-flight slot until then, so timeouts cannot pile up hidden work.
* ``/openapi.json`` and ``/docs`` exist only with ``serving.openapi=true``.

Observability: ``/metrics`` is ``prometheus_client``'s exposition of a registry owned by this
service instance (see :class:`Metrics`): process metrics, the ``/recommend`` latency histogram by
path, counters of fallbacks by reason, shed, timed-out, dropped, failed and unauthorized requests,
HTTP codes and reloads, and gauges of the serving model (``onerec_model_age_seconds``, its
training day ``onerec_model_data_date_seconds``, ``onerec_model_info``). Every response carries
``X-Request-ID`` (the caller's when sane, else a new one); a sampled share of requests
(``serving.access_log_sample_rate``, every 5xx) leaves one line on the
``onerec_prod.serving.access`` logger with that id, the status, the duration and the path served.

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
from typing import Annotated, Any, Literal

from onerec_prod.config import Config
from onerec_prod.serving.backends import DeadlineExceeded, check_deadline
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
    # unknown users' answer, best first (see popular_items); empty: they get full generation
    popular: tuple[tuple[Sid, float], ...] = ()
    loaded_at: float = field(default_factory=time.time)
    # when training wrote the model (unix time) and its training day dt: /metrics' model-age gauges
    trained_at: float | None = None
    data_date: str | None = None
    # online reasoning (mode "think"): rationale budget and the ids that end a rationale
    max_think_tokens: int = 32
    think_stops: tuple[int, ...] = ()
    # fast tokenizers must not encode from two threads at once; prompt building is ~1 ms
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)


def popular_items(users: dict[str, UserPrefixes], items: dict[str, dict[str, Any]], n: int) -> tuple[tuple[Sid, float], ...]:
    """The ``n`` catalog items seen most often in the export's histories, best first.

    Score: add-one smoothed log share of history occurrences, so scores are negative and rank
    like the model's log-probs; ties (and an export without histories) fall back to item id order.
    """
    import math

    counts: dict[str, int] = {}
    for row in users.values():
        for item_id in row.history:
            if item_id in items:
                counts[item_id] = counts.get(item_id, 0) + 1
    total = sum(counts.values()) + len(items)
    ranked = sorted(items, key=lambda i: (-counts.get(i, 0), i))[:n]
    return tuple((tuple(items[i]["sid"]), math.log((counts.get(i, 0) + 1) / total)) for i in ranked)


def model_times(model_dir: str | Path) -> tuple[float | None, str | None]:
    """``(trained_at, data_date)`` of a model dir, for the age gauges of /metrics.

    ``trained_at``: ``onerec_meta.json``'s ``trained_at`` when training records it, else that
    file's mtime (written once by ``save_model``; the registry download keeps the mtime on a
    local or mounted artifact store, an object store gives the download time). ``data_date``: the
    meta's ``dt``, the last day of data the model saw.
    """
    from onerec_prod.model.io import META_FILE, read_meta

    try:
        meta = read_meta(model_dir)
    except (OSError, ValueError):
        meta = {}
    trained_at = meta.get("trained_at")
    if not isinstance(trained_at, (int, float)):
        try:
            trained_at = (Path(model_dir) / META_FILE).stat().st_mtime
        except OSError:
            trained_at = None
    dt = meta.get("dt")
    return (float(trained_at) if trained_at is not None else None), (str(dt) if dt else None)


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
    think_stops: tuple[int, ...] = ()
    if cfg.serving.online_reasoning:
        from onerec_prod.eval.beam import think_stop_ids

        try:
            think_stops = tuple(think_stop_ids(tokenizer))
        except ValueError as e:  # the other paths still serve; mode=think requests get 422
            log.warning("model version %s cannot serve mode=think: %s", version, e)
    trained_at, data_date = model_times(model_dir)
    state = ServingState(
        model_version=version, model_dir=model_dir, sid_version=sid_version, backend=backend,
        tokenizer=tokenizer, items=items, sid_to_item=sid_to_item, users=exp.users,
        prefixes_current=current, think=bool(manifest.get("think", False)) and current,
        max_items=int(manifest.get("max_history", cfg.samples.max_history)),
        export_id=export_id(path, manifest), tokenizer_lock=tok_lock,
        popular=popular_items(exp.users, items, cfg.serving.top_n), trained_at=trained_at, data_date=data_date,
        max_think_tokens=cfg.serving.max_think_tokens, think_stops=think_stops)
    log.info("loaded model version %s (%s): %d items, %d users, prefixes %s",
             version, model_dir, len(items), len(exp.users), "current" if current else "stale")
    return state


# --------------------------------------------------------------------------------------
# the request core (no HTTP)


MODES = ("auto", "think")


def recommend(state: ServingState, user_id: str, events: Sequence[str], k: int, beam_size: int,
              deadline: float | None = None, mode: str = "auto") -> dict[str, Any]:
    """Ranked catalog items for one request on ``state``.

    ``mode="think"``: online reasoning (rationale, then the SID beam) from the stored history plus
    ``events``; needs ``state.think_stops`` (``serving.online_reasoning``). Raises
    :class:`UnknownItems`, ``ValueError`` for a bad ``mode``, and :class:`DeadlineExceeded` when
    ``deadline`` (``time.monotonic()``) passes before a generation starts (e.g. while queued on the
    model, or between the rationale and the SID beam).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: valid modes are {', '.join(MODES)}")
    if mode == "think" and not state.think_stops:
        raise ValueError("mode='think' needs serving.online_reasoning=true (online rationale generation)")
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
    if mode == "think" and (row is not None or events):
        hist = history_items((row.history if row else ()) + tuple(events), state.items)
        if hist:
            ranked, rationale = _think(state, hist, beam_size, deadline)
            items = [{"item_id": state.sid_to_item[sid], "sid": list(sid), "score": round(score, 6)}
                     for sid, score in ranked if sid in state.sid_to_item][:k]
            return {"user_id": user_id, "items": items, "rationale": rationale,
                    "model_version": state.model_version, "path": "think", "fallback_reason": None}
    if reason == "unknown_user" and state.popular:
        ranked = list(state.popular)
        items = [{"item_id": state.sid_to_item[sid], "sid": list(sid), "score": round(score, 6)}
                 for sid, score in ranked if sid in state.sid_to_item][:k]
        return {"user_id": user_id, "items": items, "rationale": None, "model_version": state.model_version,
                "path": "fallback", "fallback_reason": reason}
    if reason is None:
        check_deadline(deadline)
        hist = history_items(row.history, state.items)
        with state.tokenizer_lock:
            prompt = rec_prompt_ids(state.tokenizer, hist, think=state.think, rationale=row.rationale,
                                    max_items=state.max_items)
        ranked = state.backend.complete([prompt], [list(row.prefixes)], beam_size=beam_size,
                                        deadline=deadline)[0]
        rationale = row.rationale
        if not ranked:
            reason = "no_prefix"
    if reason is not None:
        hist = history_items((row.history if row else ()) + tuple(events), state.items)
        with state.tokenizer_lock:
            prompt = rec_prompt_ids(state.tokenizer, hist, think=False, rationale=None, max_items=state.max_items)
        check_deadline(deadline)
        ranked = state.backend.full([prompt], beam_size=beam_size, deadline=deadline)[0]
        rationale = None
    items = [{"item_id": state.sid_to_item[sid], "sid": list(sid), "score": round(score, 6)}
             for sid, score in ranked if sid in state.sid_to_item][:k]
    return {"user_id": user_id, "items": items, "rationale": rationale, "model_version": state.model_version,
            "path": "prefix" if reason is None else "fallback", "fallback_reason": reason}


def _think(state: ServingState, hist: list[dict[str, Any]], beam_size: int,
           deadline: float | None) -> tuple[list[tuple[Sid, float]], str]:
    """Online reasoning: a greedy rationale after the open think block, then the constrained SID beam.

    The prompts are the ones eval's think mode and the think precompute use (reasoning chat prompt,
    then the closed think block); the rationale and the beam are two backend calls, each checking
    ``deadline`` once it holds the model.
    """
    from onerec_prod.serving.precompute import rationale_text, think_open_ids

    with state.tokenizer_lock:
        open_ids = think_open_ids(state.tokenizer, hist, max_items=state.max_items)
    check_deadline(deadline)
    gen = state.backend.generate([open_ids], max_tokens=state.max_think_tokens,
                                 stop_token_ids=list(state.think_stops), deadline=deadline)[0]
    with state.tokenizer_lock:
        rationale = rationale_text(state.tokenizer, gen, state.think_stops)
        prompt = rec_prompt_ids(state.tokenizer, hist, think=True, rationale=rationale, max_items=state.max_items)
    check_deadline(deadline)
    ranked = state.backend.full([prompt], beam_size=beam_size, deadline=deadline)[0]
    return ranked, rationale


# --------------------------------------------------------------------------------------
# metrics (prometheus_client, one registry per service instance)


def _data_date_seconds(dt: str | None) -> float | None:
    """Unix time of UTC midnight of the model's training day ``dt`` (None when unknown)."""
    import datetime as _dt

    if not dt:
        return None
    try:
        day = _dt.date.fromisoformat(str(dt)[:10])
    except ValueError:
        return None
    return _dt.datetime(day.year, day.month, day.day, tzinfo=_dt.UTC).timestamp()


class _StateCollector:
    """Gauges read from the serving state at scrape time (the state swaps; no stale values stay behind)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.state: ServingState | None = None
        self.clock = clock  # wall clock of the scrape (a test passes a fixed one)

    def describe(self):
        return []  # families depend on the state; nothing to check at registration

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        state = self.state
        yield GaugeMetricFamily("onerec_ready", "1 when a model is loaded.", value=int(state is not None))
        if state is None:
            return
        info = GaugeMetricFamily(
            "onerec_model_info", "The serving model (value 1); labels name it.",
            labels=["model_version", "sid_version", "backend", "prefixes_current", "data_date"])
        info.add_metric([state.model_version, str(state.sid_version), str(getattr(state.backend, "name", "")),
                         str(state.prefixes_current).lower(), state.data_date or ""], 1)
        yield info
        yield GaugeMetricFamily("onerec_model_loaded_timestamp_seconds",
                                "When the serving state was loaded (unix time).", value=state.loaded_at)
        if state.trained_at is not None:
            yield GaugeMetricFamily(
                "onerec_model_trained_timestamp_seconds",
                "When the serving model's files were written by training (unix time).", value=state.trained_at)
            yield GaugeMetricFamily(
                "onerec_model_age_seconds",
                "Seconds since the serving model was trained: alert when the champion stops refreshing.",
                value=max(0.0, self.clock() - state.trained_at))
        day = _data_date_seconds(state.data_date)
        if day is not None:
            yield GaugeMetricFamily(
                "onerec_model_data_date_seconds",
                "The serving model's training day (dt) as unix time of its UTC midnight.", value=day)


class Metrics:
    """The service's Prometheus metrics, in their own ``CollectorRegistry``.

    A registry per instance, not the global default: tests and benchmarks build several apps in
    one process, and each must count only its own requests. Process (CPU, memory, fds), platform
    and GC collectors are registered too. Model gauges (age, training day, info) are read from
    the state passed to :meth:`render`.
    """

    # count() names -> counters (kept from the hand-written version, whose names the tests use)
    _COUNTERS = {
        "shed": ("onerec_shed", "Requests refused with 503 because serving.max_in_flight were running."),
        "timeouts": ("onerec_deadline_exceeded", "Requests answered 504 (serving.request_timeout_s)."),
        "dropped": ("onerec_deadline_dropped", "Requests whose deadline passed before generation started."),
        "unauthorized": ("onerec_unauthorized", "Requests refused with 401 (missing or wrong bearer token)."),
        "failed": ("onerec_request_failures", "Requests that raised an unexpected error (answered 500)."),
    }

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Histogram,
            gc_collector,
            platform_collector,
            process_collector,
        )

        self.registry = reg = CollectorRegistry()
        process_collector.ProcessCollector(registry=reg)
        platform_collector.PlatformCollector(registry=reg)
        gc_collector.GCCollector(registry=reg)
        self.requests = Counter("onerec_recommend_requests", "Answered /recommend requests by path.",
                                ["path"], registry=reg)
        self.latency = Histogram("onerec_recommend_latency_seconds", "Server-side /recommend latency.",
                                 ["path"], buckets=LATENCY_BUCKETS, registry=reg)
        for p in ("prefix", "fallback", "think"):  # every series exists from the start (rate() needs a zero)
            self.requests.labels(p)
            self.latency.labels(p)
        self.fallbacks = Counter("onerec_fallback", "Requests served by the fallback path, by reason.",
                                 ["reason"], registry=reg)
        self.codes = Counter("onerec_http_responses", "HTTP responses by status code.", ["code"], registry=reg)
        self.reloads = Counter("onerec_model_reloads", "Model/export swaps.", registry=reg)
        self.reload_failures = Counter("onerec_model_reload_failures",
                                       "Failed loads (the old model kept serving).", registry=reg)
        self.counters = {what: Counter(name, doc, registry=reg) for what, (name, doc) in self._COUNTERS.items()}
        self._state = _StateCollector(clock)
        reg.register(self._state)
        self._render_lock = threading.Lock()

    def count(self, what: str) -> None:
        """One more ``shed`` / ``timeouts`` / ``dropped`` / ``unauthorized`` / ``failed`` request."""
        self.counters[what].inc()

    def observe(self, path: str, reason: str | None, seconds: float) -> None:
        self.requests.labels(path).inc()
        self.latency.labels(path).observe(seconds)
        if reason is not None:
            self.fallbacks.labels(reason).inc()

    def status(self, code: int) -> None:
        self.codes.labels(str(code)).inc()

    def reloaded(self, ok: bool) -> None:
        (self.reloads if ok else self.reload_failures).inc()

    def render(self, state: ServingState | None) -> str:
        """The Prometheus text exposition, with the model gauges of ``state``."""
        from prometheus_client import generate_latest

        with self._render_lock:  # the state collector holds one state per scrape
            self._state.state = state
            try:
                return generate_latest(self.registry).decode()
            finally:
                self._state.state = None


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
        from onerec_prod.registry.registry import local_version

        pinned = (model_version or local_version(model_dir), Path(model_dir))
        return lambda: pinned

    verified: dict[str, Path] = {}

    def champion() -> tuple[str, Path] | None:
        """The alias each poll; the files (hash-verified by ``version_dir``) once per version change."""
        from onerec_prod.registry import registry

        version = registry.aliases(cfg).get(registry.CHAMPION)
        if version is None:
            return None
        if version not in verified:
            verified.clear()
            verified[version] = registry.version_dir(cfg, version)
        return version, verified[version]

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


class BearerToken:
    """The expected bearer token: the stripped content of ``path``, re-read when the file changes.

    A mounted Kubernetes secret is updated in place on rotation; the stat per request costs
    microseconds and spares a restart. An empty or missing file is an error, never "no token".
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._stamp: tuple[float, int] | None = None
        self._token = b""
        self.current()  # fail at startup, not at the first request

    def current(self) -> bytes:
        st = self.path.stat()
        stamp = (st.st_mtime, st.st_size)
        if stamp != self._stamp:
            token = self.path.read_bytes().strip()
            if not token:
                raise ValueError(f"serving.token_file {self.path} is empty")
            self._token, self._stamp = token, stamp
        return self._token

    def accepts(self, header: bytes | None) -> bool:
        import hmac

        if not header or not header[:7].lower() == b"bearer ":
            return False
        try:
            expected = self.current()
        except (OSError, ValueError) as e:  # secret gone: refuse everyone rather than no one
            log.error("bearer token unreadable, refusing requests: %s", e)
            return False
        return hmac.compare_digest(header[7:].strip(), expected)


OPEN_PATHS = ("/healthz",)  # liveness/readiness probes carry no token


access_log = logging.getLogger("onerec_prod.serving.access")
REQUEST_ID_HEADER = b"x-request-id"


def request_id(headers: dict[bytes, bytes]) -> str:
    """The caller's ``X-Request-ID`` when it is a sane token (1-128 of ``[A-Za-z0-9._:-]``), else a new one.

    A caller's id is kept so one request can be followed through a gateway and this service; an
    id that could break a log line or a header (spaces, quotes, control bytes) is replaced.
    """
    import re
    import uuid

    got = headers.get(REQUEST_ID_HEADER)
    if got and len(got) <= 128 and re.fullmatch(rb"[A-Za-z0-9._:\-]+", got):
        return got.decode("ascii")
    return uuid.uuid4().hex


class Guard:
    """ASGI middleware, in order: gives the request an id (``X-Request-ID``, echoed in the
    response) and counts status codes; 401 without the bearer token (before the body is read);
    413 for bodies over ``max_bytes`` (declared or streamed). An unexpected error is logged with
    the request id, counted (``onerec_request_failures_total``) and answered 500. At the end one
    access-log line for a sampled share of requests (``access_sample_rate``; every 5xx)."""

    def __init__(self, app, max_bytes: int, metrics: Metrics, token: BearerToken | None,
                 access_sample_rate: float = 0.0) -> None:
        import random

        self.app, self.max_bytes, self.metrics, self.token = app, max_bytes, metrics, token
        self.access_sample_rate = access_sample_rate
        self._random = random.Random()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from onerec_prod.log import log_context

        headers = dict(scope.get("headers") or [])
        rid = request_id(headers)
        scope.setdefault("state", {})
        status: list[int] = []
        t0 = time.perf_counter()

        async def send_counted(message) -> None:
            if message["type"] == "http.response.start":
                status.append(int(message["status"]))
                self.metrics.status(status[0])
                message = {**message, "headers": [*message.get("headers", ()), (REQUEST_ID_HEADER, rid.encode())]}
            await send(message)

        with log_context(request_id=rid):
            try:
                await self._guarded(scope, receive, send_counted, headers)
            except Exception:
                self.metrics.count("failed")
                log.exception("request %s %s %s failed", rid, scope.get("method"), scope.get("path"))
                if not status:
                    await _json(send_counted, 500, {"error": "internal error", "request_id": rid})
            finally:
                self._access(scope, rid, status[0] if status else None, time.perf_counter() - t0)

    def _access(self, scope, rid: str, status: int | None, seconds: float) -> None:
        """One access-log line: every 5xx, other requests with probability ``access_sample_rate``."""
        server_error = status is not None and status >= 500
        if not server_error and (self.access_sample_rate <= 0 or self._random.random() >= self.access_sample_rate):
            return
        served = scope.get("state", {}).get("onerec_served") or {}
        fields = {"request_id": rid, "method": scope.get("method"), "http_path": scope.get("path"),
                  "status": status, "duration_ms": round(seconds * 1000.0, 3), **served}
        access_log.log(logging.WARNING if server_error else logging.INFO,
                       "%s %s %s %s %.1fms%s", rid, fields["method"], fields["http_path"],
                       status if status is not None else "-", fields["duration_ms"],
                       "".join(f" {k}={v}" for k, v in served.items()), extra=fields)

    async def _guarded(self, scope, receive, send_counted, headers) -> None:
        if self.token is not None and scope.get("path") not in OPEN_PATHS:
            if not self.token.accepts(headers.get(b"authorization")):
                self.metrics.count("unauthorized")
                await _json(send_counted, 401, {"error": "missing or invalid bearer token"},
                            [(b"www-authenticate", b'Bearer realm="onerec"')])
                return
        declared = headers.get(b"content-length")
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
        await _json(send, 413, {"error": f"request body too large: at least {size} bytes, the limit is "
                                         f"{self.max_bytes} (serving.max_body_bytes)"})


async def _json(send, status: int, content: dict, extra_headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    import json

    body = json.dumps(content).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *extra_headers]})
    await send({"type": "http.response.body", "body": body})


class InFlight:
    """A non-blocking counter of requests being computed: ``try_enter`` fails when ``limit`` run.

    The slot is left by the worker thread when its computation ends, not when the response is
    sent: a request answered 504 still holds its slot while its generation runs.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running = 0
        self._lock = threading.Lock()

    def try_enter(self) -> bool:
        with self._lock:
            if self.running >= self.limit:
                return False
            self.running += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.running -= 1


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
        mode: Literal["auto", "think"] | None = Field(
            None, description="auto (default): precomputed prefixes, else full generation; think: online "
            "reasoning, a rationale then the SID beam (needs serving.online_reasoning).")

    return RecommendRequest


def _describe(errors: Sequence[dict]) -> list[str]:
    out = []
    for e in errors:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        if e.get("type") == "json_invalid":
            out.append("body: not valid JSON")
        elif loc == "body" and e.get("type") in ("model_attributes_type", "dict_type", "model_type"):
            out.append("body: expected a JSON object {user_id, events?, k?, mode?}")
        elif e.get("type") == "extra_forbidden":
            out.append(f"{loc}: unknown field (accepted: user_id, events, k, mode)")
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
    Raises ``ValueError`` when ``serving.auth=token`` has no readable, non-empty ``token_file``.
    """
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response

    scfg = cfg.serving
    token = None
    if scfg.auth == "token":
        if not scfg.token_file:
            raise ValueError("serving.auth=token needs serving.token_file (a file holding the bearer token, "
                             "e.g. a mounted secret); a local-only service may set serving.auth=none")
        token = BearerToken(cfg.paths.resolve(scfg.token_file))
    in_flight = InFlight(scfg.max_in_flight)
    # one worker per in-flight slot: an admitted request never waits for a thread
    executor = ThreadPoolExecutor(max_workers=scfg.max_in_flight, thread_name_prefix="onerec-recommend")
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
            executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="onerec-prod Think-Ahead service", lifespan=lifespan, redoc_url=None,
                  docs_url="/docs" if scfg.openapi else None,
                  openapi_url="/openapi.json" if scfg.openapi else None)
    app.state.watcher = watcher
    app.state.metrics = metrics
    app.state.in_flight = in_flight

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return JSONResponse(status_code=422, content={"error": "invalid request", "details": _describe(exc.errors())})

    def compute(state: ServingState, body, deadline: float) -> dict[str, Any]:
        try:
            return recommend(state, body.user_id, body.events or [], body.k or scfg.top_n, scfg.top_n,
                             deadline=deadline, mode=body.mode or "auto")
        except DeadlineExceeded:
            metrics.count("dropped")
            raise
        finally:
            in_flight.leave()

    async def run_admitted(state: ServingState, body, deadline: float) -> dict[str, Any]:
        """Compute on a worker thread (the slot is taken); DeadlineExceeded when it is not done in time."""
        try:
            fut = executor.submit(compute, state, body, deadline)
        except RuntimeError:  # shutting down
            in_flight.leave()
            raise DeadlineExceeded("shutting down") from None
        # asyncio.wait never cancels the future: a started computation always reaches in_flight.leave()
        wrapped = asyncio.wrap_future(fut)
        wrapped.add_done_callback(lambda f: f.cancelled() or f.exception())  # late results: retrieved, dropped
        await asyncio.wait({wrapped}, timeout=max(0.0, deadline - time.monotonic()))
        if not wrapped.done():
            raise DeadlineExceeded(f"not done within {scfg.request_timeout_s}s")
        return wrapped.result()

    async def recommend_endpoint(body, request):
        t0 = time.perf_counter()
        deadline = time.monotonic() + scfg.request_timeout_s
        if body.mode == "think" and not scfg.online_reasoning:
            return JSONResponse(status_code=403, content={
                "error": "mode: 'think' (online reasoning) is off on this service (serving.online_reasoning=false)"})
        state = watcher.state  # read once: this request finishes on this state
        if state is None:
            return JSONResponse(status_code=503, content={"error": "no model loaded yet; retry later"})
        if not body.events and body.user_id not in state.users and state.popular:
            # unknown user: a slice of a precomputed list, answered inline; takes no model slot
            out = recommend(state, body.user_id, [], body.k or scfg.top_n, scfg.top_n)
        elif body.mode == "think" and not state.think_stops:
            return JSONResponse(status_code=422, content={
                "error": f"mode: model version {state.model_version} cannot reason online "
                         "(its tokenizer has no </think> token)"})
        elif not in_flight.try_enter():
            metrics.count("shed")
            return JSONResponse(status_code=503, headers={"Retry-After": "1"}, content={
                "error": f"overloaded: {scfg.max_in_flight} requests in flight (serving.max_in_flight); retry later"})
        else:
            try:
                out = await run_admitted(state, body, deadline)
            except DeadlineExceeded:
                metrics.count("timeouts")
                return JSONResponse(status_code=504, content={
                    "error": f"deadline of {scfg.request_timeout_s}s exceeded (serving.request_timeout_s)"})
            except UnknownItems as e:
                return JSONResponse(status_code=422, content={"error": str(e)})
        elapsed = time.perf_counter() - t0
        metrics.observe(out["path"], out["fallback_reason"], elapsed)
        request.state.onerec_served = {"model_version": out["model_version"], "serve_path": out["path"],
                                       **({"fallback_reason": out["fallback_reason"]} if out["fallback_reason"] else {})}
        out["latency_ms"] = round(elapsed * 1000.0, 3)
        return out

    # the body model is built from the config at runtime: give FastAPI the class, not a string
    recommend_endpoint.__annotations__ = {"body": RecommendRequest, "request": Request}
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
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(watcher.state), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(Guard, max_bytes=scfg.max_body_bytes, metrics=metrics, token=token,
                       access_sample_rate=scfg.access_log_sample_rate)
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
