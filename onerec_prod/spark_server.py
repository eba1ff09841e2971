"""One long-lived Spark driver for a day's Spark tasks (local runtime): ``onerec-prod spark-server``.

Why: a local Airflow task is a fresh process, so each Spark stage used to pay for its own JVM,
Delta's class loading and a cold JIT: ~20-30 s of fixed cost per task, ~2 minutes per day for a
few hundred events. With ``spark.shared_session: true``, ``onerec-prod airflow up`` starts this
server beside the scheduler; each Spark task (``pipeline.run_stage``) posts
``{job, dt, config}`` to it and gets the job's summary back. The job runs in the server's warm
session with exactly the code it runs in-process (``jobs.<name>.run(spark, dt, cfg)``).

Why not Spark Connect: a Connect client has no ``SparkContext``, and the jobs use it
(``sparkContext.broadcast`` in build_samples' executor path, ``setLogLevel`` in ``get_spark``);
Delta's MERGE through Connect also needs Delta's Connect plugin and its jar on the server side
(delta-connect-server, one more artifact to resolve and keep in step with Spark). A driver process
that runs the unchanged jobs keeps one code path for run-day, tests, the shared server and the
cluster (where every task stays its own Spark application), and the task processes no longer
import pyspark at all.

Protocol (HTTP on 127.0.0.1, stdlib only; a token file under ``<var>/spark-server/`` keeps
other local users out):

* ``GET /health`` -> 200 ``{"ready": true, ...}`` once the session is up (503 before);
* ``POST /run`` ``{"job", "dt", "config", "kwargs"}`` -> newline-delimited JSON, streamed while the
  job runs: ``{"log": "..."}`` lines (the job's log records, and a heartbeat every
  :data:`HEARTBEAT_S`), then one final ``{"ok": true, "result": {...}}`` or ``{"ok": false, "error":
  "...", "error_type": "...", "error_class": "module:Name", "traceback": "..."}``. ``job`` is a
  Spark stage (:data:`SPARK_STAGES`), one of the model tasks' Spark reads and writes
  (:data:`SPARK_CALLS`: the training mix export, the RL prompts, the eval inputs, the catalog, the
  Think-Ahead table), so train, RL, evaluate, gate and precompute start no JVM either
  (:func:`run_on_spark`), or ``stage:<name>``: a whole pipeline stage (``pipeline.run_stage``) of
  ``spark.server_stages``. The model stages run here in the demo: torch, transformers, DeepSpeed's
  and MLflow's imports (about 5-9 s per task on 2 cores) are paid once per server, not per task,
  and their Spark reads are direct calls on the warm session.

Jobs run one at a time (a lock): the DAG has one task at a time per day and one active run, so
this costs nothing and keeps two days from sharing cached frames. A task that is killed (its
``execution_timeout``) while its job runs here does not stop the job: the job finishes, and a
retry waits for the lock. Stages are idempotent, so the retry then redoes or reuses its work. The server refuses a request
whose ``spark`` config differs from its own (the client then runs the job in-process), so a
per-run Spark override is never silently ignored.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from onerec_prod.config import Config

log = logging.getLogger(__name__)
SPARK_STAGES = ("update_catalog", "ingest_events", "build_sequences", "build_eval_snapshot", "build_samples")
# the Spark reads and writes of the model tasks: name -> "module:function", called as
# function(spark, cfg, dt, **kwargs) and returning JSON types (the same result in-process or here)
SPARK_CALLS = {
    "export_training_mix": "onerec_prod.train.data:export_mix_on",
    "rl_prompt_rows": "onerec_prod.train.grpo:rl_prompt_rows_on",
    "catalog_rows": "onerec_prod.registry.pyfunc:catalog_rows_on",
    "eval_inputs": "onerec_prod.eval.api:eval_inputs_on",
    "precompute_inputs": "onerec_prod.serving.precompute:precompute_inputs_on",
    "write_think_ahead": "onerec_prod.serving.precompute:write_think_ahead_on",
}
STAGE_PREFIX = "stage:"  # job "stage:evaluate": the whole pipeline stage, run in the server
ENV_URL = "ONEREC_SPARK_SERVER"  # set by `airflow up` in every task's environment
HEARTBEAT_S = 15.0  # a streamed log line at least this often while a job runs
_TOKEN_HEADER = "X-Onerec-Token"
_LOCAL_SPARK = None  # this process's session when it IS the server: stage jobs call Spark directly


class SparkServerUnavailable(RuntimeError):
    """The shared Spark server cannot take the job (down, not ready, or another Spark config)."""


def server_dir(cfg: Config) -> Path:
    return cfg.paths.var / "spark-server"


def token_path(cfg: Config) -> Path:
    return server_dir(cfg) / "token"


def server_url(cfg: Config) -> str:
    return f"http://127.0.0.1:{cfg.spark.server_port}"


def _ensure_token(cfg: Config) -> str:
    p = token_path(cfg)
    p.parent.mkdir(parents=True, exist_ok=True)
    if not p.exists():
        tmp = p.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(secrets.token_urlsafe(32))
        tmp.chmod(0o600)
        os.replace(tmp, p)
    return p.read_text().strip()


class _Capture(logging.Handler):
    """Queues the log lines a job emits, so the calling task's log shows them as they come."""

    def __init__(self) -> None:
        import queue

        super().__init__(logging.INFO)
        self.lines: queue.Queue[str] = queue.Queue(maxsize=20000)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.put(self.format(record))

    def put(self, line: str) -> None:
        try:
            self.lines.put_nowait(line)
        except Exception:  # noqa: BLE001 (a full queue drops lines, never the job)
            pass


