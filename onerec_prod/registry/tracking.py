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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from onerec_prod.config import REPO_ROOT, Config
from onerec_prod.util import check_date

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

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


def object_lock_root(cfg: Config) -> str:
    """Where the object-store locks live: ``registry.lock_uri`` or ``<paths.artifacts_root>/locks``."""
    return (cfg.registry.lock_uri or f"{cfg.paths.artifacts.rstrip('/')}/locks").rstrip("/")


def lock_mode(cfg: Config) -> str:
    """``file`` or ``object``: how alias moves are serialised (run creation: see ``_create_lock``).

    ``auto``: a local store is written by this machine only (``flock``); a remote tracking server
    shared by pods needs the object-store lock, which needs an ``s3://`` lock root. A remote
    server with a local lock root (one machine running ``mlflow server``) keeps the ``flock``.
    """
    if cfg.registry.lock != "auto":
        return cfg.registry.lock
    if is_local_store(cfg.mlflow_uri):
        return "file"
    root = object_lock_root(cfg)
    if urlparse(root).scheme in ("s3", "s3a", "s3n"):
        return "object"
    if (cfg.mlflow_uri, root) not in _WARNED_LOCAL_LOCK:
        _WARNED_LOCAL_LOCK.add((cfg.mlflow_uri, root))
        log.warning("tracking server %s is remote but the lock root %s is local: alias moves are "
                    "serialised on this machine only (set registry.lock_uri=s3://bucket/prefix)", cfg.mlflow_uri, root)
    return "file"


_WARNED_LOCAL_LOCK: set[tuple[str, str]] = set()


def lock_path(cfg: Config, name: str) -> Path:
    """Lock file next to the sqlite store (or under ``var/locks`` for other stores)."""
    uri = cfg.mlflow_uri
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :].split("?", 1)[0])
        return db.parent / f"{db.name}.{name}.lock"
    return cfg.paths.var / "locks" / f"mlflow.{name}.lock"


@contextlib.contextmanager
def file_lock(path: Path, timeout_s: float, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Exclusive advisory ``flock`` on ``path``, polled until ``timeout_s``.

    ``on_wait(description)`` is called at each attempt that finds the lock held.

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
                if on_wait is not None:
                    on_wait(f"flock {path} (another process on this machine)")
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
    check_date(dt, "dt")
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
    if not failed and _latest_stage_runs(c, day):
        return  # the pipeline's stage runs own the day's status (see _settle_day)
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


# --------------------------------------------------------------------------------------
# stage runs: one MLflow run per attempt of a pipeline stage, opened when the stage starts

RUN_ID_ENV = "ONEREC_MLFLOW_RUN_ID"  # the open stage run, for child processes (training curves)
TRACKING_URI_ENV = "ONEREC_MLFLOW_TRACKING_URI"
_CURVE_KEYS = ("step",)
# record subtrees that are settings or identities, not measurements: logged as params, never metrics
_PARAM_SUBTREES = ("config", "meta", "written_versions", "data_versions", "read_versions", "lineage", "gate")


def run_url(cfg: Config, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI: ``registry.ui_url`` (or an http(s) tracking URI) + the
    run's fragment; for a local store, the ``mlflow ui`` command that serves it, then the path."""
    base = cfg.registry.ui_url or (cfg.mlflow_uri if cfg.mlflow_uri.startswith(("http://", "https://")) else None)
    frag = f"#/experiments/{experiment_id}/runs/{run_id}"
    if base:
        return base.rstrip("/") + "/" + frag
    return f"(mlflow ui --backend-store-uri {cfg.mlflow_uri}) http://127.0.0.1:5000/{frag}"


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and scalars are leaves)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def split_record(record: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, str], dict[str, list]]:
    """A stage record as ``(metrics, params, curves)``.

    Measurements become metrics; versions, lineage and settings (``*version*`` keys and the
    subtrees in ``_PARAM_SUBTREES``) become params (``record.<key>``), so a Delta version or an
    eval setting is no longer plotted as if it were a score; a list of dicts that carry a numeric
    ``step`` (``reward_curve``) is a curve, logged per step.
    """
    metrics: dict[str, float] = {}
    params: dict[str, str] = {}
    curves: dict[str, list] = {}
    for key, value in flatten(record).items():
        head = key.split(".", 1)[0]
        if isinstance(value, list) and value and all(isinstance(x, Mapping) and "step" in x for x in value):
            curves[key] = list(value)
        elif head in _PARAM_SUBTREES or "version" in key.rsplit(".", 1)[-1]:
            if value is not None:
                params[f"record.{key}"] = _as_str(value, MAX_PARAM_LEN)
        elif isinstance(value, bool | int | float) and not (isinstance(value, float) and math.isnan(value)):
            metrics[key] = float(value)
    return metrics, params, curves


