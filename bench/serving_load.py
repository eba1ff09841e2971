"""Load on the Think-Ahead service: N concurrent clients on 127.0.0.1 for a bounded time.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/serving_load.py [--clients 16] [--duration 30]
        [--config configs/local.yaml] [--items 2000] [--users 64] [--model DIR]
        [--mix known=0.6,unknown=0.3,fresh=0.1,noauth=0.02] [--set serving.max_in_flight=4 ...]

Same setup as ``bench/serving.py`` (embedded model of ``--config``, the first ``--items`` Beauty
items with random SIDs, ``--users`` histories, the real precompute), then one service with the
production guards on: bearer-token auth (a token file written for the run),
``serving.max_in_flight`` and ``serving.request_timeout_s``. ``--clients`` threads each send
requests back to back until ``--duration`` seconds have passed; each request is drawn from
``--mix``:

* ``known``: a user with a precomputed row (the prefix path);
* ``unknown``: a made-up user id (popular items, answered inline: no generation, no in-flight slot);
* ``fresh``: a known user with two fresh events (full generation, the expensive path);
* ``noauth``: no token (must be 401).

Reported per kind and overall: requests, answered (200), p50/p99 latency of the answered ones
(client side, HTTP included), shed (503, in-flight limit), timed out (504, deadline), and errors
(anything else: other status codes, connection failures, a 200 for ``noauth``). The service must
still answer /healthz after the run. Prints a table and one JSON line; exits 1 on any error.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.serving import build_setup, percentile, wait_ready  # noqa: E402

log = logging.getLogger("bench.serving_load")
KINDS = ("known", "unknown", "fresh", "noauth")


def parse_mix(text: str) -> dict[str, float]:
    mix = {}
    for part in text.split(","):
        name, _, w = part.partition("=")
        if name not in KINDS:
            raise SystemExit(f"--mix: unknown kind {name!r} (kinds: {', '.join(KINDS)})")
        mix[name] = float(w)
    if sum(mix.values()) <= 0:
        raise SystemExit("--mix: weights must add up to more than 0")
    return mix


def drive(url: str, token: str, users: list[str], item_ids: list[str], mix: dict[str, float],
          clients: int, duration_s: float, seed: int, backoff_s: float = 0.0) -> dict[str, list[tuple[int, float]]]:
    """Run ``clients`` threads until ``duration_s``; per kind, ``(status, seconds)`` (status -1: no answer)."""
    import httpx

    out: dict[str, list[tuple[int, float]]] = {k: [] for k in KINDS}
    lock = threading.Lock()
    end = time.monotonic() + duration_s
    kinds, weights = list(mix), list(mix.values())

    def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        mine: dict[str, list[tuple[int, float]]] = {k: [] for k in KINDS}
        with httpx.Client(base_url=url, timeout=120) as c:
            while time.monotonic() < end:
                kind = rng.choices(kinds, weights)[0]
                headers = {} if kind == "noauth" else {"Authorization": f"Bearer {token}"}
                if kind == "unknown":
                    body = {"user_id": f"stranger-{rng.randrange(10**9)}"}
                elif kind == "fresh":
                    body = {"user_id": rng.choice(users), "events": rng.sample(item_ids, 2)}
                else:
                    body = {"user_id": rng.choice(users)}
                t = time.perf_counter()
                try:
                    status = c.post("/recommend", json=body, headers=headers).status_code
                except httpx.HTTPError:
                    status = -1
                mine[kind].append((status, time.perf_counter() - t))
                if status == 503 and backoff_s:
                    time.sleep(backoff_s * (0.5 + rng.random()))  # a polite client honours Retry-After, jittered
        with lock:
            for k, v in mine.items():
                out[k].extend(v)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return out


def summarize(results: list[tuple[int, float]], kind: str) -> dict:
    ok_code = 401 if kind == "noauth" else 200
    ok = [s for code, s in results if code == ok_code]
    shed = sum(1 for code, _ in results if code == 503)
    timeouts = sum(1 for code, _ in results if code == 504)
    errors = len(results) - len(ok) - shed - timeouts
    row = {"requests": len(results), "answered": len(ok), "shed_503": shed, "timeout_504": timeouts,
           "errors": errors}
    if ok:
        row.update(p50_ms=round(1000 * percentile(ok, 50), 2), p99_ms=round(1000 * percentile(ok, 99), 2))
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "local.yaml"))
    p.add_argument("--set", action="append", default=[], help="Config override group.key=value.")
    p.add_argument("--model", default=None, help="Model dir (default: build the embedded model).")
    p.add_argument("--items", type=int, default=2000, help="Catalog items (first N Beauty items).")
    p.add_argument("--users", type=int, default=64)
    p.add_argument("--clients", type=int, default=16, help="Concurrent client threads.")
    p.add_argument("--duration", type=float, default=30.0, help="Seconds of load.")
    p.add_argument("--mix", default="known=0.6,unknown=0.3,fresh=0.1,noauth=0.02")
    p.add_argument("--backoff-ms", type=float, default=100.0,
                   help="A client that was shed (503) waits about this long before its next request (0 = hammer).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=None, help="Work dir (default: a temp dir, removed at the end).")
    args = p.parse_args(argv)
    mix = parse_mix(args.mix)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "onerec_prod.eval.beam"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import httpx

    from onerec_prod.serving.precompute import precompute
    from onerec_prod.serving.service import background_server, create_app

    with tempfile.TemporaryDirectory(prefix="bench-serving-load-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        token = f"bench-{random.Random(args.seed).getrandbits(96):024x}"
        (work / "token").write_text(token + "\n")
        args.set = ["serving.auth=token", f"serving.token_file={work / 'token'}", *args.set]
        cfg, model_dir, items, histories = build_setup(args, work)
        precompute(cfg, "2014-01-01", model_dir, "bench", histories=histories, catalog=items, write_table=False)
        users, item_ids = sorted(histories), [it["item_id"] for it in items]
        app = create_app(cfg, champion_resolver=lambda: ("bench", model_dir))
        with background_server(app) as url:
            wait_ready(url, "bench")
            t = time.perf_counter()
            results = drive(url, token, users, item_ids, mix, args.clients, args.duration, args.seed,
                            backoff_s=args.backoff_ms / 1000)
            wall = time.perf_counter() - t
            health = httpx.get(url + "/healthz", timeout=30).status_code

    s = cfg.serving
    per_kind = {k: summarize(results[k], k) for k in KINDS if k in mix}
    authed = [r for k in KINDS if k in mix and k != "noauth" for r in results[k]]
    overall = summarize(authed, "all")
    overall["answered_per_s"] = round(overall["answered"] / wall, 2)
    errors = sum(r["errors"] for r in per_kind.values()) + (health != 200)
    summary = {"bench": "serving_load", "clients": args.clients, "backoff_ms": args.backoff_ms, "duration_s": round(wall, 1),
               "max_in_flight": s.max_in_flight, "request_timeout_s": s.request_timeout_s,
               "model": str(args.model or f"embedded {cfg.model.num_layers}x{cfg.model.hidden_size}"),
               "items": len(items), "users": len(users), "mix": mix, "per_kind": per_kind,
               "overall_authenticated": overall, "healthz_after": health, "errors": errors}
    print(f"{'kind':8s} {'reqs':>6s} {'ok':>6s} {'p50 ms':>9s} {'p99 ms':>9s} {'shed':>6s} {'504':>5s} {'errors':>6s}")
    for name, r in [*per_kind.items(), ("all", overall)]:
        print(f"{name:8s} {r['requests']:6d} {r['answered']:6d} {r.get('p50_ms', float('nan')):9.2f} "
              f"{r.get('p99_ms', float('nan')):9.2f} {r['shed_503']:6d} {r['timeout_504']:5d} {r['errors']:6d}")
    print(f"{overall['answered_per_s']} answered/s over {wall:.1f}s with {args.clients} clients "
          f"(max_in_flight={s.max_in_flight}); /healthz after: {health}")
    print(json.dumps(summary, sort_keys=True))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
