"""The one SFT trainer: HF Trainer + DeepSpeed; stages are configs (``configs/train/*.yaml``).

Each training process runs :func:`run_spec` on a JSON spec written by the driver
(:func:`onerec_prod.train.day.train_day`) and started by :mod:`onerec_prod.train.launcher`::

    setup -> train -> save -> cleanup

- setup: process group (gloo on CPU, nccl on GPU), TrainingArguments with the DeepSpeed dict
  (ZeRO stage from ``train.zero_stage``; fp32 on CPU, bf16 on GPU), model + tokenizer from the
  init dir, the warm-up row mask if the stage freezes the base, the tokenized JSONL samples.
- train: ``Trainer.train(resume_from_checkpoint=<latest complete checkpoint>)``, so a run killed
  mid-way (even ``kill -9``) continues from its own last checkpoint to the same final step. A
  checkpoint is complete when ``trainer_state.json`` exists: rank 0 writes it after a barrier that
  every rank reaches only once its optimizer and RNG shards are written, so one torn by a kill
  during its write is never resumed from. The result records what a resumed run restored (per
  rank: global step, optimizer step count, scheduler step, RNG digest) and how many steps it ran.
- save: rank 0 writes the final model with :func:`onerec_prod.model.io.save_model` (safetensors,
  ``onerec_meta.json`` with parent, dt, stage, data versions, sid_version, train loss).
- cleanup: barrier + ``destroy_process_group`` (else rank 1 aborts at exit).

    python -m onerec_prod.train.sft SPEC.json
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from onerec_prod.config import Config, ConfigError
from onerec_prod.train import checkpoint
from onerec_prod.train.distributed import (  # noqa: F401 (build_ds_config re-exported)
    RankEnv,
    barrier,
    build_ds_config,
    cleanup,
    skip_shm_comm_build,
)
from onerec_prod.train.stages import (  # noqa: F401 (re-exported: the stage API)
    STAGES_DIR,
    StageCfg,
    load_stage,
    stage_names,
    stage_train_cfg,
)

log = logging.getLogger(__name__)

CKPT_PREFIX = "checkpoint-"


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """Newest complete ``checkpoint-N`` (``trainer_state.json`` is written last) or None."""
    return checkpoint.latest(ckpt_dir, CKPT_PREFIX, "trainer_state.json")


# --------------------------------------------------------------------------------------
# the training process


class _Progress:
    """TrainerCallback factory (built lazily so this module imports without transformers)."""

    @staticmethod
    def make(collator, world_size: int, is_main: bool):
        from transformers import TrainerCallback

        class ProgressLog(TrainerCallback):
            def __init__(self):
                self.t0 = time.perf_counter()
                self.tok0 = 0
                self.last_loss: float | None = None
                self.steps_run = 0  # optimizer steps run by this process (a resumed run: the rest)

            def on_step_end(self, args, state, control, **kw):
                self.steps_run += 1

            def on_train_begin(self, args, state, control, **kw):
                self.t0, self.tok0 = time.perf_counter(), collator.tokens_seen

            def on_log(self, args, state, control, logs=None, **kw):
                logs = logs or {}
                if "loss" in logs:
                    self.last_loss = float(logs["loss"])
                if not is_main or "loss" not in logs:
                    return
                now = time.perf_counter()
                tps = (collator.tokens_seen - self.tok0) / max(now - self.t0, 1e-9)
                self.t0, self.tok0 = now, collator.tokens_seen
                log.info(
                    "step %d/%d epoch %.2f loss %.4f lr %.2e tokens/s %.0f (%.0f per process) "
                    "max_rss %.0f MiB",
                    state.global_step, state.max_steps, state.epoch or 0.0, logs["loss"],
                    logs.get("learning_rate", float("nan")), tps * world_size, tps,
                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                )

        return ProgressLog()


FAULT_POINTS = ("step_end", "optimizer_step", "checkpoint_write")


class Fault:
    """Fault injection (tests, chaos drills): rank ``rank`` SIGKILLs itself at step ``kill_at_step``.

    Set only through the spec's ``fault`` entry, e.g. ``{"kill_at_step": 4, "at":
    "checkpoint_write", "rank": 1}``; ``at`` is where (default ``step_end``, rank 0):

    - ``step_end``: after step N, between two checkpoints;
    - ``optimizer_step``: inside step N's optimizer step (a torch optimizer step post-hook: under
      ZeRO the fp32 partition is updated, the model weights not yet re-gathered);
    - ``checkpoint_write``: while writing ``checkpoint-N``, after the weights (rank 0) and this
      rank's optimizer shard, before its RNG shard (so before the ``trainer_state.json`` marker).
    """

    def __init__(self, spec: dict[str, Any] | None, rank: int):
        spec = spec or {}
        self.step = int(spec.get("kill_at_step") or 0)
        self.at = str(spec.get("at", "step_end"))
        self.rank = int(spec.get("rank", 0))
        self.here = rank
        if self.at not in FAULT_POINTS:
            raise ConfigError(f"fault.at={self.at!r}: one of {', '.join(FAULT_POINTS)}")

    def armed(self, at: str) -> bool:
        return bool(self.step) and self.at == at and self.rank == self.here

    def fire(self, at: str, step: int) -> None:
        """SIGKILL this process if the fault is set for ``at`` at ``step`` on this rank."""
        if self.armed(at) and step == self.step:
            import signal

            log.warning("fault injection: SIGKILL rank %d at %s of step %d", self.here, at, step)
            os.kill(os.getpid(), signal.SIGKILL)

    def install(self, trainer) -> None:
        """Hook the fault into ``trainer`` (callback, optimizer hook or checkpoint write)."""
        if self.armed("step_end"):
            from transformers import TrainerCallback

            fault = self

            class KillAtStepEnd(TrainerCallback):
                def on_step_end(self, args, state, control, **kw):
                    fault.fire("step_end", state.global_step)

            trainer.add_callback(KillAtStepEnd())
        elif self.armed("optimizer_step"):
            from torch.optim.optimizer import register_optimizer_step_post_hook

            # global: the torch optimizer is built inside Trainer.train (wrapped by ZeRO there);
            # during step N the Trainer's global_step is still N - 1
            register_optimizer_step_post_hook(
                lambda opt, args, kwargs: self.fire("optimizer_step", trainer.state.global_step + 1))
        trainer.fault = self  # checkpoint_write: fired by SftTrainer._save_rng_state


def _make_trainer_cls():
    """The HF Trainer with safetensors/JSON checkpoints and the warm-up's no-decay rule.

    Checkpoints hold no pickle: weights (``model.safetensors``), optimizer state per rank
    (``optimizer_rank{R}.safetensors``: the torch optimizer's state and, under ZeRO-1/2, this
    rank's fp32 master partition), ``scheduler.json``, ``rng_state_{R}.safetensors``,
    ``trainer_state.json`` and ``training_args.json``. Resuming restores the fp32 partitions and
    re-gathers the model weights from them (``update_lp_params``), so a resumed run continues
    bit for bit. ZeRO-3 keeps DeepSpeed's own partitioned checkpoint format (documented
    exception: written and read only by the same run).
    """
    from transformers import Trainer

    class SftTrainer(Trainer):
        no_decay_extra: set[str] = set()
        zero_stage: int = 0
        fault: Fault | None = None
        restored: dict[str, Any] | None = None  # what a resume loaded (None: not resumed)

        def get_decay_parameter_names(self, model) -> list[str]:
            names = super().get_decay_parameter_names(model)
            return [n for n in names if n not in self.no_decay_extra]

        @property
        def _own_state(self) -> bool:
            return not (self.is_deepspeed_enabled and self.zero_stage == 3)

        # ---- saving
        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            output_dir = output_dir or self.args.output_dir
            os.makedirs(output_dir, exist_ok=True)
            model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
            model.save_pretrained(output_dir, state_dict=state_dict)
            if self.args.should_save:
                Path(output_dir, "training_args.json").write_text(self.args.to_json_string())

        def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
            if not self._own_state:
                return super()._save_optimizer_and_scheduler(output_dir)
            rank = self.args.process_index
            if self.is_deepspeed_enabled:
                engine = self.model_wrapped
                checkpoint.save_optimizer(output_dir, rank, engine.optimizer, engine)
            elif self.args.should_save:
                checkpoint.save_optimizer(output_dir, 0, self.optimizer)
            if self.args.should_save:
                Path(output_dir, "scheduler.json").write_text(json.dumps(self.lr_scheduler.state_dict()))

        def _save_rng_state(self, output_dir: str) -> None:
            """This rank's RNG shard, the last per-rank write of a checkpoint; then a barrier.

            HF's ``_save_checkpoint`` has rank 0 write ``trainer_state.json`` (the marker
            :func:`latest_checkpoint` looks for) right after this call and does not wait for the
            other ranks: without the barrier a rank killed while writing its shards could leave a
            checkpoint marked complete but missing them.
            """
            if self.fault is not None:
                self.fault.fire("checkpoint_write", self.state.global_step)
            checkpoint.save_rng(output_dir, self.args.process_index)
            barrier()

        # ---- loading
        def _load_zero_state(self, engine, ckpt: str) -> None:
            """Replaces ``deepspeed_load_checkpoint`` for ZeRO-1/2 (collective: every rank)."""
            checkpoint.load_optimizer(ckpt, self.args.process_index, engine.optimizer, engine)
            self._record(optimizer_step=checkpoint.optimizer_steps(
                checkpoint.base_optimizer(engine.optimizer).state_dict()), engine_global_steps=int(engine.global_steps))

        def _record(self, **restored: Any) -> None:
            self.restored = {**(self.restored or {}), **restored}

        def _load_optimizer_and_scheduler(self, ckpt: str | None) -> None:
            if ckpt is None:
                return
            if not self._own_state:
                return super()._load_optimizer_and_scheduler(ckpt)
            if not self.is_deepspeed_enabled:
                checkpoint.load_optimizer(ckpt, 0, self.optimizer)
                self._record(optimizer_step=checkpoint.optimizer_steps(self.optimizer.state_dict()))
            self.lr_scheduler.load_state_dict(json.loads((Path(ckpt) / "scheduler.json").read_text()))
            self._record(checkpoint=Path(ckpt).name, scheduler_step=int(self.lr_scheduler.last_epoch))

        def _load_rng_state(self, ckpt: str | None) -> None:
            """Restore this rank's generators; record them (digest) and the step resumed at."""
            if ckpt is not None:
                loaded = checkpoint.load_rng(ckpt, self.args.process_index)
                self._record(global_step=int(self.state.global_step),
                             rng_sha256=checkpoint.rng_digest() if loaded else None)

        def train(self, resume_from_checkpoint=None, **kwargs):
            if not (self.is_deepspeed_enabled and self._own_state and resume_from_checkpoint):
                return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
            # The Trainer calls the module-level deepspeed_load_checkpoint, which reads
            # DeepSpeed's pickled files; route it to the safetensors state of this run instead.
            import transformers.trainer as hf_trainer

            original = hf_trainer.deepspeed_load_checkpoint
            hf_trainer.deepspeed_load_checkpoint = lambda engine, path, **_: self._load_zero_state(engine, path)
            try:
                return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
            finally:
                hf_trainer.deepspeed_load_checkpoint = original

    return SftTrainer


