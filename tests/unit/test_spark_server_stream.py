"""The shared server's job stream: printed lines and log records of a job reach the task."""

from __future__ import annotations

import io
import logging

from onerec_prod import spark_server


def _drain(capture) -> list[str]:
    out = []
    while not capture.lines.empty():
        out.append(capture.lines.get_nowait())
    return out


def test_tee_forwards_whole_lines_and_keeps_the_original_stream():
    capture, orig = spark_server._Capture(), io.StringIO()
    tee = spark_server._Tee(orig, capture)
    tee.write("step 3/12 loss 3.1\nstep 6")
    tee.write("/12 loss 3.0\n\n")
    tee.flush()
    assert _drain(capture) == ["step 3/12 loss 3.1", "step 6/12 loss 3.0"]  # whole lines, blank ones skipped
    assert orig.getvalue() == "step 3/12 loss 3.1\nstep 6/12 loss 3.0\n\n"


def test_job_errors_keep_the_projects_and_builtin_types():
    from onerec_prod.pipeline import StageError

    err = spark_server._job_error({"error_type": "StageError", "error": "no landing data",
                                   "error_class": "onerec_prod.pipeline:StageError", "traceback": "tb"}, "x")
    assert type(err) is StageError and "no landing data" in str(err) and "tb" in str(err)
    assert type(spark_server._job_error({"error_class": "builtins:KeyError", "error": "k"}, "x")) is KeyError
    # a class outside the project (or one that cannot be rebuilt from a message) becomes RuntimeError
    assert type(spark_server._job_error({"error_class": "json.decoder:JSONDecodeError", "error": "j"}, "x")) \
        is RuntimeError
    from onerec_prod.train.launcher import LaunchError

    assert issubclass(LaunchError, RuntimeError)
    assert type(spark_server._job_error({"error_class": "onerec_prod.train.launcher:LaunchError"}, "x")) \
        is RuntimeError


def test_capture_queues_formatted_records():
    capture = spark_server._Capture()
    rec = logging.LogRecord("onerec_prod.x", logging.INFO, __file__, 1, "hello %s", ("there",), None)
    capture.emit(rec)
    (line,) = _drain(capture)
    assert line.endswith("INFO onerec_prod.x: hello there")