class _Tee:
    """``sys.stdout``/``sys.stderr`` while a job runs: every whole line also goes to the job's log
    stream (the training ranks' output, which the launcher forwards to these streams)."""

    def __init__(self, orig, capture: _Capture) -> None:
        self.orig, self.capture, self.buf = orig, capture, ""

    def write(self, text: str) -> int:
        self.orig.write(text)
        self.buf += text
        *lines, self.buf = self.buf.split("\n")
        for line in lines:
            if line.strip():
                self.capture.put(line.rstrip())
        return len(text)

    def flush(self) -> None:
        self.orig.flush()

    def __getattr__(self, name: str):
        return getattr(self.orig, name)


class _State:
    def __init__(self, cfg: Config, token: str) -> None:
        self.cfg = cfg
        self.token = token
        self.spark = None
        self.ready = threading.Event()
        self.error: str | None = None
        self.lock = threading.Lock()
        self.started = time.time()
        self.jobs_run = 0


def run_job(spark, job: str, dt: str | None, cfg: Config, kwargs: dict[str, Any] | None = None) -> Any:
    """What a Spark stage or call returns, in-process or here: ``jobs.<job>.run(spark, dt,
    cfg).to_dict()`` for a stage, the call's JSON-typed result for a :data:`SPARK_CALLS` name."""
    import importlib

    if job.startswith(STAGE_PREFIX):
        stage = job[len(STAGE_PREFIX):]
        if stage not in cfg.spark.server_stages:
            raise ValueError(f"stage {stage!r} is not one of spark.server_stages {cfg.spark.server_stages}")
        result = importlib.import_module("onerec_prod.pipeline").run_stage(stage, dt, cfg, **(kwargs or {}))
        return json.loads(json.dumps(result, default=str))
    if job in SPARK_STAGES:
        if kwargs:
            raise ValueError(f"Spark job {job!r} takes no arguments (got {sorted(kwargs)})")
        return importlib.import_module(f"jobs.{job}").run(spark, dt, cfg).to_dict()
    if job not in SPARK_CALLS:
        raise ValueError(f"unknown Spark job {job!r} (valid: {', '.join(SPARK_STAGES + tuple(SPARK_CALLS))})")
    module, fn = SPARK_CALLS[job].split(":")
    result = getattr(importlib.import_module(module), fn)(spark, cfg, dt, **(kwargs or {}))
    return json.loads(json.dumps(result, default=str))  # JSON types here as after the HTTP hop


