"""MLflow tracking: one run per day, one nested child run per pipeline step.

Every step of day ``dt`` logs into the child run ``<step>`` of the day run ``day-<dt>``.
Both are found by tags (``run_kind``, ``dt``, ``step``), never by in-memory state, so any
process (an Airflow task, a CLI call, a rerun next week) lands in the same runs:

    >>> with day_run(cfg, "2014-01-03"):                                   # doctest: +SKIP
    ...     log_step(cfg, "2014-01-03", "ingest_events",
    ...              params={"delta_version_written": 7}, metrics={"rows": 1234})

Rerunning a step reuses its child run. Metrics are logged with ``step = log_seq`` (a counter
tag on the run), so the latest call wins and the history keeps earlier attempts. MLflow params
are immutable: a param that changes on a rerun is kept as tag ``param.<key>`` with a warning
(the first value stays in params). JSON artifacts are overwritten by a rerun.

Creation of the day/step runs is serialised by a file lock next to the sqlite store; with a
remote tracking server two racing processes may both create a run, and the loser deletes its
own (the earliest-created run wins), so there is still exactly one active run per day/step.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from onerec_prod.config import REPO_ROOT, Config

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

_DT_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_STEP_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")
MAX_PARAM_LEN = 6000
MAX_TAG_LEN = 8000


@dataclass(frozen=True)
class DayRun:
    """The day run of ``dt`` (found or created)."""

    run_id: str
    experiment_id: str
    dt: str


# --------------------------------------------------------------------------------------
# client, store, locks


def client(cfg: Config) -> MlflowClient:
    """An ``MlflowClient`` on ``cfg.mlflow_uri`` for both tracking and registry."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=cfg.mlflow_uri, registry_uri=cfg.mlflow_uri)


def is_local_store(uri: str) -> bool:
    """True for a store only this machine writes (sqlite file, file store, plain path)."""
    scheme = urlparse(uri).scheme
    return scheme in ("", "file", "sqlite")


def lock_mode(cfg: Config) -> str:
    """``file`` or ``lease``: how alias moves and run creation are serialised."""
    if cfg.registry.lock != "auto":
        return cfg.registry.lock
    return "file" if is_local_store(cfg.mlflow_uri) else "lease"


def lock_path(cfg: Config, name: str) -> Path:
    """Lock file next to the sqlite store (or under ``var/locks`` for other stores)."""
    uri = cfg.mlflow_uri
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :].split("?", 1)[0])
        return db.parent / f"{db.name}.{name}.lock"
    return cfg.paths.var / "locks" / f"mlflow.{name}.lock"


@contextlib.contextmanager
def file_lock(path: Path, timeout_s: float) -> Iterator[None]:
    """Exclusive advisory ``flock`` on ``path``, polled until ``timeout_s``.

    Raises:
        TimeoutError: the lock is still held by another process after ``timeout_s``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"lock {path} still held after {timeout_s}s; another promote/rollback "
                        "or a crashed process? (raise registry.lock_timeout_s or retry)"
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _create_lock(cfg: Config) -> Iterator[None]:
    """Serialise run creation on a local store; remote stores dedupe after the fact."""
    if lock_mode(cfg) == "file":
        with file_lock(lock_path(cfg, "runs"), cfg.registry.lock_timeout_s):
            yield
    else:
        yield


@functools.lru_cache(maxsize=1)
def git_sha() -> str:
    """``git rev-parse HEAD`` of the checkout, else ``$ONEREC_GIT_SHA`` (images), else ``unknown``."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("ONEREC_GIT_SHA", "unknown")


def ensure_experiment(cfg: Config, c: MlflowClient | None = None) -> str:
    """Id of experiment ``cfg.registry.experiment``, created with its artefact root if missing."""
    from mlflow.exceptions import MlflowException

    c = c or client(cfg)
    exp = c.get_experiment_by_name(cfg.registry.experiment)
    if exp is not None:
        return exp.experiment_id
    loc = cfg.registry.artifacts(cfg.paths.var)
    if "://" not in loc:
        loc = Path(loc).resolve().as_uri()
    try:
        return c.create_experiment(cfg.registry.experiment, artifact_location=loc)
    except MlflowException:  # created meanwhile by another process
        exp = c.get_experiment_by_name(cfg.registry.experiment)
        if exp is None:
            raise
        return exp.experiment_id