def _metric_rows(metrics: Mapping[str, Any], step: int, now: int):
    from mlflow.entities import Metric

    rows = []
    for key, value in metrics.items():
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, int | float) or (isinstance(value, float) and math.isnan(value)):
            continue
        fval = float(value)
        if math.isinf(fval):
            fval = math.copysign(1.7976931348623157e308, fval)
        rows.append(Metric(sanitize_key(key), fval, now, int(step)))
    return rows


def _log_batched(c: MlflowClient, run_id: str, *, metrics=(), params=(), tags=()) -> None:
    """``log_batch`` within MLflow's per-request limits (1000 metrics, 100 params, 100 tags)."""
    metrics, params, tags = list(metrics), list(params), list(tags)
    while metrics or params or tags:
        c.log_batch(run_id, metrics=metrics[:1000], params=params[:100], tags=tags[:100])
        metrics, params, tags = metrics[1000:], params[100:], tags[100:]


def log_curve(cfg: Config, run_id: str, curve: list[Mapping[str, Any]], prefix: str = "") -> int:
    """Log a per-step curve (``[{"step": 1, "loss": ...}, ...]``) with ``step=`` each entry's step.

    Returns the number of points logged. The MLflow UI then plots loss/reward against the
    optimizer step, not against reruns.
    """
    c, rows, now = client(cfg), [], int(time.time() * 1000)
    for point in curve:
        step = int(point["step"])
        vals = {f"{prefix}{k}": v for k, v in point.items() if k not in _CURVE_KEYS}
        rows.extend(_metric_rows(vals, step, now))
    _log_batched(c, run_id, metrics=rows)
    return len(curve)


def log_training_step(metrics: Mapping[str, float], step: int, *, prefix: str = "train/") -> bool:
    """Hook for training code: log one optimizer step's metrics to the open stage run.

    Reads the run from ``$ONEREC_MLFLOW_RUN_ID`` / ``$ONEREC_MLFLOW_TRACKING_URI`` (set by
    :func:`stage_run` and inherited by torchrun workers); a no-op returning False outside a stage
    run (a bare CLI call, a test). Call it from rank 0 only, e.g. from an HF ``TrainerCallback``'s
    ``on_log`` with ``state.global_step``; it never raises (a tracking hiccup must not kill training).
    """
    run_id, uri = os.environ.get(RUN_ID_ENV), os.environ.get(TRACKING_URI_ENV)
    if not run_id or not uri:
        return False
    try:
        from mlflow import MlflowClient

        c = MlflowClient(tracking_uri=uri)
        rows = _metric_rows({f"{prefix}{k}": v for k, v in metrics.items()}, step, int(time.time() * 1000))
        if rows:
            c.log_batch(run_id, metrics=rows)
        return True
    except Exception as e:  # noqa: BLE001
        log.warning("could not log training step %d to MLflow run %s: %s", step, run_id, e)
        return False