def run_on_spark(cfg: Config, job: str, dt: str | None, **kwargs: Any) -> Any:
    """Run Spark job or call ``job``: on the shared local Spark server when this process was started
    by the local Airflow with one (``$ONEREC_SPARK_SERVER``) and ``spark.shared_session`` is on, else
    in this process's own session (same code, a JVM of its own).

    A server that is down, still starting or on another Spark config is not an error: the job then
    runs here, with a warning saying why. A job that fails raises here, either way.
    """
    if _LOCAL_SPARK is not None:  # a stage job inside the server: the warm session, no HTTP hop
        result = run_job(_LOCAL_SPARK, job, dt, cfg, kwargs)
        if job in SPARK_STAGES:
            result.setdefault("extra", {})["spark_session"] = "shared"
        return result
    url = os.environ.get(ENV_URL)
    if url and cfg.spark.shared_session:
        try:
            return submit(url, cfg, job, dt, kwargs=kwargs)
        except SparkServerUnavailable as e:
            log.warning("%s dt=%s: %s; running in this process instead", job, dt, e)
    from onerec_prod.spark import get_spark

    return run_job(get_spark(cfg.spark), job, dt, cfg, kwargs)


def _handler(state: _State):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt: str, *args: Any) -> None:  # quiet: one line per job is logged below
            return

        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body, default=str).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            if self.path != "/health":
                return self._send(404, {"error": "not found"})
            body = {"ready": state.ready.is_set() and state.error is None, "error": state.error,
                    "pid": os.getpid(), "master": state.cfg.spark.master,
                    "uptime_s": round(time.time() - state.started, 1), "jobs_run": state.jobs_run}
            return self._send(200 if body["ready"] else 503, body)

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/run":
                return self._send(404, {"error": "not found"})
            if not secrets.compare_digest(self.headers.get(_TOKEN_HEADER, ""), state.token):
                return self._send(403, {"ok": False, "error": "bad or missing token"})
            try:
                req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                cfg = Config.model_validate(req["config"])
                job, dt = str(req["job"]), (None if req.get("dt") is None else str(req["dt"]))
                kwargs = req.get("kwargs") or {}
                if not isinstance(kwargs, dict):
                    raise ValueError("kwargs must be an object")
            except Exception as e:  # noqa: BLE001 (a bad request is answered, not fatal)
                return self._send(400, {"ok": False, "error": f"bad request: {e}"})
            if cfg.spark != state.cfg.spark:
                return self._send(409, {"ok": False, "error": "spark config differs from the server's "
                                        f"({state.cfg.spark.model_dump()} vs {cfg.spark.model_dump()})"})
            if not state.ready.wait(timeout=600) or state.error:
                return self._send(503, {"ok": False, "error": f"spark session not ready: {state.error}"})
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.end_headers()
            t_wait = time.time()
            while not state.lock.acquire(timeout=HEARTBEAT_S):  # another job runs: say so, keep the line alive
                if not self._write({"log": f"... {job} dt={dt} waits for the job running on the spark server "
                                           f"({time.time() - t_wait:.0f}s)"}):
                    return  # the task went away while it waited: nothing was started
            try:
                body = self._stream(job, dt, cfg, kwargs)
            finally:
                state.lock.release()
            log.info("job %s dt=%s: %s in %.1fs", job, dt, "ok" if body["ok"] else "FAILED", body.pop("_s"))

        def _stream(self, job: str, dt: str | None, cfg: Config, kwargs: dict[str, Any]) -> dict:
            """Run the job in a thread; stream its log lines (and heartbeats), then its result."""
            import queue

            capture = _Capture()
            root = logging.getLogger()
            out: dict[str, Any] = {}

            def work() -> None:
                try:
                    result = run_job(state.spark, job, dt, cfg, kwargs)
                    if job in SPARK_STAGES:
                        result.setdefault("extra", {})["spark_session"] = "shared"
                    out.update(ok=True, result=result)
                except BaseException as e:  # noqa: BLE001 (the task raises it, with the traceback)
                    out.update(ok=False, error=str(e), error_type=type(e).__name__,
                               error_class=f"{type(e).__module__}:{type(e).__qualname__}",
                               traceback=traceback.format_exc())

            t0 = time.time()
            root.addHandler(capture)
            streams = sys.stdout, sys.stderr  # jobs run one at a time: swapping them is safe here
            sys.stdout, sys.stderr = _Tee(sys.stdout, capture), _Tee(sys.stderr, capture)
            worker = threading.Thread(target=work, name=f"job-{job}", daemon=True)
            client = True  # a killed task closes the connection; its job still runs to the end
            last = time.time()
            try:
                worker.start()
                while worker.is_alive() or not capture.lines.empty():
                    try:
                        line: str | None = capture.lines.get(timeout=1.0)
                    except queue.Empty:
                        line = None if time.time() - last < HEARTBEAT_S else (
                            f"... {job} dt={dt} still running ({time.time() - t0:.0f}s)")
                    if line is not None and client:
                        client = self._write({"log": line})
                        last = time.time()
            finally:
                worker.join()
                sys.stdout, sys.stderr = streams
                root.removeHandler(capture)
                try:  # nothing a job cached may outlive it
                    state.spark.catalog.clearCache()
                except Exception:  # noqa: BLE001
                    log.exception("clearCache failed")
                state.jobs_run += 1
            if client and not self._write(out):
                client = False
            if not client:
                log.warning("job %s dt=%s: the client went away before the end; the job ran to its end", job, dt)
            return {**out, "_s": time.time() - t0}

        def _write(self, obj: dict) -> bool:
            try:
                self.wfile.write(json.dumps(obj, default=str).encode() + b"\n")
                self.wfile.flush()
                return True
            except OSError:
                return False

    return Handler


