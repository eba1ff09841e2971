"""Training throughput: DeepSpeed ZeRO-2 on 2 CPU processes vs the plain HF Trainer, and GPU MFU.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/train_throughput.py [--steps 30] [--samples 256]
    python bench/train_throughput.py --gpu [--steps 20] [--batch 4] [--seq 2048]

CPU mode (default): builds the embedded model with ``configs/local.yaml`` sizes (tokenizer trained
on the Beauty items, SID vocabulary 3x256+256), renders synthetic rows of every trainable task with
random SIDs, then trains the same stage through the real entry point twice in this run:
``train.nproc=2, zero_stage=2`` (torchrun, gloo, one thread per process) and ``nproc=1,
zero_stage=0`` (plain HF Trainer, no DeepSpeed, one thread). Prints tokens/s per process (real,
non-pad tokens over the whole ``trainer.train`` call, start-up included) and the ratio.

GPU mode (``--gpu``): a Qwen3-1.7B-shaped model (28 layers, d=2048, 16/8 heads, MLP 6144,
vocab 151,936 + SID tokens, tied), random init, fp32 master weights with bf16 autocast, fused
AdamW, plain PyTorch loop on one GPU (the lent machine has no DeepSpeed). Reports tokens/s and MFU
against the dense bf16 peak (H100 SXM 989 TFLOP/s; ``--peak-tflops`` to change).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

log = logging.getLogger("bench.train_throughput")


# --------------------------------------------------------------------------------------
# CPU: DeepSpeed (2 procs) vs plain Trainer (1 proc)


def _synthetic_rows(items: list[dict], sizes: list[int], n: int, seed: int = 0) -> list[dict]:
    from onerec_prod.samples.prompts import messages_to_json, render_history, task_messages, task_response
    from onerec_prod.sid.tokens import sid_to_text

    rng = random.Random(seed)
    sid = {it["item_id"]: tuple(rng.randrange(s) for s in sizes) for it in items}
    tasks = ["text2sid", "seqrec", "caption", "sid_rec", "reasoning", "general_lm"]
    rows = []
    for k in range(n):
        it = rng.choice(items)
        hist = [dict(h, sid=sid[h["item_id"]]) for h in rng.sample(items, rng.randint(3, 10))]
        s = sid_to_text(sid[it["item_id"]])
        task = tasks[k % len(tasks)]
        if task == "text2sid":
            m, r = task_messages(task, title=it["title"], categories=it["categories"]), task_response(task, sid=s)
        elif task == "caption":
            m = task_messages(task, sid=s)
            r = task_response(task, sid=s, title=it["title"], categories=it["categories"], description="")
        elif task in ("seqrec", "sid_rec"):
            m, r = task_messages(task, history=render_history(hist, False, 10)), task_response(task, sid=s)
        elif task == "reasoning":
            m = task_messages(task, history=render_history(hist, True, 10))
            r = task_response(task, sid=s, rationale="The user keeps buying similar products.")
        else:
            m, r = [], f"{it['title']}. {it['categories']}"
        rows.append({"sample_id": f"b{k:06d}", "task": task, "messages": messages_to_json(m),
                     "response": r, "sid_version": "bench", "dt": "2014-01-01"})
    return rows


def run_cpu(args: argparse.Namespace) -> dict:
    import torch

    from onerec_prod.config import load_config
    from onerec_prod.model.base import catalog_texts_from_dataset, init_base_model
    from onerec_prod.sid.tokens import level_sizes
    from onerec_prod.train import day as train_cli
    from onerec_prod.train.data import write_rows_jsonl
    from onerec_prod.util import read_meta

    root = Path(args.work or tempfile.mkdtemp(prefix="onerec-bench-"))
    common = [f"paths.var_root={root}", f"train.max_steps={args.steps}", "train.save_steps=1000000",
              f"train.logging_steps={max(1, args.steps // 3)}", "train.max_length=512"]
    cfg = load_config(REPO / "configs" / "local.yaml", common, environ={})
    base = root / "base"
    if not (base / "model.safetensors").exists():
        t0 = time.perf_counter()
        init_base_model(cfg, catalog_texts_from_dataset(cfg), base)
        log.info("embedded base model built in %.1fs", time.perf_counter() - t0)
    items = []
    with open(cfg.paths.dataset / "p5" / "items_p5_ids.jsonl") as f:
        for line in f:
            r = json.loads(line)
            items.append({"item_id": r["p5_item_id"], "title": r["title"], "categories": r["categories"]})
    samples = root / "samples.jsonl"
    write_rows_jsonl(_synthetic_rows(items, level_sizes(cfg.sid), args.samples), samples)
    train_cli._champion = lambda c: None  # the bench never reads a registry
    results = {}
    for label, over in [("deepspeed_zero2_2proc", ["train.nproc=2", "train.zero_stage=2"]),
                        ("plain_trainer_1proc", ["train.nproc=1", "train.zero_stage=0"])]:
        run_cfg = load_config(REPO / "configs" / "local.yaml",
                              common + [f"model.base_dir={base}"] + over, environ={})
        torch.set_num_threads(1)  # the same one core per process as the torchrun ranks
        out = train_cli.train_stage(run_cfg, "2014-01-01", "incremental", root / label,
                                    root / f"{label}_work", samples_path=samples, force=True)
        meta = read_meta(out)
        if not meta:
            raise SystemExit(f"{out}: training wrote no model meta file")
        results[label] = {k: meta[k] for k in ("global_step", "world_size", "train_seconds",
                                                 "tokens_per_process", "tokens_per_s_per_process")}
    ds = results["deepspeed_zero2_2proc"]["tokens_per_s_per_process"]
    plain = results["plain_trainer_1proc"]["tokens_per_s_per_process"]
    results["ratio_per_process_ds_over_plain"] = round(ds / plain, 3)
    results["aggregate_ds_tokens_per_s"] = round(ds * 2, 1)
    return results


# --------------------------------------------------------------------------------------
# GPU: MFU of a Qwen3-1.7B-shaped model


QWEN3_1_7B = dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                  vocab_size=151_936 + 1088, max_position_embeddings=40_960, tie_word_embeddings=True)


def flops_per_token(cfg: dict, seq: int) -> float:
    """Training FLOPs per token: 6 x matmul params (lm_head included) + causal attention."""
    d, L, h, kv, hd = (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
                       cfg["num_key_value_heads"], cfg["head_dim"])
    per_layer = d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * cfg["intermediate_size"]
    matmul_params = L * per_layer + cfg["vocab_size"] * d
    attention = 6 * L * seq * h * hd  # QK^T and AV, fwd+bwd (x3), causal (x1/2): 2*2*3/2
    return 6 * matmul_params + attention


def run_gpu(args: argparse.Namespace) -> dict:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    assert torch.cuda.is_available(), "--gpu needs a CUDA device"
    torch.manual_seed(0)
    qcfg = Qwen3Config(**QWEN3_1_7B, attn_implementation="sdpa", use_cache=False)
    model = Qwen3ForCausalLM(qcfg).cuda().train()
    if args.grad_ckpt:
        model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01, fused=True)
    ids = torch.randint(0, qcfg.vocab_size, (args.batch, args.seq), device="cuda")
    times = []
    for _ in range(args.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    steady = times[min(3, len(times) - 1):]
    sec = sum(steady) / len(steady)
    tps = args.batch * args.seq / sec
    fpt = flops_per_token(QWEN3_1_7B, args.seq)
    return {
        "device": torch.cuda.get_device_name(0), "params": sum(p.numel() for p in model.parameters()),
        "batch": args.batch, "seq": args.seq, "step_s": round(sec, 4), "tokens_per_s": round(tps, 1),
        "model_tflops_per_s": round(tps * fpt / 1e12, 1),
        "mfu": round(tps * fpt / (args.peak_tflops * 1e12), 4),
        "max_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
        "torch": torch.__version__, "loss": float(loss),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="GPU MFU mode (Qwen3-1.7B shape).")
    p.add_argument("--steps", type=int, default=None, help="Steps (CPU default 30, GPU 20).")
    p.add_argument("--samples", type=int, default=256, help="CPU: synthetic sample rows.")
    p.add_argument("--work", default=None, help="CPU: work dir (default: a temp dir).")
    p.add_argument("--batch", type=int, default=4, help="GPU: sequences per step.")
    p.add_argument("--seq", type=int, default=2048, help="GPU: tokens per sequence.")
    p.add_argument("--grad-ckpt", action="store_true", help="GPU: gradient checkpointing.")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="GPU: dense bf16 peak.")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "accelerate", "deepspeed", "DeepSpeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.gpu:
        args.steps = args.steps or 20
        res = run_gpu(args)
    else:
        args.steps = args.steps or 30
        res = run_cpu(args)
    print(json.dumps(res, indent=2))
    if not args.gpu:
        print(f"tokens/s per process: DeepSpeed ZeRO-2 x2 "
              f"{res['deepspeed_zero2_2proc']['tokens_per_s_per_process']:.0f} vs plain Trainer x1 "
              f"{res['plain_trainer_1proc']['tokens_per_s_per_process']:.0f} "
              f"(ratio {res['ratio_per_process_ds_over_plain']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
