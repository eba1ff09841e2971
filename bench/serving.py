"""Think-Ahead serving vs full constrained generation vs online reasoning, over loopback HTTP.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/serving.py [--requests 200] [--users 32] [--concurrency 4]
        [--config configs/local.yaml] [--items 2000] [--model DIR] [--think-tokens 32] [--fit-epochs 0]
        [--threads N] [--set serving.prefix_beam=10 ...]

One process, one model dir, the same users. Builds the embedded model of ``--config`` (default the
local shape: 4 layers x 256, SID 3x256+256; or takes ``--model DIR``), gives the first ``--items``
Beauty items distinct random SIDs, draws ``--users`` histories of 5..20 items and one held-out next
item per user (not in the history), and runs the real precompute (export only) for model version
``bench``. ``--fit-epochs N`` first fits the model N epochs on those users' history -> next item
streams (:func:`onerec_prod.train.stream_fit.fit_stream`, loss on the next item only; epochs, not
seconds, so a loaded machine fits the same model), so that the hit rates below are not all chance. Then two services run side by side on 127.0.0.1 (free ports),
both on that model dir, with ``serving.online_reasoning=true``:

* ``prefix``: version ``bench``: every user has a row, so requests complete the remaining levels
  under the precomputed prefixes (the Think-Ahead path);
* ``full``: version ``bench-full``: no export of its own, so the same users' rows are stale and
  every request runs full constrained generation from the same history (the fallback path);
* ``think``: the ``bench`` service again, requests with ``"mode": "think"``: online reasoning, a
  greedy rationale of up to ``--think-tokens`` tokens (``serving.max_think_tokens``) after the
  reasoning chat prompt, then the constrained SID beam on it (the cost Think-Ahead moves offline).

Measured from the client, HTTP included: sequential latency (p50/p99, the three paths interleaved
request by request so background load hits them alike) and requests/s of ``prefix`` and ``full``
with ``--concurrency`` client threads (alternating rounds). Bounded: ``--requests`` per path per
phase, then both servers stop. Agreement, on the same users: hit@10 of each path against the
held-out next items, top-10 overlap (|A & B| / 10) and identical lists between ``prefix`` and
``full``. Prints a table and one JSON line with the ratios (p99 think / prefix, full / prefix
latency, prefix / full throughput) and the agreement.

``--backends hf,vllm`` compares the generation backends instead, same model, same users: for each
backend (``serving.backend``; ``vllm`` starts an engine server from ``.venv-vllm``), the real
precompute (users/s, engine start-up excluded for vLLM: it is timed apart), then one service per
backend on the Think-Ahead (prefix) path, requests interleaved between the two; prints p50/p99
over HTTP, req/s, and the vllm / hf ratios in one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._common import add_threads_arg, start  # noqa: E402

log = logging.getLogger("bench.serving")


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))]


def build_setup(args, work: Path, overrides: tuple[str, ...] = ()):
    """Config (``overrides`` before ``--set``), model dir, catalog rows (with SIDs) and histories."""
    from onerec_prod.config import load_config
    from onerec_prod.sid.tokens import level_sizes
    from onerec_prod.util import read_meta

    cfg = load_config(args.config, [f"paths.var_root={work}", "serving.reload_interval_s=3600", *overrides,
                                    *args.set], environ={})
    items = []
    with open(cfg.paths.dataset / "p5" / "items_p5_ids.jsonl") as f:
        for line in f:
            r = json.loads(line)
            items.append({"item_id": r["p5_item_id"], "title": r["title"], "categories": r["categories"]})
            if len(items) == args.items:
                break
    rng = random.Random(args.seed)
    sizes = level_sizes(cfg.sid)
    seen: set[tuple[int, ...]] = set()
    for it in items:
        while True:
            sid = tuple(rng.randrange(n) for n in sizes)
            if sid not in seen:
                seen.add(sid)
                break
        it.update(sid=sid, sid_version="bench-sids", description=None)
    if args.model:
        model_dir = Path(args.model)
    else:
        from onerec_prod.model.base import init_base_model

        t = time.perf_counter()
        model_dir = init_base_model(cfg, [f"{it['title']} {it['categories']}" for it in items], work / "model")
        log.info("built the embedded model in %.1fs", time.perf_counter() - t)
    meta = read_meta(model_dir)
    if meta.get("sid_version") not in (None, "bench-sids"):
        raise SystemExit(f"--model {model_dir} has sid_version {meta['sid_version']}; the bench assigns its own SIDs")
    ids = [it["item_id"] for it in items]
    histories = {f"user{u:04d}": rng.sample(ids, rng.randint(5, 20)) for u in range(args.users)}
    return cfg, model_dir, items, histories


def next_items(histories: dict[str, list[str]], items, seed: int) -> dict[str, str]:
    """One held-out next item per user, not in the user's history (its own RNG: histories unchanged)."""
    rng = random.Random(seed + 1)
    ids = [it["item_id"] for it in items]
    out = {}
    for u in sorted(histories):
        seen = set(histories[u])
        while (nxt := rng.choice(ids)) in seen:
            pass
        out[u] = nxt
    return out