def serve(cfg: Config) -> None:
    """Bind the port at once (so the client can wait on /health), then start the session."""
    from onerec_prod.spark import get_spark

    state = _State(cfg, _ensure_token(cfg))
    httpd = ThreadingHTTPServer(("127.0.0.1", cfg.spark.server_port), _handler(state))
    httpd.daemon_threads = True
    t = threading.Thread(target=httpd.serve_forever, name="spark-server-http", daemon=True)
    t.start()
    log.info("spark server listening on %s (pid %d); starting the session", server_url(cfg), os.getpid())
    try:
        t0 = time.time()
        state.spark = get_spark(cfg.spark)
        state.spark.range(1).count()  # load Spark's and Delta's classes before the first job
        global _LOCAL_SPARK
        _LOCAL_SPARK = state.spark
        log.info("spark session ready in %.1fs", time.time() - t0)
    except Exception as e:  # noqa: BLE001
        state.error = f"{type(e).__name__}: {e}"
        log.exception("spark session failed to start")
    state.ready.set()
    try:
        while t.is_alive():
            t.join(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        httpd.shutdown()
        if state.spark is not None:
            state.spark.stop()


# --------------------------------------------------------------------------------------
# client


def health(url: str, timeout_s: float = 3) -> dict | None:
    """The server's /health body (``ready`` says whether it takes jobs), None if unreachable."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout_s) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            return json.loads(e.read())
        except ValueError:
            return None
    except (OSError, ValueError):
        return None


def wait_ready(url: str, timeout_s: float, alive=lambda: True) -> dict:
    """Block until the server is ready; raises SparkServerUnavailable on timeout or start failure."""
    t0 = time.time()
    while True:
        h = health(url)
        if h and h.get("ready"):
            return h
        if h and h.get("error"):
            raise SparkServerUnavailable(f"spark server at {url} failed to start: {h['error']}")
        if not alive():
            raise SparkServerUnavailable(f"spark server at {url} exited at start")
        if time.time() - t0 > timeout_s:
            raise SparkServerUnavailable(f"spark server at {url} not ready after {timeout_s:.0f}s")
        time.sleep(1)


def submit(url: str, cfg: Config, job: str, dt: str | None, timeout_s: float = 6 * 3600,
           kwargs: dict[str, Any] | None = None) -> Any:
    """Run ``job`` for ``dt`` on the server; returns its summary, re-logging the job's lines here.

    Raises:
        SparkServerUnavailable: the server cannot take the job, or was lost while running it (the
            caller may run it in-process: jobs and stages are idempotent).
        The job's own exception type when it is a builtin or one of the project's (else
        RuntimeError): the job itself failed; the message carries its error and traceback tail.
    """
    try:
        token = token_path(cfg).read_text().strip()
    except OSError as e:
        raise SparkServerUnavailable(f"no spark server token at {token_path(cfg)}: {e}") from None
    h = health(url)
    if not h or not h.get("ready"):
        raise SparkServerUnavailable(f"spark server at {url} is not ready: {h}")
    body = json.dumps({"job": job, "dt": dt, "config": cfg.model_dump(mode="json"),
                       "kwargs": kwargs or {}}, default=str).encode()
    req = urllib.request.Request(f"{url}/run", data=body, method="POST",
                                 headers={"Content-Type": "application/json", _TOKEN_HEADER: token})
    out: dict[str, Any] | None = None
    deadline = time.time() + timeout_s
    try:  # the server writes a line at least every HEARTBEAT_S: a silent socket means a lost server
        with urllib.request.urlopen(req, timeout=max(10 * HEARTBEAT_S, 60)) as r:
            for raw in r:
                msg = json.loads(raw)
                if "log" in msg:
                    log.info("[spark-server] %s", msg["log"])
                else:
                    out = msg
                if time.time() > deadline:  # not "unavailable": the job must not start again here
                    raise RuntimeError(f"{job} dt={dt} still running on the spark server after "
                                       f"{timeout_s:.0f}s; stopped waiting for it")
    except urllib.error.HTTPError as e:
        raise SparkServerUnavailable(f"spark server at {url} refused {job} (HTTP {e.code}): "
                                     f"{_error_text(e)}") from None
    except (OSError, ValueError) as e:
        raise SparkServerUnavailable(f"spark server at {url} lost while running {job}: {e}") from None
    if out is None:
        raise SparkServerUnavailable(f"spark server at {url} closed the stream of {job} without a result")
    if not out.get("ok"):
        raise _job_error(out, f"{job} dt={dt} failed on the spark server")
    return out["result"]


def _error_text(e: urllib.error.HTTPError) -> str:
    try:
        return json.loads(e.read()).get("error", "")[:1000]
    except (OSError, ValueError, AttributeError):
        return ""


def _job_error(out: dict[str, Any], what: str) -> Exception:
    """The job's exception, with its own type where that type is the project's or a builtin one
    (so a task fails the same way on the server as in-process), else a RuntimeError; the message
    carries the server-side traceback tail."""
    import builtins
    import importlib

    msg = f"{what}: {out.get('error_type')}: {out.get('error')}\n{(out.get('traceback') or '')[-4000:]}"
    module, _, name = str(out.get("error_class") or "").partition(":")
    cls: Any = None
    try:
        if module == "builtins":
            cls = getattr(builtins, name, None)
        elif module.split(".")[0] in ("onerec_prod", "jobs"):
            cls = importlib.import_module(module)
            for part in name.split("."):
                cls = getattr(cls, part)
    except (ImportError, AttributeError):
        cls = None
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(msg)
        except Exception:  # noqa: BLE001 (an exception type with another constructor)
            pass
    return RuntimeError(msg)


# --------------------------------------------------------------------------------------
# CLI: onerec-prod spark-server


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["serve", "health"], nargs="?", default="serve",
                   help="serve (default): run the server in the foreground; health: print its state.")


def main(args: argparse.Namespace, cfg: Config) -> int:
    if args.action == "health":
        h = health(server_url(cfg))
        print(json.dumps(h, indent=2) if h else f"no spark server at {server_url(cfg)}")
        return 0 if h and h.get("ready") else 1
    serve(cfg)
    return 0