def mlflow_trainer_callback(prefix: str = "train/"):
    """An HF ``TrainerCallback`` that sends every ``on_log`` (loss, learning_rate, grad_norm, ...)
    of the main process to the open stage run at ``step=state.global_step``.

    For ``onerec_prod.train.sft``: ``Trainer(..., callbacks=[..., mlflow_trainer_callback()])``. It
    needs no MLflow set-up in the worker (see :func:`log_training_step`) and is a no-op outside a
    stage run.
    """
    from transformers import TrainerCallback

    class StageRunCurves(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if state.is_world_process_zero and logs:
                nums = {k: v for k, v in logs.items() if isinstance(v, int | float) and not isinstance(v, bool)}
                log_training_step(nums, int(state.global_step), prefix=prefix)

    return StageRunCurves()


def config_params(cfg: Config) -> dict[str, str]:
    """The resolved config as flat params (``train.lr`` -> ``0.001``)."""
    return {k: _as_str(v, MAX_PARAM_LEN) for k, v in flatten(cfg.model_dump(mode="json")).items()}


@dataclass
class StageRun:
    """An open stage attempt: ``finish(record)`` logs the stage's record into it."""

    cfg: Config
    dt: str
    stage: str
    run_id: str
    experiment_id: str
    url: str

    def finish(self, record: Mapping[str, Any]) -> None:
        """Log the record: measurements as metrics, versions/settings as params, curves per step,
        the whole record as ``<stage>.json``."""
        from mlflow.entities import Param

        c = client(self.cfg)
        metrics, params, curves = split_record(record)
        now = int(time.time() * 1000)
        _log_batched(c, self.run_id, metrics=_metric_rows(metrics, 0, now),
                     params=[Param(sanitize_key(k), v) for k, v in params.items()])
        for name, curve in curves.items():
            log_curve(self.cfg, self.run_id, curve, prefix=f"{name}/")
        _stage_artifacts(self.run_id, c, {f"{self.stage}.json": dict(record)})


def _latest_stage_runs(c: MlflowClient, day: DayRun) -> dict[str, Any]:
    runs = c.search_runs([day.experiment_id], filter_string=f"tags.run_kind = 'stage' and tags.dt = '{day.dt}'",
                         max_results=5000)
    latest: dict[str, Any] = {}
    for r in sorted(runs, key=lambda r: (int(r.data.tags.get("attempt", "0")), r.info.start_time or 0)):
        latest[r.data.tags.get("step", "")] = r
    return latest


def _settle_day(c: MlflowClient, day: DayRun, last_stage_done: bool) -> str:
    """Day status from each stage's latest attempt: FAILED if one failed, FINISHED once the
    last stage finished, else RUNNING (the day is under way, not done)."""
    latest = _latest_stage_runs(c, day)
    states = {s: r.info.status for s, r in latest.items()}
    if any(v == "FAILED" for v in states.values()):
        status = "FAILED"
    elif last_stage_done and not any(v == "RUNNING" for v in states.values()):
        status = "FINISHED"
    else:
        status = "RUNNING"
    if status == "RUNNING":
        c.update_run(day.run_id, status="RUNNING")
    else:
        c.set_terminated(day.run_id, status)
    return status


def stage_attempts(cfg: Config, dt: str, stage: str) -> list[Any]:
    """Every attempt run of ``stage`` on day ``dt``, oldest first (status, times, tags, data)."""
    c = client(cfg)
    exp_id = ensure_experiment(cfg, c)
    runs = c.search_runs([exp_id], filter_string=f"tags.run_kind = 'stage' and tags.dt = '{dt}' "
                         f"and tags.step = '{stage}'", max_results=1000)
    return sorted(runs, key=lambda r: (int(r.data.tags.get("attempt", "0")), r.info.start_time or 0))


@contextlib.contextmanager
def stage_run(cfg: Config, dt: str, stage: str, tags: Mapping[str, Any] | None = None, *,
              last: bool = False) -> Iterator[StageRun]:
    """Open a new MLflow run for this attempt of ``stage`` on day ``dt``, as a child of the day run.

    The run is RUNNING while the block runs (so a hung stage shows as a RUNNING run with its start
    time) and ends FAILED with the error as tags if the block raises, FINISHED otherwise. Each
    attempt is its own run (tag ``attempt``), so a failure stays visible after a successful
    retry. On opening it logs the resolved config (params and ``config.yaml``), system tags
    (``mlflow.source.git.commit``, the caller's ``tags``, e.g. the Airflow run id), prints the
    run's URL, and exports ``$ONEREC_MLFLOW_RUN_ID`` for child processes (training curves, see
    :func:`log_training_step`). ``last``: this is the day's final stage (the day run may finish).
    """
    from mlflow.entities import Param, RunTag

    from onerec_prod.config import dump_config

    if not _STEP_RE.match(stage):
        raise ValueError(f"stage must match {_STEP_RE.pattern}, got {stage!r}")
    day = day_run_id(cfg, dt)
    c = client(cfg)
    sys_tags = {
        "run_kind": "stage", "dt": dt, "ds": dt, "step": stage, "mlflow.parentRunId": day.run_id,
        "mlflow.source.git.commit": git_sha(), "mlflow.source.type": "JOB", "git_sha": git_sha(),
        "config_hash": cfg.digest(), "mlflow.user": os.environ.get("USER", "onerec"),
    }
    with _create_lock(cfg):
        attempt = len(stage_attempts(cfg, dt, stage)) + 1
        run = c.create_run(day.experiment_id, run_name=f"{stage} #{attempt}",
                           tags={**sys_tags, "attempt": str(attempt)})
    rid = run.info.run_id
    extra = [RunTag(str(k), _as_str(v, MAX_TAG_LEN)) for k, v in (tags or {}).items()]
    _log_batched(c, rid, params=[Param(sanitize_key(k), v) for k, v in config_params(cfg).items()], tags=extra)
    _stage_artifacts(rid, c, {"config.yaml": dump_config(cfg)})
    c.update_run(day.run_id, status="RUNNING")
    sr = StageRun(cfg, dt, stage, rid, day.experiment_id, run_url(cfg, day.experiment_id, rid))
    log.info("MLflow run of %s dt=%s (attempt %d): %s", stage, dt, attempt, sr.url)
    saved = {k: os.environ.get(k) for k in (RUN_ID_ENV, TRACKING_URI_ENV)}
    os.environ[RUN_ID_ENV], os.environ[TRACKING_URI_ENV] = rid, cfg.mlflow_uri
    try:
        yield sr
    except BaseException as e:
        c.log_batch(rid, tags=[RunTag("error_type", type(e).__name__),
                               RunTag("error", _as_str(str(e) or type(e).__name__, MAX_TAG_LEN))])
        c.set_terminated(rid, "FAILED")
        _settle_day(c, day, last)
        log.error("stage %s dt=%s failed; MLflow run %s marked FAILED", stage, dt, rid)
        raise
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    c.set_terminated(rid, "FINISHED")
    _settle_day(c, day, last)
