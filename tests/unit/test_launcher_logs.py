"""launcher.run_command forwards each worker line to the stream the worker wrote it to.

Under an Airflow task (``AIRFLOW_CTX_DAG_ID`` in the environment, as Airflow exports it) the
workers' ``setup_logging`` writes INFO to stdout and WARNING+ to stderr; Airflow shows a task's
stderr at ERROR level, so the launcher must not fold the workers' stdout into its stderr (it did:
every INFO line of training showed as ERROR). The worker here is a real subprocess.
"""

from __future__ import annotations

import io
import os
import sys

import pytest

from onerec_prod.train import launcher

WORKER = (
    "import logging, sys; from onerec_prod.log import setup_logging; setup_logging('INFO', 'text'); "
    "log = logging.getLogger('onerec_prod.train.sft'); log.info('step 7 loss 0.25'); "
    "log.warning('grad norm clipped'); sys.exit(int(sys.argv[1]))"
)


def _run(env_extra: dict[str, str], rc: int = 0) -> tuple[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW_CTX_")} | env_extra
    out, err = io.StringIO(), io.StringIO()
    launcher.run_command([sys.executable, "-c", WORKER, str(rc)], env, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_under_airflow_info_stays_on_stdout_and_warnings_on_stderr():
    out, err = _run({"AIRFLOW_CTX_DAG_ID": "onerec_daily"})
    assert "INFO onerec_prod.train.sft: step 7 loss 0.25" in out and "loss" not in err
    assert "WARNING onerec_prod.train.sft: grad norm clipped" in err and "clipped" not in out


def test_outside_airflow_worker_logs_go_to_stderr():
    out, err = _run({})
    assert out == ""
    assert "step 7 loss 0.25" in err and "grad norm clipped" in err


def test_a_failed_worker_raises_with_the_tail_of_both_streams():
    with pytest.raises(launcher.LaunchError) as e:
        _run({"AIRFLOW_CTX_DAG_ID": "onerec_daily"}, rc=3)
    assert e.value.rc == 3
    assert "step 7 loss 0.25" in str(e.value) and "grad norm clipped" in str(e.value)