def fit_next_items(cfg, model_dir: Path, items, histories, nexts, epochs: int, out_dir: Path) -> Path:
    """The model fitted ``epochs`` on each user's stream ``history -> next item`` (loss on the next item)."""
    from onerec_prod.model.io import load_model, load_tokenizer, save_model
    from onerec_prod.samples.stream import stream_ids, stream_labels
    from onerec_prod.sid.tokens import SidVocab, level_sizes
    from onerec_prod.train.stream_fit import FitCfg, fit_stream
    from onerec_prod.util import read_meta

    tok, model = load_tokenizer(model_dir), load_model(model_dir)
    vocab = SidVocab.from_tokenizer(tok, level_sizes(cfg.sid))
    sid = {it["item_id"]: it["sid"] for it in items}
    rows = []
    for u, h in histories.items():
        tail = h[-cfg.samples.max_history:] if cfg.samples.max_history > 0 else []
        ids = stream_ids(vocab, [sid[i] for i in [*tail, nexts[u]]])
        rows.append((ids, stream_labels(ids, vocab.begin_id, len(tail))))
    res = fit_stream(model, rows, vocab.begin_id, FitCfg(batch_size=32, max_epochs=epochs, warmup_steps=20,
                                                         log_every_s=30.0))
    log.info("fitted the model on %d next items: %d epochs, %.1fs, last loss %.3f", len(rows), res.epochs,
             res.seconds, res.history[-1]["loss"])
    save_model(model, tok, out_dir, {**read_meta(model_dir), "stage": "bench-fit", "parent": str(model_dir)})
    return out_dir


def run_sequential(targets: dict[str, tuple[str, dict]], users: list[str], n: int) -> dict[str, dict]:
    """``n`` requests per target ``name -> (url, extra body)``, interleaved request by request.

    Per target: client latency p50/p99/mean, the server's p50, the paths served, and the items of
    the first answer per user (the service is deterministic: every answer for a user is the same).
    """
    import httpx

    lat: dict[str, list[float]] = {p: [] for p in targets}
    server: dict[str, list[float]] = {p: [] for p in targets}
    paths: dict[str, set] = {p: set() for p in targets}
    answers: dict[str, dict[str, list[str]]] = {p: {} for p in targets}
    clients = {p: httpx.Client(base_url=u, timeout=600) for p, (u, _) in targets.items()}
    try:
        for i in range(n):
            user = users[i % len(users)]
            for p, c in clients.items():
                t = time.perf_counter()
                r = c.post("/recommend", json={"user_id": user, **targets[p][1]})
                lat[p].append(time.perf_counter() - t)
                r.raise_for_status()
                body = r.json()
                server[p].append(body["latency_ms"] / 1000)
                paths[p].add(body["path"])
                answers[p].setdefault(user, [it["item_id"] for it in body["items"]])
    finally:
        for c in clients.values():
            c.close()
    return {p: {"p50_ms": 1000 * percentile(lat[p], 50), "p99_ms": 1000 * percentile(lat[p], 99),
                "mean_ms": 1000 * statistics.fmean(lat[p]), "server_p50_ms": 1000 * percentile(server[p], 50),
                "paths_seen": sorted(paths[p]), "answers": answers[p]} for p in targets}


