"""Capacity arithmetic for the 80-GPU deployment (the numbers of infra/CAPACITY.md).

Everything here is closed-form arithmetic on model shapes and a few assumptions, so the tables
in CAPACITY.md can be regenerated and checked by hand::

    python infra/capacity.py                      # every table, as markdown
    python infra/capacity.py --tokens-per-day 2e10 --gpus 80 --seq 4096

Conventions (see CAPACITY.md for the derivations):
- Training FLOPs per token = 6 * N_matmul + 12 * L * (heads * head_dim) * seq, where N_matmul
  counts every weight used in a matmul (attention, MLP, the LM head; not the embedding lookup).
  The attention term is the usual non-causal count (PaLM appendix B); causal masking with a fused
  kernel does about half of it, so MFU figures here are slightly generous to the hardware.
- Generation (rollouts, precompute) costs 2 * N_matmul FLOPs per token (forward only).
- Mixed-precision Adam keeps 16 bytes per trainable parameter: bf16 weights (2) + bf16 grads (2)
  + fp32 master weights, momentum and variance (12). ZeRO-2 shards grads + optimizer states,
  ZeRO-3 also the weights, over the data-parallel degree.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

H100_BF16_DENSE_TFLOPS = 989.0  # H100 SXM, dense bf16 spec peak
PAPER_TOKENS_PER_DAY = 20e9  # OneRec-Think sec. 5.4.1: ~20B tokens/day of incremental training
PAPER_GPUS = 80  # OneRec-Think sec. 5.4.1: 80 GPUs
GIB = 1024**3


@dataclass(frozen=True)
class ModelShape:
    """Decoder-only transformer shape (Qwen3 family: GQA, SwiGLU MLP)."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool

    @property
    def attn_width(self) -> int:
        return self.heads * self.head_dim

    def layer_params(self) -> int:
        q_o = 2 * self.hidden * self.attn_width
        k_v = 2 * self.hidden * self.kv_heads * self.head_dim
        mlp = 3 * self.hidden * self.ffn
        norms = 2 * self.hidden + 2 * self.head_dim  # input/post norms + q/k norms
        return q_o + k_v + mlp + norms

    def matmul_params(self, extra_vocab: int = 0) -> int:
        """Weights touched by a matmul per token: the layers plus the LM head."""
        return self.layers * self.layer_params() + self.hidden * (self.vocab + extra_vocab)

    def total_params(self, extra_vocab: int = 0) -> int:
        """Stored (trainable) parameters, vocabulary expansion included."""
        emb = self.hidden * (self.vocab + extra_vocab)
        head = 0 if self.tied else emb
        return self.layers * self.layer_params() + emb + head + self.hidden


# Public Qwen3 configs (config.json of Qwen/Qwen3-1.7B and Qwen/Qwen3-8B).
QWEN3_1_7B = ModelShape("Qwen3-1.7B", 2048, 28, 16, 8, 128, 6144, 151_936, tied=True)
QWEN3_8B = ModelShape("Qwen3-8B", 4096, 36, 32, 8, 128, 12_288, 151_936, tied=False)
MODELS = (QWEN3_1_7B, QWEN3_8B)
# Itemic tokens added to the vocabulary: the paper's industrial setup adds 24,576 + 2 (sec. 5.4.1);
# the public-benchmark setup 4 x 256 + 2 (appendix A.1).
EXTRA_VOCAB = {"Qwen3-1.7B": 4 * 256 + 2, "Qwen3-8B": 24_576 + 2}


def train_flops_per_token(m: ModelShape, seq: int, extra_vocab: int = 0) -> float:
    """6N + 12 * L * (heads * head_dim) * seq."""
    return 6.0 * m.matmul_params(extra_vocab) + 12.0 * m.layers * m.attn_width * seq


def gen_flops_per_token(m: ModelShape, extra_vocab: int = 0) -> float:
    """Forward-only cost of one generated or prefilled token (attention term neglected)."""
    return 2.0 * m.matmul_params(extra_vocab)


def tokens_per_s_per_gpu(tokens_per_day: float, gpus: int, window_h: float) -> float:
    """Training throughput each GPU must sustain to fit a day's tokens into the window."""
    return tokens_per_day / gpus / (window_h * 3600.0)


def implied_mfu(
    m: ModelShape,
    tokens_per_s_gpu: float,
    seq: int,
    peak_tflops: float = H100_BF16_DENSE_TFLOPS,
    extra_vocab: int = 0,
) -> float:
    """Model FLOPs utilisation that throughput implies against the dense bf16 peak."""
    return tokens_per_s_gpu * train_flops_per_token(m, seq, extra_vocab) / (peak_tflops * 1e12)


def hours_at_mfu(
    m: ModelShape,
    tokens_per_day: float,
    gpus: int,
    mfu: float,
    seq: int,
    extra_vocab: int = 0,
    peak_tflops: float = H100_BF16_DENSE_TFLOPS,
) -> float:
    """Wall hours the day's tokens take on ``gpus`` GPUs running at ``mfu``."""
    flops = tokens_per_day * train_flops_per_token(m, seq, extra_vocab)
    return flops / (gpus * peak_tflops * 1e12 * mfu) / 3600.0


