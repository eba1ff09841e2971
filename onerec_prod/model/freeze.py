"""Token warm-up: freeze the LLM, train only the rows of the new (SID) tokens.

Every parameter gets ``requires_grad=False`` except the input embedding matrix (and the
``lm_head`` when it is not tied to it). A gradient hook on those matrices zeroes every row that
is not a new token, so nothing is copied (no adapter, no second model) and the optimizer sees
the real parameters.

Why old rows stay bit-identical under AdamW: a row whose gradient is always zero keeps
``exp_avg == exp_avg_sq == 0`` and its Adam update is exactly ``0 / eps = 0``. Decoupled weight
decay would still shrink it (``p -= lr * wd * p``), so the masked matrices must sit in a
param group with ``weight_decay=0``: :func:`no_decay_names` lists them for the trainer
(``SftTrainer.get_decay_parameter_names``) and :func:`param_groups` builds the groups for a plain
loop. The new rows therefore train without weight decay during warm-up (the reference recipes
use ``weight_decay=0`` for this stage anyway).

    >>> mask = freeze_except_rows(model, new_ids)                      # doctest: +SKIP
    >>> opt = torch.optim.AdamW(param_groups(model, 0.1, mask.param_names))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class RowMask:
    """Handle of an applied row mask: masked parameter names, trainable rows, hook handles."""

    param_names: list[str]
    row_ids: list[int]
    handles: list = field(default_factory=list, repr=False)

    def remove(self) -> None:
        """Remove the gradient hooks (``requires_grad`` flags are left as they are)."""
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _row_masking_hook(mask):
    def hook(grad):
        return grad * mask.to(device=grad.device, dtype=grad.dtype)

    return hook


def freeze_except_rows(model, row_ids: Sequence[int]) -> RowMask:
    """Freeze ``model`` except rows ``row_ids`` of the embeddings (and of an untied lm_head)."""
    import torch

    if not row_ids:
        raise ValueError("freeze_except_rows: no rows to train (are the SID tokens in the vocab?)")
    emb = model.get_input_embeddings().weight
    head_mod = model.get_output_embeddings()
    head = head_mod.weight if head_mod is not None else None
    targets = [emb] if head is None or head is emb else [emb, head]
    target_ids = {id(t) for t in targets}
    names = []
    for name, p in model.named_parameters(remove_duplicate=True):
        if id(p) in target_ids:
            p.requires_grad_(True)
            names.append(name)
        else:
            p.requires_grad_(False)
    handles = []
    for t in targets:
        n_rows = t.shape[0]
        bad = [i for i in row_ids if not 0 <= i < n_rows]
        if bad:
            raise ValueError(f"freeze_except_rows: row ids {bad[:5]} outside 0..{n_rows - 1}")
        mask = torch.zeros(n_rows, 1, dtype=t.dtype)
        mask[list(row_ids)] = 1
        handles.append(t.register_hook(_row_masking_hook(mask)))
    log.info("warm-up: training %d rows of %s; every other parameter frozen", len(row_ids), names)
    return RowMask(param_names=names, row_ids=list(row_ids), handles=handles)


def no_decay_names(mask: RowMask | None) -> set[str]:
    """Parameter names that must not be weight-decayed (the masked matrices)."""
    return set(mask.param_names) if mask is not None else set()


def param_groups(model, weight_decay: float, exclude: Iterable[str] = ()) -> list[dict]:
    """AdamW groups of trainable params: decay on matrices, none on norms/biases/``exclude``."""
    excl = set(exclude)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in excl or p.ndim < 2 or "norm" in name or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