def agreement(answers: dict[str, dict[str, list[str]]], nexts: dict[str, str], k: int) -> dict:
    """hit@k per path against the held-out next items; top-k overlap and identical lists, prefix vs full."""
    users = sorted(set.intersection(*(set(a) for a in answers.values())))
    out: dict = {"users": len(users), "k": k}
    for p, a in answers.items():
        out[f"hit@{k}_{p}"] = sum(nexts[u] in a[u][:k] for u in users) / len(users)
    pre, full = answers["prefix"], answers["full"]
    out[f"overlap@{k}_prefix_full"] = statistics.fmean(len(set(pre[u][:k]) & set(full[u][:k])) / k for u in users)
    out["identical_lists_prefix_full"] = sum(pre[u][:k] == full[u][:k] for u in users) / len(users)
    out["same_hit_prefix_full"] = sum((nexts[u] in pre[u][:k]) == (nexts[u] in full[u][:k]) for u in users) / len(users)
    return out


def run_throughput(url: str, users: list[str], n: int, concurrency: int) -> float:
    import httpx

    counter = iter(range(n))
    lock = threading.Lock()
    failures: list[str] = []

    def worker():
        with httpx.Client(base_url=url, timeout=60) as c:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                r = c.post("/recommend", json={"user_id": users[i % len(users)]})
                if r.status_code != 200:
                    failures.append(r.text)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    if failures:
        raise RuntimeError(f"{len(failures)} failed requests, e.g. {failures[0]}")
    return n / wall


