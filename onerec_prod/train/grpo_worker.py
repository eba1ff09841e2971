"""One rank of the multi-process GRPO refresh (DeepSpeed), like :mod:`onerec_prod.train.sft`.

:func:`onerec_prod.train.grpo.rl_day` writes a JSON spec (init dir, prompts JSONL, catalog SIDs,
config, meta, run key) and starts ``grpo.nproc`` of these through the launcher when
``grpo.nproc > 1`` or ``grpo.zero_stage > 0``::

    python -m onerec_prod.train.grpo_worker SPEC.json

- setup: process group (gloo on CPU, nccl on GPU), policy + frozen SFT reference from the init
  dir, the policy wrapped by ``deepspeed.initialize`` (AdamW at ``grpo.lr``, grad-norm clip
  :data:`~onerec_prod.train.grpo.MAX_GRAD_NORM`, ZeRO stage ``grpo.zero_stage`` from the SFT
  template ``train.deepspeed_config``; bf16 only on GPU with ZeRO; ``zero_stage: 0`` with several
  processes is plain data parallel in fp32).
- train: each step's prompts (:func:`~onerec_prod.train.grpo.step_prompts`) are split by rank
  (``r::world``); each rank rolls out and computes the loss on its share
  (:func:`~onerec_prod.train.grpo.grpo_step`, the same step as the single-process loop) scaled so
  that DeepSpeed's gradient average is the mean over the whole step; every rank runs the same
  number of micro-batches (the DeepSpeed accumulation steps). The step's sums (reward, KL, hits,
  ...) are all-reduced, so the logged curve is global.
- checkpoints (``grpo.save_steps``): rank 0 writes the model (safetensors), every rank its
  optimizer state (``optimizer_rank{R}.safetensors``: torch state + ZeRO fp32 partition), then
  rank 0 ``grpo_state.safetensors`` (step, curve) last: a directory with it is complete. A rerun
  resumes from the latest (same run key: the parent discards checkpoints of other inputs).
- save: rank 0 writes the final model to ``out_dir`` and ``result.json`` (curve, resumed_from)
  to the work dir; the parent evaluates and publishes it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from onerec_prod.config import Config, ConfigError
from onerec_prod.train import checkpoint
from onerec_prod.train.distributed import (
    RankEnv,
    all_reduce_sums,
    barrier,
    build_ds_config,
    cleanup,
    init_distributed,
)
from onerec_prod.train.grpo import (
    CKPT_PREFIX,
    MAX_GRAD_NORM,
    RESULT_FILE,
    STATE_FILE,
    chunk_units,
    ckpt_due,
    default_rewards,
    grpo_step,
    latest_ckpt,
    log_step,
    rank_share,
    read_prompts,
    rollout_seed,
    step_metrics,
    step_prompts,
)

log = logging.getLogger(__name__)

MICRO_BATCH = 16


def build_grpo_ds_config(cfg: Config, bf16: bool, micro_batch: int, grad_accum: int,
                         world: int) -> dict[str, Any]:
    """DeepSpeed config of the GRPO engine: the SFT template's ZeRO block for ``grpo.zero_stage``.

    ``grad_accum`` = micro-batches per update on every rank. ``zero_stage: 0`` = data parallel
    without ZeRO (fp32).
    """
    zero = cfg.grpo.zero_stage
    if zero > 2:
        raise ConfigError(f"grpo.zero_stage={zero}: rollouts need whole weights (ZeRO <= 2)")
    ds = build_ds_config(cfg.train.model_copy(update={"zero_stage": max(zero, 1)}), bf16 and zero > 0)
    assert ds is not None
    if zero == 0:
        ds["zero_optimization"] = {"stage": 0}
    ds.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=grad_accum,
              train_batch_size=micro_batch * grad_accum * world, gradient_clipping=MAX_GRAD_NORM,
              zero_allow_untested_optimizer=True)
    auto = [k for k, v in ds.items() if v == "auto"]
    auto += [k for k, v in ds["zero_optimization"].items() if v == "auto"]
    if auto:
        raise ConfigError(f"{cfg.train.deepspeed_config}: 'auto' values left for GRPO: {auto}")
    return ds


class EngineUpdate:
    """The DeepSpeed engine applies the gradients: ``backward`` + ``step`` per micro-batch.

    The engine steps the optimizer at its accumulation boundary (every ``grad_accum``
    micro-batches = one ``grpo_step`` iteration); the loss is already scaled (no 1/gas).
    """

    def __init__(self, engine):
        self.engine = engine
        self.model = engine
        self._steps = 0

    def begin(self) -> None:
        self._steps = self.engine.global_steps

    def backward(self, loss) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()

    def end(self) -> None:
        if self.engine.global_steps != self._steps + 1:
            raise RuntimeError("GRPO: micro-batches out of step with DeepSpeed's accumulation boundary")


class GrpoRun:
    """One rank: ``setup -> train -> save -> cleanup``."""

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self.cfg = Config.model_validate(spec["config"])
        self.gcfg = self.cfg.grpo
        self.env = RankEnv.from_env()
        self.rank, self.world, self.is_main = self.env.rank, self.env.world, self.env.is_main
        self.ckpt = Path(spec["ckpt_dir"])
        self.curve: list[dict[str, float]] = []
        self.start = 0

    # ---- setup
    def setup(self) -> None:
        import deepspeed
        import torch

        from onerec_prod.model.io import load_model, load_tokenizer
        from onerec_prod.sid.tokens import SidVocab
        from onerec_prod.sid.trie import SidTrie

        g = self.gcfg
        self.device, self.on_gpu = init_distributed(self.env, force_cpu=self.spec.get("force_cpu", False))
        bf16 = self.on_gpu and g.zero_stage > 0
        if self.world != g.nproc and self.is_main:
            log.warning("GRPO: %d processes but grpo.nproc=%d", self.world, g.nproc)
        if g.prompts_per_step < self.world:
            raise ConfigError(f"grpo.prompts_per_step={g.prompts_per_step} < {self.world} processes")
        init = Path(self.spec["init_dir"])
        sizes = list(self.spec["sid_sizes"])
        self.tok = load_tokenizer(init)
        self.vocab = SidVocab.from_tokenizer(self.tok, sizes)
        self.trie = SidTrie.from_sids([tuple(s) for s in json.loads(Path(self.spec["sids_path"]).read_text())],
                                      sizes)
        self.prompts = read_prompts(self.spec["prompts_path"])
        self.rewards = default_rewards(self.tok, self.vocab, g)
        torch.manual_seed(g.seed)
        policy = load_model(init, device=str(self.device), dtype=torch.float32)
        self.ref = None
        if g.kl_coef > 0:
            self.ref = load_model(init, device=str(self.device), dtype=torch.bfloat16 if bf16 else torch.float32)
            self.ref.eval().requires_grad_(False)
        self.last = latest_ckpt(self.ckpt)
        if self.last is not None:
            checkpoint.load_weights(policy, self.last)
        # every rank runs the same number of micro-batches (collectives of ZeRO's gradient
        # reduction must pair up): enough for the largest share, the smaller shares split finer
        # (a direct-mode group is never split: it shares one prompt forward)
        unit = chunk_units(g)
        biggest = math.ceil(g.prompts_per_step / self.world) * g.group_size
        smallest_units = (g.prompts_per_step // self.world) * (g.group_size // unit)
        self.n_chunks = max(1, min(math.ceil(biggest / MICRO_BATCH), smallest_units))
        ds = build_grpo_ds_config(self.cfg, bf16, MICRO_BATCH, self.n_chunks, self.world)
        opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=g.lr, weight_decay=0.0)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=policy, optimizer=opt, config=ds)
        if self.last is not None:
            self._load_state(self.last)
        if self.is_main:
            log.info("GRPO worker: world=%d zero=%d %s, %d prompts, %d micro-batches per update; cfg %s",
                     self.world, g.zero_stage, "bf16" if bf16 else "fp32", len(self.prompts), self.n_chunks,
                     json.dumps(g.model_dump(), sort_keys=True))

    # ---- optimizer state (safetensors, no pickle): train.checkpoint
    def _load_state(self, ckpt: Path) -> None:
        from onerec_prod.model.io import load_tree

        saved = checkpoint.optimizer_shards(ckpt)
        if saved != self.world:
            raise RuntimeError(f"checkpoint {ckpt} holds {saved} optimizer shards, this run has "
                               f"{self.world} processes")
        checkpoint.load_optimizer(ckpt, self.rank, self.optimizer, self.engine)
        state = load_tree(ckpt / STATE_FILE)
        if int(state.get("world_size", -1)) != self.world:
            raise RuntimeError(f"checkpoint {ckpt} is not of a {self.world}-process run")
        self.curve, self.start = list(state["curve"]), int(state["step"])
        if self.is_main:
            log.info("GRPO: resuming from %s (step %d)", ckpt, self.start)

    def _checkpoint(self, step: int) -> None:
        """Collective: model by rank 0, optimizer shard by every rank, then the state file."""
        from onerec_prod.model.io import save_model, save_tree

        d = self.ckpt / f"{CKPT_PREFIX}{step}"
        if self.is_main:
            save_model(self.engine.module, self.tok, d, {**self.spec.get("meta", {}), "grpo_step": step})
        barrier()
        checkpoint.save_optimizer(d, self.rank, self.optimizer, self.engine)
        barrier()
        if self.is_main:
            save_tree({"step": step, "curve": self.curve, "world_size": self.world,
                       "zero_stage": self.gcfg.zero_stage}, d / STATE_FILE)
            checkpoint.prune(self.ckpt, CKPT_PREFIX, d)

    # ---- train
    def train(self) -> None:
        g = self.gcfg
        update = EngineUpdate(self.engine)
        kill_at = int((self.spec.get("fault") or {}).get("kill_at_step") or 0)
        for step in range(self.start, g.steps):
            t0 = time.perf_counter()
            idx = step_prompts(len(self.prompts), g.prompts_per_step, step, g.seed)
            batch = [self.prompts[i] for i in rank_share(idx, self.rank, self.world)]
            sums = grpo_step(self.engine.module, self.ref, self.tok, batch, self.trie, self.vocab, g,
                             self.rewards, update, seed=rollout_seed(g, step, self.rank),
                             n_total=len(idx) * g.group_size, world=self.world, micro_batch=MICRO_BATCH,
                             n_chunks=self.n_chunks, max_items=self.cfg.samples.max_history)
            m = step_metrics(all_reduce_sums(sums, self.device), step, time.perf_counter() - t0)
            self.curve.append(m)
            if self.is_main:
                log_step(m, g.steps)
            if ckpt_due(g, step):
                self._checkpoint(step + 1)
            if kill_at and step + 1 == kill_at and self.is_main:
                log.warning("fault injection: SIGKILL after step %d", step + 1)
                os.kill(os.getpid(), signal.SIGKILL)

    # ---- save
    def save(self) -> None:
        from onerec_prod.model.io import save_model

        if self.is_main:
            self.engine.module.eval()
            meta = {**self.spec.get("meta", {}), "grpo_step": self.gcfg.steps, "world_size": self.world}
            save_model(self.engine.module, self.tok, Path(self.spec["out_dir"]), meta)
            result = {"run_key": self.spec.get("run_key"), "curve": self.curve,
                      "resumed_from": self.start, "world_size": self.world}
            Path(self.spec["work_dir"], RESULT_FILE).write_text(json.dumps(result))
        barrier()

    # ---- cleanup
    def cleanup(self) -> None:
        cleanup()


def run_spec(spec: dict[str, Any]) -> None:
    """Run the GRPO steps of ``spec`` in this process (one rank of a torchrun job)."""
    run = GrpoRun(spec)
    try:
        run.setup()
        run.train()
        run.save()
    finally:
        run.cleanup()


def main(argv: list[str] | None = None) -> int:
    from onerec_prod.train.launcher import worker_main

    return worker_main("onerec_prod.train.grpo_worker", run_spec, argv)


if __name__ == "__main__":
    sys.exit(main())
