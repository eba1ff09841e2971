"""Training stages as configs (``configs/train/<name>.yaml``): the schema, loading and the
per-stage TrainCfg (stage file, then ``train.stage_overrides``).

A leaf of ``onerec_prod.train``: the launcher, the SFT worker and the day driver all read stages
from here, so none of them imports another to learn a stage's settings.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from onerec_prod.config import REPO_ROOT, ConfigError, TrainCfg

STAGES_DIR = REPO_ROOT / "configs" / "train"


class StageCfg(BaseModel):
    """One training stage (``configs/train/<name>.yaml``), or a chain of stages."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("", description="Stage name (the YAML file's stem).")
    description: str = Field("", description="One line on what the stage does.")
    chain: list[str] = Field(default_factory=list, description="Run these stages in order instead.")
    tasks: list[str] = Field(default_factory=list, description="Sample tasks trained on.")
    freeze_base: bool = Field(False, description="Token warm-up: only new SID token rows train.")
    init: str = Field("champion", description="champion | base | previous (stage in a chain).")
    full_retrain: bool = Field(False, description="May start a new sid_version (from the base).")
    replay: bool = Field(False, description="Mix in replayed samples of earlier days.")
    train: dict[str, Any] = Field(default_factory=dict, description="TrainCfg fields overridden.")


def stage_names() -> list[str]:
    return sorted(p.stem for p in STAGES_DIR.glob("*.yaml"))


def load_stage(name: str) -> StageCfg:
    """Stage config ``name``; errors name the valid stages, fields and tasks."""
    from onerec_prod.samples.stream import STREAM_TASK
    from onerec_prod.samples.templates import TEMPLATES

    path = STAGES_DIR / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"train stage {name!r} not found (valid: {', '.join(stage_names())})")
    tree = yaml.safe_load(path.read_text()) or {}
    try:
        stage = StageCfg.model_validate({"name": name, **tree})
    except ValidationError as e:
        raise ConfigError(f"{path}: {e}") from None
    problems = []
    trainable = [t for t in [*TEMPLATES, STREAM_TASK] if t != "rl_prompt"]
    bad_tasks = [t for t in stage.tasks if t not in trainable]
    if bad_tasks:
        problems.append(f"tasks: {bad_tasks} are not trainable tasks (valid: {', '.join(trainable)})")
    bad_keys = sorted(set(stage.train) - set(TrainCfg.model_fields))
    if bad_keys:
        problems.append(f"train: unknown TrainCfg keys {bad_keys} (valid: {', '.join(TrainCfg.model_fields)})")
    if stage.init not in ("champion", "base", "previous"):
        problems.append(f"init: {stage.init!r} is not one of champion, base, previous")
    if stage.chain:
        missing = [c for c in stage.chain if not (STAGES_DIR / f"{c}.yaml").exists()]
        if missing or name in stage.chain:
            problems.append(f"chain: unknown or recursive stages {missing or [name]}")
    elif not stage.tasks:
        problems.append("tasks: a stage without a chain needs at least one task")
    if problems:
        raise ConfigError(f"{path}: invalid stage config:\n  - " + "\n  - ".join(problems))
    return stage


def stage_train_cfg(tcfg: TrainCfg, stage: StageCfg) -> TrainCfg:
    """``tcfg`` with the stage's overrides applied (validated)."""
    extra = dict(tcfg.stage_overrides.get(stage.name) or {})
    bad = sorted(set(extra) - set(TrainCfg.model_fields) | ({"stage_overrides"} & set(extra)))
    if bad:
        raise ConfigError(f"train.stage_overrides.{stage.name}: unknown TrainCfg keys {bad}")
    try:
        return TrainCfg.model_validate({**tcfg.model_dump(), **stage.train, **extra})
    except ValidationError as e:
        raise ConfigError(f"configs/train/{stage.name}.yaml train: {e}") from None
