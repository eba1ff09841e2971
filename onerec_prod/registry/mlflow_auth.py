"""Users of the cluster's MLflow server: the pipeline (writes) and serving (reads only).

The server runs MLflow's basic-auth app (``mlflow server --app-name basic-auth``,
``infra/k8s/base/mlflow.yaml``) with ``default_permission = NO_PERMISSIONS``: a request without
credentials gets 401, and a user sees only what it was granted. Two users, each from its own
Kubernetes Secret, so that a compromised serving pod cannot move ``champion``:

- the pipeline (Secret ``onerec-mlflow-pipeline``; Airflow tasks, training, RL, the evaluate /
  gate / promote / precompute pods): ``MANAGE`` on the experiment and the registered model
  (create runs, register versions, move aliases);
- serving (Secret ``onerec-mlflow-serving``): ``READ`` on both (resolve ``champion``, download
  the version's files); an alias move answers 403.

Each client reads its credentials from ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``
(MLflow's own variables, set by ``envFrom`` of the Secret). :func:`ensure_users` is the one-time,
idempotent set-up run by the Job ``infra/k8s/mlflow/users-init-job.yaml`` with the admin's
credentials (Secret ``onerec-mlflow-admin``); rerunning it rotates the passwords to the Secrets'
current values and re-grants.

    python -m onerec_prod.registry.mlflow_auth --config configs/cluster.yaml
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass

log = logging.getLogger(__name__)

PIPELINE_PERMISSION, SERVING_PERMISSION = "MANAGE", "READ"


@dataclass(frozen=True)
class User:
    username: str
    password: str

    @classmethod
    def from_env(cls, prefix: str) -> User:
        """``<prefix>_USERNAME`` / ``<prefix>_PASSWORD``; a missing or empty one is an error."""
        name, pw = os.environ.get(f"{prefix}_USERNAME", ""), os.environ.get(f"{prefix}_PASSWORD", "")
        if not name or not pw:
            raise SystemExit(f"{prefix}_USERNAME and {prefix}_PASSWORD must be set (from their Secret)")
        return cls(name, pw)


def _exists(e: Exception) -> bool:
    return getattr(e, "error_code", "") == "RESOURCE_ALREADY_EXISTS" or "already exists" in str(e).lower()


def ensure_users(tracking_uri: str, experiment: str, model_name: str, artifact_location: str | None,
                 pipeline: User, serving: User) -> dict[str, str]:
    """Create (or re-password) both users, the experiment and the registered model, and grant
    the pipeline MANAGE and serving READ on both. Runs with the admin's ``MLFLOW_TRACKING_*``.

    Returns:
        ``{"experiment_id", "model", "pipeline", "serving"}``.
    """
    from mlflow import MlflowClient
    from mlflow.server.auth.client import AuthServiceClient

    auth = AuthServiceClient(tracking_uri)
    for user in (pipeline, serving):
        try:
            auth.create_user(user.username, user.password)
            log.info("created MLflow user %s", user.username)
        except Exception as e:
            if not _exists(e):
                raise
            auth.update_user_password(user.username, user.password)
            log.info("MLflow user %s exists: password set to the Secret's value", user.username)
    c = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else c.create_experiment(experiment, artifact_location=artifact_location)
    try:
        c.create_registered_model(model_name)
    except Exception as e:
        if not _exists(e):
            raise
    for user, perm in ((pipeline, PIPELINE_PERMISSION), (serving, SERVING_PERMISSION)):
        for rtype, rid in (("experiment", str(exp_id)), ("registered_model", model_name)):
            try:
                auth.grant_user_permission(user.username, rtype, rid, perm)
            except Exception as e:  # granted before: set it to exactly this permission
                if not _exists(e):
                    raise
                auth.revoke_user_permission(user.username, rtype, rid)
                auth.grant_user_permission(user.username, rtype, rid, perm)
        log.info("MLflow user %s: %s on experiment %s and registered model %s", user.username, perm,
                 experiment, model_name)
    return {"experiment_id": str(exp_id), "model": model_name, "pipeline": pipeline.username,
            "serving": serving.username}


def main(argv: list[str] | None = None) -> int:
    from onerec_prod.config import load_config

    p = argparse.ArgumentParser(description="Create the pipeline (write) and serving (read-only) MLflow users.")
    p.add_argument("--config", default=os.environ.get("ONEREC_CONFIG", "configs/cluster.yaml"))
    p.add_argument("--tracking-uri", default=None, help="Default: registry.tracking_uri of the config.")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(a.config)
    if not os.environ.get("MLFLOW_TRACKING_USERNAME"):
        raise SystemExit("MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD: the admin's (Secret onerec-mlflow-admin)")
    out = ensure_users(a.tracking_uri or cfg.mlflow_uri, cfg.registry.experiment, cfg.registry.model_name,
                       cfg.registry.artifacts(cfg.paths.var), User.from_env("ONEREC_MLFLOW_PIPELINE"),
                       User.from_env("ONEREC_MLFLOW_SERVING"))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
