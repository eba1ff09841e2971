"""Training-time dropout for Qwen3-architecture models, without changing the architecture.

Qwen3 has only attention-probability dropout (``config.attention_dropout``). A small model trained
from scratch on a few hundred thousand targets overfits without more, so three rates are applied:

- ``attention``: set on the config and on every attention module (saved with the model; HF
  applies it in training mode only; inference engines ignore it);
- ``hidden``: on the output of each attention and MLP block, before the residual add (the
  classic transformer residual dropout), by forward hooks;
- ``embedding``: on the token embeddings, by a forward hook.

Hooks are active only while the module is in training mode, are not saved, and a real Qwen3
checkpoint loads and saves unchanged. :func:`apply_dropout` returns the hook handles;
``remove()`` each to detach them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DropoutRates:
    attention: float = 0.0
    hidden: float = 0.0
    embedding: float = 0.0

    def __post_init__(self) -> None:
        for name in ("attention", "hidden", "embedding"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"dropout {name}={p} must be in [0, 1)")


def apply_dropout(model, rates: DropoutRates) -> list:
    """Install ``rates`` on ``model`` (a ``*ForCausalLM``); return the hook handles."""
    import torch.nn.functional as F

    model.config.attention_dropout = rates.attention
    handles = []
    for mod in model.modules():
        if hasattr(mod, "attention_dropout") and hasattr(mod, "q_proj"):
            mod.attention_dropout = rates.attention

    if rates.hidden > 0:
        def drop_out(mod, args, out):
            if not mod.training:
                return out
            if isinstance(out, tuple):
                return (F.dropout(out[0], rates.hidden, True), *out[1:])
            return F.dropout(out, rates.hidden, True)

        for layer in model.get_decoder().layers:
            handles.append(layer.self_attn.register_forward_hook(drop_out))
            handles.append(layer.mlp.register_forward_hook(drop_out))
    if rates.embedding > 0:
        emb = model.get_input_embeddings()

        def drop_emb(mod, args, out):
            return F.dropout(out, rates.embedding, True) if mod.training else out

        handles.append(emb.register_forward_hook(drop_emb))
    return handles
