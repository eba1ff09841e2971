"""Logging set-up shared by the CLI, jobs, tasks and the service (one line per event, rank 0 only).

Two formats, chosen by ``ONEREC_LOG_FORMAT`` (``text``, the default, or ``json``) or the
``fmt`` argument of :func:`setup_logging`:

* ``text``: ``time level logger: message``, for people at a terminal;
* ``json``: one JSON object per line, for a log pipeline (Loki, Elastic, Cloud Logging) that
  indexes fields: ``ts``, ``level``, ``logger``, ``msg``, the fields of the current
  :func:`log_context` (the pipeline day ``dt`` and ``stage``, the service's ``request_id``),
  the ids inherited through the environment (the MLflow stage run's ``run_id``, Airflow's
  ``dag_id``, ``dag_run_id``, ``task_id``, ``try_number``), the ``extra=`` fields of the call,
  and ``exc`` with the traceback.

The context lives in a :class:`contextvars.ContextVar`, so it follows a request's or a stage's
own thread or task and never leaks into another: ``with log_context(dt=..., stage=...):``.

Where the lines go: stderr, except under an Airflow task (``AIRFLOW_CTX_DAG_ID`` set, which Airflow
exports to the task's subprocesses), where INFO and below go to stdout and WARNING and above to
stderr. Airflow's task log shows a subprocess's stderr lines at ERROR level, so an INFO line
written there would read as a failure.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as _dt
import json
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

FORMATS = ("text", "json")
_CONTEXT: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("onerec_log_context", default={})  # noqa: B039
# ids a process inherits from its parent: the Airflow task's (exported by Airflow to the task's
# subprocesses) and the MLflow stage run's (exported by tracking.stage_run for training workers)
_ENV_FIELDS = (("AIRFLOW_CTX_DAG_ID", "dag_id"), ("AIRFLOW_CTX_DAG_RUN_ID", "dag_run_id"),
               ("AIRFLOW_CTX_TASK_ID", "task_id"), ("AIRFLOW_CTX_TRY_NUMBER", "try_number"),
               ("ONEREC_MLFLOW_RUN_ID", "run_id"))
# LogRecord attributes that are not ``extra=`` fields
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[dict[str, Any]]:
    """Add ``fields`` (None values skipped) to every log line written inside the block."""
    merged = {**_CONTEXT.get(), **{k: v for k, v in fields.items() if v is not None}}
    token = _CONTEXT.set(merged)
    try:
        yield merged
    finally:
        _CONTEXT.reset(token)


def current_context() -> dict[str, Any]:
    """The fields :func:`log_context` set for this thread or task (a copy)."""
    return dict(_CONTEXT.get())


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the log context, ``extra=`` fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _dt.datetime.fromtimestamp(record.created, _dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for env, key in _ENV_FIELDS:
            value = os.environ.get(env)
            if value:
                out[key] = value
        out.update(_CONTEXT.get())
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class _MaxLevel(logging.Filter):
    def __init__(self, below: int) -> None:
        super().__init__()
        self.below = below

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.below


def log_format(fmt: str | None = None) -> str:
    """``fmt``, else ``$ONEREC_LOG_FORMAT``, else ``text``; anything else is an error."""
    chosen = (fmt or os.environ.get("ONEREC_LOG_FORMAT") or "text").strip().lower()
    if chosen not in FORMATS:
        raise ValueError(f"log format {chosen!r} (ONEREC_LOG_FORMAT): expected one of {', '.join(FORMATS)}")
    return chosen


def under_airflow() -> bool:
    """True inside an Airflow task or a process it started (Airflow exports AIRFLOW_CTX_*)."""
    return bool(os.environ.get("AIRFLOW_CTX_DAG_ID"))


def make_formatter(fmt: str | None = None) -> logging.Formatter:
    if log_format(fmt) == "json":
        return JsonFormatter()
    return logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


def setup_logging(level: str | int = "INFO", fmt: str | None = None) -> None:
    """Configure the root logger once (later calls only change the level); rank>0 quiet.

    ``fmt``: ``text`` or ``json`` (default ``$ONEREC_LOG_FORMAT``, else text).
    """
    rank = int(os.environ.get("RANK", "0") or 0)
    if rank > 0:
        level = "WARNING"
    root = logging.getLogger()
    if getattr(root, "_onerec_configured", False):
        root.setLevel(level)
        return
    formatter = make_formatter(fmt)
    if under_airflow():
        out = logging.StreamHandler(sys.stdout)
        out.addFilter(_MaxLevel(logging.WARNING))
        err = logging.StreamHandler(sys.stderr)
        err.setLevel(logging.WARNING)
        handlers: list[logging.Handler] = [out, err]
    else:
        handlers = [logging.StreamHandler(sys.stderr)]
    for h in handlers:
        h.setFormatter(formatter)
    root.handlers[:] = handlers
    root.setLevel(level)
    for noisy in ("py4j", "urllib3", "httpx", "alembic", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    root._onerec_configured = True  # type: ignore[attr-defined]