def zero2_comm_gb_per_gpu_step(m: ModelShape, grad_accum: int, extra_vocab: int = 0) -> float:
    """Bytes each GPU moves per optimizer step under ZeRO-2 (ring collectives, large world):
    a bf16 gradient reduce-scatter per micro step (~2 bytes/param) and one bf16 all-gather of
    the updated weights (~2 bytes/param)."""
    psi = m.total_params(extra_vocab)
    return (grad_accum * 2.0 * psi + 2.0 * psi) / 1e9


def window_rows(tokens_per_day: float, gpus: int, seq: int, windows_h=(24, 12, 6)) -> list[dict]:
    rows = []
    for w in windows_h:
        tps = tokens_per_s_per_gpu(tokens_per_day, gpus, w)
        row = {"window_h": w, "tokens_s_gpu": tps}
        for m in MODELS:
            row[m.name] = implied_mfu(m, tps, seq, extra_vocab=EXTRA_VOCAB[m.name])
        rows.append(row)
    return rows


def zero_memory_gib(m: ModelShape, stage: int, dp: int, extra_vocab: int = 0) -> float:
    """Model-state memory per GPU (weights, grads, Adam states) under ZeRO stage 0-3."""
    psi = m.total_params(extra_vocab)
    w, g, o = 2.0 * psi, 2.0 * psi, 12.0 * psi
    if stage >= 1:
        o /= dp
    if stage >= 2:
        g /= dp
    if stage >= 3:
        w /= dp
    return (w + g + o) / GIB


def activation_gib(m: ModelShape, micro_batch: int, seq: int, extra_vocab: int = 0) -> float:
    """Activations with full activation checkpointing and a fused (flash) attention kernel.

    Stored: each layer's bf16 input (2*b*s*h bytes), plus one layer recomputed in full
    (~34*b*s*h bytes, Korthikanti et al. 2022 without the s^2 term), plus the logits in bf16 and
    their fp32 copy for the loss (6*b*s*V bytes).
    """
    bsh = micro_batch * seq * m.hidden
    logits = 6.0 * micro_batch * seq * (m.vocab + extra_vocab)
    return (2.0 * bsh * m.layers + 34.0 * bsh + logits) / GIB


@dataclass(frozen=True)
class RlBudget:
    """One day's GRPO refresh (configs/cluster.yaml grpo.*)."""

    prompts_per_step: int = 64
    group_size: int = 8
    steps: int = 200
    prompt_tokens: int = 2048
    think_tokens: int = 256
    beam: int = 10
    sid_tokens: int = 6  # <|sid_begin|> + 4 levels + <|sid_end|>
    train_mfu: float = 0.35
    decode_mfu: float = 0.10


def rl_gpu_hours(m: ModelShape, b: RlBudget, extra_vocab: int = 0, seq: int = 4096) -> dict:
    """GPU-hours of one day's RL refresh: rollouts (prefill + decode) and the policy update."""
    peak = H100_BF16_DENSE_TFLOPS * 1e12
    gen = gen_flops_per_token(m, extra_vocab)
    rollouts = b.prompts_per_step * b.group_size
    gen_tokens = b.think_tokens + b.beam * b.sid_tokens
    prefill = b.prompts_per_step * b.prompt_tokens * gen  # prompt KV shared by the G rollouts
    decode = rollouts * gen_tokens * gen
    seq_tokens = rollouts * (b.prompt_tokens + gen_tokens)
    update = seq_tokens * (train_flops_per_token(m, seq, extra_vocab) + gen)  # + reference fwd
    per_step_s = (prefill + update) / (peak * b.train_mfu) + decode / (peak * b.decode_mfu)
    total_s = per_step_s * b.steps
    return {
        "flops": (prefill + decode + update) * b.steps,
        "gpu_hours": total_s / 3600.0,
    }


def precompute_gpu_hours(
    m: ModelShape,
    users: float,
    prompt_tokens: int = 2048,
    think_tokens: int = 128,
    beam: int = 10,
    levels: int = 2,
    prefill_mfu: float = 0.5,
    decode_mfu: float = 0.10,
    extra_vocab: int = 0,
) -> float:
    """Think-Ahead precompute: per user, prefill the prompt, decode the rationale and B beams of k
    SID levels (serving.prefix_beam, serving.prefix_levels)."""
    peak = H100_BF16_DENSE_TFLOPS * 1e12
    gen = gen_flops_per_token(m, extra_vocab)
    prefill = users * prompt_tokens * gen / (peak * prefill_mfu)
    decode = users * (think_tokens + beam * levels) * gen / (peak * decode_mfu)
    return (prefill + decode) / 3600.0


