"""Alerts of the daily DAG: a failed task, a failed day, a missed champion deadline.

Why: with ``depends_on_past`` and one active run, a failed or hung day stalls every later day.
Nobody watches the Airflow UI at night, so each of these events leaves three traces:

- one ERROR line in the log of the process that saw it (the task log for a task failure);
- one JSON line appended to ``<var>/airflow/alerts.jsonl`` (what ``onerec-prod`` tooling and the
  tests read; it survives the task log's rotation);
- a JSON POST to ``airflow.notify_webhook_url`` when set (a chat or paging integration). A webhook
  that is down is logged and never turns the notification itself into a second failure.

:class:`PipelineNotifier` is an Airflow ``BaseNotifier`` used as the tasks' and the DAG's
``on_failure_callback`` and as the deadline alert's ``SyncCallback`` (which instantiates it with
its kwargs and then calls it with the deadline's context).
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from airflow.sdk import BaseNotifier

log = logging.getLogger(__name__)


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def event_from_context(kind: str, context: Any) -> dict[str, Any]:
    """The alert's JSON body from an Airflow callback context (task, DAG run or deadline)."""
    context = context or {}
    ti = context.get("ti") or context.get("task_instance")
    run = context.get("dag_run")
    event: dict[str, Any] = {"kind": kind, "at": datetime.now(UTC).isoformat(timespec="seconds")}
    if isinstance(run, dict):  # a deadline's context: the run as the REST API's JSON
        event.update(dag_id=run.get("dag_id"), run_id=run.get("dag_run_id") or run.get("run_id"),
                     logical_date=_text(run.get("logical_date")), state=_text(run.get("state")),
                     queued_at=_text(run.get("queued_at")))
    elif run is not None:
        event.update(dag_id=getattr(run, "dag_id", None), run_id=getattr(run, "run_id", None),
                     logical_date=_text(getattr(run, "logical_date", None)),
                     run_type=_text(getattr(getattr(run, "run_type", None), "value", None)
                                    or getattr(run, "run_type", None)))
    if ti is not None:
        event.update(task_id=getattr(ti, "task_id", None), try_number=getattr(ti, "try_number", None),
                     max_tries=getattr(ti, "max_tries", None))
        try:
            event["log_url"] = ti.log_url
        except Exception:  # noqa: BLE001 (the URL is a convenience; the alert must still go out)
            pass
    if context.get("ds"):
        event["ds"] = context["ds"]
    exc = context.get("exception")
    if exc is not None:
        event["error_type"] = type(exc).__name__
        event["error"] = str(exc)[:2000] or type(exc).__name__
    if context.get("reason"):
        event["reason"] = str(context["reason"])
    deadline = context.get("deadline")
    if isinstance(deadline, dict):
        event["deadline_time"] = _text(deadline.get("deadline_time"))
    return {k: v for k, v in event.items() if v is not None}


def send(event: dict[str, Any], *, alerts_path: str | None, webhook_url: str | None,
         timeout_s: float = 10.0) -> bool:
    """Log, append and POST one alert. Returns whether the webhook accepted it (True without one)."""
    what = event.get("task_id") or event.get("run_id") or ""
    log.error("ALERT %s %s dt=%s: %s", event["kind"], what, event.get("ds") or event.get("logical_date"),
              event.get("error") or event.get("reason") or event.get("deadline_time") or "")
    if alerts_path:
        p = Path(alerts_path)
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "a") as f:  # one short line per write: appends from several processes stay whole
            f.write(json.dumps(event, sort_keys=True, default=str) + "\n")
    if not webhook_url:
        return True
    body = json.dumps(event, sort_keys=True, default=str).encode()
    req = urllib.request.Request(webhook_url, data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    for attempt in range(2):
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                if 200 <= resp.status < 300:
                    return True
                log.warning("alert webhook answered HTTP %d", resp.status)
        except (urllib.error.URLError, OSError) as e:
            log.warning("alert webhook %s failed (try %d/2): %s", webhook_url, attempt + 1, e)
        time.sleep(1)
    return False


class PipelineNotifier(BaseNotifier):
    """Failure/deadline notifier of ``onerec_daily`` (see the module docstring).

    Args:
        kind: ``task_failed``, ``dag_run_failed`` or ``deadline_missed`` (names the event).
        alerts_path: JSON-lines file the alerts are appended to (None = none).
        webhook_url: where to POST the alert (None = log and file only).
        timeout_s: timeout of one POST.
    """

    def __init__(self, kind: str = "task_failed", alerts_path: str | None = None,
                 webhook_url: str | None = None, timeout_s: float = 10.0, **_: Any):
        super().__init__()
        self.kind, self.alerts_path, self.webhook_url, self.timeout_s = kind, alerts_path, webhook_url, timeout_s

    def render_template_fields(self, context: Any, jinja_env: Any = None) -> None:
        """Nothing to render (no template fields); skipping it also keeps the DAG-level callback
        working where Airflow hands over a serialized DAG without a template environment."""

    def notify(self, context: Any) -> None:
        send(event_from_context(self.kind, context), alerts_path=self.alerts_path,
             webhook_url=self.webhook_url, timeout_s=self.timeout_s)


def alerts_path_for(var_root: str | os.PathLike) -> str:
    """Where the alerts of a deployment whose ``paths.var`` is ``var_root`` go."""
    return str(Path(var_root) / "airflow" / "alerts.jsonl")
