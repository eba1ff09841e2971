"""In-process fit of a causal LM on SID-stream rows, with validation, best checkpoint and early stop.

Used by the quality bench and by experiments that must fit an hour on two CPU cores (no Spark,
no torchrun). The daily pipeline trains the same rows through its DeepSpeed recipe.

- Rows are ``(input_ids, labels)`` pairs (labels -100 where no loss), e.g. from
  :func:`onerec_prod.samples.stream.stream_ids` / :func:`~onerec_prod.samples.stream.stream_labels`.
- Batches group rows of similar length (little padding); the LM head runs only where a label is.
- AdamW, linear warm-up (``warmup_steps``, at most a tenth of the run), cosine decay to 10% over ``max_epochs`` or the time budget, whichever
  ends first (the schedule follows the budget: no step cap silently overrides it).
- Every ``eval_every`` epochs ``validate(model) -> float`` (higher is better, e.g. validation
  R@10) is called; the best weights are kept in memory and restored at the end; training stops
  after ``patience`` evaluations without improvement.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from onerec_prod.model.dropout import DropoutRates, apply_dropout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitCfg:
    lr: float = 2e-3
    weight_decay: float = 0.01
    batch_size: int = 128
    max_epochs: int = 200
    warmup_steps: int = 200
    label_smoothing: float = 0.0
    dropout: DropoutRates = field(default_factory=DropoutRates)
    eval_every: int = 1
    patience: int = 5
    time_budget_s: float | None = None
    grad_clip: float = 1.0
    seed: int = 1234
    log_every_s: float = 60.0


@dataclass
class FitResult:
    best_epoch: int
    best_score: float | None
    epochs: int
    steps: int
    tokens: int
    target_tokens: int
    seconds: float
    history: list[dict[str, Any]]
    stopped: str

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def _batches(rows: Sequence[tuple[list[int], list[int]]], batch_size: int, rng: random.Random):
    """One epoch of batches: rows shuffled, then sorted by length inside chunks of 32 batches."""
    order = list(range(len(rows)))
    rng.shuffle(order)
    chunk = batch_size * 32
    out = []
    for lo in range(0, len(order), chunk):
        part = sorted(order[lo: lo + chunk], key=lambda i: len(rows[i][0]))
        out += [part[i: i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(out)
    return out


def _collate(rows, idx, pad_id: int):
    import torch

    width = max(len(rows[i][0]) for i in idx)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    lab = torch.full((len(idx), width), -100, dtype=torch.long)
    attn = torch.zeros((len(idx), width), dtype=torch.long)
    for b, i in enumerate(idx):
        x, y = rows[i]
        ids[b, : len(x)] = torch.tensor(x)
        lab[b, : len(y)] = torch.tensor(y)
        attn[b, : len(x)] = 1
    return ids, lab, attn


def fit_stream(model, rows: Sequence[tuple[list[int], list[int]]], pad_id: int, cfg: FitCfg,
               validate: Callable[[Any], float] | None = None) -> FitResult:
    """Train ``model`` in place on ``rows``; returns the fit record (the best weights loaded)."""
    import torch
    import torch.nn.functional as F

    if not rows:
        raise ValueError("fit_stream: no training rows")
    dev = next(model.parameters()).device
    hooks = apply_dropout(model, cfg.dropout)
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    steps_per_epoch = math.ceil(len(rows) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.max_epochs
    warm = max(1, min(cfg.warmup_steps, total_steps // 10))
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in n else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    t0 = time.perf_counter()
    budget = cfg.time_budget_s

    def progress(step: int) -> float:
        done = step / total_steps
        if budget:
            done = max(done, (time.perf_counter() - t0) / budget)
        return min(1.0, done)

    def lr_at(step: int) -> float:
        return cfg.lr * min(1.0, (step + 1) / warm) * (0.1 + 0.45 * (1 + math.cos(math.pi * progress(step))))

    decoder, head = model.get_decoder(), model.get_output_embeddings()
    history: list[dict[str, Any]] = []
    best_score, best_epoch, best_state, bad = None, 0, None, 0
    step = tokens = target_tokens = 0
    stopped = "max_epochs"
    last_log = t0
    epoch = 0
    try:
        for epoch in range(1, cfg.max_epochs + 1):
            model.train()
            loss_sum, loss_n = 0.0, 0
            for idx in _batches(rows, cfg.batch_size, rng):
                ids, lab, attn = (t.to(dev) for t in _collate(rows, idx, pad_id))
                for g in opt.param_groups:
                    g["lr"] = lr_at(step)
                h = decoder(input_ids=ids, attention_mask=attn).last_hidden_state[:, :-1]
                tgt = lab[:, 1:]
                sel = tgt != -100
                logits = head(h[sel]).float()
                loss = F.cross_entropy(logits, tgt[sel], label_smoothing=cfg.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                step += 1
                n_sel = int(sel.sum())
                tokens += int(attn.sum())
                target_tokens += n_sel
                loss_sum += loss.item() * n_sel
                loss_n += n_sel
                now = time.perf_counter()
                if now - last_log > cfg.log_every_s:
                    log.info("epoch %d step %d loss %.4f lr %.2e %.0f tok/s", epoch, step, loss_sum / loss_n,
                             lr_at(step), tokens / (now - t0))
                    last_log = now
                if budget and now - t0 > budget:
                    break
            rec: dict[str, Any] = {"epoch": epoch, "step": step, "loss": loss_sum / max(loss_n, 1),
                                   "seconds": round(time.perf_counter() - t0, 1)}
            over = bool(budget and time.perf_counter() - t0 > budget)
            if validate is not None and (epoch % cfg.eval_every == 0 or over or epoch == cfg.max_epochs):
                model.eval()
                score = float(validate(model))
                rec["val"] = score
                if best_score is None or score > best_score:
                    best_score, best_epoch, bad = score, epoch, 0
                    best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
                else:
                    bad += 1
            history.append(rec)
            log.info("epoch %d done: loss %.4f%s (%.0fs, %.0f tok/s)", epoch, rec["loss"],
                     f" val {rec['val']:.4f} (best {best_score:.4f} @ {best_epoch})" if "val" in rec else "",
                     rec["seconds"], tokens / max(rec["seconds"], 1e-9))
            if over:
                stopped = "time_budget"
                break
            if validate is not None and bad >= cfg.patience:
                stopped = "early_stop"
                break
    finally:
        for hdl in hooks:
            hdl.remove()
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        best_epoch = epoch
    model.eval()
    return FitResult(best_epoch=best_epoch, best_score=best_score, epochs=epoch, steps=step, tokens=tokens,
                     target_tokens=target_tokens, seconds=round(time.perf_counter() - t0, 1),
                     history=history, stopped=stopped)