# --------------------------------------------------------------------------------------
# report


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def report(tokens_per_day: float, gpus: int, seq: int, micro_batch: int, grad_accum: int = 4) -> str:
    out = []
    out.append(f"### Model shapes (seq {seq})\n")
    out.append("| model | params (+itemic vocab) | N_matmul | train FLOPs/token | of which attention |")
    out.append("|---|---|---|---|---|")
    for m in MODELS:
        ev = EXTRA_VOCAB[m.name]
        attn = 12.0 * m.layers * m.attn_width * seq
        out.append(
            f"| {m.name} | {m.total_params(ev) / 1e9:.2f}B (+{ev}) | {m.matmul_params(ev) / 1e9:.2f}B | "
            f"{train_flops_per_token(m, seq, ev):.3g} | {attn:.3g} |"
        )
    out.append(
        f"\n### Throughput and implied MFU ({tokens_per_day / 1e9:.0f}B tokens/day, {gpus} GPUs, "
        f"peak {H100_BF16_DENSE_TFLOPS:.0f} TFLOP/s)\n"
    )
    out.append("| training window | tokens/s/GPU | MFU Qwen3-1.7B | MFU Qwen3-8B |")
    out.append("|---|---|---|---|")
    for r in window_rows(tokens_per_day, gpus, seq):
        out.append(
            f"| {r['window_h']} h | {r['tokens_s_gpu']:,.0f} | {_pct(r['Qwen3-1.7B'])} | "
            f"{_pct(r['Qwen3-8B'])} |"
        )
    out.append("\n### Hours for the day's tokens at a sustained MFU\n")
    out.append("| model | MFU 25% | MFU 40% | MFU 50% |")
    out.append("|---|---|---|---|")
    for m in MODELS:
        cells = [
            hours_at_mfu(m, tokens_per_day, gpus, u, seq, EXTRA_VOCAB[m.name]) for u in (0.25, 0.40, 0.50)
        ]
        out.append(f"| {m.name} | " + " | ".join(f"{h:.1f} h" for h in cells) + " |")
    out.append(f"\n### Memory per GPU (data-parallel degree {gpus}, micro batch {micro_batch} x {seq})\n")
    out.append("| model | ZeRO-0 | ZeRO-2 | ZeRO-3 | activations (ckpt) | total ZeRO-2 | total ZeRO-3 |")
    out.append("|---|---|---|---|---|---|---|")
    for m in MODELS:
        ev = EXTRA_VOCAB[m.name]
        z0, z2, z3 = (zero_memory_gib(m, s, gpus, ev) for s in (0, 2, 3))
        act = activation_gib(m, micro_batch, seq, ev)
        out.append(
            f"| {m.name} | {z0:.1f} GiB | {z2:.1f} GiB | {z3:.1f} GiB | {act:.1f} GiB | "
            f"{z2 + act:.1f} GiB | {z3 + act:.1f} GiB |"
        )
    out.append(f"\n### ZeRO-2 traffic per GPU and optimizer step (grad_accum {grad_accum})\n")
    out.append("| model | GB per step | GB/s at the 12 h window |")
    out.append("|---|---|---|")
    tokens_per_step = micro_batch * grad_accum * seq * gpus
    step_s_12h = tokens_per_step / (tokens_per_s_per_gpu(tokens_per_day, gpus, 12) * gpus)
    for m in MODELS:
        gb = zero2_comm_gb_per_gpu_step(m, grad_accum, EXTRA_VOCAB[m.name])
        out.append(
            f"| {m.name} | {gb:.1f} | {gb / step_s_12h:.1f} (step {step_s_12h:.1f} s, "
            f"{tokens_per_step / 1e6:.2f}M tokens) |"
        )
    b = RlBudget()
    out.append(
        f"\n### RL refresh per day (G={b.group_size}, {b.prompts_per_step} prompts/step, "
        f"{b.steps} steps, beam {b.beam}, think {b.think_tokens})\n"
    )
    out.append("| model | FLOPs | GPU-hours | wall on 80 GPUs |")
    out.append("|---|---|---|---|")
    for m in MODELS:
        r = rl_gpu_hours(m, b, EXTRA_VOCAB[m.name], seq)
        out.append(
            f"| {m.name} | {r['flops']:.3g} | {r['gpu_hours']:.1f} | {60 * r['gpu_hours'] / gpus:.0f} min |"
        )
    out.append("\n### Think-Ahead precompute per day (prompt 2048, rationale 128, B=10, k=2)\n")
    out.append("| model | 1M users | 10M users | 100M users |")
    out.append("|---|---|---|---|")
    for m in MODELS:
        cells = [precompute_gpu_hours(m, u, extra_vocab=EXTRA_VOCAB[m.name]) for u in (1e6, 1e7, 1e8)]
        out.append(f"| {m.name} | " + " | ".join(f"{c:,.0f} GPU-h" for c in cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens-per-day", type=float, default=PAPER_TOKENS_PER_DAY)
    p.add_argument("--gpus", type=int, default=PAPER_GPUS)
    p.add_argument("--seq", type=int, default=4096, help="Packed sequence length (train.max_length).")
    p.add_argument("--micro-batch", type=int, default=4, help="train.per_device_batch_size.")
    p.add_argument("--grad-accum", type=int, default=4, help="train.grad_accum.")
    args = p.parse_args(argv)
    print(report(args.tokens_per_day, args.gpus, args.seq, args.micro_batch, args.grad_accum))
    return 0


if __name__ == "__main__":
    sys.exit(main())
