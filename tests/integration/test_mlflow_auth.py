"""The cluster's MLflow authentication on a real ``mlflow server --app-name basic-auth`` (127.0.0.1).

The server reads the ``basic_auth.ini`` of infra/k8s/base/mlflow.yaml (its database placeholder
filled in as the init container does, with a sqlite file here); ``mlflow_auth.ensure_users`` runs
as the admin as the users-init Job does. Then: no credentials -> 401; the pipeline user moves
``champion``; the serving user reads it but its alias move is refused (403) and nothing moved.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(900)  # the server starts in ~1 min on an idle 2-core box


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ini_template() -> str:
    docs = yaml.safe_load_all((REPO / "infra/k8s/base/mlflow.yaml").read_text())
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "mlflow-auth-config"]
    return cm["data"]["basic_auth.ini"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import httpx

    tmp = tmp_path_factory.mktemp("mlflow_auth")
    ini = tmp / "basic_auth.ini"
    ini.write_text(_ini_template().replace("@MLFLOW_AUTH_DATABASE_URI@", f"sqlite:///{tmp / 'auth.db'}"))
    port = _port()
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
           "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-test-only-0", "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(k, None)
    log = open(tmp / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
         "--serve-artifacts", "--artifacts-destination", str(tmp / "artifacts")],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    try:
        while True:
            assert proc.poll() is None, (tmp / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=10).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.5)
        yield url
    finally:  # also when it never came up: no server outlives the test
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _as(monkeypatch, user: str, pw: str) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", pw)


def test_pipeline_writes_serving_reads_anonymous_refused(server, monkeypatch):
    import httpx
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from onerec_prod.registry import mlflow_auth

    pipeline = mlflow_auth.User("onerec-pipeline", "pipeline-test-only-0")
    serving = mlflow_auth.User("onerec-serving", "serving-test-only-0")
    _as(monkeypatch, "admin", "admin-test-only-0")
    out = mlflow_auth.ensure_users(server, "onerec-daily", "onerec", None, pipeline, serving)
    # idempotent: a rerun (a rotated Secret) sets the passwords again and re-grants
    serving = mlflow_auth.User(serving.username, "serving-rotated-0")
    assert mlflow_auth.ensure_users(server, "onerec-daily", "onerec", None, pipeline, serving) == out

    # no credentials: nothing, not even a read
    r = httpx.get(f"{server}/api/2.0/mlflow/registered-models/get", params={"name": "onerec"})
    assert r.status_code == 401

    # the pipeline registers two versions and moves champion
    _as(monkeypatch, pipeline.username, pipeline.password)
    c = MlflowClient(tracking_uri=server, registry_uri=server)
    run = c.create_run(out["experiment_id"])
    versions = [c.create_model_version("onerec", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id).version
                for _ in range(2)]
    c.set_registered_model_alias("onerec", "champion", versions[0])

    # serving resolves champion; moving it is refused and nothing moved
    _as(monkeypatch, serving.username, serving.password)
    s = MlflowClient(tracking_uri=server, registry_uri=server)
    assert s.get_model_version_by_alias("onerec", "champion").version == versions[0]
    with pytest.raises(MlflowException, match="(?i)permission"):
        s.set_registered_model_alias("onerec", "champion", versions[1])
    with pytest.raises(MlflowException, match="(?i)permission"):
        s.create_run(out["experiment_id"])
    _as(monkeypatch, serving.username, "serving-test-only-0")  # the password before the rotation
    with pytest.raises(MlflowException, match="(?i)401|credential|unauthori"):
        MlflowClient(tracking_uri=server, registry_uri=server).get_registered_model("onerec")
    _as(monkeypatch, pipeline.username, pipeline.password)
    assert c.get_model_version_by_alias("onerec", "champion").version == versions[0]
