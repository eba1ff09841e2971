"""Local Airflow for the embedded default: started, driven and stopped by the project itself.

``onerec-prod airflow up``        migrate the sqlite DB, create the GPU pool, start the API server,
                                  the DAG processor and the scheduler (LocalExecutor), and with
                                  ``spark.shared_session`` the Spark server that runs every Spark
                                  task in one warm session (:mod:`onerec_prod.spark_server`); wait
                                  until all are healthy
``onerec-prod airflow backfill --from-date A --to-date B``
                                  Airflow's own backfill of onerec_daily, in date order, one run at
                                  a time; waits and reports each run's state
``onerec-prod airflow down``      stop what ``up`` started (by PID)

Everything lives under ``<var>/airflow`` (AIRFLOW_HOME); the DAG folder is the repo's ``dags/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from onerec_prod.config import REPO_ROOT, Config

log = logging.getLogger(__name__)
DAG_ID = "onerec_daily"
SERVICES = ("api-server", "dag-processor", "scheduler")
SPARK_SERVER = "spark-server"  # with spark.shared_session: one warm Spark driver for every Spark task


def airflow_home(cfg: Config) -> Path:
    return cfg.paths.var / "airflow"


def _airflow_bin() -> str:
    cand = Path(sys.executable).parent / "airflow"
    return str(cand) if cand.exists() else "airflow"


# sqlite3's default 5 s busy timeout is too short when the scheduler, the API server and a CLI
# call write the same file on a loaded 2-core machine ("database is locked"); Airflow imports
# these by dotted path ([database] sql_alchemy_connect_args / _async).
SQLITE_CONNECT_ARGS: dict = {"timeout": 60}
SQLITE_CONNECT_ARGS_ASYNC: dict = {"timeout": 60}


def airflow_env(cfg: Config, config_path: str | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of every Airflow process (and so of every task)."""
    home = airflow_home(cfg)
    home.mkdir(parents=True, exist_ok=True)
    secret_file = home / "jwt_secret"
    if not secret_file.exists():
        secret_file.write_text(secrets.token_urlsafe(32))
        secret_file.chmod(0o600)
    port = cfg.airflow.api_port
    env = dict(os.environ)
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "2",
        "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "2",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS": f"{__name__}.SQLITE_CONNECT_ARGS",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS_ASYNC": f"{__name__}.SQLITE_CONNECT_ARGS_ASYNC",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(cfg.airflow.log_server_port),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__API_AUTH__JWT_SECRET": secret_file.read_text().strip(),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "30",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "TOKENIZERS_PARALLELISM": "false",
        "DS_BUILD_OPS": "0",
        "PYTHONUNBUFFERED": "1",
    })
    if config_path:
        env["ONEREC_CONFIG"] = str(Path(config_path).resolve())
    env.update(extra or {})
    if cfg.spark.shared_session:  # the Spark tasks submit to the one server `up` starts
        from onerec_prod.spark_server import ENV_URL, server_url

        env[ENV_URL] = server_url(cfg)
    return env


def _af(cfg: Config, env: dict[str, str], *args: str, check: bool = True, capture: bool = True,
        retries: int = 8):
    cmd = [_airflow_bin(), *args]
    for attempt in range(retries + 1):
        res = subprocess.run(cmd, env=env, capture_output=capture, text=True)
        # a CLI write that lost the sqlite lock rolled back whole: safe to run again
        if res.returncode == 0 or "database is locked" not in (res.stderr or "") or attempt == retries:
            break
        log.warning("`airflow %s`: sqlite database is locked; retry %d/%d", " ".join(args), attempt + 1, retries)
        time.sleep(2 + 3 * attempt)
    if check and res.returncode != 0:
        raise RuntimeError(
            f"`airflow {' '.join(args)}` failed (rc={res.returncode}):\n{(res.stderr or '')[-3000:]}"
        )
    return res


def _pids_file(cfg: Config) -> Path:
    return airflow_home(cfg) / "pids.json"


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v2/monitor/health", timeout=3) as r:
            return r.status == 200
    except OSError:
        return False