# --------------------------------------------------------------------------------------
# day and step runs


def _check_dt(dt: str) -> None:
    if not _DT_RE.match(dt):
        raise ValueError(f"dt must be YYYY-MM-DD, got {dt!r}")


def _find_or_create(c: MlflowClient, cfg: Config, exp_id: str, filt: str, create) -> str:
    def search():
        runs = c.search_runs([exp_id], filter_string=filt, max_results=100)
        return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))

    with _create_lock(cfg):
        runs = search()
        if runs:
            return runs[0].info.run_id
        mine = create()
    runs = search()
    winner = runs[0].info.run_id if runs else mine
    if winner != mine:  # lost a race against another process (remote store only)
        log.warning("duplicate run for %s: keeping %s, deleting %s", filt, winner, mine)
        c.delete_run(mine)
    return winner


def day_run_id(cfg: Config, dt: str) -> DayRun:
    """Find or create the day run ``day-<dt>`` (tags ``dt``, ``git_sha``, ``config_hash``)."""
    _check_dt(dt)
    c = client(cfg)
    exp_id = ensure_experiment(cfg, c)
    tags = {
        "run_kind": "day",
        "dt": dt,
        "ds": dt,
        "git_sha": git_sha(),
        "config_hash": cfg.digest(),
    }

    def create() -> str:
        return c.create_run(exp_id, run_name=f"day-{dt}", tags=tags).info.run_id

    rid = _find_or_create(c, cfg, exp_id, f"tags.run_kind = 'day' and tags.dt = '{dt}'", create)
    return DayRun(run_id=rid, experiment_id=exp_id, dt=dt)


def step_run_id(cfg: Config, dt: str, step: str) -> str:
    """Find or create the child run ``step`` of the day run of ``dt``."""
    if not _STEP_RE.match(step):
        raise ValueError(f"step must match {_STEP_RE.pattern}, got {step!r}")
    day = day_run_id(cfg, dt)
    c = client(cfg)
    tags = {
        "run_kind": "step",
        "dt": dt,
        "ds": dt,
        "step": step,
        "mlflow.parentRunId": day.run_id,
    }

    def create() -> str:
        return c.create_run(day.experiment_id, run_name=step, tags=tags).info.run_id

    filt = f"tags.run_kind = 'step' and tags.dt = '{dt}' and tags.step = '{step}'"
    return _find_or_create(c, cfg, day.experiment_id, filt, create)


@contextlib.contextmanager
def day_run(cfg: Config, dt: str) -> Iterator[DayRun]:
    """The day run of ``dt``: RUNNING inside the block, FINISHED/FAILED after. Idempotent."""
    day = day_run_id(cfg, dt)
    c = client(cfg)
    c.update_run(day.run_id, status="RUNNING")
    c.set_tag(day.run_id, "git_sha", git_sha())
    c.set_tag(day.run_id, "config_hash", cfg.digest())
    try:
        yield day
    except BaseException:
        c.set_terminated(day.run_id, "FAILED")
        raise
    _refresh_day_status(c, day)


def _refresh_day_status(c: MlflowClient, day: DayRun) -> None:
    children = c.search_runs(
        [day.experiment_id],
        filter_string=f"tags.run_kind = 'step' and tags.dt = '{day.dt}'",
        max_results=1000,
    )
    failed = any(r.info.status == "FAILED" for r in children)
    c.set_terminated(day.run_id, "FAILED" if failed else "FINISHED")


# --------------------------------------------------------------------------------------
# logging


def sanitize_key(key: str) -> str:
    """An MLflow-safe metric/param key: ``recall@10`` -> ``recall_at_10``."""
    return _BAD_KEY_CHARS.sub("_", str(key).replace("@", "_at_"))