def wait_ready(url: str, version: str, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = httpx.get(url + "/healthz", timeout=10)
        if r.status_code == 200 and r.json()["model_version"] == version:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{url} never became ready with version {version}")


def compare_backends(args, work: Path, backends: list[str]) -> int:
    """Precompute users/s and Think-Ahead latency over HTTP per backend; ratios against the first."""
    from onerec_prod.config import load_config
    from onerec_prod.model.io import load_tokenizer
    from onerec_prod.serving.backends import build_backend
    from onerec_prod.serving.precompute import precompute, select_catalog
    from onerec_prod.serving.service import background_server, create_app
    from onerec_prod.sid.tokens import SidVocab, level_sizes
    from onerec_prod.sid.trie import SidTrie

    base_cfg, model_dir, items, histories = build_setup(args, work / "setup")
    users = sorted(histories)
    cfgs, pre, startup = {}, {}, {}
    for b in backends:
        cfg = load_config(args.config, [f"paths.var_root={work / b}", "serving.reload_interval_s=3600", *args.set,
                                        f"serving.backend={b}"], environ={})
        sel, _ = select_catalog(items, "bench-sids")
        sizes = level_sizes(cfg.sid)
        trie = SidTrie.from_sids([it["sid"] for it in sel], sizes)
        vocab = SidVocab.from_tokenizer(load_tokenizer(model_dir), sizes)
        t = time.perf_counter()
        backend = build_backend(b, model_dir, trie, vocab, device=cfg.serving.device, vllm=cfg.serving.vllm,
                                label="bench", batch_size=cfg.serving.batch_size)
        startup[b] = time.perf_counter() - t
        try:
            precompute(cfg, "2014-01-01", model_dir, "bench", histories=histories, catalog=items, write_table=False,
                       backend=backend)  # warm (vLLM's first batches compile/allocate)
            t = time.perf_counter()
            res = precompute(cfg, "2014-01-01", model_dir, "bench", histories=histories, catalog=items,
                             write_table=False, backend=backend)
            pre[b] = res["users"] / (time.perf_counter() - t)
        finally:
            backend.close()
        cfgs[b] = cfg
    apps = {b: create_app(cfgs[b], champion_resolver=lambda: ("bench", model_dir)) for b in backends}
    try:
        with contextlib.ExitStack() as stack:
            urls = {b: stack.enter_context(background_server(apps[b])) for b in backends}
            for b, url in urls.items():
                wait_ready(url, "bench", timeout=cfgs[b].serving.vllm.startup_timeout_s)
            targets = {b: (url, {}) for b, url in urls.items()}
            run_sequential(targets, users, args.warmup)
            seq = run_sequential(targets, users, args.requests)
            rounds, per_round = 4, max(1, args.requests // 4)
            wall = {b: 0.0 for b in urls}
            for _ in range(rounds):
                for b, url in urls.items():
                    wall[b] += per_round / run_throughput(url, users, per_round, args.concurrency)
            rps = {b: rounds * per_round / wall[b] for b in urls}
    finally:
        for app in apps.values():
            if app.state.watcher.state is not None:
                app.state.watcher.state.backend.close()
    for b in backends:
        if seq[b]["paths_seen"] != ["prefix"]:
            raise RuntimeError(f"{b}: unexpected paths {seq[b]['paths_seen']}")
    ref = backends[0]
    s = base_cfg.serving
    summary = {
        "bench": "serving-backends", "device": "cpu", "backends": backends,
        "model": str(args.model or f"embedded {base_cfg.model.num_layers}x{base_cfg.model.hidden_size}"),
        "prefix_levels": s.prefix_levels, "prefix_beam": s.prefix_beam, "top_n": s.top_n, "items": len(items),
        "users": len(users), "requests": args.requests, "concurrency": args.concurrency,
        **{b: {"startup_s": round(startup[b], 2), "precompute_users_per_s": round(pre[b], 2),
               **{k: round(v, 2) for k, v in seq[b].items() if k not in ("paths_seen", "answers")},
               "rps": round(rps[b], 2)}
           for b in backends},
    }
    for b in backends[1:]:
        summary[f"ratio_{b}_over_{ref}"] = {
            "precompute_users_per_s": round(pre[b] / pre[ref], 2),
            "p50": round(seq[b]["p50_ms"] / seq[ref]["p50_ms"], 2),
            "p99": round(seq[b]["p99_ms"] / seq[ref]["p99_ms"], 2), "rps": round(rps[b] / rps[ref], 2)}
    print(f"{'backend':8s} {'start s':>8s} {'pre u/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'req/s':>8s}")
    for b in backends:
        r = summary[b]
        print(f"{b:8s} {r['startup_s']:8.2f} {r['precompute_users_per_s']:8.2f} {r['p50_ms']:8.2f} "
              f"{r['p99_ms']:8.2f} {r['rps']:8.2f}")
    print(json.dumps(summary, sort_keys=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "local.yaml"))
    p.add_argument("--set", action="append", default=[], help="Config override group.key=value.")
    p.add_argument("--model", default=None, help="Model dir (default: build the embedded model).")
    p.add_argument("--items", type=int, default=2000, help="Catalog items (first N Beauty items).")
    p.add_argument("--users", type=int, default=32)
    p.add_argument("--requests", type=int, default=200, help="Requests per path per phase.")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--think-tokens", type=int, default=32,
                   help="Rationale budget of the online reasoning path (serving.max_think_tokens).")
    p.add_argument("--fit-epochs", type=int, default=0,
                   help="Fit the model N epochs on the users' history -> next item first (0: as built).")
    p.add_argument("--work", default=None, help="Work dir (default: a temp dir, removed at the end).")
    add_threads_arg(p)
    p.add_argument("--backends", default=None,
                   help="Compare generation backends instead, e.g. hf,vllm (ratios against the first).")
    args = p.parse_args(argv)
    start(args)
    for noisy in ("httpx", "onerec_prod.eval.beam"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import torch

    from onerec_prod.serving.precompute import precompute
    from onerec_prod.serving.service import background_server, create_app

    if args.backends:
        with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
            return compare_backends(args, Path(args.work or tmp), [b.strip() for b in args.backends.split(",")])

    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        work = Path(args.work or tmp)
        cfg, model_dir, items, histories = build_setup(args, work, (
            "serving.online_reasoning=true", f"serving.max_think_tokens={args.think_tokens}",
            "serving.request_timeout_s=300"))
        nexts = next_items(histories, items, args.seed)
        if args.fit_epochs > 0:
            model_dir = fit_next_items(cfg, model_dir, items, histories, nexts, args.fit_epochs, work / "model-fit")
        t = time.perf_counter()
        res = precompute(cfg, "2014-01-01", model_dir, "bench", histories=histories, catalog=items, write_table=False)
        pre_s = time.perf_counter() - t
        users = sorted(histories)
        apps = {"prefix": (create_app(cfg, champion_resolver=lambda: ("bench", model_dir)), "bench"),
                "full": (create_app(cfg, champion_resolver=lambda: ("bench-full", model_dir)), "bench-full")}
        with background_server(apps["prefix"][0]) as u_prefix, background_server(apps["full"][0]) as u_full:
            urls = {"prefix": u_prefix, "full": u_full}
            for name, url in urls.items():
                wait_ready(url, apps[name][1])
            # (c) runs on the prefix service: same model in memory, same users, the request asks for it
            targets = {"prefix": (u_prefix, {}), "full": (u_full, {}), "think": (u_prefix, {"mode": "think"})}
            run_sequential(targets, users, args.warmup)
            seq = run_sequential(targets, users, args.requests)
            # throughput in alternating rounds, so load from other processes hits both paths alike
            rounds, per_round = 4, max(1, args.requests // 4)
            wall = {name: 0.0 for name in urls}
            for _ in range(rounds):
                for name, url in urls.items():
                    wall[name] += per_round / run_throughput(url, users, per_round, args.concurrency)
            rps = {name: rounds * per_round / wall[name] for name in urls}
        expected = {"prefix": ["prefix"], "full": ["fallback"], "think": ["think"]}
        if any(seq[p]["paths_seen"] != want for p, want in expected.items()):
            raise RuntimeError(f"unexpected paths: { {p: seq[p]['paths_seen'] for p in seq} }")

    s = cfg.serving
    agree = agreement({p: seq[p]["answers"] for p in seq}, nexts, s.top_n)
    lat = {p: {k: round(v, 2) for k, v in seq[p].items() if k not in ("paths_seen", "answers")} for p in seq}
    summary = {
        "bench": "serving", "device": "cpu", "torch_threads": torch.get_num_threads(),
        "model": str(args.model or f"embedded {cfg.model.num_layers}x{cfg.model.hidden_size}"),
        "fit_epochs": args.fit_epochs, "sid_sizes": [cfg.sid.codebook_size] * cfg.sid.levels + [cfg.sid.collision_size],
        "prefix_levels": s.prefix_levels, "prefix_beam": s.prefix_beam, "top_n": s.top_n,
        "max_think_tokens": s.max_think_tokens,
        "items": len(items), "users": len(users), "requests_per_path": args.requests,
        "concurrency": args.concurrency, "precompute_s": round(pre_s, 2), "precompute_users": res["users"],
        "prefix": {**lat["prefix"], "rps": round(rps["prefix"], 2)},
        "full": {**lat["full"], "rps": round(rps["full"], 2)},
        "think": lat["think"],
        "ratio_p99_think_over_prefix": round(seq["think"]["p99_ms"] / seq["prefix"]["p99_ms"], 2),
        "ratio_p50_think_over_prefix": round(seq["think"]["p50_ms"] / seq["prefix"]["p50_ms"], 2),
        "ratio_p50_full_over_prefix": round(seq["full"]["p50_ms"] / seq["prefix"]["p50_ms"], 2),
        "ratio_p99_full_over_prefix": round(seq["full"]["p99_ms"] / seq["prefix"]["p99_ms"], 2),
        "ratio_rps_prefix_over_full": round(rps["prefix"] / rps["full"], 2),
        "agreement": {k: round(v, 4) if isinstance(v, float) else v for k, v in agree.items()},
    }
    print(f"{'path':8s} {'p50 ms':>8s} {'p99 ms':>8s} {'server p50':>11s} {'req/s':>8s} {'hit@' + str(s.top_n):>7s}")
    for name in ("prefix", "full", "think"):
        r = summary[name]
        rps_txt = f"{r['rps']:8.2f}" if "rps" in r else f"{'-':>8s}"
        print(f"{name:8s} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {r['server_p50_ms']:11.2f} {rps_txt} "
              f"{agree[f'hit@{s.top_n}_{name}']:7.3f}")
    print(f"think/prefix latency: p99 x{summary['ratio_p99_think_over_prefix']}, "
          f"p50 x{summary['ratio_p50_think_over_prefix']} ({s.max_think_tokens}-token rationale budget)")
    print(f"full/prefix latency: p50 x{summary['ratio_p50_full_over_prefix']}, "
          f"p99 x{summary['ratio_p99_full_over_prefix']}; prefix/full req/s x{summary['ratio_rps_prefix_over_full']}")
    print(f"prefix vs full on {agree['users']} users: hit@{s.top_n} {agree[f'hit@{s.top_n}_prefix']:.3f} vs "
          f"{agree[f'hit@{s.top_n}_full']:.3f}, top-{s.top_n} overlap {agree[f'overlap@{s.top_n}_prefix_full']:.3f}, "
          f"identical lists {agree['identical_lists_prefix_full']:.3f}")
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