def up(cfg: Config, config_path: str | None, extra_env: dict[str, str] | None = None, timeout_s: float = 240) -> dict:
    """Migrate, create the pool, start the services (and the Spark server); idempotent (reuses live ones)."""
    env = airflow_env(cfg, config_path, extra_env)
    home = airflow_home(cfg)
    pids = _read_pids(cfg)
    if pids and all(_alive(p) for p in pids.values()):
        log.info("local airflow already running: %s", pids)
        return pids
    down(cfg)
    log.info("airflow db migrate (home=%s)", home)
    _af(cfg, env, "db", "migrate")
    _af(cfg, env, "pools", "set", cfg.airflow.gpu_pool, str(cfg.airflow.gpu_pool_slots),
        "GPU pool: training, RL, eval and precompute tasks")
    pids = {}
    commands = {svc: [_airflow_bin(), svc] for svc in SERVICES}
    if cfg.spark.shared_session:
        # first: its JVM start is the longest, and it overlaps with Airflow's own start-up
        commands = {SPARK_SERVER: [sys.executable, "-m", "onerec_prod.cli", "spark-server"], **commands}
    for svc, cmd in commands.items():
        logf = open(home / f"{svc}.log", "ab")  # noqa: SIM115 (kept open by the child)
        p = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT,
                             start_new_session=True, cwd=str(REPO_ROOT))
        pids[svc] = p.pid
    _pids_file(cfg).write_text(json.dumps(pids))
    t0 = time.time()
    while not _healthy(cfg.airflow.api_port):
        if time.time() - t0 > timeout_s:
            down(cfg)
            raise RuntimeError(f"airflow api-server not healthy after {timeout_s}s; see {home}/api-server.log")
        dead = [s for s, p in pids.items() if not _alive(p)]
        if dead:
            down(cfg)
            raise RuntimeError(f"airflow {dead} exited at start; see {home}/{dead[0]}.log")
        time.sleep(2)
    if SPARK_SERVER in pids:
        from onerec_prod.spark_server import SparkServerUnavailable, server_url, wait_ready

        try:
            wait_ready(server_url(cfg), max(timeout_s - (time.time() - t0), 30),
                       alive=lambda: _alive(pids[SPARK_SERVER]))
        except SparkServerUnavailable as e:
            down(cfg)
            raise RuntimeError(f"{e}; see {home}/{SPARK_SERVER}.log") from None
    log.info("local airflow up in %.0fs: %s (api http://127.0.0.1:%d)", time.time() - t0, pids, cfg.airflow.api_port)
    return pids