def _as_str(value: Any, limit: int) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _stage_artifacts(run_id: str, c: MlflowClient, artifacts: Mapping[str, Any]) -> None:
    with tempfile.TemporaryDirectory(prefix="onerec-art-") as tmp:
        staged = False
        for name, value in artifacts.items():
            rel = Path(name)
            if rel.is_absolute() or ".." in rel.parts:
                raise ValueError(f"artifact name must be a relative path, got {name!r}")
            if isinstance(value, str) and len(value) < 4096 and "\n" not in value and Path(value).exists():
                value = Path(value)
            if isinstance(value, Path):
                if value.is_dir():
                    c.log_artifacts(run_id, str(value), artifact_path=name)
                    continue
                if not value.is_file():
                    raise FileNotFoundError(f"artifact {name!r}: {value} does not exist")
                dest = Path(tmp) / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(value, dest)
            else:
                if isinstance(value, dict | list) and not rel.suffix:
                    rel = rel.with_suffix(".json")
                dest = Path(tmp) / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(value, str):
                    dest.write_text(value)
                else:
                    dest.write_text(json.dumps(value, indent=2, sort_keys=True, default=str))
            staged = True
        if staged:
            c.log_artifacts(run_id, tmp)


def log_step(
    cfg: Config,
    dt: str,
    step: str,
    params: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    artifacts: Mapping[str, dict | list | str | Path] | None = None,
    tags: Mapping[str, Any] | None = None,
    *,
    status: str = "FINISHED",
) -> str:
    """Log one step of day ``dt`` into its nested run; returns the step's run id.

    Args:
        params: logged once (MLflow params are immutable; a changed value goes to tag
            ``param.<key>`` with a warning). Keys are sanitised (``@`` -> ``_at_``).
        metrics: numbers, logged at ``step = log_seq`` so a rerun's values are the latest.
        artifacts: ``name -> dict|list`` (JSON, ``.json`` added if no suffix), ``Path`` (file or
            directory, logged under ``name``) or ``str`` (an existing path, else text content).
        tags: free-form; non-strings are JSON-encoded.
        status: terminal status of the step run (``FINISHED`` or ``FAILED``).

    Raises:
        TypeError: a metric value is not a number.
    """
    from mlflow.entities import Metric, Param, RunTag

    c = client(cfg)
    rid = step_run_id(cfg, dt, step)
    run = c.get_run(rid)
    seq = int(run.data.tags.get("log_seq", "0")) + 1
    now = int(time.time() * 1000)

    new_params, run_tags = [], [
        RunTag("log_seq", str(seq)),
        RunTag("git_sha", git_sha()),
        RunTag("config_hash", cfg.digest()),
    ]
    for key, value in (params or {}).items():
        k, v = sanitize_key(key), _as_str(value, MAX_PARAM_LEN)
        old = run.data.params.get(k)
        if old is None:
            new_params.append(Param(k, v))
        elif old != v:
            log.warning("step %s/%s: param %s changed %r -> %r; kept as tag param.%s", dt, step, k, old, v, k)
            run_tags.append(RunTag(f"param.{k}", v))
    metric_rows = []
    for key, value in (metrics or {}).items():
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, int | float):
            raise TypeError(f"metric {key!r} of step {step!r} must be a number, got {value!r}")
        fval = float(value)
        if math.isinf(fval):
            fval = math.copysign(1.7976931348623157e308, fval)
        metric_rows.append(Metric(sanitize_key(key), fval, now, seq))
    for key, value in (tags or {}).items():
        run_tags.append(RunTag(str(key), _as_str(value, MAX_TAG_LEN)))
    c.log_batch(rid, metrics=metric_rows, params=new_params, tags=run_tags)
    if artifacts:
        _stage_artifacts(rid, c, artifacts)
    c.set_terminated(rid, status)
    _refresh_day_status(c, day_run_id(cfg, dt))
    log.info("logged step %s of %s (run %s, seq %d)", step, dt, rid, seq)
    return rid


def step_artifact_uri(cfg: Config, run_id: str, path: str) -> str:
    """Full artefact URI of ``path`` inside run ``run_id``."""
    return client(cfg).get_run(run_id).info.artifact_uri.rstrip("/") + "/" + path.strip("/")