class SftRun:
    """One training process of one stage: ``setup -> train -> save -> cleanup``."""

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self.cfg = Config.model_validate(spec["config"])
        self.stage = StageCfg.model_validate(spec["stage_cfg"])
        self.tcfg = stage_train_cfg(self.cfg.train, self.stage)
        env = RankEnv.from_env()
        self.rank, self.world, self.local_rank, self.is_main = env.rank, env.world, env.local_rank, env.is_main
        self.trainer = None
        self.result: dict[str, Any] = {}

    # ---- setup
    def setup(self) -> None:
        import torch
        import torch.distributed as dist
        from transformers import PrinterCallback, TrainingArguments
        from transformers.utils import logging as hf_logging

        from onerec_prod.model.dropout import DropoutRates, apply_dropout
        from onerec_prod.model.freeze import freeze_except_rows, no_decay_names
        from onerec_prod.model.io import load_model, load_tokenizer, weights_hash
        from onerec_prod.model.vocab import sid_token_ids
        from onerec_prod.registry.tracking import mlflow_trainer_callback
        from onerec_prod.sid.tokens import level_sizes
        from onerec_prod.train.data import PadCollator, SftDataset, read_jsonl

        hf_logging.disable_progress_bar()
        t = self.tcfg
        self.on_gpu = torch.cuda.is_available() and not self.spec.get("force_cpu", False)
        bf16 = t.precision == "bf16" or (t.precision == "auto" and self.on_gpu)
        if self.is_main:
            log.info("stage %s (%s): world=%d zero=%d %s; train cfg %s", self.stage.name,
                     self.stage.description, self.world, t.zero_stage, "bf16" if bf16 else "fp32",
                     json.dumps(t.model_dump(), sort_keys=True))
        backend = "nccl" if self.on_gpu else "gloo"
        if self.on_gpu:
            torch.cuda.set_device(self.local_rank)
        if t.zero_stage > 0:
            import deepspeed

            if not self.on_gpu:
                skip_shm_comm_build()
            deepspeed.init_distributed(dist_backend=backend)
        elif self.world > 1 and not dist.is_initialized():
            dist.init_process_group(backend=backend)
        ds = build_ds_config(t, bf16)
        if ds is not None and t.zero_stage == 3 and self.stage.freeze_base:
            raise ConfigError(f"stage {self.stage.name}: freeze_base needs train.zero_stage <= 2 "
                              "(ZeRO-3 partitions the embedding rows the mask works on)")
        ckpt_dir = Path(self.spec["ckpt_dir"])
        self.args = TrainingArguments(
            output_dir=str(ckpt_dir),
            per_device_train_batch_size=t.per_device_batch_size,
            gradient_accumulation_steps=t.grad_accum,
            learning_rate=t.lr,
            weight_decay=t.weight_decay,
            warmup_steps=t.warmup_ratio,
            lr_scheduler_type="linear",
            num_train_epochs=t.epochs,
            max_steps=t.max_steps,
            max_grad_norm=1.0,
            logging_steps=t.logging_steps,
            save_strategy="steps",
            save_steps=t.save_steps,
            save_total_limit=2,
            seed=t.seed,
            data_seed=t.seed,
            bf16=bf16,
            use_cpu=not self.on_gpu,
            ddp_backend=backend if self.world > 1 else None,
            deepspeed=ds,
            report_to="none",
            disable_tqdm=True,
            remove_unused_columns=False,
            dataloader_num_workers=0,
            log_level="warning",
            log_level_replica="error",
        )
        # ZeRO-3: TrainingArguments above registered the DS config, so from_pretrained partitions.
        init_dir = Path(self.spec["init_dir"])
        expected = (self.spec.get("meta") or {}).get("parent", {}).get("weights_sha256")
        if expected and self.is_main and weights_hash(init_dir) != expected:
            raise RuntimeError(f"init weights in {init_dir} changed since the driver chose them "
                               f"(expected sha256 {expected[:12]}): rerun the day")
        self.tokenizer = load_tokenizer(init_dir)
        model = load_model(init_dir, device="cpu", dtype=torch.float32)
        model.config.use_cache = False
        m = self.cfg.model
        apply_dropout(model, DropoutRates(m.attention_dropout, m.hidden_dropout, m.embedding_dropout))
        sizes = level_sizes(self.cfg.sid)
        new_ids = sid_token_ids(self.tokenizer, sizes)  # raises if the init dir lacks SID tokens
        mask = freeze_except_rows(model, new_ids) if self.stage.freeze_base else None
        self.dataset = SftDataset(read_jsonl(self.spec["samples_path"]), self.tokenizer, t.max_length,
                                  self.stage.tasks)
        if not len(self.dataset):
            raise ValueError(f"no samples of tasks {self.stage.tasks} in {self.spec['samples_path']}")
        self.collator = PadCollator(self.tokenizer.pad_token_id)
        cls = _make_trainer_cls()
        cls.no_decay_extra = no_decay_names(mask)
        cls.zero_stage = t.zero_stage if ds is not None else 0
        self.progress = _Progress.make(self.collator, self.world, self.is_main)
        self.trainer = cls(
            model=model, args=self.args, train_dataset=self.dataset, data_collator=self.collator,
            callbacks=[self.progress, mlflow_trainer_callback()],  # loss/lr curves on the stage's MLflow run
        )
        self.trainer.remove_callback(PrinterCallback)  # our callback logs one line per step
        Fault(self.spec.get("fault"), self.rank).install(self.trainer)
        if self.is_main:
            log.info("%d samples from %s (tokenized as drawn); init %s", len(self.dataset),
                     self.spec["samples_path"], init_dir)

    # ---- train
    def train(self) -> dict[str, Any]:
        import torch.distributed as dist

        ckpt = latest_checkpoint(self.spec["ckpt_dir"])
        if ckpt is not None and self.is_main:
            log.info("resuming from %s", ckpt)
        t0 = time.perf_counter()
        out = self.trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
        secs = time.perf_counter() - t0
        restored = [self.trainer.restored]
        if dist.is_initialized() and self.world > 1:  # every rank's restored state, rank order
            restored = [None] * self.world
            dist.all_gather_object(restored, self.trainer.restored)
        self.result = {
            "global_step": int(self.trainer.state.global_step),
            "train_loss": float(out.training_loss),
            "last_loss": self.progress.last_loss,
            "resumed_from": ckpt.name if ckpt else None,
            "restored": restored if ckpt else None,
            "steps_run": self.progress.steps_run,
            "train_seconds": round(secs, 2),
            "tokens_per_process": int(self.collator.tokens_seen),
            "tokens_per_s_per_process": round(self.collator.tokens_seen / max(secs, 1e-9), 1),
            "world_size": self.world,
        }
        if self.is_main:
            log.info("trained %s: %s", self.stage.name, json.dumps(self.result))
        return self.result

    # ---- save
    def save(self) -> Path:
        import torch.distributed as dist

        from onerec_prod.model.io import save_model

        out_dir = Path(self.spec["out_dir"])
        state_dict = None
        if self.tcfg.zero_stage == 3:  # collective: every rank takes part in the gather
            state_dict = self.trainer.accelerator.get_state_dict(self.trainer.deepspeed)
        if self.is_main:
            model = self.trainer.accelerator.unwrap_model(self.trainer.model)
            model.config.use_cache = True
            meta = {**self.spec.get("meta", {}), **self.result, "stage": self.stage.name}
            save_model(model, self.tokenizer, out_dir, meta, state_dict=state_dict)
            (Path(self.spec["ckpt_dir"]) / "result.json").write_text(json.dumps(self.result))
        if dist.is_initialized():
            dist.barrier()
        return out_dir

    # ---- cleanup
    def cleanup(self) -> None:
        cleanup()


def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one stage in this process (one rank of a torchrun job, or the only process)."""
    run = SftRun(spec)
    try:
        run.setup()
        result = run.train()
        run.save()
        return result
    finally:
        run.cleanup()


def main(argv: list[str] | None = None) -> int:
    from onerec_prod.train.launcher import worker_main

    return worker_main("onerec_prod.train.sft", run_spec, argv)


if __name__ == "__main__":
    sys.exit(main())