def _read_pids(cfg: Config) -> dict[str, int]:
    f = _pids_file(cfg)
    return json.loads(f.read_text()) if f.exists() else {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie child counts as dead
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def down(cfg: Config, grace_s: float = 20) -> None:
    """Stop the services that ``up`` started (their whole process groups)."""
    pids = _read_pids(cfg)
    for pid in pids.values():
        try:
            os.killpg(pid, signal.SIGTERM)
        except OSError:
            continue
    t0 = time.time()
    while any(_alive(p) for p in pids.values()) and time.time() - t0 < grace_s:
        time.sleep(0.5)
    for pid in pids.values():
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
        try:  # reap our own children (started by this process's `up`), so no zombie lingers
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
    if pids:
        log.info("local airflow stopped: %s", pids)
    _pids_file(cfg).unlink(missing_ok=True)


@contextmanager
def running(cfg: Config, config_path: str | None, extra_env: dict[str, str] | None = None):
    """``with running(cfg, path): ...`` — Airflow up for the block, always stopped after."""
    up(cfg, config_path, extra_env)
    try:
        yield airflow_env(cfg, config_path, extra_env)
    finally:
        down(cfg)


def wait_for_dag(cfg: Config, env: dict[str, str], timeout_s: float = 180) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        # an import error is fatal: say so at once instead of waiting for the DAG to appear
        errs = _af(cfg, env, "dags", "list-import-errors", "-o", "json", check=False).stdout or ""
        if "onerec_daily.py" in errs:
            raise RuntimeError(f"DAG import error (see {airflow_home(cfg)}/dag-processor.log): {errs[-2000:]}")
        res = _af(cfg, env, "dags", "list", "-o", "json", check=False)
        if res.returncode == 0 and DAG_ID in res.stdout:
            return
        time.sleep(3)
    raise RuntimeError(f"DAG {DAG_ID} not parsed after {timeout_s}s; see {airflow_home(cfg)}/dag-processor.log")


def dag_runs(cfg: Config, env: dict[str, str]) -> list[dict]:
    res = _af(cfg, env, "dags", "list-runs", DAG_ID, "-o", "json", check=False)
    out = res.stdout or ""
    # airflow may print warning lines before the JSON: take the line that opens the list
    start = next((i for i, ln in _line_offsets(out) if ln.startswith("[{") or ln.strip() == "[]"), -1)
    try:
        return json.loads(out[start:]) if start >= 0 else []
    except json.JSONDecodeError:
        return []


def overrides_env(overrides: list[str]) -> dict[str, str]:
    """``group.key=value`` overrides as the ``ONEREC__GROUP__KEY`` variables the DAG's tasks read."""
    return {"ONEREC__" + o.split("=", 1)[0].upper().replace(".", "__"): o.split("=", 1)[1] for o in overrides}


def task_progress(cfg: Config, run_id: str) -> str:
    """One line on a run's tasks: ``k/N tasks done; running: a, b``, read-only from the local
    sqlite metadata DB (a second CLI call per poll would cost seconds of CPU); '' if unreadable."""
    import sqlite3

    db = airflow_home(cfg) / "airflow.db"
    if not run_id or not db.exists():
        return ""
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            rows = con.execute("SELECT task_id, state FROM task_instance WHERE dag_id = ? AND run_id = ?",
                               (DAG_ID, run_id)).fetchall()
        finally:
            con.close()
    except sqlite3.Error:
        return ""
    if not rows:
        return ""
    done = sum(1 for _, st in rows if st in ("success", "skipped", "failed", "upstream_failed"))
    running = sorted(t for t, st in rows if st in ("running", "queued", "scheduled", "up_for_retry"))
    return f"{done}/{len(rows)} tasks done" + (f"; running: {', '.join(running)}" if running else "")


def task_durations(cfg: Config) -> dict[str, dict[str, float]]:
    """``{day: {task_id: seconds}}`` of onerec_daily's finished task instances, read-only from the
    local sqlite metadata DB (Airflow's own durations: task process start to end, last try);
    {} when there is no DB yet."""
    import sqlite3

    db = airflow_home(cfg) / "airflow.db"
    if not db.exists():
        return {}
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            rows = con.execute(
                "SELECT dr.logical_date, ti.task_id, ti.duration FROM task_instance ti JOIN dag_run dr "
                "ON ti.dag_id = dr.dag_id AND ti.run_id = dr.run_id WHERE ti.dag_id = ? "
                "AND ti.state IN ('success', 'failed') AND ti.duration IS NOT NULL", (DAG_ID,)).fetchall()
        finally:
            con.close()
    except sqlite3.Error as e:
        log.warning("task durations unreadable from %s: %s", db, e)
        return {}
    out: dict[str, dict[str, float]] = {}
    for logical_date, task_id, duration in rows:
        out.setdefault(str(logical_date)[:10], {})[task_id] = round(float(duration), 1)
    return out


def backfill(cfg: Config, env: dict[str, str], from_date: str, to_date: str, timeout_s: float = 6 * 3600) -> list[dict]:
    """Airflow's own backfill of the range; waits for every run; returns runs with their states."""
    wait_for_dag(cfg, env)
    _af(cfg, env, "dags", "unpause", DAG_ID)
    _af(cfg, env, "backfill", "create", "--dag-id", DAG_ID, "--from-date", from_date, "--to-date", to_date,
        "--max-active-runs", "1", "--reprocess-behavior", "failed")
    log.info("backfill %s..%s created; waiting for runs", from_date, to_date)
    t0, last, last_progress = time.time(), None, None
    while True:
        runs = [r for r in dag_runs(cfg, env) if from_date <= str(r.get("logical_date", ""))[:10] <= to_date]
        states = {str(r.get("logical_date", ""))[:10]: r.get("state") for r in runs}
        if states != last:
            log.info("backfill runs: %s", dict(sorted(states.items())))
            last = states
        for r in runs:
            if r.get("state") == "running":
                line = task_progress(cfg, str(r.get("dag_run_id") or r.get("run_id") or ""))
                if line and line != last_progress:
                    log.info("%s: %s", str(r.get("logical_date", ""))[:10], line)
                    last_progress = line
        if runs and all(s in ("success", "failed") for s in states.values()):
            expected = _days(from_date, to_date)
            if set(states) >= set(expected):
                return sorted(runs, key=lambda r: str(r.get("logical_date")))
        if any(s == "failed" for s in states.values()):
            # one active run at a time: later days cannot succeed once a day failed
            return sorted(runs, key=lambda r: str(r.get("logical_date")))
        if time.time() - t0 > timeout_s:
            raise RuntimeError(f"backfill not finished after {timeout_s}s: {states}")
        time.sleep(cfg.airflow.poll_interval_s)


def _line_offsets(text: str):
    pos = 0
    for ln in text.splitlines(keepends=True):
        yield pos, ln
        pos += len(ln)


def _days(a: str, b: str) -> list[str]:
    from datetime import date, timedelta

    d0, d1 = date.fromisoformat(a), date.fromisoformat(b)
    return [(d0 + timedelta(days=i)).isoformat() for i in range((d1 - d0).days + 1)]


def failed_task_logs(cfg: Config, max_chars: int = 4000) -> str:
    """Tail of the newest task log that mentions an error (for a clear failure message)."""
    logs = sorted((p for p in (airflow_home(cfg) / "logs").rglob("*.log") if "task_id=" in str(p)),
                  key=lambda p: p.stat().st_mtime)
    for p in reversed(logs):
        txt = p.read_text(errors="replace")
        if "Traceback" in txt or '"level":"error"' in txt or "ERROR" in txt:
            return f"{p}:\n{txt[-max_chars:]}"
    return ""


# --------------------------------------------------------------------------------------
# CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["up", "down", "backfill", "status"], help="What to do.")
    p.add_argument("--from-date", help="backfill: first logical date (YYYY-MM-DD).")
    p.add_argument("--to-date", help="backfill: last logical date (inclusive).")
    p.add_argument("--keep-running", action="store_true", help="backfill: leave Airflow up afterwards.")


def main(args: argparse.Namespace, cfg: Config) -> int:
    cfg_path = args.config or os.environ.get("ONEREC_CONFIG")
    extra = {k: v for k, v in os.environ.items() if k.startswith("ONEREC__")}
    extra.update(overrides_env(args.set))
    if args.action == "up":
        print(json.dumps(up(cfg, cfg_path, extra)))
    elif args.action == "down":
        down(cfg)
    elif args.action == "status":
        pids = _read_pids(cfg)
        print(json.dumps({s: {"pid": p, "alive": _alive(p)} for s, p in pids.items()}, indent=2))
        print(json.dumps(dag_runs(cfg, airflow_env(cfg, cfg_path, extra)), indent=2))
    else:
        if not (args.from_date and args.to_date):
            raise SystemExit("backfill needs --from-date and --to-date")
        env = airflow_env(cfg, cfg_path, extra)
        up(cfg, cfg_path, extra)
        try:
            runs = backfill(cfg, env, args.from_date, args.to_date)
        finally:
            if not args.keep_running:
                down(cfg)
        for r in runs:
            print(f"{str(r.get('logical_date'))[:10]}  {r.get('state')}")
        return 0 if runs and all(r.get("state") == "success" for r in runs) else 1
    return 0
