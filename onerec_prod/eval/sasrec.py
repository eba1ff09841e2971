"""SASRec (Kang & McAuley, 2018): causal self-attention over item ids, the standard sequential baseline.

Own small torch implementation. Item embeddings (shared with the output layer) plus learned
positions, ``n_blocks`` pre-norm Transformer blocks with a causal mask, and next-item training at
every position of each user's last ``max_len + 1`` items. Loss ``ce`` (softmax over all items),
``ss`` (sampled softmax: the positive against ``n_negatives`` uniform negatives shared by the batch,
the strongest published SASRec setting on Beauty) or ``bce`` (the paper's: one random negative per
position). Sequences are right padded, so a causal mask alone keeps padding out of every real
position. Ranking is over every item of ``items`` (the whole catalog when given, so items never
seen in training stay rankable); only the padding index is excluded.

Model selection: with ``validate`` (a function of the model returning a score, e.g. R@10 on the
validation item), training keeps the best epoch's weights and stops after ``patience`` epochs
without improvement.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SasrecParams:
    """SASRec hyper-parameters (defaults: the paper's Beauty setting, with CE loss)."""

    dim: int = 64
    max_len: int = 50
    n_blocks: int = 2
    n_heads: int = 1
    dropout: float = 0.2
    lr: float = 1e-3
    batch_size: int = 128
    epochs: int = 20
    loss: Literal["ce", "ss", "bce"] = "ce"
    n_negatives: int = 256
    weight_decay: float = 0.0
    patience: int = 10
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        problems = []
        if self.dim % self.n_heads:
            problems.append(f"dim={self.dim} must be a multiple of n_heads={self.n_heads}")
        if self.loss not in ("ce", "ss", "bce"):
            problems.append(f"loss={self.loss!r} must be 'ce', 'ss' or 'bce'")
        if not 0 <= self.dropout < 1 or self.n_negatives < 1 or self.patience < 1:
            problems.append("dropout in [0, 1), n_negatives >= 1 and patience >= 1 are required")
        if self.max_len < 2 or self.epochs < 1 or self.batch_size < 1:
            problems.append("max_len >= 2, epochs >= 1 and batch_size >= 1 are required")
        if problems:
            raise ValueError("SasrecParams: " + "; ".join(problems))


def _build_net(n_items: int, p: SasrecParams):
    import torch
    from torch import nn

    class SasrecNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.item = nn.Embedding(n_items + 1, p.dim, padding_idx=0)
            self.pos = nn.Embedding(p.max_len, p.dim)
            layer = nn.TransformerEncoderLayer(p.dim, p.n_heads, dim_feedforward=p.dim * 2, dropout=p.dropout,
                                               batch_first=True, norm_first=True, activation="gelu")
            self.blocks = nn.TransformerEncoder(layer, p.n_blocks, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(p.dim)
            self.drop = nn.Dropout(p.dropout)
            nn.init.normal_(self.item.weight, std=p.dim ** -0.5)
            with torch.no_grad():
                self.item.weight[0].zero_()

        def forward(self, seq):  # (B, T) item indices, right padded with 0
            t = seq.shape[1]
            h = self.item(seq) * math.sqrt(p.dim) + self.pos(torch.arange(t, device=seq.device))[None]
            h = self.drop(h)
            mask = torch.nn.Transformer.generate_square_subsequent_mask(t, device=seq.device)
            return self.norm(self.blocks(h, mask=mask, is_causal=True))

    return SasrecNet()


def _pad_right(rows: Sequence[Sequence[int]], device):
    import torch

    width = max(len(r) for r in rows)
    out = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out.to(device)


def _warm_start(net, init: Sasrec, index: dict[str, int]) -> None:
    """Copy ``init``'s weights into ``net`` (same params); item rows are moved to ``index``'s order."""
    import torch

    old = init.net.state_dict()
    state = net.state_dict()
    mismatch = [k for k in state if k != "item.weight" and (k not in old or old[k].shape != state[k].shape)]
    if mismatch:
        raise ValueError(f"sasrec warm start: the previous model has another architecture ({mismatch[:3]})")
    for k in state:
        if k != "item.weight":
            state[k] = old[k].to(state[k].device)
    pairs = [(index[it], j) for it, j in init.index.items() if it in index]
    if pairs:
        dst, src = (torch.tensor(x) for x in zip(*pairs, strict=True))
        state["item.weight"][dst] = old["item.weight"][src].to(state["item.weight"].device)
    net.load_state_dict(state)


class Sasrec:
    """A trained SASRec with its item index (item id <-> 1..N)."""

    def __init__(self, net, items: list[str], params: SasrecParams) -> None:
        self.net = net
        self.items = items
        self.index = {it: i + 1 for i, it in enumerate(items)}
        self.params = params
        self.best_epoch: int | None = None      # set by train_sasrec when it validates
        self.best_score: float | None = None
        self.epochs_run: int | None = None

    def encode(self, history: Sequence[str]) -> list[int]:
        """Known items of ``history`` as indices, last ``max_len`` only (unknown items dropped)."""
        ids = [self.index[it] for it in history if it in self.index]
        return ids[-self.params.max_len:]

    def recommend(self, histories: Sequence[Sequence[str]], k: int, batch_size: int = 256) -> list[list[str]]:
        """Top ``k`` items per history (full ranking; a history with no known item gets ``[]``)."""
        import torch

        enc = [self.encode(h) for h in histories]
        out: list[list[str]] = [[] for _ in histories]
        todo = [i for i, e in enumerate(enc) if e]
        if len(todo) < len(enc):
            log.info("sasrec: %d histories have no known item (empty ranking)", len(enc) - len(todo))
        self.net.eval()
        with torch.inference_mode():
            for lo in range(0, len(todo), batch_size):
                idx = todo[lo: lo + batch_size]
                seq = _pad_right([enc[i] for i in idx], self.params.device)
                h = self.net(seq)
                last = torch.tensor([len(enc[i]) - 1 for i in idx], device=seq.device)
                scores = h[torch.arange(len(idx), device=seq.device), last] @ self.net.item.weight.T
                scores[:, 0] = float("-inf")
                top = scores.topk(min(k, len(self.items)), dim=1).indices.cpu().tolist()
                for i, row in zip(idx, top, strict=True):
                    out[i] = [self.items[j - 1] for j in row]
        return out


def train_sasrec(sequences: Sequence[Sequence[str]], params: SasrecParams = SasrecParams(), *,
                 items: Sequence[str] | None = None, validate=None,
                 time_budget_s: float | None = None, init: Sasrec | None = None) -> Sasrec:
    """Train SASRec on ``sequences`` (each a user's training items, oldest first).

    ``items``: the item universe to rank (default: the items of ``sequences``, plus ``init``'s);
    every training item must be in it. ``validate(model) -> float`` (higher is better) runs after
    each epoch: the best epoch's weights are kept and training stops after ``params.patience``
    epochs without improvement. ``time_budget_s`` stops training after that many seconds.
    ``init``: warm start from this model (same architecture): its weights, and its item
    embeddings for the items it knows; new items start as in a fresh model.
    """
    import copy

    import torch
    import torch.nn.functional as F

    seen = sorted({it for s in sequences for it in s})
    if not seen and init is None:
        raise ValueError("train_sasrec: no training items")
    universe = list(items) if items is not None else (
        seen if init is None else sorted(set(seen) | set(init.items)))
    index = {it: i + 1 for i, it in enumerate(universe)}
    unknown = [it for it in seen if it not in index]
    if unknown:
        raise ValueError(f"train_sasrec: {len(unknown)} training items are not in items, e.g. {unknown[:3]}")
    windows = [[index[it] for it in s][-(params.max_len + 1):] for s in sequences]
    windows = [w for w in windows if len(w) >= 2]
    if not windows and init is None:
        raise ValueError("train_sasrec: no sequence has 2 or more items")
    n = len(universe)
    dev = params.device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params.seed)
        net = _build_net(n, params).to(dev)
        if init is not None:
            _warm_start(net, init, index)
        if not windows:  # a warm start with nothing new to learn: the previous model, re-indexed
            net.eval()
            return Sasrec(net, universe, params)
        opt = torch.optim.AdamW(net.parameters(), lr=params.lr, betas=(0.9, 0.98), weight_decay=params.weight_decay)
        g = torch.Generator().manual_seed(params.seed)
        n_pos = sum(len(w) - 1 for w in windows)
        t0 = time.perf_counter()
        best, best_epoch, best_state, bad = None, 0, None, 0
        model = Sasrec(net, universe, params)
        for epoch in range(params.epochs):
            net.train()
            perm = torch.randperm(len(windows), generator=g).tolist()
            total = 0.0
            for lo in range(0, len(perm), params.batch_size):
                batch = [windows[i] for i in perm[lo: lo + params.batch_size]]
                seq = _pad_right([w[:-1] for w in batch], dev)
                tgt = _pad_right([w[1:] for w in batch], dev)
                real = tgt > 0
                h = net(seq)[real]
                y = tgt[real]
                if params.loss == "ce":
                    logits = h @ net.item.weight.T
                    logits[:, 0] = float("-inf")
                    loss = F.cross_entropy(logits, y)
                elif params.loss == "ss":
                    neg = torch.randint(1, n + 1, (params.n_negatives,), generator=g).to(dev)
                    pos_s = (h * net.item(y)).sum(-1, keepdim=True)
                    neg_s = (h @ net.item(neg).T).masked_fill(neg[None, :] == y[:, None], float("-inf"))
                    loss = F.cross_entropy(torch.cat([pos_s, neg_s], 1), torch.zeros_like(y))
                else:
                    neg = torch.randint(1, n + 1, y.shape, generator=g).to(dev)
                    pos_s = (h * net.item(y)).sum(-1)
                    neg_s = (h * net.item(neg)).sum(-1)
                    loss = F.softplus(-pos_s).mean() + F.softplus(neg_s).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * int(real.sum())
            msg = ""
            if validate is not None:
                net.eval()
                score = float(validate(model))
                if best is None or score > best:
                    best, best_epoch, bad = score, epoch + 1, 0
                    best_state = copy.deepcopy({k: v.detach().cpu() for k, v in net.state_dict().items()})
                else:
                    bad += 1
                msg = f" val {score:.4f} (best {best:.4f} @ {best_epoch})"
            log.info("sasrec epoch %d/%d loss %.4f%s (%d positions, %.0fs)", epoch + 1, params.epochs,
                     total / n_pos, msg, n_pos, time.perf_counter() - t0)
            if validate is not None and bad >= params.patience:
                log.info("sasrec: early stop at epoch %d (best epoch %d)", epoch + 1, best_epoch)
                break
            if time_budget_s and time.perf_counter() - t0 > time_budget_s:
                log.info("sasrec: time budget reached at epoch %d", epoch + 1)
                break
        if best_state is not None:
            net.load_state_dict(best_state)
        model.best_epoch, model.best_score, model.epochs_run = best_epoch, best, epoch + 1
    net.eval()
    return model


# --------------------------------------------------------------------------------------
# the daily warm start: yesterday's SASRec, trained on the sequences that changed since


def _seq_hash(seq: Sequence[str]) -> str:
    import hashlib

    return hashlib.sha256("\x1f".join(seq).encode()).hexdigest()[:16]


def _arch_key(p: SasrecParams) -> str:
    import hashlib
    import json

    arch = {k: getattr(p, k) for k in ("dim", "max_len", "n_blocks", "n_heads", "dropout", "loss", "n_negatives")}
    return hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:12]


