"""onerec_prod.log: JSON lines with the log context and inherited ids; stdout/stderr under Airflow."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from onerec_prod.log import JsonFormatter, current_context, log_context, log_format

REPO = Path(__file__).resolve().parents[2]

CHILD = """
import logging
from onerec_prod.log import log_context, setup_logging
setup_logging("INFO")
log = logging.getLogger("onerec_prod.pipeline")
with log_context(dt="2014-03-07", stage="incremental_sft"):
    log.info("stage %s: start", "incremental_sft", extra={"rows": 12})
    try:
        1 / 0
    except ZeroDivisionError:
        log.exception("stage failed")
log.info("outside")
"""


def run_child(**env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("AIRFLOW_CTX_", "ONEREC_LOG_", "ONEREC_MLFLOW_"))}
    return subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, env={**clean, "PYTHONPATH": str(REPO), **env},
                          capture_output=True, text=True, timeout=120, check=True)


def test_json_lines_under_airflow_info_to_stdout_errors_to_stderr():
    """A task subprocess (Airflow exports AIRFLOW_CTX_*): INFO on stdout, which Airflow shows as
    INFO; ERROR on stderr; each line one JSON object with the context and the inherited ids."""
    res = run_child(ONEREC_LOG_FORMAT="json", AIRFLOW_CTX_DAG_ID="onerec_daily",
                    AIRFLOW_CTX_DAG_RUN_ID="scheduled__2014-03-07", AIRFLOW_CTX_TASK_ID="incremental_sft",
                    ONEREC_MLFLOW_RUN_ID="0a1b2c")
    out = [json.loads(line) for line in res.stdout.splitlines()]
    err = [json.loads(line) for line in res.stderr.splitlines()]
    assert [o["msg"] for o in out] == ["stage incremental_sft: start", "outside"]
    first = out[0]
    assert (first["level"], first["logger"], first["rows"]) == ("INFO", "onerec_prod.pipeline", 12)
    assert (first["dt"], first["stage"]) == ("2014-03-07", "incremental_sft")
    assert (first["dag_id"], first["dag_run_id"], first["task_id"], first["run_id"]) == (
        "onerec_daily", "scheduled__2014-03-07", "incremental_sft", "0a1b2c")
    assert "dt" not in out[1] and out[1]["run_id"] == "0a1b2c"  # the context ended with its block
    assert [e["level"] for e in err] == ["ERROR"]
    assert err[0]["stage"] == "incremental_sft" and "ZeroDivisionError" in err[0]["exc"]


def test_text_to_stderr_outside_airflow():
    res = run_child()
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert " INFO onerec_prod.pipeline: stage incremental_sft: start" in lines[0]
    assert any("ZeroDivisionError" in line for line in lines)


def test_context_is_per_thread_and_nests():
    seen = {}

    def other():
        seen["thread"] = current_context()

    with log_context(dt="d1", stage="a", ignored=None):
        with log_context(stage="b", request_id="r1"):
            assert current_context() == {"dt": "d1", "stage": "b", "request_id": "r1"}
            th = threading.Thread(target=other)
            th.start()
            th.join()
        assert current_context() == {"dt": "d1", "stage": "a"}
    assert current_context() == {} and seen["thread"] == {}


def test_formatter_and_format_choice(monkeypatch):
    rec = logging.LogRecord("onerec_prod.x", logging.WARNING, __file__, 1, "%d items", (3,), None)
    rec.path_kind = Path("/tmp/a")  # not JSON-serialisable: written as its str
    with log_context(request_id="abc"):
        line = json.loads(JsonFormatter().format(rec))
    assert line["msg"] == "3 items" and line["request_id"] == "abc" and line["path_kind"] == "/tmp/a"
    assert line["ts"].endswith("+00:00")
    monkeypatch.setenv("ONEREC_LOG_FORMAT", "JSON")
    assert log_format() == "json" and log_format("text") == "text"
    monkeypatch.setenv("ONEREC_LOG_FORMAT", "xml")
    with pytest.raises(ValueError, match="ONEREC_LOG_FORMAT"):
        log_format()
