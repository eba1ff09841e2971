"""SASRec (Kang & McAuley, 2018): causal self-attention over item ids, the standard sequential baseline.

Own small torch implementation. Item embeddings (shared with the output layer) plus learned
positions, ``n_blocks`` pre-norm Transformer blocks with a causal mask, and next-item training at
every position of each user's last ``max_len + 1`` items. Loss ``ce`` (softmax over all items;
converges in a few epochs) or ``bce`` (the paper's: one random negative per position).
Sequences are right padded, so a causal mask alone keeps padding out of every real position.
Ranking is over every item; only the padding index is excluded.
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
    loss: Literal["ce", "bce"] = "ce"
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        problems = []
        if self.dim % self.n_heads:
            problems.append(f"dim={self.dim} must be a multiple of n_heads={self.n_heads}")
        if self.loss not in ("ce", "bce"):
            problems.append(f"loss={self.loss!r} must be 'ce' or 'bce'")
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


class Sasrec:
    """A trained SASRec with its item index (item id <-> 1..N)."""

    def __init__(self, net, items: list[str], params: SasrecParams) -> None:
        self.net = net
        self.items = items
        self.index = {it: i + 1 for i, it in enumerate(items)}
        self.params = params

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


def train_sasrec(sequences: Sequence[Sequence[str]], params: SasrecParams = SasrecParams()) -> Sasrec:
    """Train SASRec on ``sequences`` (each a user's training items, oldest first)."""
    import torch
    import torch.nn.functional as F

    items = sorted({it for s in sequences for it in s})
    if not items:
        raise ValueError("train_sasrec: no training items")
    index = {it: i + 1 for i, it in enumerate(items)}
    windows = [[index[it] for it in s][-(params.max_len + 1):] for s in sequences]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise ValueError("train_sasrec: no sequence has 2 or more items")
    n = len(items)
    dev = params.device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params.seed)
        net = _build_net(n, params).to(dev)
        opt = torch.optim.Adam(net.parameters(), lr=params.lr, betas=(0.9, 0.98))
        g = torch.Generator().manual_seed(params.seed)
        n_pos = sum(len(w) - 1 for w in windows)
        t0 = time.perf_counter()
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
                else:
                    neg = torch.randint(1, n + 1, y.shape, generator=g).to(dev)
                    pos_s = (h * net.item(y)).sum(-1)
                    neg_s = (h * net.item(neg)).sum(-1)
                    loss = F.softplus(-pos_s).mean() + F.softplus(neg_s).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * int(real.sum())
            log.info("sasrec epoch %d/%d loss %.4f (%d positions, %.0fs)", epoch + 1, params.epochs,
                     total / n_pos, n_pos, time.perf_counter() - t0)
    return Sasrec(net.eval(), items, params)