def warm_sasrec(sequences: Sequence[Sequence[str]], params: SasrecParams, cache_dir, dt: str,
                keep: int = 7) -> tuple[Sasrec, dict]:
    """SASRec for day ``dt``, warm-started from the newest cached model of a day before ``dt``.

    The cache (``<cache_dir>/<architecture key>/dt=D.pt``) holds each day's weights, items and the
    hashes of the sequences it was trained on. With a cached day ``P < dt``, only the sequences
    that are new or changed since ``P`` (a user with new events has a new sequence) are trained
    on, ``params.epochs`` epochs; without one, every sequence. The day's model is then cached
    (written to a temp file, then renamed); the newest ``keep`` days are kept. A rerun of ``dt``
    starts from the same cached day, so it gives the same model.

    Returns ``(model, info)``; ``info``: ``warm_start_from`` (day or None), ``sequences_trained``.
    """
    import os
    from pathlib import Path

    import torch

    root = Path(cache_dir) / _arch_key(params)
    root.mkdir(parents=True, exist_ok=True)
    hashes = [_seq_hash(s) for s in sequences]
    before = sorted(f for f in root.glob("dt=*.pt") if f.stem[3:] < dt)
    init, prev_day, todo = None, None, list(sequences)
    if before:
        try:
            blob = torch.load(before[-1], map_location="cpu", weights_only=True)
            init = Sasrec(_build_net(len(blob["items"]), params), list(blob["items"]), params)
            init.net.load_state_dict(blob["state"])
            known = set(blob["hashes"])
            todo = [s for s, h in zip(sequences, hashes, strict=True) if h not in known]
            prev_day = before[-1].stem[3:]
        except (OSError, RuntimeError, KeyError, ValueError) as e:  # a bad cache file: train from scratch
            log.warning("sasrec cache %s unreadable (%s: %s): training from scratch", before[-1], type(e).__name__, e)
            init, todo = None, list(sequences)
    model = train_sasrec(todo, params, init=init)
    dst = root / f"dt={dt}.pt"
    tmp = dst.with_suffix(f".tmp-{os.getpid()}")
    torch.save({"state": {k: v.detach().cpu() for k, v in model.net.state_dict().items()},
                "items": model.items, "hashes": sorted(set(hashes)), "dt": dt}, tmp)
    os.replace(tmp, dst)
    for old in sorted(root.glob("dt=*.pt"))[:-keep]:
        old.unlink(missing_ok=True)
    info = {"warm_start_from": prev_day, "sequences_trained": len(todo), "sequences": len(sequences)}
    log.info("sasrec dt=%s: %s", dt, info)
    return model, info
